"""Numba kernels (backend "numba"): parallel ``@njit`` versions of every path of the Cython backend.

The four functions of the backend interface (see :mod:`fastbn._reference`) work on C-contiguous
``(outer, C, inner)`` views of float32 or float64 data; ``inner == 1`` is the channels-last case.

Numerics
--------
* Statistics are accumulated in float64 about a per-channel shift (the channel's first value), so a
  constant channel has an exact mean and a zero M2. Each block of the data gives (count, mean, M2)
  from per-lane shifted sums; blocks are merged with Chan's formula in a fixed order. The
  channels-last float32 gradient sums of fewer than 1024 channels are summed in float32 over
  eight rows about the float32 mean before each addition into float64, as in the Cython backend
  (see _rows_grad32).
* The decomposition into blocks depends only on the shape, never on the thread count, and every
  partial result is written to its own slot and combined in a fixed order: results are bitwise
  identical for any number of threads (and for the serial fallback below).
* No ``fastmath``: the reductions vectorize because they are written as several independent
  accumulators (per-lane arrays that the loop vectorizer handles without reassociation).
* Normalization is ``((x - mean_hi) - mean_lo) * scale + shift`` in the compute dtype, where
  ``mean_hi`` is the float64 mean rounded to that dtype and ``mean_lo`` the rounded remainder: a
  float32 input with a large offset loses no digits in the subtraction.
* ReLU is ``0 if y <= 0 else y``: NaN passes through.

Channels-first blocks
---------------------
Block j of a channel is a run of images n (one image for rows longer than ``RUN``, and a piece
of its row for rows longer than ``BLOCK``), about ``BLOCK`` values at most; its shifted sums go
to the slot (channel, j). The work is shared out in units that read memory in order. With short
rows (``inner <= RUN``, e.g. 7x7 images) a unit is one block of ``RUN // inner`` adjacent
channels, whose rows form one contiguous run per image; its lanes run across that run with one
shift or mean per element, so a 49-value row costs no call, no remainder loop and no lane reset.
The element-wise passes of short rows (normalization, dx) go through the tensor in memory order
instead, in runs across channels where each vector takes the constants of the one or two
channels it covers (``_norm_seg_run``, ``_dx_seg_run``).
With long rows a block is one image's row (or a piece of it), cut into rows of
``LANES`` lanes, and a unit is the blocks of up to ``LONG_RUN // inner`` adjacent channels of
one image: the units follow memory order. Every lane belongs to one channel, so how channels are
shared out never changes a result (moments and training give the same statistics). Training
forward and backward run channel group by channel group (``GROUP_BYTES`` of input), so that
the second pass over a group finds it in cache.

Threading layer
---------------
Unless the user chose one (``NUMBA_THREADING_LAYER`` or ``numba.config.THREADING_LAYER``), fastbn
asks Numba to prefer the ``omp`` layer, then ``tbb``, then ``workqueue``. Measured here, on 2
cores: with ``tbb``, a Cython (libgomp) call right after a Numba call took 6.7 ms instead of
1.05 ms, because TBB's idle workers kept spinning on both cores; with ``omp`` both backends share
libgomp's one thread pool and neither slows the other (1.5 ms). The choice is process-wide and is
documented in ``show_config()``. fastbn adapts to whichever layer is active:

* ``omp`` (GNU OpenMP, thread-safe, not fork-safe: Numba terminates a forked child that starts a
  parallel region): in a child forked after the parent started the layer, fastbn's Numba calls fall
  back to the NumPy reference backend (correct, slower).
* ``tbb`` (the ``tbb`` package is a dependency, for machines without libgomp): thread-safe and
  fork-safe; used as is.
* ``workqueue`` (not thread-safe: concurrent parallel calls abort the process): fastbn's calls are
  serialized with a lock.

The thread count comes from ``fastbn.set_num_threads`` (or OpenMP's limit): it is applied with
``numba.set_num_threads`` inside each call and restored afterwards (Numba's mask is thread-local).

Compilation
-----------
Kernels compile lazily, each specialized on the dtype and on the flags of the call. The Python
wrappers pick one entry per combination of flags (residual, ReLU, streamed stores, training,
output given; see ``_specialized``): a closure whose flags Numba types as literals, so every
branch a call cannot take is pruned before it is compiled, and the element-wise loops below it
(``_seg_vectors``, ``_norm_rows``) compile only the one variant that call runs. A user pays for
the operations and flag combinations used, once: all entries and kernels are cached on disk
(``cache=True``; Numba writes cache files atomically, keys them on the source file's timestamp
and keys a closure by the values it closes over).

First calls on the 2-core AMD EPYC (Zen 4) VM, float32 (4, 32, 64, 64), each from an empty cache
in a fresh process, 2026-12-04: channels-first inference 7.3-9.7 s, training 17.2 s, backward
17.0 s (32x64x64x64, which streams its stores: 8.7, 30.8 and 35.9 s); channels-last 3.6, 7.4
and 10.5 s; on 2026-12-05, with the span sums as explicit vectors (_flush_intrinsic), training
12.6 s and backward 12.5 s (the float32 loops before them, in the same conditions: 13.1 and
14.7 s). When the entries took runtime flags (same VM and shapes), every kernel compiled each
combination it might run: 21.6, 50.9 and 38.8 s channels-first. From the
cache, import 0.25 s and first call 0.3 s. Each further flag combination compiles its entry
and the element-wise loop it calls (a few seconds).
"""
from __future__ import annotations

import functools
import math
import os
import platform
import threading

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, models, overload, register_model

from ._config import channel_group_bytes, gradient_prefetch, stream_above_bytes

__all__ = ["moments", "normalize", "train_forward", "backward"]

if "NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default":
    # One OpenMP pool shared with the Cython kernels: no oversubscription (see the docstring).
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]

# Independent float64 accumulators (lanes) over a long channels-first row.
LANES = 32
# Elements per statistics block (channels-first / channels-last).
BLOCK = 16384
BLOCK_NHWC = 65536
# Channels-first rows (inner) of at most RUN values are short: a work unit then holds whole rows
# of RUN // inner adjacent channels, one contiguous run per image n, and its loops run across
# the run with one shift or constant per element (no call and no remainder loop per 7x7 row).
RUN = 1024
# Long rows (RUN < inner < BLOCK): values per work unit, whole rows of adjacent channels of one
# image (at least one row; fewer while the channel range has fewer than MIN_TASKS units). Each
# unit costs about 0.2 us besides its spans (its bounds, its kind of sums, a call per span):
# one thread, 8x64x56x56 float32 moments, spans alone 170 us, through the 256 units of 8192
# values 215-225 us (Cython 172). Kernels alone, interleaved, Numba over Cython time, 8192 ->
# 24576 values a unit, 2 threads: 8x64x56x56 moments 1.30 -> 1.18, training 1.22 -> 1.15,
# backward 1.18 -> 1.13; 16x32x40x40 1.39 -> 1.30, 1.19 -> 1.14, 1.20 -> 1.16. (32768: the
# same on these, but rows of 12544 then went two channels a unit, and 4x64x112x112 backward
# seemed to lose 5-10% at two threads.)
LONG_RUN = 24576
# Bytes of input per channel group in the fused channels-first passes: the second pass over a
# group re-reads data that the first pass left in the cache (fastbn._config.channel_group_bytes).
GROUP_BYTES = channel_group_bytes()
# float32 rows summed in float32 before each addition into float64 (see _rows_grad32), for
# fewer than GRAD32_BELOW channels (as the Cython backend's GRAD_MEM_BELOW: wider rows keep the
# float64 lanes, whose sums of channels with much cancellation are more accurate).
FLUSH = 8
GRAD32_BELOW = 1024
# float32 channels-first moments of long rows (_span_moments32): the center from the first
# SAMPLE values, float64 again when sum(d*d) exceeds the span's M2 more than CANCEL times.
SAMPLE = 64
CANCEL = 4.0
# The float32 span sums (_span_moments32, _span_grad32) prefetch each cache line they read
# AHEAD32 (gradient sums) or MOMENTS_AHEAD32 values (8 KB, moments) ahead, as the Cython spans.
# Measured with their earlier loads through eight rows of LANES values side by side, which the
# hardware prefetchers follow less well than one sequential stream: moments alone,
# 32x256x56x56 (from memory), x copy: 1 thread 1.27 -> 1.04, 2 threads 1.01 -> 0.91 (Cython
# 0.96, 0.83); in L2 unchanged (1.09 -> 1.07); on an Intel Xeon, moments 32x64x112x112
# 0.78-0.82 -> 0.65-0.67, 32x256x56x56 0.96 -> 0.91 (2 KB -> 8 KB ahead). The sequential
# vectors of _sums_intrinsic, on a Zen 4: moments without the prefetch 0.63-0.65 against
# 0.65-0.69 (kept, for the Intel figures). The gradient sums prefetch when dy and x fit in
# half the last-level cache (8x64x56x56 backward Numba/Cython 1.41-1.55 -> 1.27-1.41), and
# from memory where fastbn._config.gradient_prefetch says so (Intel): an Intel Xeon guest,
# Numba/Cython in one run, 32x256x56x56 1.37 -> 1.27, 32x64x112x112 1.30 -> 1.14; on a Zen 4
# 32x256x56x56 backward 2.75-2.85 -> 3.54-3.62 x copy with it.
LINE32 = 16
AHEAD32 = 512
MOMENTS_AHEAD32 = 2048
GRAD_AHEAD_FROM_MEMORY = gradient_prefetch()
# Channels per chunk when merging channels-last partials in parallel.
MERGE_CHUNK = 256
# Channels at a time in the float32 channels-last moments (_rows_moments32), and the most row
# blocks they take (each block ends with a pass over its channels).
COLS = 1024
MAX_ROW_BLOCKS = 64
# Channels-first float32 moments of rows shorter than COLUMNS32_BELOW (7x7, 14x14 images) sum
# a block's columns in float32 trees (_cols_moments32) when a channel has COLUMNS32_FROM values
# or more in the block, as the Cython backend's columns (COLUMN_SPAN, FASTBN_COL_FLOAT32_FROM):
# fewer values cost little in float64 and keep small inputs' M2 within 1e-15 of NumPy's; longer
# rows keep the float64 lanes (M2 within 1e-10 of NumPy's at an offset of 1e4, float32 trees
# 3e-9).
COLUMNS32_BELOW = 256
GRAD32_SPANS_FROM = 128  # channels-first rows this long: float32 backward sums (see _unit_sums)
COLUMNS32_FROM = 1024
# Channels-first training (float32) and backward of rows of OVERLAP_FROM values or more, with
# streamed outputs, overlap the channel groups: one parallel pass sums group k (from memory)
# while it streams group k-1's output (from the cache), in the same loop (see _unit_pair). The
# Python wrappers pass OVERLAP (False: sums, then output, group by group; the same bits either
# way). Paired A/B on the Zen 3, float32, 2 threads, x copy: backward 32x64x112x112 2.66 ->
# 2.21 (with training unchanged as the control, paired ratio 0.998), masked 2.67 -> 2.23,
# 32x128x80x80 2.95 -> 2.61; training 32x64x112x112 1.98 -> 1.50, 32x128x80x80 2.09 -> 1.71.
# Rows of 3136 (56x56): training 2.21 -> 1.95 but backward unchanged with 2 threads, and with
# 1 thread 5-15% slower, so they keep the plain order.
OVERLAP = True
OVERLAP_FROM = 4096
# Channels-first rows shorter than SHORT_ROWS values go in groups of at least SHORT_GROUP_BYTES:
# the short-row passes lose more per group than the cache gives back. On an Intel Xeon (1 MB
# GROUP_BYTES), float32, 2 threads, ms with 1 / 4 / 16 MB groups: backward 64x2048x7x7 3.67 /
# 3.56 / 2.70, 32x576x14x14 1.89 / 1.59 / 1.40, 32x192x28x28 2.15 / 1.55 / 1.59; training 2.05 /
# 1.85 / 1.61, 1.10 / 0.88 / 0.82, 1.27 / 1.12 / 1.11; but rows of 3136 backward 32x256x56x56
# 12.3 / 12.8 / 15.1, training 7.1 / 7.3 / 8.2.
# So does a backward whose output is not streamed (the tensor fits in the cache, and so does
# its second read in any case): fewer groups, fewer parallel regions. Zen 3, float32, 2
# threads, Numba over Cython time, interleaved, 4 / 16 MB groups: 8x64x56x56 1.10-1.24 /
# 1.08-1.13, 16x64x56x56 1.12-1.28 / 1.11, 4x32x112x112 1.15-1.18 / 1.13; training was no
# faster that way (8x64x56x56 1.14-1.18 / 1.18-1.22) and keeps GROUP_BYTES.
SHORT_ROWS = 1024
SHORT_GROUP_BYTES = 16 << 20


def _group_bytes(inner, cached_backward=False):
    """Bytes of input per channel group for channels-first rows of `inner` values."""
    if inner >= SHORT_ROWS and not cached_backward:
        return GROUP_BYTES
    return max(GROUP_BYTES, SHORT_GROUP_BYTES)


# Values per task of the channels-first normalization of short rows: runs across channels in
# memory order (_norm_seg_run). Against the per-element constants of the statistics' units (20
# channels of all images, strided), x copy, 64x2048x7x7 float32 inference 1.71 -> 1.27 (Cython
# 1.18), training 2.37 -> 1.94 (Cython 2.17).
SEG_RUN = 4096
# Values per task of a streamed channels-first element-wise pass (see _units_per_task).
ELEMENTWISE_SPAN = 65536
MIN_TASKS = 16
# Work units per task of the sums passes (scratch allocated once per task).
UNIT_CHUNK = 4

# error_model="numpy": a float division by zero gives inf or NaN as in NumPy and C (the other
# backends), where Python's model raised ZeroDivisionError (training a constant channel with
# eps=0) and its zero test kept divisions from vectorizing.
_JIT = dict(cache=True, nogil=True, error_model="numpy")
_PARALLEL = dict(_JIT, parallel=True)


# ----------------------------------------------------------------------------- row helpers
# They work on rows of `width` elements of flat arrays, row r starting at start + r * stride.

