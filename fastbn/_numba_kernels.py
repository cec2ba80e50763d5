"""Numba kernels (backend "numba"): parallel ``@njit`` versions of every path of the Cython backend.

The four functions of the backend interface (see :mod:`fastbn._reference`) work on C-contiguous
``(outer, C, inner)`` views of float32 or float64 data; ``inner == 1`` is the channels-last case.

Numerics
--------
* Statistics are accumulated in float64 about a per-channel shift (the channel's first value), so a
  constant channel has an exact mean and a zero M2. Each block of the data gives (count, mean, M2)
  from per-lane shifted sums; blocks are merged with Chan's formula in a fixed order.
* The decomposition into blocks depends only on the shape, never on the thread count, and every
  partial result is written to its own slot and combined in a fixed order: results are bitwise
  identical for any number of threads (and for the serial fallback below).
* No ``fastmath``: the reductions vectorize because they are written as several independent
  accumulators (per-lane arrays that the loop vectorizer handles without reassociation).
* Normalization is ``((x - mean_hi) - mean_lo) * scale + shift`` in the compute dtype, where
  ``mean_hi`` is the float64 mean rounded to that dtype and ``mean_lo`` the rounded remainder: a
  float32 input with a large offset loses no digits in the subtraction.
* ReLU is ``0 if y <= 0 else y``: NaN passes through.

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
Kernels compile lazily: one parallel function per operation and layout (channels-first or
channels-last), specialized only on the dtype (residual/output presence and ReLU are runtime
flags), so at most 16 specializations exist and a user pays only for those used. All are cached on
disk (``cache=True``; Numba writes cache files atomically and keys them on the source file's
timestamp). Measured on the 2-core development machine (heavily loaded by other jobs, so upper
bounds): cold first call (empty cache) 4-13 s per channels-last kernel, 8-19 s for channels-first
moments/training, 20-30 s for channels-first backward; about 150 s to compile all 16. Warm cache:
import 0.8 s, first call 0.05 s (about 1 s for the very first call of a process: Numba and TBB
start-up).
"""
from __future__ import annotations

import os
import threading

import numba
import numpy as np
from numba import njit, prange

__all__ = ["moments", "normalize", "train_forward", "backward"]

if "NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default":
    # One OpenMP pool shared with the Cython kernels: no oversubscription (see the docstring).
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]

# Lanes (independent float64 accumulators) per row of a channels-first block.
LANES = 32
# Elements per statistics block (channels-first / channels-last).
BLOCK = 16384
BLOCK_NHWC = 65536
# Bytes of input per channel group in the fused channels-first passes: the second pass over a
# group re-reads data that the first pass left in the (8 MB, shared) last-level cache.
GROUP_BYTES = 1 << 21
# Channels per chunk when merging channels-last partials in parallel.
MERGE_CHUNK = 256

_JIT = dict(cache=True, nogil=True)
_PARALLEL = dict(parallel=True, cache=True, nogil=True)


# ----------------------------------------------------------------------------- lane helpers

@njit(**_JIT)
def _lanes_moments(xs, width, shiftv, s, q):
    """Accumulate the rows of width `width` of the 1-D contiguous `xs` into lanes s, q.

    s[k] += x - shift[k], q[k] += (x - shift[k])**2 in float64; four rows are combined per
    update so the accumulators are loaded and stored once per four elements.
    """
    rows = xs.shape[0] // width
    r = 0
    while r + 4 <= rows:
        b = r * width
        x0 = xs[b:b + width]
        x1 = xs[b + width:b + 2 * width]
        x2 = xs[b + 2 * width:b + 3 * width]
        x3 = xs[b + 3 * width:b + 4 * width]
        for k in range(width):
            sh = shiftv[k]
            d0 = x0[k] - sh
            d1 = x1[k] - sh
            d2 = x2[k] - sh
            d3 = x3[k] - sh
            s[k] += (d0 + d1) + (d2 + d3)
            q[k] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        r += 4
    while r < rows:
        b = r * width
        x0 = xs[b:b + width]
        for k in range(width):
            d0 = x0[k] - shiftv[k]
            s[k] += d0
            q[k] += d0 * d0
        r += 1