@intrinsic
def _prefetch(typingctx, arr, index):
    """Prefetch the cache line of arr[index] for reading (llvm.prefetch); any index: a
    prefetch never faults."""
    sig = types.void(arr, index)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        address = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32]),
            "llvm.prefetch.p0")
        builder.call(fn, [address, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def _borrowed(typingctx, arr):
    """A view of the array `arr` (or None, returned as is) without its reference count.

    Numba increments and decrements the reference count of every array argument of a call
    (an atomic add on the array's memory info); with both threads calling kernels on views of
    the same arrays, span after span, the count's cache line went back and forth between the
    cores. Borrowed views only of arrays the caller keeps alive for the whole call (the
    kernel's arguments): nothing frees the data under them. Channels-first float32 moments of
    8x64x56x56, one call per span of 3136 values: 1 thread 304 -> 271 us, 2 threads 162 ->
    143 us (Cython 203 and 112)."""
    sig = arr(arr)

    def codegen(context, builder, signature, args):
        if not isinstance(signature.args[0], types.Array):
            return args[0]
        aryty = signature.args[0]
        source = context.make_array(aryty)(context, builder, args[0])
        view = context.make_array(aryty)(context, builder)
        for field in ("nitems", "itemsize", "data", "shape", "strides"):
            setattr(view, field, getattr(source, field))
        view.meminfo = cgutils.get_null_value(view.meminfo.type)
        view.parent = cgutils.get_null_value(view.parent.type)
        return view._getvalue()
    return sig, codegen


@intrinsic
def _keep(typingctx, owner):
    """Nothing, but a use of `owner`: Numba releases an array after its last use, so that the
    owner of borrowed views (see _borrowed) called with _keep after them outlives them."""
    def codegen(context, builder, signature, args):
        return context.get_dummy_value()
    return types.void(owner), codegen


def _sums_intrinsic(grad: bool):
    """An intrinsic: the span sums of n float32 values from index a (n a multiple of 16), as
    the Cython kernels' loop (fastbn_span_sums_f32, fastbn_span_grad_sums_f32) in 8-lane
    vectors: p, q += d (d = x - m), r, t += d * d, or for `grad` p, q += g and r, t += g * (x - m)
    (g = dy, masked by of > 0 when `masked`), FLUSH steps of 16 values at a time; after each
    flush p + q and r + t are widened to float64 and added into acc[0:4] and acc[4:8], which
    stay in registers for the whole span. Each step prefetches the lines `ahead` values on (0:
    none). In the vectors of Numba's own loops, the trees of eight 32-lane rows went through a
    scratch array and 64 float64 lanes in memory: one thread, spans of 3136 in L2, moments
    6.5 -> 10.9 values per ns; 32x256x56x56 moments, 2 threads, x copy 1.44-1.51 -> 0.72
    (Cython 0.67). With an intrinsic call per flush (acc in memory after each, the steps after
    the last full flush widened one by one) a 14x14 span's gradient sums took 35 ns in L1, in
    this loop 29 (spans of 3136 unchanged)."""
    @intrinsic
    def sums(typingctx, dyf, xf, of, a, n, m, acc, ahead, masked):
        if not _are_flags(masked):
            return None
        sig = types.void(dyf, xf, of, a, n, m, acc, ahead, masked)

        def codegen(context, builder, signature, args):
            dyt, xt, ot, _, _, _, acct, _, _ = signature.args
            dyv, xv, ov, av, nv, mv, accv, aheadv, _ = args
            v8 = ir.VectorType(ir.FloatType(), 8)
            v4 = ir.VectorType(ir.DoubleType(), 4)
            i64 = ir.IntType(64)
            zero = ir.Constant(v8, [0.0] * 8)
            m8 = _splat(builder, v8, mv)
            accp = context.make_array(acct)(context, builder, accv).data
            totals = [builder.bitcast(builder.gep(accp, [i64(k)]), v4.as_pointer())
                      for k in (0, 4)]
            sums = [cgutils.alloca_once_value(builder, builder.load(t, align=8))
                    for t in totals]
            lanes = [cgutils.alloca_once(builder, v8) for _ in range(4)]  # p, q, r, t
            end = builder.add(av, nv)

            def load(aryty, ary, index):
                data = context.make_array(aryty)(context, builder, ary).data
                return builder.load(builder.bitcast(builder.gep(data, [index]), v8.as_pointer()),
                                    align=4)

            def step(i, masked):
                j = builder.add(i, i64(8))
                with builder.if_then(builder.icmp_signed("!=", aheadv, i64(0))):
                    ahead_at = builder.add(i, aheadv)
                    for aryty, ary in ((dyt, dyv), (xt, xv), (ot, ov))[0 if grad else 1:
                                                                       3 if masked else 2]:
                        _prefetch_line(context, builder, aryty, ary, ahead_at)
                p, q, r, t = (builder.load(v) for v in lanes)
                u = builder.fsub(load(xt, xv, i), m8)
                w = builder.fsub(load(xt, xv, j), m8)
                if grad:
                    g, h = load(dyt, dyv, i), load(dyt, dyv, j)
                    if masked:
                        g = builder.select(builder.fcmp_ordered(">", load(ot, ov, i), zero),
                                           g, zero)
                        h = builder.select(builder.fcmp_ordered(">", load(ot, ov, j), zero),
                                           h, zero)
                    r = builder.fadd(r, builder.fmul(g, u))
                    t = builder.fadd(t, builder.fmul(h, w))
                    u, w = g, h
                else:
                    r = builder.fadd(r, builder.fmul(u, u))
                    t = builder.fadd(t, builder.fmul(w, w))
                for var, value in zip(lanes, (builder.fadd(p, u), builder.fadd(q, w), r, t)):
                    builder.store(value, var)

            def widen(v):
                halves = [builder.fpext(builder.shuffle_vector(
                    v, v, ir.Constant(ir.VectorType(ir.IntType(32), 4), list(range(h, h + 4)))),
                    v4) for h in (0, 4)]
                return builder.fadd(halves[0], halves[1])

            def emit(masked):
                flush = i64(16 * FLUSH)
                with cgutils.for_range_slice(builder, av, end, flush) as (i, _):
                    for var in lanes:
                        builder.store(zero, var)
                    last = builder.add(i, flush)
                    stop = builder.select(builder.icmp_signed("<", last, end), last, end)
                    with cgutils.for_range_slice(builder, i, stop, i64(16)) as (k, _):
                        step(k, masked)
                    p, q, r, t = (builder.load(v) for v in lanes)
                    for var, v in zip(sums, (builder.fadd(p, q), builder.fadd(r, t))):
                        builder.store(builder.fadd(builder.load(var), widen(v)), var)

            _by_flags(builder, signature.args[8:], args[8:], emit)
            for total, var in zip(totals, sums):
                builder.store(builder.load(var), total, align=8)
            return context.get_dummy_value()
        return sig, codegen
    return sums


def _prefetch_line(context, builder, aryty, ary, index):
    """llvm.prefetch of the cache line of ary[index] (for reading, into all levels)."""
    data = context.make_array(aryty)(context, builder, ary).data
    address = builder.bitcast(builder.gep(data, [index]), ir.IntType(8).as_pointer())
    i32 = ir.IntType(32)
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32]),
        "llvm.prefetch.p0")
    builder.call(fn, [address, i32(0), i32(3), i32(1)])


_SUMS_MOMENTS = _sums_intrinsic(False)
_SUMS_GRAD = _sums_intrinsic(True)


@njit(**_JIT)
def _lanes_moments(xf, start, rows, stride, width, shiftv, s, q, ahead=False):
    """Accumulate the rows into lanes s, q: s[k] += x - shift[k], q[k] += (x - shift[k])**2.

    In float64; eight rows are combined per update, so the lanes are loaded and stored once
    per eight elements and the loop's set-up (LLVM's alias checks) is paid once per eight
    rows (four rows per update: 401408x64 channels-last moments 3.5 ms, eight: see the note).

    `ahead`: prefetch the next eight rows first. The hardware prefetchers follow eight rows
    read side by side less well than one stream: for channels-last rows of 64-512 channels
    from memory this made moments 7.07 -> 6.12 ms (32x56x56x256) and 5.07 -> 3.67 ms
    (32x112x112x64), training 11.4 -> 10.9 and 10.6 -> 9.2 ms on the Zen 3; from the cache
    (8x56x56x64) and for 2048 channels (a burst of 1024 prefetches) it cost 2-10%.
    """
    r = 0
    while r + 8 <= rows:
        b = start + r * stride
        if ahead:
            for j in range(8, 16):
                for p in range(0, width, 64 // xf.itemsize):  # one per cache line
                    _prefetch(xf, b + j * stride + p)
        x0 = xf[b:b + width]
        x1 = xf[b + stride:b + stride + width]
        x2 = xf[b + 2 * stride:b + 2 * stride + width]
        x3 = xf[b + 3 * stride:b + 3 * stride + width]
        x4 = xf[b + 4 * stride:b + 4 * stride + width]
        x5 = xf[b + 5 * stride:b + 5 * stride + width]
        x6 = xf[b + 6 * stride:b + 6 * stride + width]
        x7 = xf[b + 7 * stride:b + 7 * stride + width]
        for k in range(width):
            sh = shiftv[k]
            d0 = x0[k] - sh
            d1 = x1[k] - sh
            d2 = x2[k] - sh
            d3 = x3[k] - sh
            d4 = x4[k] - sh
            d5 = x5[k] - sh
            d6 = x6[k] - sh
            d7 = x7[k] - sh
            s[k] += ((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7))
            q[k] += (((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3))
                     + ((d4 * d4 + d5 * d5) + (d6 * d6 + d7 * d7)))
        r += 8
    while r < rows:
        x0 = xf[start + r * stride:start + r * stride + width]
        for k in range(width):
            d0 = x0[k] - shiftv[k]
            s[k] += d0
            q[k] += d0 * d0
        r += 1


@njit(inline="always", **_JIT)
def _row_set(xf, o, n, m, a, aq):
    """a[c] = d, aq[c] = d * d for d = xf[o + c] - m[c] (one row of _tree8_by_rows)."""
    for c in range(n):
        d = xf[o + np.uint64(c)] - m[c]
        a[c] = d
        aq[c] = d * d


@njit(inline="always", **_JIT)
def _row_add(xf, o, n, m, a, aq):
    """a[c] += d, aq[c] += d * d for d = xf[o + c] - m[c]."""
    for c in range(n):
        d = xf[o + np.uint64(c)] - m[c]
        a[c] += d
        aq[c] += d * d


@njit(inline="always", **_JIT)
def _fold(a, aq, b, bq, n):
    for c in range(n):
        a[c] += b[c]
        aq[c] += bq[c]


@njit(**_JIT)
def _tree8_by_rows(xf, b, n, stride, m, u0, u1, v0, v1, w0, w1):
    """u0, u1 = the eight-row float32 trees of _rows_moments32 for the rows from b (`stride`
    values apart, n channels), ((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7)) and the same
    of the squares, built in L1 as the rows arrive, one whole row after another: the same
    operations, so the same bits, as reading the eight rows side by side, which the memory
    of a Zen 4 served at half the speed of a sequential read (the Cython backend does the
    same: fastbn_rows_sums_stream_f32)."""
    _row_set(xf, b, n, m, u0, u1)
    _row_add(xf, b + stride, n, m, u0, u1)
    _row_set(xf, b + np.uint64(2) * stride, n, m, v0, v1)
    _row_add(xf, b + np.uint64(3) * stride, n, m, v0, v1)
    _fold(u0, u1, v0, v1, n)
    _row_set(xf, b + np.uint64(4) * stride, n, m, v0, v1)
    _row_add(xf, b + np.uint64(5) * stride, n, m, v0, v1)
    _row_set(xf, b + np.uint64(6) * stride, n, m, w0, w1)
    _row_add(xf, b + np.uint64(7) * stride, n, m, w0, w1)
    _fold(v0, v1, w0, w1, n)
    _fold(u0, u1, v0, v1, n)


@njit(**_JIT)
def _trees32(xf, first, rows, stride, n, m, t1, t2, w32, by_rows):
    """t1[c] += sum(d), t2[c] += sum(d * d) over the rows from `first` (`stride` values apart)
    of columns c < n, d = x - m[c] in float32: eight rows per update added as a float32 tree,
    each tree widened into float64 in a loop of its own (see _span_moments32); the last rows
    as one more tree. `by_rows`: see _tree8_by_rows. w32 rows 1-6: the trees' scratch.
    Flat arrays at unsigned indices, no slices (see _rows_grad32)."""
    u0 = w32[1, :n]
    u1 = w32[2, :n]
    v0 = w32[3, :n]
    v1 = w32[4, :n]
    z0 = w32[5, :n]
    z1 = w32[6, :n]
    # Offsets of rows 1..7 as unsigned values computed outside the loop (an int64 times a
    # uint64 is a float64 in Numba; in the loop it cost 3x).
    w1, w2, w3 = np.uint64(stride), np.uint64(2 * stride), np.uint64(3 * stride)
    w4, w5, w6 = np.uint64(4 * stride), np.uint64(5 * stride), np.uint64(6 * stride)
    w7 = np.uint64(7 * stride)
    r = 0
    while r + 8 <= rows:
        b = first + np.uint64(r) * w1
        if by_rows:
            _tree8_by_rows(xf, b, n, w1, m, u0, u1, v0, v1, z0, z1)
        else:
            for c in range(n):
                i = b + np.uint64(c)
                mc = m[c]
                d0 = xf[i] - mc
                d1 = xf[i + w1] - mc
                d2 = xf[i + w2] - mc
                d3 = xf[i + w3] - mc
                d4 = xf[i + w4] - mc
                d5 = xf[i + w5] - mc
                d6 = xf[i + w6] - mc
                d7 = xf[i + w7] - mc
                u0[c] = ((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7))
                u1[c] = (((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3))
                           + ((d4 * d4 + d5 * d5) + (d6 * d6 + d7 * d7)))
        for c in range(n):
            t1[c] += np.float64(u0[c])
            t2[c] += np.float64(u1[c])
        r += 8
    if r < rows:
        for c in range(n):
            u0[c] = 0.0
            u1[c] = 0.0
        for j in range(r, rows):
            b = first + np.uint64(j) * w1
            for c in range(n):
                d = xf[b + np.uint64(c)] - m[c]
                u0[c] += d
                u1[c] += d * d
        for c in range(n):
            t1[c] += np.float64(u0[c])
            t2[c] += np.float64(u1[c])


@njit(inline="always", **_JIT)
def _trusted(sum1, sum2, count):
    """Whether float32 sums about a center can be re-centred: finite, not tiny, and no
    cancellation (a center far from the values' mean)."""
    return (np.isfinite(sum1) and np.isfinite(sum2) and sum2 >= count * 1e-30
            and sum1 * sum1 <= sum2 * count * (1.0 - 1.0 / CANCEL))


@njit(**_JIT)
def _rows_moments32(xf, start, rows, width, shift, s, q, by_rows, w32, w64):
    """Channels-last float32 statistics of `rows` contiguous rows of `width` channels from
    `start`, added to the float64 s[c] += sum(x - shift[c]), q[c] += sum((x - shift[c])**2):
    the Cython backend's scheme (fastbn_rows_sums_mem_f32). d = x - m in float32 about a
    float32 center m per channel (the first row plus the mean difference of the first eight
    rows; a sample of 64 rows, as Cython's, was a second pass over short blocks: one thread,
    32 rows of 2048 channels in L2, 4.1 -> 4.4 values per ns), summed by _trees32, then
    re-centred on shift. A channel whose sums are not trusted (_trusted) is summed again in
    float64. COLS channels at a time, so that the float64 totals stay in L1. `by_rows` (data
    from memory): the trees built one whole row after another (_tree8_by_rows); on a Zen 4,
    float32, 2 threads, x copy, interleaved, against the eight rows side by side: moments
    100352x256 1.45-1.48 -> 0.84-0.88, 401408x64 0.80 -> 0.71 (Cython 0.62-0.68). w32
    (7 x COLS float32) and w64 (2 x COLS float64): the calling task's scratch."""
    cols = min(width, COLS)
    stride = np.uint64(width)
    for c0 in range(0, width, cols):
        n = min(cols, width - c0)
        first = np.uint64(start + c0)
        m = w32[0, :n]
        t1 = w64[0, :n]
        t2 = w64[1, :n]
        for c in range(n):
            m[c] = xf[first + np.uint64(c)]
            t1[c] = 0.0
            t2[c] = 0.0
        if rows >= 8:  # the center: one update of eight rows, as _trees32's
            for c in range(n):
                i = first + np.uint64(c)
                mc = m[c]
                m[c] = mc + ((((xf[i] - mc) + (xf[i + stride] - mc))
                              + ((xf[i + np.uint64(2) * stride] - mc)
                                 + (xf[i + np.uint64(3) * stride] - mc)))
                             + (((xf[i + np.uint64(4) * stride] - mc)
                                 + (xf[i + np.uint64(5) * stride] - mc))
                                + ((xf[i + np.uint64(6) * stride] - mc)
                                   + (xf[i + np.uint64(7) * stride] - mc)))) / np.float32(8)
        _trees32(xf, first, rows, width, n, m, t1, t2, w32, by_rows)
        for c in range(n):
            sum1 = t1[c]
            sum2 = t2[c]
            if _trusted(sum1, sum2, rows):
                delta = np.float64(m[c]) - shift[c0 + c]
                s[c0 + c] += sum1 + rows * delta
                q[c0 + c] += sum2 + (2.0 * delta) * sum1 + rows * (delta * delta)
            else:
                for j in range(rows):
                    e = np.float64(xf[first + np.uint64(j) * stride + np.uint64(c)]) \
                        - shift[c0 + c]
                    s[c0 + c] += e
                    q[c0 + c] += e * e


@njit(**_JIT)
def _cols_moments32(xf, start, rows, stride, chans, inner, shift, sum1, sum2, w32, w64):
    """Channels-first float32 statistics of a block of short rows (7x7, 14x14 images): `rows`
    rows n from `start`, `stride` values apart, each holding `chans` channels of `inner` values
    side by side; sets sum1[c] = sum(x - shift[c]), sum2[c] = sum((x - shift[c])**2).

    The block's columns (a channel's position i) are summed down the rows by _trees32, about
    one float32 center per channel (its first value plus the mean difference of its first
    column's first eight rows), so a channel's column totals add up before the one re-centring
    on shift[c] and the one _trusted test, as the Cython backend's fastbn_cols_sums_f32; a
    test and re-centring per column cost 13 cycles a column, most of the time of 32-row blocks
    (32x1280x7x7 moments, one thread: 390 us in float64 lanes, 506 us so). A channel not
    trusted is summed again in float64. w32 (7 x COLS float32), w64 (2 x COLS float64): the
    calling task's scratch."""
    tile = max(1, COLS // inner)
    count = rows * inner
    w1 = np.uint64(stride)
    ahead = min(rows, 8)
    for k0 in range(0, chans, tile):
        nch = min(tile, chans - k0)
        n = nch * inner
        first = np.uint64(start + k0 * inner)
        m = w32[0, :n]
        t1 = w64[0, :n]
        t2 = w64[1, :n]
        for c in range(nch):
            i = first + np.uint64(c * inner)
            x0 = xf[i]
            d = np.float32(0.0)
            for r in range(1, ahead):
                d += xf[i + np.uint64(r) * w1] - x0
            m[c * inner:(c + 1) * inner] = x0 + d / np.float32(ahead)
        t1[:] = 0.0
        t2[:] = 0.0
        _trees32(xf, first, rows, stride, n, m, t1, t2, w32, False)
        for c in range(nch):
            o = c * inner
            a1 = b1 = c1 = e1 = 0.0  # four chains each: the column totals, in a fixed order
            a2 = b2 = c2 = e2 = 0.0
            i = 0
            while i + 4 <= inner:
                a1 += t1[o + i]
                b1 += t1[o + i + 1]
                c1 += t1[o + i + 2]
                e1 += t1[o + i + 3]
                a2 += t2[o + i]
                b2 += t2[o + i + 1]
                c2 += t2[o + i + 2]
                e2 += t2[o + i + 3]
                i += 4
            while i < inner:
                a1 += t1[o + i]
                a2 += t2[o + i]
                i += 1
            a1 = (a1 + b1) + (c1 + e1)
            a2 = (a2 + b2) + (c2 + e2)
            sh = shift[k0 + c]
            if _trusted(a1, a2, count):
                delta = np.float64(m[o]) - sh
                sum1[k0 + c] = a1 + count * delta
                sum2[k0 + c] = a2 + (2.0 * delta) * a1 + count * (delta * delta)
                continue
            a1 = a2 = 0.0
            for r in range(rows):
                b = first + np.uint64(r) * w1 + np.uint64(o)
                for j in range(inner):
                    e = np.float64(xf[b + np.uint64(j)]) - sh
                    a1 += e
                    a2 += e * e
            sum1[k0 + c] = a1
            sum2[k0 + c] = a2


@njit(**_JIT)
def _lanes_grad(dyf, dstart, dstride, xf, start, rows, stride, width, meanv, s, q, side=None,
                pos=0, sdyf=None, sof=None, sdxf=None):
    """Backward sums of the rows: s[k] += g, q[k] += g * (x - mean[k]), g = dy.

    Row r of dy starts at dstart + r * dstride, row r of x at start + r * stride. `side`: a
    streamed dx (of dy sdyf, mask sof, into sdxf) that advances by as many values per update,
    from `pos` (see _side_dx); returns where it stopped.
    """
    r = 0
    while r + 4 <= rows:
        b = start + r * stride
        d = dstart + r * dstride
        g0s = dyf[d:d + width]
        g1s = dyf[d + dstride:d + dstride + width]
        g2s = dyf[d + 2 * dstride:d + 2 * dstride + width]
        g3s = dyf[d + 3 * dstride:d + 3 * dstride + width]
        x0 = xf[b:b + width]
        x1 = xf[b + stride:b + stride + width]
        x2 = xf[b + 2 * stride:b + 2 * stride + width]
        x3 = xf[b + 3 * stride:b + 3 * stride + width]
        for k in range(width):
            m = meanv[k]
            g0 = np.float64(g0s[k])
            g1 = np.float64(g1s[k])
            g2 = np.float64(g2s[k])
            g3 = np.float64(g3s[k])
            s[k] += (g0 + g1) + (g2 + g3)
            q[k] += ((g0 * (x0[k] - m) + g1 * (x1[k] - m))
                     + (g2 * (x2[k] - m) + g3 * (x3[k] - m)))
        if side is not None:
            pos = _side_dx(side, pos, 4 * width, sdyf, xf, sof, sdxf)
        r += 4
    while r < rows:
        b = start + r * stride
        d = dstart + r * dstride
        g0s = dyf[d:d + width]
        x0 = xf[b:b + width]
        for k in range(width):
            g0 = np.float64(g0s[k])
            s[k] += g0
            q[k] += g0 * (x0[k] - meanv[k])
        r += 1
    return pos


def _is_float32(a):
    """Whether array `a` holds float32 (a compile-time constant in jitted code)."""
    return a.dtype == np.float32


@overload(_is_float32, inline="always")
def _is_float32_jit(a):
    flag = a.dtype == types.float32
    return lambda a: flag


def _flat(a):
    """The flat view of array `a`, or None for None (moments pass dy as None: see _lanes)."""
    return None if a is None else a.reshape(a.size)


@overload(_flat, inline="always")
def _flat_jit(a):
    if isinstance(a, types.NoneType):
        return lambda a: None
    return lambda a: a.reshape(a.size)


@njit(**_JIT)
def _rows_grad32(dyf, xf, of, has_out, start, rows, width, mean, s, q):
    """Channels-last float32 gradient sums of `rows` contiguous rows of `width` channels from
    `start`, added to the float64 s[c] = sum(g), q[c] = sum(g * (x - mean[c])), g = dy, or dy
    where the forward output `of` > 0 when `has_out` (in the loop: 32x56x56x256 masked backward
    27.6 -> 24.7 ms against the scratch copy of _grad_sums; Cython 22.9 ms): row by row
    into float32 lanes about the float32 mean, flushed into float64 every FLUSH rows, then
    corrected by (m - mean) * sum(g). The flat arrays are read at unsigned indices: a signed
    index b + c is tested for wraparound and the loop did not vectorize (3.6x slower), so the
    rows used to be slices, but each slice updates the array's reference count, a line both
    threads write: 8x56x56x64 gradient sums 1.64 (slices, `of` sliced unread) -> 1.13 (read
    slices only) -> 0.98-1.04 x copy (no slices), masked 1.39-1.74 -> 1.30-1.35. A channel
    whose sums are not finite or tiny (overflow, possible underflow) is summed again in float64.
    Channels-last backward on the Zen 3 (float64 lanes of _lanes_grad -> these; Cython in the
    same run): 32x56x56x256 17.2 -> 12.9 ms (12.1), 32x112x112x64 13.4 -> 12.7 ms (12.4),
    8x56x56x64 0.57 -> 0.53 ms (0.35)."""
    m = np.empty(width, np.float32)
    s32 = np.empty(width, np.float32)
    q32 = np.empty(width, np.float32)
    t1 = np.zeros(width)
    t2 = np.zeros(width)
    for c in range(width):
        m[c] = np.float32(mean[c])
    r = 0
    while r < rows:
        r1 = min(rows, r + FLUSH)
        s32[:] = 0.0
        q32[:] = 0.0
        if has_out:  # masked: loops of its own, so that both vectorize
            for j in range(r, r1):
                b = np.uint64(start + j * width)
                for c in range(width):
                    i = b + np.uint64(c)
                    g = np.float32(dyf[i]) if of[i] > 0 else np.float32(0.0)
                    s32[c] += g
                    q32[c] += g * np.float32(xf[i] - m[c])
        else:
            for j in range(r, r1):
                b = np.uint64(start + j * width)
                for c in range(width):  # float32 casts: no-ops (typed, not run, for float64)
                    i = b + np.uint64(c)
                    g = np.float32(dyf[i])
                    s32[c] += g
                    q32[c] += g * np.float32(xf[i] - m[c])
        for c in range(width):
            t1[c] += np.float64(s32[c])
            t2[c] += np.float64(q32[c])
        r = r1
    for c in range(width):
        sum2 = t2[c] + (np.float64(m[c]) - mean[c]) * t1[c]
        tiny = abs(sum2) < rows * 1e-30 and not (t1[c] == 0.0 and sum2 == 0.0)  # see Cython
        if np.isfinite(t1[c]) and np.isfinite(sum2) and not tiny:                # grad_redo
            s[c] += t1[c]
            q[c] += sum2
        else:
            for j in range(rows):
                k = start + j * width + c
                g = np.float64(dyf[k]) if not has_out or of[k] > 0 else 0.0
                s[c] += g
                q[c] += g * (xf[k] - mean[c])


@njit(**_JIT)
def _span_moments32(xf, b, n, shift, acc, side=None, pos=0, of=None, rf=None):
    """Shifted sums (sum(x - shift), sum((x - shift)**2)) of the float32 span xf[b:b + n] as
    the Cython backend computes them (fastbn_span_sums_f32): d = x - m in float32 about a
    center m taken from the first values (the first value plus the mean difference of the first
    SAMPLE), in float32 vectors FLUSH steps of 16 values at a time, then in float64 (see
    _sums_intrinsic), and re-centred on `shift`. acc: 8 float64 values of scratch.

    Returns (ok, sum1, sum2, pos); not ok (the caller sums in float64) for spans of fewer than
    8 * LANES values, sums that are not finite (NaN or inf, squares past float32's range) or
    tiny (a constant span, possible underflow), and a center far from the span's mean
    (sum(d)**2 close to n * sum(d*d): float32 cancellation). `side`, pos: a streamed
    normalization into `of` (residual rf) that advances by as many values per flush (see
    _side_norm); the returned pos is where it stopped.

    The float64 lanes convert every value; these compute in float32, twice as many per vector,
    and convert one vector per flush. Channels-first float32 moments, x copy, 2 threads, in one
    run: 32x256x56x56 1.46 -> 1.04, 32x64x112x112 1.26 -> 0.90 (Cython 0.72, 0.71) with trees of
    eight rows of LANES values in Numba's own loops; in the vectors of _sums_intrinsic, on a
    Zen 4: 1.44-1.51 -> 0.72-0.98 and 0.68 (Cython 0.66-0.68, 0.63). Errors against exact
    float64 as the Cython kernel's (offsets, outliers, ramps, steps)."""
    rows = n // LANES
    if rows < 8:
        return False, 0.0, 0.0, pos
    x0 = xf[b]
    # The sample's sum of x - x0 in the span loop's float32 vectors (as the Cython kernel sums
    # it): as a loop of its own, with Numba's index checks and the sums in acc[] (LLVM cannot
    # tell acc from xf), it took 10% of a 3136-value span's time.
    sample = min(n, SAMPLE) // 16 * 16
    acc[:8] = 0.0
    _SUMS_MOMENTS(xf, xf, xf, b, sample, np.float32(x0), acc, np.int64(0), False)
    d = (acc[0] + acc[1]) + (acc[2] + acc[3])
    m = np.float32(x0 + np.float32(d / sample))
    acc[:8] = 0.0
    end = b + n // 16 * 16
    if side is None:
        _SUMS_MOMENTS(xf, xf, xf, b, end - b, m, acc, np.int64(MOMENTS_AHEAD32), False)
    else:  # a flush at a time, each followed by its share of the normalization
        for i in range(b, end, 16 * FLUSH):
            k = min(16 * FLUSH, end - i)
            _SUMS_MOMENTS(xf, xf, xf, i, k, m, acc, np.int64(MOMENTS_AHEAD32), False)
            if k == 16 * FLUSH:
                pos = _side_norm(side, pos, k, xf, of, rf)
    mm = np.float64(m)
    tail1 = 0.0
    tail2 = 0.0
    for i in range(end, b + n):
        e = np.float64(xf[i]) - mm
        tail1 += e
        tail2 += e * e
    total1 = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + tail1
    total2 = ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail2
    if (not np.isfinite(total1) or not np.isfinite(total2) or total2 < n * 1e-30
            or total1 * total1 > total2 * n * (1.0 - 1.0 / CANCEL)):
        return False, 0.0, 0.0, pos
    delta = mm - shift
    return (True, total1 + n * delta, total2 + (2.0 * delta) * total1 + n * (delta * delta),
            pos)


@njit(**_JIT)
def _span_grad32(dyf, xf, of, has_out, b, n, mean, acc, side=None, pos=0, sdxf=None):
    """Backward sums (sum(g), sum(g * (x - mean))) of the float32 span [b, b + n), g = dy, or
    dy where the forward output `of` > 0 when `has_out`, as the Cython backend computes them
    (fastbn_span_grad_sums_f32): g * (x - m) about the mean rounded to float32, in float32
    vectors FLUSH steps of 16 values at a time, then in float64 (acc: 8 float64 values, see
    _sums_intrinsic), then corrected by (m - mean) * sum(g).

    Returns (ok, sum1, sum2, pos); not ok (the caller sums in float64) for spans of fewer than
    16 values and for sums that are not finite or tiny (possible underflow). `side`,
    pos, sdxf: a streamed dx that advances by as many values per flush (see _side_dx).

    Against the float64 lanes of _grad_sums, one thread, spans of 3136 in L2: 3.2 -> 4.7 values
    per ns, ReLU-masked 0.9 -> 4.1 (trees of eight rows of LANES values in Numba's loops)."""
    if n < 16:
        return False, 0.0, 0.0, pos
    m = np.float32(mean)
    acc[:8] = 0.0
    from_cache = xf.size * xf.itemsize * 2 <= STREAM_ABOVE
    ahead = np.int64(AHEAD32 if GRAD_AHEAD_FROM_MEMORY or from_cache else 0)  # see AHEAD32
    end = b + n // 16 * 16
    if side is None:
        _SUMS_GRAD(dyf, xf, of, b, end - b, m, acc, ahead, has_out)
    else:  # a flush at a time, each followed by its share of dx
        for i in range(b, end, 16 * FLUSH):
            k = min(16 * FLUSH, end - i)
            _SUMS_GRAD(dyf, xf, of, i, k, m, acc, ahead, has_out)
            if k == 16 * FLUSH:
                pos = _side_dx(side, pos, k, dyf, xf, of, sdxf)
    tail1 = 0.0
    tail2 = 0.0
    mm = np.float64(m)
    for i in range(end, b + n):
        g = np.float64(dyf[i]) if not has_out or of[i] > 0 else 0.0
        tail1 += g
        tail2 += g * (np.float64(xf[i]) - mm)
    total1 = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + tail1
    total2 = ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail2
    if (not np.isfinite(total1) or not np.isfinite(total2)
            or abs(total2) < n * 1e-30 and not (total1 == 0.0 and total2 == 0.0)):
        return False, 0.0, 0.0, pos
    return True, total1, total2 + (mm - mean) * total1, pos


@njit(**_JIT)
def _grad_sums(dyf, xf, of, has_out, start, rows, stride, width, meanv, s, q, side=None,
               pos=0, dxf=None):
    """_lanes_grad of g = dy, or of g = dy masked by output > 0 when `has_out` (`of` is the
    forward output): the masked rows are written to a scratch array first. With the mask in
    the sums loop, LLVM did not vectorize it (ReLU-masked sums of 32x256x56x56 17.1 ms, with
    the scratch rows 8.1 ms, unmasked 2.7 ms)."""
    if not has_out:
        return _lanes_grad(dyf, start, stride, xf, start, rows, stride, width, meanv, s, q,
                           side, pos, dyf, of, dxf)
    masked = np.empty(rows * width, dyf.dtype)
    zero = np.zeros(1, dyf.dtype)[0]
    for r in range(rows):
        b = start + r * stride
        ds = dyf[b:b + width]
        os = of[b:b + width]
        ms = masked[r * width:(r + 1) * width]
        for k in range(width):
            ms[k] = ds[k] if os[k] > 0 else zero
    return _lanes_grad(masked, 0, width, xf, start, rows, stride, width, meanv, s, q, side, pos,
                       dyf, of, dxf)


# The sums of a unit are backward sums when dyf is an array and moments when it is None (see
# _flat). _lanes and _span_sums32 below, and _output_run (the output beside them), choose when
# they are typed, so a caller compiles only its own kind: training does not compile the
# gradient sums, nor the backward the moments.

def _lanes(has_out, dyf, xf, of, start, rows, stride, width, centerv, s, q):
    """_grad_sums about centerv, or (dyf None) _lanes_moments about centerv."""


@overload(_lanes, jit_options=_JIT)
def _lanes_jit(has_out, dyf, xf, of, start, rows, stride, width, centerv, s, q):
    if isinstance(dyf, types.NoneType):
        def moments(has_out, dyf, xf, of, start, rows, stride, width, centerv, s, q):
            _lanes_moments(xf, start, rows, stride, width, centerv, s, q)
        return moments

    def grad(has_out, dyf, xf, of, start, rows, stride, width, centerv, s, q):
        _grad_sums(dyf, xf, of, has_out, start, rows, stride, width, centerv, s, q)
    return grad


def _span_sums32(dyf, xf, of, has_out, b, n, center, acc, side=None, pos=0, outf=None,
                 rf=None):
    """_span_grad32 about the mean `center` (side: (end, has_out, training, cc)), or (dyf None)
    _span_moments32 about the shift `center` (side: (end, has_res, relu, cc))."""


@overload(_span_sums32, jit_options=_JIT)
def _span_sums32_jit(dyf, xf, of, has_out, b, n, center, acc, side=None, pos=0,
                     outf=None, rf=None):
    if isinstance(dyf, types.NoneType):
        def moments(dyf, xf, of, has_out, b, n, center, acc, side=None, pos=0, outf=None,
                    rf=None):
            return _span_moments32(xf, b, n, center, acc, side, pos, outf, rf)
        return moments

    def grad(dyf, xf, of, has_out, b, n, center, acc, side=None, pos=0, outf=None,
             rf=None):
        return _span_grad32(dyf, xf, of, has_out, b, n, center, acc, side, pos, outf)
    return grad


def _at(v, m, i):
    """Constant m of element i: v[m, i] for constants per element (a 2-D array), v[m] for the
    same constants for every element (a tuple)."""
    return v[m, i] if isinstance(v, np.ndarray) else v[m]


@overload(_at, inline="always")
def _at_jit(v, m, i):
    if isinstance(v, types.Array):
        return lambda v, m, i: v[m, i]
    return lambda v, m, i: v[m]


@njit(inline="always", **_JIT)
def _norm_value(x, r, hi, lo, scale, shift, zero, with_res, with_relu):
    """One normalized value, residual r added when with_res, ReLU when with_relu."""
    y = ((x - hi) - lo) * scale + shift
    if with_res:
        y += r
    if with_relu:
        y = zero if y <= zero else y
    return y


@njit(**_JIT)
def _norm_rows(xf, of, rf, start, rows, stride, width, has_res, relu, consts, zero):
    """out = act(((x - hi) - lo) * scale + shift [+ residual]), consts = (hi, lo, scale, shift).

    The flags are constants where the kernels' entries made them so (see _specialized), and
    this loop is then compiled for them: LLVM took only some runtime flags out of the loop.
    Row by row: two rows at a time (each constant loaded once for both) had made channels-last
    8x56x56x64 inference 1.16-1.36 -> 0.98-1.13x the copy time on a Zen 4, but on an Intel Xeon
    it was the slower (1.18-1.23 against 1.11-1.13, training 2.12-2.15 against 1.96-2.01), as
    in the Cython backend. The flat arrays are read at unsigned indices (see _rows_grad32)."""
    for r in range(rows):
        b0 = np.uint64(start + r * stride)
        for i in range(width):
            k0 = b0 + np.uint64(i)
            of[k0] = _norm_value(xf[k0], rf[k0] if has_res else zero, _at(consts, 0, i),
                                 _at(consts, 1, i), _at(consts, 2, i), _at(consts, 3, i),
                                 zero, has_res, relu)


@njit(**_JIT)
def _dx_rows(dyf, xf, of, dxf, start, rows, stride, width, has_out, training, consts, zero):
    """dx = g*a + ((x - hi) - lo)*b + c (training) or g*a (frozen: x is not read), where g is dy
    masked by output > 0 when `has_out` and consts = (a, b, c, hi, lo)."""
    for r in range(rows):
        k = start + r * stride
        dys = dyf[k:k + width]
        xs = xf[k:k + width]
        dxs = dxf[k:k + width]
        # Four loops: with the flags tested per element, per-element constants did not vectorize.
        # `of` is sliced only when read (a slice costs a reference count update).
        if training:
            if has_out:
                os = of[k:k + width]
                for i in range(width):
                    g = dys[i] if os[i] > 0 else zero
                    dxs[i] = (g * _at(consts, 0, i)
                              + ((xs[i] - _at(consts, 3, i)) - _at(consts, 4, i))
                              * _at(consts, 1, i) + _at(consts, 2, i))
            else:
                for i in range(width):
                    dxs[i] = (dys[i] * _at(consts, 0, i)
                              + ((xs[i] - _at(consts, 3, i)) - _at(consts, 4, i))
                              * _at(consts, 1, i) + _at(consts, 2, i))
        else:
            if has_out:
                os = of[k:k + width]
                for i in range(width):
                    g = dys[i] if os[i] > 0 else zero
                    dxs[i] = g * _at(consts, 0, i)
            else:
                for i in range(width):
                    dxs[i] = dys[i] * _at(consts, 0, i)


# ----------------------------------------------------------------------------- streamed stores
# Normalized outputs larger than STREAM_ABOVE bytes (as in the Cython backend: see
# fastbn._config.stream_above_bytes) are written with non-temporal stores, which need no read
# of the destination first.
# Numba has no vector types, so one vector step of the normalization is an intrinsic that emits
# the vector operations and a store with !nontemporal metadata: the same operations in the same
# order as _norm_rows, so every element rounds the same way whether it is streamed or not.
# Measured on Zen 5 (interleaved A/B, float32, 2 threads): 32x64x112x112 inference 4.84 ->
# 3.69 ms, 32x256x56x56 5.19 -> 3.98 ms, channels-last 401408x64 4.39 -> 2.54 ms (copy 2.0-3.4
# ms). Short channels-first rows (7x7) were slower streamed with constants expanded per element
# (1.02 -> 1.57 ms); they are normalized in runs across channels, each vector blending the
# constants of the channels it covers (_norm_seg_run). Computing into an L1 tile and streaming the
# tile was slower than plain stores (5.1 against 4.5 ms). dx is streamed too (long
# channels-first rows and channels-last; the same scheme, _dx_step): on the Zen 3
# (reads are the scarce resource there, a streamed store needs no read of the destination),
# backward 32x256x56x56 16.4 -> 15.6 ms, channels-last 32x112x112x64 17.5 -> 16.1 ms,
# 64x7x7x2048 3.57 -> 3.31 ms, ReLU-masked 27.2 -> 24.7 and 5.58 -> 4.84 ms. (On the Zen 5
# channels-last dx was 7% slower streamed: 12.1 -> 12.9 ms.)

STREAM_ABOVE = stream_above_bytes()
VECTOR_BYTES = 64  # one cache line per streamed store
# Channels-last outputs that are not streamed are written as one run per block with periodic
# constants, as the streamed ones, when rows have fewer than RUN_BELOW channels: row by row
# (_norm_rows, _dx_rows), each row paid the loop's set-up (LLVM's alias checks), about 10
# cycles. Zen 4, float32, 2 threads, in the cache, Numba/Cython interleaved, rows -> run:
# inference 50000x32 1.60 -> 1.20-1.26, 25000x64 1.32 -> 1.15-1.17, 12500x128 1.29 ->
# 1.12-1.20; wider rows were slower as a run (6250x256 1.15 -> 1.22-1.30, 6272x576 1.00-1.18
# -> 1.18-1.27).
RUN_BELOW = 256
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def _vector_width(dtype):
    return VECTOR_BYTES // (dtype.bitwidth // 8)


def _vector_at(context, builder, aryty, ary, index):
    """Pointer to the vector of a 1-D contiguous array that starts at element `index`."""
    data = context.make_array(aryty)(context, builder, ary).data
    vt = ir.VectorType(context.get_data_type(aryty.dtype), _vector_width(aryty.dtype))
    return builder.bitcast(builder.gep(data, [index]), vt.as_pointer())


def _load(context, builder, aryty, ary, index):
    return builder.load(_vector_at(context, builder, aryty, ary, index), align=1)


def _splat(builder, vt, value):
    v = builder.insert_element(ir.Constant(vt, ir.Undefined), value, ir.IntType(32)(0))
    mask = ir.Constant(ir.VectorType(ir.IntType(32), vt.count), [0] * vt.count)
    return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined), mask)