@njit(**_JIT)
def _lanes_grad(dys, xs, os, has_out, width, meanv, s, q):
    """Backward sums over rows of width `width`: s[k] += g, q[k] += g * (x - mean[k]).

    g = dy, or dy masked by output > 0 when `has_out` (`os` is the forward output).
    """
    rows = xs.shape[0] // width
    r = 0
    while r + 4 <= rows:
        b = r * width
        g0s = dys[b:b + width]
        g1s = dys[b + width:b + 2 * width]
        g2s = dys[b + 2 * width:b + 3 * width]
        g3s = dys[b + 3 * width:b + 4 * width]
        x0 = xs[b:b + width]
        x1 = xs[b + width:b + 2 * width]
        x2 = xs[b + 2 * width:b + 3 * width]
        x3 = xs[b + 3 * width:b + 4 * width]
        if has_out:
            o0 = os[b:b + width]
            o1 = os[b + width:b + 2 * width]
            o2 = os[b + 2 * width:b + 3 * width]
            o3 = os[b + 3 * width:b + 4 * width]
            for k in range(width):
                m = meanv[k]
                g0 = np.float64(g0s[k]) if o0[k] > 0 else 0.0
                g1 = np.float64(g1s[k]) if o1[k] > 0 else 0.0
                g2 = np.float64(g2s[k]) if o2[k] > 0 else 0.0
                g3 = np.float64(g3s[k]) if o3[k] > 0 else 0.0
                s[k] += (g0 + g1) + (g2 + g3)
                q[k] += ((g0 * (x0[k] - m) + g1 * (x1[k] - m))
                         + (g2 * (x2[k] - m) + g3 * (x3[k] - m)))
        else:
            for k in range(width):
                m = meanv[k]
                g0 = np.float64(g0s[k])
                g1 = np.float64(g1s[k])
                g2 = np.float64(g2s[k])
                g3 = np.float64(g3s[k])
                s[k] += (g0 + g1) + (g2 + g3)
                q[k] += ((g0 * (x0[k] - m) + g1 * (x1[k] - m))
                         + (g2 * (x2[k] - m) + g3 * (x3[k] - m)))
        r += 4
    while r < rows:
        b = r * width
        g0s = dys[b:b + width]
        x0 = xs[b:b + width]
        o0 = os[b:b + width]
        for k in range(width):
            g0 = np.float64(g0s[k]) if (not has_out or o0[k] > 0) else 0.0
            s[k] += g0
            q[k] += g0 * (x0[k] - meanv[k])
        r += 1


@njit(**_JIT)
def _tree_sum(v):
    """Sum of v (length a power of two) in a fixed pairwise order; v is overwritten."""
    w = v.shape[0]
    while w > 1:
        w //= 2
        for k in range(w):
            v[k] += v[k + w]
    return v[0]


@njit(**_JIT)
def _norm_seg(xs, os, rs, has_res, relu, hi, lo, sc, sh, zero):
    """os = act(((xs - hi) - lo) * sc + sh [+ rs]) with scalar constants (channels-first row)."""
    n = xs.shape[0]
    if relu:
        if has_res:
            for i in range(n):
                y = ((xs[i] - hi) - lo) * sc + sh + rs[i]
                os[i] = zero if y <= zero else y
        else:
            for i in range(n):
                y = ((xs[i] - hi) - lo) * sc + sh
                os[i] = zero if y <= zero else y
    else:
        if has_res:
            for i in range(n):
                os[i] = ((xs[i] - hi) - lo) * sc + sh + rs[i]
        else:
            for i in range(n):
                os[i] = ((xs[i] - hi) - lo) * sc + sh


@njit(**_JIT)
def _norm_row(xs, os, rs, has_res, relu, hi, lo, sc, sh, zero):
    """The same with per-channel vectors (one channels-last row)."""
    n = xs.shape[0]
    if relu:
        if has_res:
            for i in range(n):
                y = ((xs[i] - hi[i]) - lo[i]) * sc[i] + sh[i] + rs[i]
                os[i] = zero if y <= zero else y
        else:
            for i in range(n):
                y = ((xs[i] - hi[i]) - lo[i]) * sc[i] + sh[i]
                os[i] = zero if y <= zero else y
    else:
        if has_res:
            for i in range(n):
                os[i] = ((xs[i] - hi[i]) - lo[i]) * sc[i] + sh[i] + rs[i]
        else:
            for i in range(n):
                os[i] = ((xs[i] - hi[i]) - lo[i]) * sc[i] + sh[i]


@njit(**_JIT)
def _grad_seg(dys, xs, os, has_out, dxs, a, b, c, hi, lo, training, zero):
    """dx = g*a + ((x - hi) - lo)*b + c (training) or g*a (frozen), scalar constants."""
    n = xs.shape[0]
    if training:
        if has_out:
            for i in range(n):
                g = dys[i] if os[i] > 0 else zero
                dxs[i] = g * a + ((xs[i] - hi) - lo) * b + c
        else:
            for i in range(n):
                dxs[i] = dys[i] * a + ((xs[i] - hi) - lo) * b + c
    else:
        if has_out:
            for i in range(n):
                g = dys[i] if os[i] > 0 else zero
                dxs[i] = g * a
        else:
            for i in range(n):
                dxs[i] = dys[i] * a