def _param(context, builder, pty, pval, m, column, vt):
    """Parameter m as a vector: row m of a C-contiguous 2-D array from `column` on (one value
    per element), or element m of a tuple repeated (one value for every element)."""
    if isinstance(pty, types.Array):
        rowp = _row(context, builder, pty, pval, m)
        return builder.load(builder.bitcast(builder.gep(rowp, [column]), vt.as_pointer()),
                            align=1)
    value = builder.extract_value(pval, m)
    return value if isinstance(pty[m], _VectorType) else _splat(builder, vt, value)


def _row(context, builder, pty, pval, m):
    """Pointer to the first element of row m of a C-contiguous 2-D array."""
    arr = context.make_array(pty)(context, builder, pval)
    stride = builder.extract_value(arr.strides, 0)
    rowp = builder.gep(builder.bitcast(arr.data, ir.IntType(8).as_pointer()),
                       [builder.mul(stride, ir.Constant(stride.type, m))])
    return builder.bitcast(rowp, arr.data.type)


def _stream_store(context, builder, aryty, ary, index, value):
    store = builder.store(value, _vector_at(context, builder, aryty, ary, index),
                          align=VECTOR_BYTES)
    store.set_metadata("nontemporal", builder.module.add_metadata([ir.IntType(32)(1)]))


def _store(context, builder, aryty, ary, index, value, streamed):
    """Store the vector at ary[index:], streamed (ary + index aligned) or plainly."""
    if streamed:
        _stream_store(context, builder, aryty, ary, index, value)
    else:
        builder.store(value, _vector_at(context, builder, aryty, ary, index), align=1)


def _norm_vector(context, builder, xt, rt, args, p, vt, with_residual, with_relu):
    """act(((x - hi) - lo) * scale + shift [+ r]) of the vector at args[3] (args: xf, of, rf,
    i, ...), p = (hi, lo, scale, shift) as vectors: the operations of _norm_rows."""
    x = _load(context, builder, xt, args[0], args[3])
    y = builder.fadd(builder.fmul(builder.fsub(builder.fsub(x, p[0]), p[1]), p[2]), p[3])
    if with_residual:
        y = builder.fadd(y, _load(context, builder, rt, args[2], args[3]))
    if with_relu:
        zero = ir.Constant(vt, [0.0] * vt.count)
        y = builder.select(builder.fcmp_ordered("<=", y, zero), zero, y)
    return y


def _by_flags(builder, flag_types, flag_values, emit, chosen=()):
    """emit(*flags) for boolean flags: one typed as a literal (or omitted, its default) is
    compiled in, any other is tested by a branch around a variant for each of its values."""
    if len(chosen) == len(flag_types):
        emit(*chosen)
        return
    ty, value = flag_types[len(chosen)], flag_values[len(chosen)]
    if isinstance(ty, (types.BooleanLiteral, types.Omitted)):
        known = ty.literal_value if isinstance(ty, types.BooleanLiteral) else ty.value
        _by_flags(builder, flag_types, flag_values, emit, chosen + (bool(known),))
        return
    with builder.if_else(value) as (then, otherwise):
        with then:
            _by_flags(builder, flag_types, flag_values, emit, chosen + (True,))
        with otherwise:
            _by_flags(builder, flag_types, flag_values, emit, chosen + (False,))


def _are_flags(*flags):
    return all(isinstance(f, (types.Boolean, types.Omitted)) for f in flags)


def _vector_type(context, dtype):
    return ir.VectorType(context.get_data_type(dtype), _vector_width(dtype))


@intrinsic(prefer_literal=True)
def _norm_step(typingctx, xf, of, rf, i, consts, column, has_res, relu, stream):
    """of[i:i+V] = act(((x - hi) - lo) * scale + shift [+ r]) with the constants (hi, lo,
    scale, shift) of consts (see _param) from `column` on, streamed (of + i aligned) or stored
    plainly. The residual, the ReLU and the streaming are compiled in where their flags are
    literals (as run-time tests, a select on the loaded residual made LLVM load it with a mask:
    residual + ReLU 1.4x slower)."""
    if not _are_flags(has_res, relu, stream):
        return None
    return (types.void(xf, of, rf, i, consts, column, has_res, relu, stream),
            _step_codegen(_norm_emitter, 6))


def _step_codegen(emitter, first_flag, flags=None):
    """The codegen of a vector step: emitter(...)(*flags), the flags given, or (flags None)
    the intrinsic's arguments from first_flag on (see _by_flags)."""
    def codegen(context, builder, signature, args):
        emit = emitter(context, builder, signature, args)
        if flags is None:
            _by_flags(builder, signature.args[first_flag:], args[first_flag:], emit)
        else:
            emit(*flags)
        return context.get_dummy_value()
    return codegen


@functools.cache
def _norm_step_as(has_res: bool, relu: bool, stream: bool):
    """_norm_step with the flags compiled in, for an overload's implementation (whose
    arguments Numba types as plain booleans even where the overload saw literals)."""
    @intrinsic
    def norm_step(typingctx, xf, of, rf, i, consts, column):
        return (types.void(xf, of, rf, i, consts, column),
                _step_codegen(_norm_emitter, 6, (has_res, relu, stream)))
    return norm_step


def _norm_emitter(context, builder, signature, args):
    """emit(has_res, relu, streamed): the code of _norm_step for its first six arguments."""
    xt, ot, rt, _, pt, _ = signature.args[:6]
    vt = _vector_type(context, xt.dtype)

    def emit(with_residual, with_relu, streamed):
        p = [_param(context, builder, pt, args[4], m, args[5], vt) for m in range(4)]
        y = _norm_vector(context, builder, xt, rt, args, p, vt, with_residual, with_relu)
        _store(context, builder, ot, args[1], args[3], y, streamed)
    return emit


def _entry(context, builder, pty, pval, m, column):
    """Element (m, column) of a C-contiguous 2-D array."""
    return builder.load(builder.gep(_row(context, builder, pty, pval, m), [column]))


class _VectorType(types.Type):
    """An LLVM vector of `lanes` values of `dtype`: a parameter splatted once and kept in a
    register from one vector of a run to the next (see _seg_vectors)."""

    def __init__(self, dtype, lanes):
        self.dtype = dtype
        self.lanes = lanes
        super().__init__(name=f"vector({dtype} x {lanes})")


@register_model(_VectorType)
class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        scalar = dmm.lookup(fe_type.dtype).get_value_type()
        super().__init__(dmm, fe_type, ir.VectorType(scalar, fe_type.lanes))


@intrinsic
def _splat_column(typingctx, consts, k, rows):
    """Column k of the first `rows` (a literal) rows of a C-contiguous 2-D array, each value
    as a vector (a tuple of _VectorType)."""
    if not isinstance(rows, types.IntegerLiteral):
        return None
    count = rows.literal_value
    vty = _VectorType(consts.dtype, _vector_width(consts.dtype))
    sig = types.UniTuple(vty, count)(consts, k, rows)

    def codegen(context, builder, signature, args):
        vt = context.get_value_type(vty)
        values = [_splat(builder, vt, _entry(context, builder, signature.args[0], args[0], m,
                                               args[1])) for m in range(count)]
        return context.make_tuple(builder, signature.return_type, values)
    return sig, codegen


@intrinsic
def _blend_columns(typingctx, first, second, boundary):
    """Tuples of vectors (_splat_column) blended: the lanes before `boundary` from `first`, the
    others from `second` (a vector across two channels)."""
    sig = first(first, second, boundary)

    def codegen(context, builder, signature, args):
        vt = context.get_value_type(signature.args[0].dtype)
        it = ir.IntType(32)
        lanes = ir.Constant(ir.VectorType(it, vt.count), list(range(vt.count)))
        nxt = builder.icmp_signed(">=", lanes,
                                  _splat(builder, lanes.type, builder.trunc(args[2], it)))
        values = [builder.select(nxt, builder.extract_value(args[1], m),
                                 builder.extract_value(args[0], m))
                  for m in range(signature.args[0].count)]
        return context.make_tuple(builder, signature.return_type, values)
    return sig, codegen


@intrinsic(prefer_literal=True)
def _dx_step(typingctx, dyf, xf, of, dxf, i, consts, column, training, masked, stream):
    """dxf[i:i+V] = g * a + ((x - hi) - lo) * b + c (training) or g * a (frozen), g = dy, or
    dy where output > 0 and 0 elsewhere (masked), streamed (dxf + i aligned) or stored
    plainly; the operations of _dx_rows in its order. consts = (a, b, c, hi, lo) as in _param,
    the flags as in _norm_step."""
    if not _are_flags(training, masked, stream):
        return None
    return (types.void(dyf, xf, of, dxf, i, consts, column, training, masked, stream),
            _step_codegen(_dx_emitter, 7))


@functools.cache
def _dx_step_as(training: bool, masked: bool, stream: bool):
    """_dx_step with the flags compiled in (see _norm_step_as)."""
    @intrinsic
    def dx_step(typingctx, dyf, xf, of, dxf, i, consts, column):
        return (types.void(dyf, xf, of, dxf, i, consts, column),
                _step_codegen(_dx_emitter, 7, (training, masked, stream)))
    return dx_step


def _dx_emitter(context, builder, signature, args):
    """emit(training, masked, streamed): the code of _dx_step for its first seven arguments."""
    dxt, pt = signature.args[3], signature.args[5]
    vt = _vector_type(context, dxt.dtype)

    def emit(training, masked, streamed):
        p = [_param(context, builder, pt, args[5], m, args[6], vt)
             for m in range(5 if training else 1)]
        dx = _dx_vector(context, builder, signature.args, args, p, vt, training, masked)
        _store(context, builder, dxt, args[3], args[4], dx, streamed)
    return emit