@njit(**_JIT)
def _grad_row(dys, xs, os, has_out, dxs, a, b, c, hi, lo, training, zero):
    """The same with per-channel vectors (one channels-last row)."""
    n = xs.shape[0]
    if training:
        if has_out:
            for i in range(n):
                g = dys[i] if os[i] > 0 else zero
                dxs[i] = g * a[i] + ((xs[i] - hi[i]) - lo[i]) * b[i] + c[i]
        else:
            for i in range(n):
                dxs[i] = dys[i] * a[i] + ((xs[i] - hi[i]) - lo[i]) * b[i] + c[i]
    else:
        if has_out:
            for i in range(n):
                g = dys[i] if os[i] > 0 else zero
                dxs[i] = g * a[i]
        else:
            for i in range(n):
                dxs[i] = dys[i] * a[i]


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
    rows = max(1, BLOCK // inner)
    return rows, 1, inner, (outer + rows - 1) // rows


@njit(**_JIT)
def _group_channels(outer, inner, itemsize, arrays, channels):
    per_channel = outer * inner * itemsize * arrays
    return max(1, min(channels, GROUP_BYTES // max(1, per_channel)))


@njit(**_JIT)
def _chw_block_bounds(j, rows, pieces, plen, outer, inner):
    """Rows [n0, n1) and inner range [i0, i1) of channels-first block j of a channel."""
    n0 = (j // pieces) * rows
    i0 = (j % pieces) * plen
    return n0, min(outer, n0 + rows), i0, min(inner, i0 + plen)


@njit(**_JIT)
def _chw_block_moments(x, c, j, rows, pieces, plen, shift, part_s, part_q, slot):
    """Shifted sums of block j of channel c (channels-first) into part_s/part_q[slot]."""
    n0, n1, i0, i1 = _chw_block_bounds(j, rows, pieces, plen, x.shape[0], x.shape[2])
    s = np.zeros(LANES)
    q = np.zeros(LANES)
    shiftv = np.full(LANES, shift)
    full = (i1 - i0) // LANES * LANES
    for n in range(n0, n1):
        if full > 0:
            _lanes_moments(x[n, c, i0:i0 + full], LANES, shiftv, s, q)
        if i0 + full < i1:
            _lanes_moments(x[n, c, i0 + full:i1], i1 - i0 - full, shiftv, s, q)
    part_s[slot] = _tree_sum(s)
    part_q[slot] = _tree_sum(q)


@njit(**_JIT)
def _chw_block_grad(dy, x, output, has_out, c, j, rows, pieces, plen, mean, part_s, part_q,
                    slot):
    """Backward sums of block j of channel c (channels-first) into part_s/part_q[slot]."""
    n0, n1, i0, i1 = _chw_block_bounds(j, rows, pieces, plen, x.shape[0], x.shape[2])
    s = np.zeros(LANES)
    q = np.zeros(LANES)
    meanv = np.full(LANES, mean)
    full = (i1 - i0) // LANES * LANES
    for n in range(n0, n1):
        if full > 0:
            _lanes_grad(dy[n, c, i0:i0 + full], x[n, c, i0:i0 + full],
                        output[n, c, i0:i0 + full], has_out, LANES, meanv, s, q)
        if i0 + full < i1:
            _lanes_grad(dy[n, c, i0 + full:i1], x[n, c, i0 + full:i1],
                        output[n, c, i0 + full:i1], has_out, i1 - i0 - full, meanv, s, q)
    part_s[slot] = _tree_sum(s)
    part_q[slot] = _tree_sum(q)


@njit(**_JIT)
def _chw_merge(part_s, part_q, base, nblocks, rows, pieces, plen, outer, inner):
    """Chan's merge of one channel's block partials (shifted sums), in block order."""
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


@njit(**_JIT)
def _shift_of(x):
    channels = x.shape[1]
    shift = np.empty(channels)
    for c in range(channels):
        shift[c] = x[0, c, 0]
    return shift


@njit(**_JIT)
def _affine_constants(mean, m2, count, weight, bias, eps, var, hi, lo, sc, sh, c0, c1):
    """var = m2/count and the compute-dtype constants of the normalization of [c0, c1)."""
    for c in range(c0, c1):
        var[c] = m2[c] / count
        hi[c] = mean[c]
        lo[c] = mean[c] - hi[c]
        sc[c] = weight[c] / np.sqrt(var[c] + eps)
        sh[c] = bias[c]


@njit(**_JIT)
def _grad_constants(c0, c1, n, mean, invstd, weight, sum_dy, sum_dy_xmu, a, b, cc, hi, lo):
    for c in range(c0, c1):
        ac = weight[c] * invstd[c]
        a[c] = ac
        b[c] = -ac * invstd[c] * invstd[c] * sum_dy_xmu[c] / n
        cc[c] = -ac * sum_dy[c] / n
        hi[c] = mean[c]
        lo[c] = mean[c] - hi[c]


# ------------------------------------------------------------------------ channels-first kernels
# One parallel function per operation and layout (compiled only when used). Channels-first
# operations that read the data twice run channel group by channel group, so the second pass
# finds the group in cache.

@njit(**_PARALLEL)
def _chw_moments(x):
    outer, channels, inner = x.shape
    shift = _shift_of(x)
    mean = np.empty(channels)
    m2 = np.empty(channels)
    rows, pieces, plen, bpc = _geometry(outer, inner)
    part_s = np.empty(channels * bpc)
    part_q = np.empty(channels * bpc)
    for t in prange(channels * bpc):
        c = t // bpc
        _chw_block_moments(x, c, t % bpc, rows, pieces, plen, shift[c], part_s, part_q, t)
    for c in prange(channels):
        mc, m2c = _chw_merge(part_s, part_q, c * bpc, bpc, rows, pieces, plen, outer, inner)
        mean[c] = shift[c] + mc
        m2[c] = m2c
    return mean, m2


@njit(**_PARALLEL)
def _chw_train(x, weight, bias, eps, residual, has_res, relu, out):
    outer, channels, inner = x.shape
    count = np.float64(outer * inner)
    shift = _shift_of(x)
    mean = np.empty(channels)
    m2 = np.empty(channels)
    var = np.empty(channels)
    hi = np.empty(channels, x.dtype)
    lo = np.empty(channels, x.dtype)
    sc = np.empty(channels, x.dtype)
    sh = np.empty(channels, x.dtype)
    zero = np.zeros(1, x.dtype)[0]
    rows, pieces, plen, bpc = _geometry(outer, inner)
    group = _group_channels(outer, inner, x.itemsize, 1, channels)
    part_s = np.empty(group * bpc)
    part_q = np.empty(group * bpc)
    for c0 in range(0, channels, group):
        c1 = min(channels, c0 + group)
        for t in prange((c1 - c0) * bpc):
            c = c0 + t // bpc
            _chw_block_moments(x, c, t % bpc, rows, pieces, plen, shift[c], part_s, part_q, t)
        for c in range(c0, c1):
            mc, m2c = _chw_merge(part_s, part_q, (c - c0) * bpc, bpc, rows, pieces, plen,
                                 outer, inner)
            mean[c] = shift[c] + mc
            m2[c] = m2c
        _affine_constants(mean, m2, count, weight, bias, eps, var, hi, lo, sc, sh, c0, c1)
        for t in prange((c1 - c0) * outer):
            c = c0 + t // outer
            n = t % outer
            _norm_seg(x[n, c], out[n, c], residual[n, c], has_res, relu, hi[c], lo[c], sc[c],
                      sh[c], zero)
    return mean, var


@njit(**_PARALLEL)
def _chw_normalize(x, hi, lo, sc, sh, residual, has_res, relu, out):
    outer, channels, _ = x.shape
    zero = np.zeros(1, x.dtype)[0]
    for t in prange(channels * outer):
        n = t // channels
        c = t % channels
        _norm_seg(x[n, c], out[n, c], residual[n, c], has_res, relu, hi[c], lo[c], sc[c],
                  sh[c], zero)


@njit(**_PARALLEL)
def _chw_backward(dy, x, mean, invstd, weight, output, has_out, training, out):
    outer, channels, inner = x.shape
    n = np.float64(outer * inner)
    sum_dy = np.empty(channels)
    sum_dy_xmu = np.empty(channels)
    a = np.empty(channels, x.dtype)
    b = np.empty(channels, x.dtype)
    cc = np.empty(channels, x.dtype)
    hi = np.empty(channels, x.dtype)
    lo = np.empty(channels, x.dtype)
    zero = np.zeros(1, x.dtype)[0]
    rows, pieces, plen, bpc = _geometry(outer, inner)
    group = _group_channels(outer, inner, x.itemsize, 3 if has_out else 2, channels)
    part_s = np.empty(group * bpc)
    part_q = np.empty(group * bpc)
    for c0 in range(0, channels, group):
        c1 = min(channels, c0 + group)
        for t in prange((c1 - c0) * bpc):
            c = c0 + t // bpc
            _chw_block_grad(dy, x, output, has_out, c, t % bpc, rows, pieces, plen, mean[c],
                            part_s, part_q, t)
        for c in range(c0, c1):
            s1 = 0.0
            s2 = 0.0
            base = (c - c0) * bpc
            for j in range(bpc):
                s1 += part_s[base + j]
                s2 += part_q[base + j]
            sum_dy[c] = s1
            sum_dy_xmu[c] = s2
        _grad_constants(c0, c1, n, mean, invstd, weight, sum_dy, sum_dy_xmu, a, b, cc, hi, lo)
        for t in prange((c1 - c0) * outer):
            c = c0 + t // outer
            i = t % outer
            _grad_seg(dy[i, c], x[i, c], output[i, c], has_out, out[i, c], a[c], b[c], cc[c],
                      hi[c], lo[c], training, zero)
    return sum_dy, sum_dy_xmu


# ------------------------------------------------------------------------- channels-last kernels

@njit(**_PARALLEL)
def _hwc_moments(x):
    """mean and M2 of every channel of a channels-last (rows, C, 1) view."""
    outer, channels, _ = x.shape
    x2 = x.reshape((outer, channels))
    shift = _shift_of(x)
    mean = np.empty(channels)
    m2 = np.empty(channels)
    rb = max(1, BLOCK_NHWC // channels)
    nblocks = (outer + rb - 1) // rb
    part_s = np.zeros((nblocks, channels))
    part_q = np.zeros((nblocks, channels))
    for b in prange(nblocks):
        r0 = b * rb
        r1 = min(outer, r0 + rb)
        _lanes_moments(x2[r0:r1].reshape((r1 - r0) * channels), channels, shift, part_s[b],
                       part_q[b])
    nchunks = (channels + MERGE_CHUNK - 1) // MERGE_CHUNK
    for k in prange(nchunks):
        _hwc_merge_chunk(part_s, part_q, rb, outer, k * MERGE_CHUNK,
                         min(channels, (k + 1) * MERGE_CHUNK), mean, m2)
    for c in range(channels):
        mean[c] += shift[c]
    return mean, m2


@njit(**_PARALLEL)
def _hwc_normalize(x, hi, lo, sc, sh, residual, has_res, relu, out):
    outer, channels, _ = x.shape
    x2 = x.reshape((outer, channels))
    o2 = out.reshape((outer, channels))
    r2 = residual.reshape((outer, channels))
    zero = np.zeros(1, x.dtype)[0]
    rb = max(1, BLOCK // channels)
    for b in prange((outer + rb - 1) // rb):
        for r in range(b * rb, min(outer, (b + 1) * rb)):
            _norm_row(x2[r], o2[r], r2[r], has_res, relu, hi, lo, sc, sh, zero)


@njit(**_PARALLEL)
def _hwc_backward(dy, x, mean, invstd, weight, output, has_out, training, out):
    outer, channels, _ = x.shape
    shape2 = (outer, channels)
    x2 = x.reshape(shape2)
    dy2 = dy.reshape(shape2)
    o2 = output.reshape(shape2)
    dx2 = out.reshape(shape2)
    n = np.float64(outer)
    rb = max(1, BLOCK_NHWC // channels)
    nblocks = (outer + rb - 1) // rb
    part_s = np.zeros((nblocks, channels))
    part_q = np.zeros((nblocks, channels))
    for blk in prange(nblocks):
        r0 = blk * rb
        r1 = min(outer, r0 + rb)
        size = (r1 - r0) * channels
        _lanes_grad(dy2[r0:r1].reshape(size), x2[r0:r1].reshape(size),
                    o2[r0:r1].reshape(size), has_out, channels, mean, part_s[blk], part_q[blk])
    sum_dy = np.zeros(channels)
    sum_dy_xmu = np.zeros(channels)
    nchunks = (channels + MERGE_CHUNK - 1) // MERGE_CHUNK
    for k in prange(nchunks):
        for blk in range(nblocks):
            for c in range(k * MERGE_CHUNK, min(channels, (k + 1) * MERGE_CHUNK)):
                sum_dy[c] += part_s[blk, c]
                sum_dy_xmu[c] += part_q[blk, c]
    a = np.empty(channels, x.dtype)
    b = np.empty(channels, x.dtype)
    cc = np.empty(channels, x.dtype)
    hi = np.empty(channels, x.dtype)
    lo = np.empty(channels, x.dtype)
    zero = np.zeros(1, x.dtype)[0]
    _grad_constants(0, channels, n, mean, invstd, weight, sum_dy, sum_dy_xmu, a, b, cc, hi, lo)
    rbn = max(1, BLOCK // channels)
    for blk in prange((outer + rbn - 1) // rbn):
        for r in range(blk * rbn, min(outer, (blk + 1) * rbn)):
            _grad_row(dy2[r], x2[r], o2[r], has_out, dx2[r], a, b, cc, hi, lo, training, zero)
    return sum_dy, sum_dy_xmu


@njit(**_JIT)
def _hwc_train(x, weight, bias, eps, residual, has_res, relu, out):
    outer, channels, _ = x.shape
    mean, m2 = _hwc_moments(x)
    var = np.empty(channels)
    hi = np.empty(channels, x.dtype)
    lo = np.empty(channels, x.dtype)
    sc = np.empty(channels, x.dtype)
    sh = np.empty(channels, x.dtype)
    _affine_constants(mean, m2, np.float64(outer), weight, bias, eps, var, hi, lo, sc, sh, 0,
                      channels)
    _hwc_normalize(x, hi, lo, sc, sh, residual, has_res, relu, out)
    return mean, var


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
    global _layer
    if _layer is None:
        try:
            from numba.np.ufunc.parallel import _launch_threads
            _launch_threads()
            _layer = numba.threading_layer()
        except Exception:  # pragma: no cover - private API moved: assume the worst
            _layer = "workqueue"
    return _layer


def _run(num_threads, kernel, fallback, *args):
    """Call `kernel` with `num_threads` threads, safely for the active threading layer."""
    layer = _layer or _active_layer()
    if _forked_gnu_omp:
        # GNU OpenMP terminates a forked child that starts a parallel region.
        return fallback(*args)
    n = max(1, min(int(num_threads), numba.config.NUMBA_NUM_THREADS))
    previous = numba.get_num_threads()
    if layer == "workqueue":
        with _threads_lock:
            numba.set_num_threads(n)
            try:
                return kernel(*args)
            finally:
                numba.set_num_threads(previous)
    numba.set_num_threads(n)  # thread-local in Numba
    try:
        return kernel(*args)
    finally:
        numba.set_num_threads(previous)


def _reference():
    from . import _reference as ref
    return ref


def moments(x, num_threads=1):
    """Per-channel count, mean and M2 (see :func:`fastbn._reference.moments`)."""
    count = x.shape[0] * x.shape[2]
    if count == 0 or x.shape[1] == 0:
        return count, np.zeros(x.shape[1]), np.zeros(x.shape[1])
    kernel = _hwc_moments if x.shape[2] == 1 else _chw_moments
    mean, m2 = _run(num_threads, kernel, lambda x: _reference().moments(x)[1:], x)
    return count, mean, m2


def normalize(x, mean, scale, shift, residual, relu, out, num_threads=1):
    """out = act((x - mean) * scale + shift + residual) (see :mod:`fastbn._reference`)."""
    if x.size == 0:
        return
    if _forked_gnu_omp:
        return _reference().normalize(x, mean, scale, shift, residual, relu, out)
    dtype = x.dtype
    hi = mean.astype(dtype)
    lo = (mean - hi).astype(dtype)
    kernel = _hwc_normalize if x.shape[2] == 1 else _chw_normalize
    _run(num_threads, kernel, None, x, hi, lo, scale.astype(dtype), shift.astype(dtype),
         x if residual is None else residual, residual is not None, bool(relu), out)


def train_forward(x, weight, bias, eps, residual, relu, out, num_threads=1):
    """Normalize with the batch statistics; return (mean, biased var)."""
    if x.shape[1] == 0:  # no channels: nothing to normalize (the block sizes divide by C)
        return np.zeros(0), np.zeros(0)
    kernel = _hwc_train if x.shape[2] == 1 else _chw_train
    return _run(num_threads, kernel,
                lambda x, w, b, e, r, _, relu, o: _reference().train_forward(
                    x, w, b, e, None if not _ else r, relu, o),
                x, weight, bias, float(eps), x if residual is None else residual,
                residual is not None, bool(relu), out)


def backward(dy, x, mean, invstd, weight, output, training, out, num_threads=1):
    """Gradient of batch norm; returns (sum_dy, sum_dy_xmu) (see :mod:`fastbn._reference`)."""
    if x.size == 0:
        return np.zeros(x.shape[1]), np.zeros(x.shape[1])
    kernel = _hwc_backward if x.shape[2] == 1 else _chw_backward
    return _run(num_threads, kernel,
                lambda dy, x, m, i, w, o, has, t, out: _reference().backward(
                    dy, x, m, i, w, o if has else None, t, out),
                dy, x, mean, invstd, weight, x if output is None else output,
                output is not None, bool(training), out)