def _dx_vector(context, builder, argtys, args, p, vt, training, masked):
    """g * a + ((x - hi) - lo) * b + c (training) or g * a of the vector at args[4] (args: dyf,
    xf, of, dxf, i, ...), p = (a, b, c, hi, lo) as vectors: the operations of _dx_rows."""
    dyt, xt, ot = argtys[:3]
    zero = ir.Constant(vt, [0.0] * vt.count)
    g = _load(context, builder, dyt, args[0], args[4])
    if masked:
        o = _load(context, builder, ot, args[2], args[4])
        g = builder.select(builder.fcmp_ordered(">", o, zero), g, zero)
    dx = builder.fmul(g, p[0])
    if training:
        x = _load(context, builder, xt, args[1], args[4])
        dx = builder.fadd(builder.fadd(
            dx, builder.fmul(builder.fsub(builder.fsub(x, p[3]), p[4]), p[1])), p[2])
    return dx


@intrinsic
def _store_fence(typingctx):
    """Order the streamed stores before what follows (sfence on x86)."""
    def codegen(context, builder, signature, args):
        if _X86:
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse.sfence")
            builder.call(fn, [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()
    return types.void(), codegen


@njit(**_JIT)
def _stream_head(arr, start, n):
    """Elements before arr[start:] reaches a VECTOR_BYTES boundary (at most n)."""
    return min(n, ((-(arr.ctypes.data + start * arr.itemsize)) % VECTOR_BYTES) // arr.itemsize)


@njit(**_JIT)
def _wrap(column, period):
    """column modulo period (when period > 0) for a column at most one vector past it, by
    subtraction: an integer division per vector costs about as much as the vector's work."""
    if period > 0:
        while column >= period:
            column -= period
    return column


@njit(**_JIT)
def _norm_run(xf, of, rf, start, n, has_res, relu, consts, column, period, zero, stream=True):
    """Normalization of the run [start, start + n), streamed when `stream`: element start + t
    takes the constants of column column + t of a 2-D consts (wrapping at `period` when
    period > 0, consts then holding period + V columns), or the tuple consts. Head and tail
    (before the output is aligned when streamed, after the last full vector) are stored by
    _norm_elems."""
    width = VECTOR_BYTES // xf.itemsize
    head = _stream_head(of, start, n) if stream else 0
    body = head + (n - head) // width * width
    _norm_elems(xf, of, rf, start, head, has_res, relu, consts, column, zero)
    col = _wrap(column + head, period)
    for i in range(start + head, start + body, width):
        _norm_step(xf, of, rf, i, consts, col, has_res, relu, stream)
        col = _wrap(col + width, period)
    _norm_elems(xf, of, rf, start + body, n - body, has_res, relu, consts, col, zero)


@njit(**_JIT)
def _norm_elems(xf, of, rf, start, n, has_res, relu, consts, column, zero):
    """The normalization of the n < one vector values from start (the head or tail of a run),
    element start + t with the constants of column column + t: the flags tested per element,
    where _norm_rows compiles a loop per flag combination, which for these few values would
    only lengthen the first call."""
    for t in range(n):
        k = start + t
        i = column + t
        of[k] = _norm_value(xf[k], rf[k] if has_res else zero, _at(consts, 0, i),
                            _at(consts, 1, i), _at(consts, 2, i), _at(consts, 3, i), zero,
                            has_res, relu)


@njit(**_JIT)
def _norm_seg_run(xf, of, rf, start, n, has_res, relu, consts, c, seg, zero, stream):
    """Normalization of the run [start, start + n) across channels c, c + 1, ... of `seg`
    values each (starting with channel c's first value; seg of at least one vector), with the
    per-channel constants (hi, lo, scale, shift) of consts: a vector takes the constants of the
    one or two channels it covers (_norm_seg), as the Cython backend does, instead of constants
    expanded per element. Streamed when `stream` (head and tail, element by element)."""
    width = VECTOR_BYTES // xf.itemsize
    head = _stream_head(of, start, n) if stream else 0
    body = head + (n - head) // width * width
    for t in range(n - body + head):  # head, then tail
        t = t if t < head else t - head + body
        k = c + t // seg
        y = ((xf[start + t] - consts[0, k]) - consts[1, k]) * consts[2, k] + consts[3, k]
        y = y + rf[start + t] if has_res else y
        of[start + t] = zero if relu and y <= zero else y
    _seg_vectors((xf, of, rf), start, head, body, consts, c, seg, False, has_res, relu, stream)


def _seg_vectors(arrays, start, head, body, consts, c, seg, dx, a, b, stream):
    """The whole vectors [head, body) of a run from `start` across channels c, c + 1, ... of
    `seg` values each (at least one vector), in one loop: the constants of the current channel
    splatted once into vectors (_splat_column) that stay in registers from one vector to the
    next, and at each channel boundary a vector with the lanes of both channels' constants
    (_blend_columns), as the Cython backend's fastbn_affine_seg does. Splatted per vector
    (from scalars), the loop took 8 cycles a vector in the L1 against 5.6 (7x7 float32). The
    normalization (arrays (xf, of, rf), flags a = residual, b = ReLU) or dx (arrays (dyf, xf,
    of, dxf), a = training, b = masked), streamed or not. The flags must be literals (see
    _specialized): each combination is compiled as its own loop, with no test of the flags per
    vector (and no function passed as a value, which Numba could not cache)."""


@overload(_seg_vectors, jit_options=_JIT, prefer_literal=True)
def _seg_vectors_jit(arrays, start, head, body, consts, c, seg, dx, a, b, stream):
    if not all(isinstance(f, types.BooleanLiteral) for f in (dx, a, b, stream)):
        return None
    flags = (a.literal_value, b.literal_value, stream.literal_value)
    inside = _dx_step_as(*flags) if dx.literal_value else _norm_step_as(*flags)
    rows = (5 if a.literal_value else 1) if dx.literal_value else 4  # the constants used
    width = _vector_width(arrays[0].dtype)  # a constant: no division by it below

    def vectors(arrays, start, head, body, consts, c, seg, dx, a, b, stream):
        last = consts.shape[1] - 1
        k = c + head // seg
        end = head - (k - c) * seg  # where the vector before the next ends in channel k
        now = _splat_column(consts, k, rows)
        for i in range(start + head, start + body, width):
            end += width
            if end < seg:
                inside(*arrays, i, now, 0)
                continue
            # the vector holds the last seg - (end - width) values of channel k
            k = min(k + 1, last)
            nxt = _splat_column(consts, k, rows)
            inside(*arrays, i, _blend_columns(now, nxt, seg - end + width), 0)
            end -= seg
            now = nxt
    return vectors


@njit(**_JIT)
def _dx_seg_run(dyf, xf, of, dxf, start, n, has_out, training, consts, c, seg, zero, stream):
    """dx over the run [start, start + n) across channels c, c + 1, ... of `seg` values each,
    with the per-channel constants (a, b, c, hi, lo) of consts, as _norm_seg_run does for the
    normalization."""
    width = VECTOR_BYTES // xf.itemsize
    head = _stream_head(dxf, start, n) if stream else 0
    body = head + (n - head) // width * width
    for t in range(n - body + head):  # head, then tail
        t = t if t < head else t - head + body
        k = c + t // seg
        i = start + t
        g = dyf[i] if not has_out or of[i] > 0 else zero
        if training:
            dxf[i] = (g * consts[0, k] + ((xf[i] - consts[3, k]) - consts[4, k]) * consts[1, k]
                      + consts[2, k])
        else:
            dxf[i] = g * consts[0, k]
    _seg_vectors((dyf, xf, of, dxf), start, head, body, consts, c, seg, True, training, has_out,
                 stream)


@njit(**_JIT)
def _norm_block(xf, of, rf, start, rows, stride, width, has_res, relu, consts, zero, stream):
    """_norm_rows, streamed when `stream`."""
    if stream:
        for r in range(rows):
            _norm_run(xf, of, rf, start + r * stride, width, has_res, relu, consts, np.int64(0),
                      np.int64(0), zero)
    else:
        _norm_rows(xf, of, rf, start, rows, stride, width, has_res, relu, consts, zero)


@njit(**_JIT)
def _dx_run(dyf, xf, of, dxf, start, n, has_out, training, consts, column, period, zero,
            stream=True):
    """dx of the run [start, start + n), streamed when `stream`, the constants as in
    _norm_run; head and tail by _dx_elems."""
    width = VECTOR_BYTES // xf.itemsize
    head = _stream_head(dxf, start, n) if stream else 0
    body = head + (n - head) // width * width
    _dx_elems(dyf, xf, of, dxf, start, head, has_out, training, consts, column, zero)
    col = _wrap(column + head, period)
    for i in range(start + head, start + body, width):
        _dx_step(dyf, xf, of, dxf, i, consts, col, training, has_out, stream)
        col = _wrap(col + width, period)
    _dx_elems(dyf, xf, of, dxf, start + body, n - body, has_out, training, consts, col, zero)


@njit(**_JIT)
def _dx_elems(dyf, xf, of, dxf, start, n, has_out, training, consts, column, zero):
    """dx of the n < one vector values from start, as _norm_elems (the formulas of
    _dx_rows)."""
    for t in range(n):
        k = start + t
        i = column + t
        g = dyf[k] if not has_out or of[k] > 0 else zero
        if training:
            dxf[k] = (g * _at(consts, 0, i) + ((xf[k] - _at(consts, 3, i)) - _at(consts, 4, i))
                      * _at(consts, 1, i) + _at(consts, 2, i))
        else:
            dxf[k] = g * _at(consts, 0, i)


@njit(inline="always", **_JIT)
def _side_norm(side, pos, n, xf, of, rf):
    """_side_dx for the normalization: side = (end, has_res, relu, constants)."""
    end, has_res, relu, cc = side
    width = VECTOR_BYTES // xf.itemsize
    stop = pos + min(n, end - pos) // width * width
    for i in range(pos, stop, width):
        _norm_step(xf, of, rf, i, cc, 0, has_res, relu, True)
    return stop


@njit(inline="always", **_JIT)
def _side_dx(side, pos, n, dyf, xf, of, dxf):
    """Advance a streamed dx of one channel by the whole vectors of the next n values from pos
    (aligned), not past its end; returns the new pos. side = (end, has_out, training,
    constants). (The arrays are arguments of their own: in a tuple, each would be reference
    counted per call, an atomic update of a count that both threads share.)"""
    end, has_out, training, cc = side
    width = VECTOR_BYTES // xf.itemsize
    stop = pos + min(n, end - pos) // width * width
    for i in range(pos, stop, width):
        _dx_step(dyf, xf, of, dxf, i, cc, 0, training, has_out, True)
    return stop


# ----------------------------------------------------------------------------- geometry

@njit(**_JIT)
def _geometry(outer, inner):
    """Fixed channels-first block decomposition of one channel's (outer, inner) slab.

    Returns (rows per block, inner pieces per row, piece length, blocks per channel); block j
    covers rows [(j // pieces) * rows, ...+rows) and inner [(j % pieces) * plen, ...+plen).
    """
    if inner >= BLOCK:
        pieces = (inner + BLOCK - 1) // BLOCK
        plen = ((inner + pieces - 1) // pieces + LANES - 1) // LANES * LANES
        pieces = (inner + plen - 1) // plen
        return 1, pieces, plen, outer * pieces
    if inner > RUN:
        return 1, 1, inner, outer
    rows = max(1, BLOCK // inner)
    return rows, 1, inner, (outer + rows - 1) // rows


@njit(**_JIT)
def _units(c0, c1, outer, inner):
    """Channels per work unit, and the number of units, over channels [c0, c1).

    A work unit is one block of `chans` adjacent channels. Short rows: unit u is block u % bpc
    of channels [c0 + (u // bpc) * chans, ...+chans), so the threads' static shares of the
    units get equal numbers of full and partial blocks. Long rows (a block is one image's row,
    or a piece of it): the units follow memory order, image by image and within an image
    channel chunk by channel chunk (piece by piece); reading one channel's rows image after
    image jumped C * inner values between rows (32x256x56x56 moments 1.7x -> 0.9x the copy).
    """
    if inner <= RUN:
        chans = RUN // inner
    elif inner < BLOCK:
        chans = max(1, min(LONG_RUN // inner, (c1 - c0) * outer // MIN_TASKS))
    else:
        chans = 1
    return chans, (c1 - c0 + chans - 1) // chans * _geometry(outer, inner)[3]


@njit(**_JIT)
def _group_channels(outer, inner, itemsize, arrays, channels, group_bytes):
    per_channel = outer * inner * itemsize * arrays
    return max(1, min(channels, group_bytes // max(1, per_channel)))


@njit(**_JIT)
def _chw_block_bounds(j, rows, pieces, plen, outer, inner):
    """Rows [n0, n1) and inner range [i0, i1) of channels-first block j of a channel."""
    n0 = (j // pieces) * rows
    i0 = (j % pieces) * plen
    return n0, min(outer, n0 + rows), i0, min(inner, i0 + plen)


@njit(**_JIT)
def _unit_rows(u, c0, c1, outer, channels, inner):
    """Channels [ca, cb) of work unit u over channels [c0, c1), and its data as rows of the flat
    array: (start, rows, stride, width), one row per image n of the unit's block."""
    rows, pieces, plen, bpc = _geometry(outer, inner)
    chans = _units(c0, c1, outer, inner)[0]
    if inner <= RUN:
        chunk, j = u // bpc, u % bpc
    else:
        per_image = (c1 - c0 + chans - 1) // chans * pieces
        n, k = u // per_image, u % per_image
        chunk, j = k // pieces, n * pieces + k % pieces
    ca = c0 + chunk * chans
    cb = min(c1, ca + chans)
    n0, n1, i0, i1 = _chw_block_bounds(j, rows, pieces, plen, outer, inner)
    start = (n0 * channels + ca) * inner + i0
    return ca, cb, start, n1 - n0, channels * inner, (cb - ca - 1) * inner + i1 - i0, j


@njit(**_JIT)
def _expand(v, ca, cb, inner):
    """The per-channel rows v[:, ca:cb], each value repeated `inner` times (one per element)."""
    e = np.empty((v.shape[0], (cb - ca) * inner), v.dtype)
    for m in range(v.shape[0]):
        for c in range(ca, cb):
            e[m, (c - ca) * inner:(c - ca + 1) * inner] = v[m, c]
    return e


@njit(**_JIT)
def _unit_sums(dyf, xf, of, shape, has_out, center, c0, c1, u, part_s, part_q, scratch,
               scratch32):
    """Sums of work unit u into part_s/part_q[(c - c0) * bpc + j], block j, channel c.

    Shifted moments about `center` when dyf is None, else the backward sums about it (the mean).
    Short rows: lanes across the run of the unit's channels, one run per image; float32 moments
    of rows shorter than COLUMNS32_BELOW sum the run's columns (_cols_moments32). Long
    rows (one channel): each row's values as rows of LANES lanes plus a tail. dyf, xf, of: the
    flat arrays, `shape` their (outer, channels, inner) view; scratch (4 x max(RUN, LANES)
    float64) and scratch32 (7 x COLS float32): the calling task's.
    """
    outer, channels, inner = shape
    bpc = _geometry(outer, inner)[3]
    ca, cb, start, rows, stride, width, j = _unit_rows(u, c0, c1, outer, channels, inner)
    if (dyf is None and _is_float32(xf) and inner < COLUMNS32_BELOW
            and rows * inner >= COLUMNS32_FROM):
        s = scratch[0, :cb - ca]
        q = scratch[1, :cb - ca]
        _cols_moments32(xf, start, rows, stride, cb - ca, inner, center[ca:cb], s, q,
                        scratch32, scratch[2:4])
        for c in range(ca, cb):
            part_s[(c - c0) * bpc + j] = s[c - ca]
            part_q[(c - c0) * bpc + j] = q[c - ca]
        return
    if (dyf is not None and _is_float32(xf) and GRAD32_SPANS_FROM <= inner <= RUN
            and xf.size * xf.itemsize * 2 <= STREAM_ABOVE  # from the cache: see below
            and _short_spans_grad32(dyf, xf, of, has_out, start, rows, stride, cb - ca, inner,
                                    center[ca:cb], scratch)):
        for c in range(ca, cb):
            part_s[(c - c0) * bpc + j] = scratch[0, c - ca]
            part_q[(c - c0) * bpc + j] = scratch[1, c - ca]
        return
    if inner <= RUN:
        centerv = scratch[2, :width]
        for c in range(ca, cb):
            centerv[(c - ca) * inner:(c - ca + 1) * inner] = center[c]
        period = inner
        s = scratch[0, :width]
        q = scratch[1, :width]
        s[:] = 0.0
        q[:] = 0.0
        _lanes(has_out, dyf, xf, of, start, rows, stride, width, centerv, s, q)
    else:
        period = np.int64(LANES)
        sc = scratch[0, :period]
        qc = scratch[1, :period]
        cc = scratch[2, :period]
        seg = width - (cb - ca - 1) * inner  # one channel's part of the unit
        full = seg // period
        for c in range(ca, cb):
            b = start + (c - ca) * inner
            slot = (c - c0) * bpc + j
            if _is_float32(xf):
                ok, s1, s2, _ = _span_sums32(dyf, xf, of, has_out, b, seg, center[c], sc)
                if ok:
                    part_s[slot] = s1
                    part_q[slot] = s2
                    continue
            sc[:] = 0.0
            qc[:] = 0.0
            cc[:] = center[c]
            _lanes(has_out, dyf, xf, of, b, full, period, period, cc, sc, qc)
            _lanes(has_out, dyf, xf, of, b + full * period, np.int64(1), period,
                   seg - full * period, cc, sc, qc)
            part_s[slot] = sc.sum()
            part_q[slot] = qc.sum()
        return
    slot = (ca - c0) * bpc + j
    for c in range(ca, cb):
        k = (c - ca) * period
        part_s[slot + (c - ca) * bpc] = _lane_total(s, k, period)
        part_q[slot + (c - ca) * bpc] = _lane_total(q, k, period)


@njit(inline="always", **_JIT)
def _lane_total(v, k, n):
    """sum(v[k:k + n]) in four chains. As one chain (ndarray.sum), adding each channel's
    `inner` column lanes was a quarter of a 2x64x16x16 training call (one add per 4 cycles)."""
    a0 = a1 = a2 = a3 = 0.0
    body = k + n // 4 * 4
    for i in range(k, body, 4):
        a0 += v[i]
        a1 += v[i + 1]
        a2 += v[i + 2]
        a3 += v[i + 3]
    for i in range(body, k + n):
        a0 += v[i]
    return (a0 + a1) + (a2 + a3)


@njit(**_JIT)
def _short_spans_grad32(dyf, xf, of, has_out, start, rows, stride, chans, inner, mean,
                        scratch):
    """Backward sums of `rows` rows from start (stride apart) of `chans` channels of `inner`
    float32 values each (short rows: 7x7, 14x14), span by span in memory order with
    _span_grad32, as the Cython backend sums them (float32 from 16 values on), into
    scratch[0, :chans] and scratch[1, :chans]. Returns False (the caller sums in float64)
    where a span's float32 sums are not to be trusted. Used from GRAD32_SPANS_FROM values a
    row, for data in the cache: against the float64 lanes of _lanes, Numba over Cython time,
    backward, one thread, 8x576x14x14 1.85-1.98 -> 1.48-1.51 (2 threads 1.85 -> 1.71-1.75),
    8x128x28x28 2.38 -> 1.50 (2 threads 2.36 -> 1.41); but 16x1024x7x7 1.1 -> 1.8 (a call
    per 49 values costs more than it saves), and from memory (2 threads) 32x576x14x14
    1.42-1.44 -> 1.63-1.66, 32x128x28x28 1.45-1.52 -> 1.59-1.68: the lanes' longer loops
    keep more loads in flight."""
    s = scratch[0, :chans]
    q = scratch[1, :chans]
    acc = _borrowed(scratch[3])  # (a call per span: see _borrowed)
    s[:] = 0.0
    q[:] = 0.0
    for r in range(rows):
        for c in range(chans):
            ok, s1, s2, _ = _span_grad32(dyf, xf, of, has_out, start + r * stride + c * inner,
                                         inner, mean[c], acc)
            if not ok:
                return False
            s[c] += s1
            q[c] += s2
    return True


@njit(**_JIT)
def _chw_merge(part_s, part_q, base, outer, inner):
    """Chan's merge of one channel's block partials (shifted sums), in block order."""
    rows, pieces, plen, nblocks = _geometry(outer, inner)
    n = 0.0
    mean = 0.0
    m2 = 0.0
    for j in range(nblocks):
        n0, n1, i0, i1 = _chw_block_bounds(j, rows, pieces, plen, outer, inner)
        nb = np.float64((n1 - n0) * (i1 - i0))
        sb = part_s[base + j]
        mb = sb / nb
        m2b = part_q[base + j] - sb * mb
        m2b = 0.0 if m2b < 0.0 else m2b
        if j == 0:
            n, mean, m2 = nb, mb, m2b
        else:
            tot = n + nb
            delta = mb - mean
            mean = mean + delta * (nb / tot)
            m2 = m2 + m2b + delta * delta * (n * nb / tot)
            n = tot
    return mean, m2


@njit(**_JIT)
def _hwc_merge_chunk(part_s, part_q, rb, outer, c0, c1, mean, m2):
    """Chan's merge of channels [c0, c1) over the row blocks, in block order (vectorized over c)."""
    nblocks = part_s.shape[0]
    n = 0.0
    for b in range(nblocks):
        nb = np.float64(min(outer, (b + 1) * rb) - b * rb)
        if b == 0:
            for c in range(c0, c1):
                mb = part_s[b, c] / nb
                m2b = part_q[b, c] - part_s[b, c] * mb
                mean[c] = mb
                m2[c] = 0.0 if m2b < 0.0 else m2b
            n = nb
        else:
            tot = n + nb
            w = nb / tot
            v = n * nb / tot
            for c in range(c0, c1):
                mb = part_s[b, c] / nb
                m2b = part_q[b, c] - part_s[b, c] * mb
                m2b = 0.0 if m2b < 0.0 else m2b
                delta = mb - mean[c]
                mean[c] = mean[c] + delta * w
                m2[c] = m2[c] + m2b + delta * delta * v
            n = tot


# In a parallel function every NumPy allocation that initializes (np.zeros, np.full) is a
# parallel loop of its own, launched on its own (a few microseconds per call); a one-element
# zero or a table of partials zeroed in the loop that fills it launches nothing.
@njit(**_JIT)
def _zero_of(x):
    """0 in x's dtype (made outside the parallel functions, see above)."""
    return np.zeros(1, x.dtype)[0]


@njit(**_JIT)
def _shift_of(x):
    channels = x.shape[1]
    shift = np.empty(channels)
    for c in range(channels):
        shift[c] = x[0, c, 0]
    return shift


@njit(**_JIT)
def _affine_constants(mean, m2, count, weight, bias, eps, var, consts, c0, c1):
    """var = m2/count and the compute-dtype constants (hi, lo, scale, shift) of [c0, c1)."""
    for c in range(c0, c1):
        var[c] = m2[c] / count
        consts[0, c] = mean[c]
        consts[1, c] = mean[c] - consts[0, c]
        consts[2, c] = weight[c] / np.sqrt(var[c] + eps)
        consts[3, c] = bias[c]


@njit(**_JIT)
def _norm_constants(mean, scale, shift, consts):
    """The compute-dtype constants (hi, lo, scale, shift) of a normalization (in one call: four
    NumPy statements took 5 us of a 30 us call on a small input)."""
    for c in range(mean.shape[0]):
        consts[0, c] = mean[c]
        consts[1, c] = mean[c] - consts[0, c]
        consts[2, c] = scale[c]
        consts[3, c] = shift[c]


@njit(**_JIT)
def _grad_constants(c0, c1, n, mean, invstd, weight, sum_dy, sum_dy_xmu, consts):
    """The compute-dtype constants (a, b, c, hi, lo) of dx for channels [c0, c1)."""
    for c in range(c0, c1):
        ac = weight[c] * invstd[c]
        consts[0, c] = ac
        consts[1, c] = -ac * invstd[c] * invstd[c] * sum_dy_xmu[c] / n
        consts[2, c] = -ac * sum_dy[c] / n
        consts[3, c] = mean[c]
        consts[4, c] = mean[c] - consts[3, c]


# ------------------------------------------------------------------------ channels-first kernels
# Three parallel functions (compiled only when used) work on a channel range [c0, c1) unit by
# unit (see _units): block partial sums, normalization and dx. Training forward and backward run
# them channel group by channel group, so the second pass finds the group in cache. A constant
# argument (0) is typed as a literal and compiles a specialization of its own, and so does a
# prange index (int64 when the loop is typed, uint64 in the parallel body): np.int64 keeps one
# specialization per dtype. (The flags are literals on purpose: see _specialized.)

@njit(**_PARALLEL)
def _chw_partials(dy, x, output, has_out, center, c0, c1, part_s, part_q):
    """Block partial sums of channels [c0, c1) (see _unit_sums)."""
    outer, _, inner = x.shape
    units = _units(c0, c1, outer, inner)[1]
    chunks = (units + UNIT_CHUNK - 1) // UNIT_CHUNK
    # The flat views once per call and the scratch once per chunk, not per unit: each reshape
    # and each call with an array argument updates the array's reference count atomically, a
    # cache line both threads write (32x256x56x56 gradient sums 1.45 -> 1.38 x copy; a bare
    # loop over the rows: 1.33). The views are borrowed (see _borrowed) for the same reason,
    # and so is the scratch, whose slices (several a span) otherwise each take an atomic
    # increment and decrement: 20% of one thread's time on 8x64x56x56 moments; Numba over
    # Cython time, 2 threads, interleaved, 1.39-1.42 -> 1.20-1.22.
    dyf = _borrowed(_flat(dy))
    xf = _borrowed(x.reshape(x.size))
    of = _borrowed(output.reshape(output.size))
    center = _borrowed(center)
    part_s = _borrowed(part_s)
    part_q = _borrowed(part_q)
    for k in prange(chunks):
        owner = np.empty((4, max(RUN, LANES)))
        owner32 = np.empty((7, COLS), np.float32)
        scratch = _borrowed(owner)
        scratch32 = _borrowed(owner32)
        for u in range(np.int64(k) * UNIT_CHUNK, min(units, (np.int64(k) + 1) * UNIT_CHUNK)):
            _unit_sums(dyf, xf, of, x.shape, has_out, center, c0, c1, u, part_s, part_q,
                       scratch, scratch32)
        _keep(owner)
        _keep(owner32)


@njit(**_JIT)
def _across_channels(out, inner, stream):
    """Channels per run of a channels-first element-wise pass taken as runs across channels
    (the constants switching within the vector that straddles two channels), or 0 for the
    work units (span by span). Short rows: runs of about SEG_RUN values. Streamed rows whose
    spans start off a 64-byte line (NumPy's large arrays start 16 bytes into one): runs of
    about ELEMENTWISE_SPAN values, since span by span each span's scalar head and tail cost
    more than the blends (as in the Cython backend's _unaligned_spans). Float32 inference, x
    copy, four buffer pairs interleaved with a copy of another array (as the benchmark times
    them): 32x256x56x56 1.35 -> 1.07, 32x64x112x112 1.30 -> 0.99. Streamed short rows also
    take runs of about ELEMENTWISE_SPAN values, since each task ends with a store fence (as
    the Cython backend's blocks do): 64x2048x7x7 inference, Numba over Cython time, 1.35-1.45
    -> 1.01-1.08 (SEG_RUN values a run)."""
    if VECTOR_BYTES // out.itemsize <= inner <= RUN:
        return max(1, (ELEMENTWISE_SPAN if stream else SEG_RUN) // inner)
    if stream and inner > RUN and (out.ctypes.data % VECTOR_BYTES != 0
                                   or inner * out.itemsize % VECTOR_BYTES != 0):
        return max(1, ELEMENTWISE_SPAN // inner)
    return 0


@njit(**_JIT)
def _units_per_task(c0, c1, outer, inner, stream):
    """Work units per task of a channels-first element-wise pass: streamed, at least
    ELEMENTWISE_SPAN values (each task ends with a store fence; rows of 3136 made tasks of two
    rows, as in the Cython backend's _elementwise_layout) while there are MIN_TASKS tasks (the
    threads' static shares stay even: groups of one channel of 32 rows went in 4 tasks of 10,
    10, 10 and 2 rows, backward 2.9 -> 3.1x copy); else one."""
    if not stream:
        return np.int64(1)
    rows, pieces, plen, bpc = _geometry(outer, inner)
    chans, units = _units(c0, c1, outer, inner)
    per = ELEMENTWISE_SPAN // (rows * min(plen, inner) * chans)
    return max(np.int64(1), min(per, units // MIN_TASKS))


@njit(**_PARALLEL)
def _chw_normalize(x, consts, residual, has_res, relu, out, c0, c1, stream):
    """Normalize channels [c0, c1) with the constants (hi, lo, scale, shift) of consts."""
    outer, channels, inner = x.shape
    units = _units(c0, c1, outer, inner)[1]
    xf = _borrowed(x.reshape(x.size))
    of = _borrowed(out.reshape(out.size))
    rf = _borrowed(residual.reshape(residual.size))
    consts = _borrowed(consts)
    zero = _zero_of(x)
    chans = _across_channels(out, inner, stream)
    if chans > 0:
        # runs across channels in memory order (_norm_seg_run)
        chunks = (c1 - c0 + chans - 1) // chans
        for task in prange(outer * chunks):
            n = np.int64(task) // chunks
            ca = c0 + (np.int64(task) % chunks) * chans
            cb = min(c1, ca + chans)
            _norm_seg_run(xf, of, rf, (n * channels + ca) * inner, (cb - ca) * inner, has_res,
                          relu, consts, ca, inner, zero, stream)
            if stream:
                _store_fence()
        return
    per = _units_per_task(c0, c1, outer, inner, stream)
    for task in prange((units + per - 1) // per):
        for u in range(np.int64(task) * per, min(units, (np.int64(task) + 1) * per)):
            ca, cb, start, rows, stride, width, _ = _unit_rows(u, c0, c1, outer, channels,
                                                               inner)
            if inner <= RUN:
                e = _expand(consts, ca, cb, inner)
                _norm_rows(xf, of, rf, start, rows, stride, width, has_res, relu, e, zero)
            else:
                seg = width - (cb - ca - 1) * inner
                for c in range(ca, cb):
                    _norm_block(xf, of, rf, start + (c - ca) * inner, rows, stride, seg,
                                has_res, relu,
                                (consts[0, c], consts[1, c], consts[2, c], consts[3, c]), zero,
                                stream)
        if stream:
            _store_fence()


@njit(**_PARALLEL)
def _chw_dx(dy, x, output, has_out, training, consts, out, c0, c1, stream):
    """dx of channels [c0, c1) with the constants (a, b, c, hi, lo) of consts; long rows
    streamed when `stream`."""
    outer, channels, inner = x.shape
    units = _units(c0, c1, outer, inner)[1]
    dyf = _borrowed(dy.reshape(dy.size))
    xf = _borrowed(x.reshape(x.size))
    of = _borrowed(output.reshape(output.size))
    dxf = _borrowed(out.reshape(out.size))
    consts = _borrowed(consts)
    zero = _zero_of(x)
    chans = _across_channels(out, inner, stream)
    if chans > 0:  # as in _chw_normalize
        chunks = (c1 - c0 + chans - 1) // chans
        for task in prange(outer * chunks):
            n = np.int64(task) // chunks
            ca = c0 + (np.int64(task) % chunks) * chans
            cb = min(c1, ca + chans)
            _dx_seg_run(dyf, xf, of, dxf, (n * channels + ca) * inner, (cb - ca) * inner,
                        has_out, training, consts, ca, inner, zero, stream)
            if stream:
                _store_fence()
        return
    per = _units_per_task(c0, c1, outer, inner, stream)
    for task in prange((units + per - 1) // per):
        for u in range(np.int64(task) * per, min(units, (np.int64(task) + 1) * per)):
            ca, cb, start, rows, stride, width, _ = _unit_rows(u, c0, c1, outer, channels,
                                                               inner)
            if inner <= RUN:
                e = _expand(consts, ca, cb, inner)
                _dx_rows(dyf, xf, of, dxf, start, rows, stride, width, has_out, training, e,
                         zero)
            else:
                seg = width - (cb - ca - 1) * inner
                for c in range(ca, cb):
                    cc = (consts[0, c], consts[1, c], consts[2, c], consts[3, c], consts[4, c])
                    b = start + (c - ca) * inner
                    if stream:
                        for r in range(rows):
                            _dx_run(dyf, xf, of, dxf, b + r * stride, seg, has_out, training,
                                    cc, np.int64(0), np.int64(0), zero)
                    else:
                        _dx_rows(dyf, xf, of, dxf, b, rows, stride, seg, has_out, training,
                                 cc, zero)
        if stream:
            _store_fence()


def _output_run(dyf, xf, of, rf, outf, start, n, has_out, training, has_res, relu, cc,
                stream, zero):
    """One channel's output over [start, start + n): dx (cc = (a, b, c, hi, lo)), or (dyf None)
    the normalization (cc = (hi, lo, scale, shift, unused)); streamed or plain stores."""


@overload(_output_run, jit_options=_JIT)
def _output_run_jit(dyf, xf, of, rf, outf, start, n, has_out, training, has_res, relu, cc,
                    stream, zero):
    if isinstance(dyf, types.NoneType):
        def normalize(dyf, xf, of, rf, outf, start, n, has_out, training, has_res, relu, cc,
                      stream, zero):
            if stream:
                _norm_run(xf, outf, rf, start, n, has_res, relu, cc, np.int64(0), np.int64(0),
                          zero)
            else:
                _norm_rows(xf, outf, rf, start, np.int64(1), np.int64(0), n, has_res, relu, cc,
                           zero)
        return normalize

    def dx(dyf, xf, of, rf, outf, start, n, has_out, training, has_res, relu, cc, stream, zero):
        if stream:
            _dx_run(dyf, xf, of, outf, start, n, has_out, training, cc, np.int64(0),
                    np.int64(0), zero)
        else:
            _dx_rows(dyf, xf, of, outf, start, np.int64(1), np.int64(0), n, has_out, training,
                     cc, zero)
    return dx


@njit(**_JIT)
def _unit_pair(dyf, xf, of, rf, outf, shape, has_out, center, c0, c1, part_s, part_q,
               consts, has_res, relu, training, e0, e1, u, do_a, do_e, s, q, cv, zero):
    """Long rows, streamed output: unit u of the sums of channels [c0, c1) (when do_a; as
    _unit_sums: gradient sums when dyf is an array, else float32 moments) beside unit u of the
    output of channels [e0, e1) (when do_e; dx as _chw_dx, or the normalization as
    _chw_normalize), channel beside channel: the sums' loop streams the other channel's output
    as it goes (the `side` of _lanes_grad and _span_moments32), so that one loop reads one group
    from memory while it writes the other."""
    outer, channels, inner = shape
    bpc = _geometry(outer, inner)[3]
    width = VECTOR_BYTES // xf.itemsize
    period = np.int64(LANES)
    ca = cb = start = seg = j = ea = eb = estart = eseg = np.int64(0)
    if do_a:
        ca, cb, start, _, _, seg, j = _unit_rows(u, c0, c1, outer, channels, inner)
        seg -= (cb - ca - 1) * inner  # one channel's part of the unit
    if do_e:
        ea, eb, estart, _, _, eseg, _ = _unit_rows(u, e0, e1, outer, channels, inner)
        eseg -= (eb - ea - 1) * inner
    full = seg // period
    last = consts.shape[0] - 1
    for k in range(max(cb - ca, eb - ea)):
        e = min(ea + k, channels - 1)
        cc = (consts[0, e], consts[1, e], consts[2, e], consts[3, e], consts[last, e])
        be = estart + k * inner
        if k >= cb - ca:
            _output_run(dyf, xf, of, rf, outf, be, eseg, has_out, training, has_res,
                        relu, cc, True, zero)
            continue
        b = start + k * inner
        paired = k < eb - ea
        pos = end = be
        if paired:  # the head up to the first aligned vector, as _dx_run and _norm_run do
            head = _stream_head(outf, be, eseg)
            _output_run(dyf, xf, of, rf, outf, be, head, has_out, training, has_res,
                        relu, cc, False, zero)
            pos = be + head
            end = pos + (eseg - head) // width * width
        ok = False
        s1 = s2 = 0.0
        if _is_float32(xf) and paired:
            flags = (has_res, relu) if dyf is None else (has_out, training)
            ok, s1, s2, pos = _span_sums32(dyf, xf, of, has_out, b, seg, center[ca + k], s,
                                           (end, flags[0], flags[1], cc), pos, outf, rf)
        elif _is_float32(xf):
            ok, s1, s2, _ = _span_sums32(dyf, xf, of, has_out, b, seg, center[ca + k], s)
        if not ok:
            s[:] = 0.0
            q[:] = 0.0
            cv[:] = center[ca + k]
            if dyf is not None and paired:
                pos = _grad_sums(dyf, xf, of, has_out, b, full, period, period, cv, s, q,
                                 (end, has_out, training, cc), pos, outf)
            else:
                _lanes(has_out, dyf, xf, of, b, full, period, period, cv, s, q)
            _lanes(has_out, dyf, xf, of, b + full * period, np.int64(1), period,
                   seg - full * period, cv, s, q)
            s1 = s.sum()
            s2 = q.sum()
        if paired:
            _output_run(dyf, xf, of, rf, outf, pos, be + eseg - pos, has_out, training,
                        has_res, relu, cc, True, zero)
        part_s[(ca + k - c0) * bpc + j] = s1
        part_q[(ca + k - c0) * bpc + j] = s2


@njit(**_PARALLEL)
def _chw_overlap(dy, x, output, has_out, center, c0, c1, part_s, part_q, consts,
                 residual, has_res, relu, training, out, e0, e1):
    """Long rows, streamed output: the block sums of channels [c0, c1) and the output of
    channels [e0, e1) (the group before), unit u of one beside unit u of the other (see
    _unit_pair); the sums of _chw_partials and the outputs of _chw_dx or _chw_normalize, bit
    for bit."""
    outer, _, inner = x.shape
    ua = _units(c0, c1, outer, inner)[1]
    ue = _units(e0, e1, outer, inner)[1]
    units = max(ua, ue)
    dyf = _borrowed(_flat(dy))
    xf = _borrowed(x.reshape(x.size))
    of = _borrowed(output.reshape(output.size))
    rf = _borrowed(residual.reshape(residual.size))
    outf = _borrowed(out.reshape(out.size))
    center = _borrowed(center)
    part_s = _borrowed(part_s)
    part_q = _borrowed(part_q)
    consts = _borrowed(consts)
    zero = _zero_of(x)
    for k in prange((units + UNIT_CHUNK - 1) // UNIT_CHUNK):
        owner = np.empty((3, LANES))
        lanes = _borrowed(owner)  # as in _chw_partials
        for u in range(np.int64(k) * UNIT_CHUNK, min(units, (np.int64(k) + 1) * UNIT_CHUNK)):
            _unit_pair(dyf, xf, of, rf, outf, x.shape, has_out, center, c0, c1, part_s,
                       part_q, consts, has_res, relu, training, e0, e1, u, u < ua, u < ue,
                       lanes[0], lanes[1], lanes[2], zero)
        _keep(owner)
        _store_fence()


@njit(**_JIT)
def _chw_stats(x, shift, c0, c1, part_s, part_q, mean, m2):
    """mean and M2 of channels [c0, c1): block partials merged with Chan's formula."""
    _chw_partials(None, x, x, np.bool_(False), shift, c0, c1, part_s, part_q)
    _chw_merged(x, shift, c0, c1, part_s, part_q, mean, m2)


@njit(**_JIT)
def _chw_merged(x, shift, c0, c1, part_s, part_q, mean, m2):
    """mean and M2 of channels [c0, c1) from their block partials (Chan's formula)."""
    outer, _, inner = x.shape
    bpc = _geometry(outer, inner)[3]
    for c in range(c0, c1):
        mc, m2c = _chw_merge(part_s, part_q, (c - c0) * bpc, outer, inner)
        mean[c] = shift[c] + mc
        m2[c] = m2c


@njit(**_JIT)
def _chw_moments(x):
    outer, channels, inner = x.shape
    size = channels * _geometry(outer, inner)[3]
    mean = np.empty(channels)
    m2 = np.empty(channels)
    _chw_stats(x, _shift_of(x), np.int64(0), channels, np.empty(size), np.empty(size), mean, m2)
    return mean, m2


# ------------------------------------------------------------------------- channels-last kernels

@njit(**_PARALLEL)
def _hwc_moments(x, from_memory):
    """mean and M2 of every channel of a channels-last (rows, C, 1) view; `from_memory`: x is
    larger than the cache can hold (see _lanes_moments' `ahead`)."""
    outer, channels, _ = x.shape
    xf = x.reshape(x.size)
    shift = _shift_of(x)
    mean = np.empty(channels)
    m2 = np.empty(channels)
    rb = max(1, BLOCK_NHWC // channels)
    if (outer + rb - 1) // rb > MAX_ROW_BLOCKS:
        rb = (outer + MAX_ROW_BLOCKS - 1) // MAX_ROW_BLOCKS
    nblocks = (outer + rb - 1) // rb
    part_s = np.empty((nblocks, channels))
    part_q = np.empty((nblocks, channels))
    # From memory, 64-512 channels: float32 trees built row by row, float64 lanes prefetched
    mid_from_memory = from_memory and 64 <= channels <= 512
    for b in prange(nblocks):
        for c in range(channels):
            part_s[b, c] = 0.0
            part_q[b, c] = 0.0
        r0 = b * rb
        if _is_float32(x) and channels < GRAD32_BELOW:
            _rows_moments32(xf, r0 * channels, min(outer, r0 + rb) - r0, channels, shift,
                            part_s[b], part_q[b], mid_from_memory,
                            np.empty((7, min(channels, COLS)), np.float32),
                            np.empty((2, min(channels, COLS))))
        else:
            _lanes_moments(xf, r0 * channels, min(outer, r0 + rb) - r0, channels, channels,
                           shift, part_s[b], part_q[b], mid_from_memory)
    nchunks = (channels + MERGE_CHUNK - 1) // MERGE_CHUNK
    for k in prange(nchunks):
        _hwc_merge_chunk(part_s, part_q, rb, outer, k * MERGE_CHUNK,
                         min(channels, (k + 1) * MERGE_CHUNK), mean, m2)
    for c in range(channels):
        mean[c] += shift[c]
    return mean, m2


@njit(**_JIT)
def _periodic(consts, channels):
    """consts with V more columns, column k being column k % channels: a vector of constants
    read at any column of a row of channels never runs past the end (see _norm_run)."""
    width = VECTOR_BYTES // consts.itemsize
    padded = np.empty((consts.shape[0], channels + width), consts.dtype)
    # Row by row (a column slice per k took 13 us at 1024 channels), the modulo only where
    # the row wraps.
    for r in range(consts.shape[0]):
        for k in range(channels):
            padded[r, k] = consts[r, k]
        for k in range(channels, channels + width):
            padded[r, k] = consts[r, k % channels]
    return padded


@njit(**_JIT)
def _row_block(outer, channels):
    """Rows per block of a channels-last element-wise pass: BLOCK values, at most
    MAX_ROW_BLOCKS blocks."""
    rb = max(1, BLOCK // channels)
    if (outer + rb - 1) // rb > MAX_ROW_BLOCKS:
        rb = (outer + MAX_ROW_BLOCKS - 1) // MAX_ROW_BLOCKS
    return rb


@njit(**_PARALLEL)
def _hwc_normalize(x, consts, residual, has_res, relu, out, stream):
    outer, channels, _ = x.shape
    xf = x.reshape(x.size)
    of = out.reshape(out.size)
    rf = residual.reshape(residual.size)
    zero = _zero_of(x)
    as_run = stream or channels < RUN_BELOW
    padded = _periodic(consts, channels) if as_run else consts
    rb = _row_block(outer, channels)
    for b in prange((outer + rb - 1) // rb):
        r0 = b * rb
        rows = min(outer, r0 + rb) - r0
        if as_run:  # the block's rows as one run, the constants periodic
            _norm_run(xf, of, rf, r0 * channels, rows * channels, has_res, relu, padded,
                      np.int64(0), channels, zero, stream)
            if stream:
                _store_fence()
        else:
            _norm_rows(xf, of, rf, r0 * channels, rows, channels, channels, has_res, relu,
                       consts, zero)


@njit(**_PARALLEL)
def _hwc_backward(dy, x, mean, invstd, weight, output, has_out, training, out, stream):
    """Channels-last backward."""
    outer, channels, _ = x.shape
    dyf = dy.reshape(dy.size)
    xf = x.reshape(x.size)
    of = output.reshape(output.size)
    dxf = out.reshape(out.size)
    rb = max(1, BLOCK_NHWC // channels)
    nblocks = (outer + rb - 1) // rb
    part_s = np.empty((nblocks, channels))
    part_q = np.empty((nblocks, channels))
    for blk in prange(nblocks):
        for c in range(channels):
            part_s[blk, c] = 0.0
            part_q[blk, c] = 0.0
        r0 = blk * rb
        if _is_float32(x) and channels < GRAD32_BELOW:
            _rows_grad32(dyf, xf, of, has_out, r0 * channels, min(outer, r0 + rb) - r0,
                         channels, mean, part_s[blk], part_q[blk])
        else:
            _grad_sums(dyf, xf, of, has_out, r0 * channels, min(outer, r0 + rb) - r0, channels,
                       channels, mean, part_s[blk], part_q[blk])
    sum_dy = np.empty(channels)
    sum_dy_xmu = np.empty(channels)
    nchunks = (channels + MERGE_CHUNK - 1) // MERGE_CHUNK
    for k in prange(nchunks):
        for c in range(k * MERGE_CHUNK, min(channels, (k + 1) * MERGE_CHUNK)):
            sum_dy[c] = 0.0
            sum_dy_xmu[c] = 0.0
        for blk in range(nblocks):
            for c in range(k * MERGE_CHUNK, min(channels, (k + 1) * MERGE_CHUNK)):
                sum_dy[c] += part_s[blk, c]
                sum_dy_xmu[c] += part_q[blk, c]
    consts = np.empty((5, channels), x.dtype)
    zero = _zero_of(x)
    _grad_constants(0, channels, np.float64(outer), mean, invstd, weight, sum_dy, sum_dy_xmu,
                    consts)
    as_run = stream or channels < RUN_BELOW
    padded = _periodic(consts, channels) if as_run else consts
    rbn = _row_block(outer, channels)
    for blk in prange((outer + rbn - 1) // rbn):
        r0 = blk * rbn
        rows = min(outer, r0 + rbn) - r0
        if as_run:  # the block's rows as one run, the constants periodic
            _dx_run(dyf, xf, of, dxf, r0 * channels, rows * channels, has_out, training,
                    padded, np.int64(0), channels, zero, stream)
            if stream:
                _store_fence()
        else:
            _dx_rows(dyf, xf, of, dxf, r0 * channels, rows, channels, channels, has_out,
                     training, consts, zero)
    return sum_dy, sum_dy_xmu


# ----------------------------------------------------------------------------- public interface

_threads_lock = threading.Lock()
_layer: str | None = None
_forked_gnu_omp = False


def _after_fork_in_child() -> None:
    global _forked_gnu_omp, _threads_lock
    _threads_lock = threading.Lock()
    if _layer == "omp":
        _forked_gnu_omp = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _active_layer() -> str:
    """Start Numba's threading layer (under its own process lock) and return its name."""
    global _layer, _get_threads, _set_threads
    if _layer is None:
        try:
            from numba.np.ufunc import parallel
            parallel._launch_threads()
            _layer = numba.threading_layer()
        except Exception:  # pragma: no cover - private API moved: assume the worst
            _layer = "workqueue"
        else:
            # The layer's own thread-count functions: numba.get_num_threads and
            # set_num_threads take a process lock and a thread lock on every call (1.1-1.8 us
            # each, a tenth of a small call); these are what they call then.
            _get_threads = getattr(parallel, "_get_num_threads", numba.get_num_threads)
            _set_threads = getattr(parallel, "_set_num_threads", numba.set_num_threads)
    return _layer


_get_threads = numba.get_num_threads
_set_threads = numba.set_num_threads


def _run(num_threads, kernel, fallback, *args):
    """Call `kernel` with `num_threads` threads, safely for the active threading layer."""
    layer = _layer or _active_layer()
    if _forked_gnu_omp:
        # GNU OpenMP terminates a forked child that starts a parallel region.
        return fallback(*args)
    n = max(1, min(int(num_threads), numba.config.NUMBA_NUM_THREADS))
    if layer == "workqueue":  # one pool for all Python threads: one call at a time
        with _threads_lock:
            previous = numba.get_num_threads()
            numba.set_num_threads(n)
            try:
                return kernel(*args)
            finally:
                numba.set_num_threads(previous)
    previous = _get_threads()  # thread-local in the omp and tbb layers
    if previous == n:
        return kernel(*args)
    _set_threads(n)
    try:
        return kernel(*args)
    finally:
        _set_threads(previous)


def _streamed(out) -> bool:
    """Whether to write `out` with non-temporal stores (see STREAM_ABOVE)."""
    return out.nbytes > STREAM_ABOVE


def _reference():
    from . import _reference as ref
    return ref


def moments(x, num_threads=1):
    """Per-channel count, mean and M2 (see :func:`fastbn._reference.moments`)."""
    count = x.shape[0] * x.shape[2]
    if count == 0 or x.shape[1] == 0:
        return count, np.zeros(x.shape[1]), np.zeros(x.shape[1])
    if x.shape[2] == 1:
        mean, m2 = _run(num_threads, _hwc_moments, lambda x, _: _reference().moments(x)[1:], x,
                        _streamed(x))
    else:
        mean, m2 = _run(num_threads, _chw_moments, lambda x: _reference().moments(x)[1:], x)
    return count, mean, m2


def normalize(x, mean, scale, shift, residual, relu, out, num_threads=1):
    """out = act((x - mean) * scale + shift + residual) (see :mod:`fastbn._reference`)."""
    if x.size == 0:
        return
    if _forked_gnu_omp:
        return _reference().normalize(x, mean, scale, shift, residual, relu, out)
    consts = np.empty((4, x.shape[1]), x.dtype)
    _norm_constants(mean, scale, shift, consts)
    _normalize_with(x, consts, residual, relu, out, num_threads)


def _normalize_with(x, consts, residual, relu, out, num_threads):
    """normalize with its constants built (see _norm_constants)."""
    kernel = _specialized(_normalize_as, x.shape[2] == 1, residual is not None, bool(relu),
                          _streamed(out))
    _run(num_threads, kernel, None, x, consts, x if residual is None else residual, out)


def train_forward(x, weight, bias, eps, residual, relu, out, num_threads=1):
    """Normalize with the batch statistics; return (mean, biased var)."""
    if x.shape[1] == 0:  # no channels: nothing to normalize (the block sizes divide by C)
        return np.zeros(0), np.zeros(0)

    def fallback(*_):
        return _reference().train_forward(x, weight, bias, eps, residual, relu, out)

    args = (x, weight, bias, float(eps), x if residual is None else residual, out)
    flags = (residual is not None, bool(relu), _streamed(out))
    if x.shape[2] == 1:
        return _run(num_threads, _specialized(_hwc_train_as, *flags), fallback, *args)
    return _run(num_threads, _specialized(_chw_train_as, *flags), fallback, *args,
                _group_bytes(x.shape[2]), OVERLAP)


def backward(dy, x, mean, invstd, weight, output, training, out, num_threads=1):
    """Gradient of batch norm; returns (sum_dy, sum_dy_xmu) (see :mod:`fastbn._reference`)."""
    if x.size == 0:
        return np.zeros(x.shape[1]), np.zeros(x.shape[1])

    def fallback(*_):
        return _reference().backward(dy, x, mean, invstd, weight, output, training, out)

    args = (dy, x, mean, invstd, weight, x if output is None else output)
    if x.shape[2] == 1:  # (no loop compiled for the flags)
        return _run(num_threads, _hwc_backward, fallback, *args, output is not None,
                    bool(training), out, _streamed(out))
    kernel = _specialized(_chw_backward_as, output is not None, bool(training),
                          _streamed(out))
    group_bytes = _group_bytes(x.shape[2], cached_backward=not _streamed(out))
    return _run(num_threads, kernel, fallback, *args, out, group_bytes, OVERLAP)


# ----------------------------------------------------------------------------- entries
# The flags of a call (residual, ReLU, ReLU mask, training, streamed stores, layout) select
# the loops compiled for them deep inside the kernels (_norm_rows, _seg_vectors). As run-time
# values at the kernels' entry they made every call compile every combination it might take:
# float32 channels-first inference 10.4 -> 26.6 s from an empty cache. So Python calls an
# entry compiled for its flags: a closure over them (Numba types a closure's variables as
# literals, and its disk cache tells closures apart by their variables' values), one
# dispatcher per combination, made when first used. (numba.literally would also make them
# literals, but every call of a dispatcher that uses it takes the compiler's slow path, 3 ms.)

_entries: dict = {}


def _specialized(make, *flags):
    """The entry `make(*flags)`, compiled lazily."""
    key = (make, flags)
    entry = _entries.get(key)
    if entry is None:
        entry = _entries.setdefault(key, njit(**_JIT)(make(*flags)))
    return entry


def _normalize_as(channels_last, has_res, relu, stream):
    def normalize(x, consts, residual, out):
        if channels_last:
            _hwc_normalize(x, consts, residual, has_res, relu, out, stream)
        else:
            _chw_normalize(x, consts, residual, has_res, relu, out, np.int64(0), x.shape[1],
                           stream)
    return normalize


def _hwc_train_as(has_res, relu, stream):
    def hwc_train(x, weight, bias, eps, residual, out):
        outer, channels, _ = x.shape
        mean, m2 = _hwc_moments(x, np.bool_(stream))
        var = np.empty(channels)
        consts = np.empty((4, channels), x.dtype)
        _affine_constants(mean, m2, np.float64(outer), weight, bias, eps, var, consts, 0,
                          channels)
        _hwc_normalize(x, consts, residual, has_res, relu, out, stream)
        return mean, var
    return hwc_train


def _chw_train_as(has_res, relu, stream):
    # The flags that select no compiled loop are passed as np.bool_ (not literals), so that
    # what they reach compiles once for all of them.
    def chw_train(x, weight, bias, eps, residual, out, group_bytes, overlap):
        outer, channels, inner = x.shape
        shift = _shift_of(x)
        mean = np.empty(channels)
        m2 = np.empty(channels)
        var = np.empty(channels)
        consts = np.empty((4, channels), x.dtype)
        group = _group_channels(outer, inner, x.itemsize, 1, channels, group_bytes)
        part_s = np.empty(group * _geometry(outer, inner)[3])
        part_q = np.empty(part_s.size)
        # as chw_backward, for float32 data (its moments: the float32 ones of _span_moments32)
        overlapped = stream and overlap and inner >= OVERLAP_FROM and _is_float32(x)
        c0 = e0 = e1 = np.int64(0)  # [e0, e1): the group whose output is due
        while c0 < channels or e0 < e1:
            c1 = min(channels, c0 + group)
            if stream and overlapped:
                _chw_overlap(None, x, x, np.bool_(False), shift, c0, c1, part_s, part_q, consts,
                             residual, np.bool_(has_res), np.bool_(relu), np.bool_(True), out, e0,
                             e1)
                _chw_merged(x, shift, c0, c1, part_s, part_q, mean, m2)
            else:
                _chw_stats(x, shift, c0, c1, part_s, part_q, mean, m2)
            _affine_constants(mean, m2, np.float64(outer * inner), weight, bias, eps, var, consts,
                              c0, c1)
            if not overlapped:
                _chw_normalize(x, consts, residual, has_res, relu, out, c0, c1, stream)
            e0 = c0 if overlapped else c1
            e1 = c1
            c0 = c1
        return mean, var
    return chw_train


def _chw_backward_as(has_out, training, stream):
    def chw_backward(dy, x, mean, invstd, weight, output, out, group_bytes, overlap):
        outer, channels, inner = x.shape
        bpc = _geometry(outer, inner)[3]
        sum_dy = np.empty(channels)
        sum_dy_xmu = np.empty(channels)
        consts = np.empty((5, channels), x.dtype)
        group = _group_channels(outer, inner, x.itemsize, 3 if has_out else 2, channels,
                                group_bytes)
        part_s = np.empty(group * bpc)
        part_q = np.empty(part_s.size)
        # `stream` tested first, and again at the call: a constant, so that without it the
        # overlapped pass is not compiled
        overlapped = stream and overlap and inner >= OVERLAP_FROM
        c0 = e0 = e1 = np.int64(0)  # [e0, e1): the group whose dx is due (see OVERLAP)
        while c0 < channels or e0 < e1:
            c1 = min(channels, c0 + group)
            if stream and overlapped:
                _chw_overlap(dy, x, output, np.bool_(has_out), mean, c0, c1, part_s, part_q,
                             consts, x, np.bool_(False), np.bool_(False), np.bool_(training), out,
                             e0, e1)
            else:
                _chw_partials(dy, x, output, np.bool_(has_out), mean, c0, c1, part_s, part_q)
            for c in range(c0, c1):
                base = (c - c0) * bpc
                sum_dy[c] = part_s[base:base + bpc].sum()
                sum_dy_xmu[c] = part_q[base:base + bpc].sum()
            _grad_constants(c0, c1, np.float64(outer * inner), mean, invstd, weight, sum_dy,
                            sum_dy_xmu, consts)
            if not overlapped:
                _chw_dx(dy, x, output, has_out, training, consts, out, c0, c1, stream)
            e0 = c0 if overlapped else c1
            e1 = c1
            c0 = c1
        return sum_dy, sum_dy_xmu
    return chw_backward


# ----------------------------------------------------------------------------- fast path
# The Cython backend's fast_batch_norm(_backward) in Python, with the per-channel arithmetic
# jitted: for common calls (C-contiguous native float32/float64 arrays, per-channel ndarrays or
# None, no residual) they skip the general path's conversions and NumPy statements on (C,)
# vectors, 13-22 us of a call (the whole 1x16x8x8 inference took 26-29 us, its kernel 4.5-5).
# Anything else returns None, and the caller takes the general path, which also raises every
# error: these functions never raise for a bad argument and change nothing before they know
# they handle the call.

_NATIVE_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _plain(a) -> bool:
    """A C-contiguous float32 or float64 ndarray in native byte order (not a subclass)."""
    return type(a) is np.ndarray and a.dtype in _NATIVE_FLOATS and a.flags.c_contiguous


def _vector_ok(a, channels) -> bool:
    return a is None or (_plain(a) and a.shape == (channels,))


def _like(a, x) -> bool:
    return _plain(a) and a.dtype == x.dtype and a.shape == x.shape


def _writable_like(out, x, operands) -> bool:
    """`out` can take the result: x's kind of array, writable, and sharing memory with no
    operand unless it is that operand (an element-wise pass may overwrite its own input)."""
    if not (_like(out, x) and out.flags.writeable):
        return False
    return not any(a is not None and a is not out and np.may_share_memory(out, a)
                   for a in operands)


def _dims(x, axis):
    """(outer, C, inner) of x with its channels on `axis`, or None for an axis the general
    path must judge."""
    ndim = x.ndim
    if type(axis) is not int or not -ndim <= axis < ndim:
        return None
    axis %= ndim
    shape = x.shape
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


def _as_f64(a, channels, default):
    """A per-channel vector (checked by _vector_ok) as float64, `default` for None."""
    if a is None:
        return np.full(channels, default)
    return a if a.dtype == np.float64 else a.astype(np.float64)


# The fast path's per-channel steps are small jitted functions (cheap to compile for each
# combination of None and dtypes), as few calls as possible: after a pass over a tensor larger
# than L2 the interpreter's own data is out of the cache, and each Python step or dispatch
# costs microseconds (256x1024 inference: the checks took 10 us, the constants 6).
# A jitted driver around the kernels too would save one more dispatch, but each combination of
# arguments would then recompile the kernels into it (1.9 s each for inference, 3.7 s for
# training, instead of 0.2-0.7 s).

@njit(**_JIT)
def _eval_constants(running_mean, running_var, weight, bias, eps, dtype):
    """The constants of inference from the running statistics (see _norm_constants), a new
    array of x's dtype: scale is weight / sqrt(var + eps) in float64, as the general path
    computes it."""
    consts = np.empty((4, running_mean.shape[0]), dtype)
    for c in range(consts.shape[1]):
        mean = np.float64(running_mean[c])
        consts[0, c] = mean
        consts[1, c] = mean - consts[0, c]
        w = 1.0
        if weight is not None:
            w = np.float64(weight[c])
        consts[2, c] = w / np.sqrt(np.float64(running_var[c]) + eps)
        consts[3, c] = 0.0
        if bias is not None:
            consts[3, c] = bias[c]
    return consts


@njit(**_JIT)
def _affine64(weight, bias, channels):
    """weight and bias as new float64 arrays (None: ones, zeros)."""
    w = np.ones(channels)
    b = np.zeros(channels)
    for c in range(channels):
        if weight is not None:
            w[c] = weight[c]
        if bias is not None:
            b[c] = bias[c]
    return w, b


@njit(**_JIT)
def _after_training(mean, var, count, running_mean, running_var, momentum, stats):
    """The running-statistics update (when given) and the statistics kept (stats not None)."""
    if running_mean is not None:
        _update_running(running_mean, running_var, mean, var, count / (count - 1), momentum)
    if stats is not None:
        stats[0] = mean
        stats[1] = var


@njit(**_JIT)
def _update_running(running_mean, running_var, mean, var, factor, momentum):
    """The running-statistics update of the general path (_api._update_running_stats), the
    same operations in the same order: new = (1 - momentum) * old + momentum * batch, with
    the unbiased variance var * factor; rounded once into each array's dtype."""
    for c in range(mean.shape[0]):
        running_mean[c] = (1.0 - momentum) * np.float64(running_mean[c]) + momentum * mean[c]
    for c in range(mean.shape[0]):
        running_var[c] = ((1.0 - momentum) * np.float64(running_var[c])
                          + momentum * (var[c] * factor))


@njit(**_JIT)
def _scale_shift_constants(scale, shift, channels, dtype):
    """The constants of normalize with a zero mean (see _norm_constants), a new array of x's
    dtype: the general path of fastbn.affine."""
    consts = np.zeros((4, channels), dtype)
    for c in range(channels):
        consts[2, c] = 1.0 if scale is None else np.float64(scale[c])
        consts[3, c] = 0.0 if shift is None else np.float64(shift[c])
    return consts


def fast_affine(input, scale, shift, axis, out, activation, num_threads):
    """affine without a residual for the common case (as fast_batch_norm in inference), or
    None when the general path must handle the call."""
    if _forked_gnu_omp or not (_plain(input) and input.ndim >= 2 and input.size > 0):
        return None
    if activation is not None and not (type(activation) is str and activation == "relu"):
        return None
    dims = _dims(input, axis)
    if dims is None or not (_vector_ok(scale, dims[1]) and _vector_ok(shift, dims[1])):
        return None
    if out is None:
        out = np.empty_like(input)
    elif not _writable_like(out, input, (input,)):
        return None
    consts = _scale_shift_constants(scale, shift, dims[1], input.dtype)
    _normalize_with(input.reshape(dims), consts, None, activation is not None,
                    out.reshape(dims), num_threads)
    return out


def fast_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                    axis, out, activation, num_threads, stats=None):
    """batch_norm for the common case, or None when the general path must handle the call.

    stats: None, or for training a C-contiguous float64 array of shape (2, C) that receives the
    batch mean and biased variance (what the BatchNorm layer keeps for its backward)."""
    if _forked_gnu_omp or not (_plain(input) and input.ndim >= 2 and input.size > 0):
        return None
    if activation is not None and not (type(activation) is str and activation == "relu"):
        return None
    if type(training) is not bool or type(eps) is not float or type(momentum) is not float:
        return None
    if not (eps >= 0.0 and 0.0 <= momentum <= 1.0):
        return None
    dims = _dims(input, axis)
    if dims is None:
        return None
    outer, channels, inner = dims
    if not (_vector_ok(weight, channels) and _vector_ok(bias, channels)
            and _vector_ok(running_mean, channels) and _vector_ok(running_var, channels)):
        return None
    if (running_mean is None) != (running_var is None):
        return None
    if training:
        if outer * inner < 2:
            return None
        if running_mean is not None and not (running_mean.flags.writeable
                                             and running_var.flags.writeable):
            return None
    elif running_mean is None:
        return None
    if stats is not None and not (
            training and type(stats) is np.ndarray and stats.dtype == np.float64
            and stats.flags.c_contiguous and stats.flags.writeable
            and stats.shape == (2, channels)):
        return None
    if out is None:
        out = np.empty_like(input)
    elif not _writable_like(out, input, (input,)):
        return None
    x3, out3, relu = input.reshape(dims), out.reshape(dims), activation is not None
    if training:
        mean, var = train_forward(x3, *_affine64(weight, bias, channels), eps, None, relu,
                                  out3, num_threads)
        if running_mean is not None or stats is not None:
            _after_training(mean, var, outer * inner, running_mean, running_var, momentum,
                            stats)
    else:
        consts = _eval_constants(running_mean, running_var, weight, bias, eps, input.dtype)
        _normalize_with(x3, consts, None, relu, out3, num_threads)
    return out


def fast_batch_norm_backward(grad_output, input, mean, invstd, weight, axis, training, output,
                             activation, out, num_threads):
    """batch_norm_backward for the common case (contiguous native float arrays of one dtype,
    per-channel ndarrays, `out` None or such an array), or None when the general path must
    handle the call."""
    if _forked_gnu_omp or not (_plain(input) and input.ndim >= 2 and input.size > 0
                               and _like(grad_output, input)):
        return None
    if type(training) is not bool or (
            activation is not None and not (type(activation) is str and activation == "relu")):
        return None
    if activation is None:
        output = None
    elif not _like(output, input):
        return None
    dims = _dims(input, axis)
    if dims is None:
        return None
    channels = dims[1]
    if mean is None or invstd is None or not (
            _vector_ok(mean, channels) and _vector_ok(invstd, channels)
            and _vector_ok(weight, channels)):
        return None
    if out is None:
        out = np.empty_like(input)
    elif not _writable_like(out, input, (grad_output, input, output)):
        return None
    invstd = _as_f64(invstd, channels, 0.0)
    sum_dy, sum_dy_xmu = backward(
        grad_output.reshape(dims), input.reshape(dims), _as_f64(mean, channels, 0.0), invstd,
        _as_f64(weight, channels, 1.0), None if output is None else output.reshape(dims),
        training, out.reshape(dims), num_threads)
    return out, (sum_dy_xmu * invstd).astype(input.dtype), sum_dy.astype(input.dtype)
