"""Numba backend specifics: determinism across thread counts, threading-layer safety (Python
threads, fork), accuracy of the split-mean normalization, compile caching."""
import multiprocessing
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import fastbn

numba_kernels = pytest.importorskip("fastbn._numba_kernels")
if "numba" not in fastbn.available_backends():
    pytest.skip("numba backend unavailable", allow_module_level=True)

import numba  # noqa: E402

# Shapes covering both layouts, several blocks per channel, inner split into pieces and tails,
# short rows shared out in units of several channels (several units and blocks, a partial unit),
# rows just short (RUN) and just long enough to be cut into lanes, long rows shared out in
# units of several channels (with a partial unit).
SHAPES = [(6, 5, 1), (300, 7, 1), (3, 4, 20000), (40, 3, 77), (2, 3, 4096 * 5 + 3),
          (700, 45, 49), (5, 3, numba_kernels.RUN), (5, 3, numba_kernels.RUN + 1),
          (4, 7, numba_kernels.LONG_RUN // 3 - 1)]


def data(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    return ((rng.standard_normal(shape) * 3 + 7).astype(dtype),
            rng.standard_normal(shape).astype(dtype))


def run_all(x, dy, num_threads):
    c = x.shape[1]
    w = np.linspace(0.5, 1.5, c)
    b = np.linspace(-1, 1, c)
    out = np.empty_like(x)
    count, mean, m2 = numba_kernels.moments(x, num_threads)
    tmean, tvar = numba_kernels.train_forward(x, w, b, 1e-5, dy, True, out, num_threads)
    inv = 1 / np.sqrt(tvar + 1e-5)
    dx = np.empty_like(x)
    sums = numba_kernels.backward(dy, x, tmean, inv, w, out, True, dx, num_threads)
    ev = np.empty_like(x)
    numba_kernels.normalize(x, tmean, w * inv, b, None, False, ev, num_threads)
    return [mean, m2, out, tmean, tvar, dx, *sums, ev]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bitwise_identical_for_any_thread_count(shape, dtype):
    x, dy = data(shape, dtype, seed=1)
    results = [run_all(x, dy, n) for n in (1, 2, 3)]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.array_equal(a, b, equal_nan=True)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_the_reference(shape, dtype):
    from fastbn import _reference as reference
    x, dy = data(shape, dtype, seed=5)
    c = shape[1]
    w, b = np.linspace(0.5, 1.5, c), np.linspace(-1, 1, c)
    mean, invstd = np.linspace(6, 8, c), np.linspace(0.2, 0.4, c)
    results = []
    for module in (numba_kernels, reference):
        out, dx, ev = np.empty_like(x), np.empty_like(x), np.empty_like(x)
        stats = module.train_forward(x, w, b, 1e-5, dy, True, out, 2)
        sums = module.backward(dy, x, mean, invstd, w, dy, True, dx, 2)  # dy > 0 as the ReLU mask
        module.normalize(x, mean, w * invstd, b, None, True, ev, 2)
        results.append([*module.moments(x, 2)[1:], *stats, out, *sums, dx, ev])
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for got, want in zip(*results):
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("shape", [(64, 400, 49), (48, 30, 2500)])
def test_training_statistics_equal_moments_bitwise(monkeypatch, shape):
    # The blocks depend on the shape only, not on the channel groups that training runs
    # (short rows; long rows whose units hold several channels, cut by the groups).
    outer, channels, inner = shape
    x = (np.random.default_rng(4).standard_normal(shape) * 3 + 5).astype(np.float32)
    monkeypatch.setattr(numba_kernels, "GROUP_BYTES", 1 << 22)
    monkeypatch.setattr(numba_kernels, "SHORT_GROUP_BYTES", 1 << 22)
    group = numba_kernels._group_channels(outer, inner, x.itemsize, 1, channels, 1 << 22)
    assert group < channels
    assert group % numba_kernels._units(0, channels, outer, inner)[0] != 0
    count, mean, m2 = numba_kernels.moments(x, 2)
    tmean, tvar = numba_kernels.train_forward(x, np.ones(channels), np.zeros(channels), 1e-5,
                                              None, False, np.empty_like(x), 2)
    assert tmean.tobytes() == mean.tobytes()
    assert tvar.tobytes() == (m2 / count).tobytes()


@pytest.mark.parametrize("shape", [(64, 400, 49), (48, 30, 2500)])
def test_channel_groups_do_not_change_results(monkeypatch, shape):
    """Training forward and backward (ReLU-masked) run group by group; results are those of
    one group holding every channel, bit for bit."""
    rng = np.random.default_rng(6)
    x = (rng.standard_normal(shape) * 3 + 5).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    c = shape[1]
    w, b = np.linspace(0.5, 1.5, c), np.linspace(-1, 1, c)

    def run(group_bytes):
        monkeypatch.setattr(numba_kernels, "GROUP_BYTES", group_bytes)
        monkeypatch.setattr(numba_kernels, "SHORT_GROUP_BYTES", group_bytes)
        y, dx = np.empty_like(x), np.empty_like(x)
        mean, var = numba_kernels.train_forward(x, w, b, 1e-5, None, True, y, 2)
        sums = numba_kernels.backward(dy, x, mean, 1 / np.sqrt(var + 1e-5), w, y, True, dx, 2)
        return [mean, var, y, dx, *sums]

    for got, want in zip(run(1 << 22), run(1 << 40)):
        assert got.tobytes() == want.tobytes()


def test_num_threads_is_applied_and_restored():
    before = numba.get_num_threads()
    x = np.random.default_rng(0).standard_normal((4, 3, 50)).astype(np.float32)
    numba_kernels.moments(x, 1)
    assert numba.get_num_threads() == before
    numba_kernels.moments(x, 1000)  # clamped to Numba's pool size
    assert numba.get_num_threads() == before


def test_large_offset_float32_moments_and_normalize():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((16, 8, 1024)) + 1e4).astype(np.float32)
    out = np.empty_like(x)
    mean, var = numba_kernels.train_forward(x, np.ones(8), np.zeros(8), 1e-5, None, False, out, 2)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=(0, 2)), rtol=1e-15)
    np.testing.assert_allclose(var, x64.var(axis=(0, 2)), rtol=1e-10)
    expected = (x64 - x64.mean(axis=(0, 2), keepdims=True)) / np.sqrt(
        x64.var(axis=(0, 2), keepdims=True) + 1e-5)
    assert np.abs(out - expected).max() <= 1e-5


def test_threading_layer_is_reported_and_safe():
    x = np.ones((2, 2, 3), np.float32)
    numba_kernels.moments(x, 2)
    layer = numba.threading_layer()
    assert layer in ("tbb", "omp", "workqueue")
    from fastbn._config import config
    assert layer in config()["numba threading layer"]


def test_concurrent_calls_from_python_threads():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 32, 300)).astype(np.float32)
    expected = fastbn.batch_norm(x, None, None, training=True, backend="numba")
    errors = []

    def work():
        try:
            for _ in range(20):
                y = fastbn.batch_norm(x, None, None, training=True, backend="numba")
                if not np.array_equal(y, expected):
                    errors.append("mismatch")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


_FORK_SCRIPT = r"""
import os, sys, numpy as np, fastbn
x = np.random.default_rng(0).standard_normal((8, 16, 500)).astype(np.float32)
y = fastbn.batch_norm(x, None, None, training=True, backend="numba")
pid = os.fork()
if pid == 0:
    z = fastbn.batch_norm(x, None, None, training=True, backend="numba")
    os._exit(0 if np.allclose(z, y, atol=2e-6) else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_after_parallel_use_does_not_deadlock():
    # In a subprocess so a hang or a killed child cannot take the test runner with it.
    result = subprocess.run([sys.executable, "-c", _FORK_SCRIPT], timeout=300,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _child(queue):
    x = np.random.default_rng(0).standard_normal((4, 8, 100)).astype(np.float32)
    queue.put(float(fastbn.batch_norm(x, None, None, training=True, backend="numba").std()))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_multiprocessing_fork_pool_after_use():
    x = np.random.default_rng(0).standard_normal((4, 8, 100)).astype(np.float32)
    fastbn.batch_norm(x, None, None, training=True, backend="numba")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue,))
    proc.start()
    value = queue.get(timeout=300)
    proc.join(timeout=60)
    assert proc.exitcode == 0 and abs(value - 1.0) < 1e-3


def test_compiled_kernels_are_cached_on_disk():
    # cache=True on every kernel: a second process loads them instead of compiling.
    kernels = [getattr(numba_kernels, name)
               for name in ("_chw_normalize", "_hwc_moments", "_chw_partials", "_lanes_moments")]
    # and the entries compiled for a combination of flags (closures)
    kernels += [numba_kernels._specialized(make, True, False, True)
                for make in (numba_kernels._chw_train_as, numba_kernels._chw_backward_as)]
    for kernel in kernels:
        assert type(kernel._cache).__name__ == "FunctionCache"


_KIND_SCRIPT = """
import sys
import numpy as np
from numba import njit
from fastbn import _numba_kernels as nk

gradient = sys.argv[1] == "gradient"
x = np.linspace(1.0, 2.0, 4096, dtype=np.float32)
dy = x.copy() if gradient else None
cc = (np.float32(1), np.float32(0), np.float32(1), np.float32(0), np.float32(0))


@njit
def sums(dyf, xf, out):
    s = np.zeros(nk.LANES)
    q = np.zeros(nk.LANES)
    nk._lanes(False, dyf, xf, xf, 0, 4, nk.LANES, nk.LANES, np.full(nk.LANES, 1.5), s, q)
    ok, s1, s2, _ = nk._span_sums32(dyf, xf, xf, False, 0, 4096, 1.5, s)
    nk._output_run(dyf, xf, xf, xf, out, 0, 4096, False, False, False, False, cc, False,
                   np.float32(0))
    return s1 + s.sum() + out.sum()


sums(dy, x, np.empty_like(x))
for name in ("_grad_sums", "_span_grad32", "_dx_rows", "_lanes_moments", "_span_moments32",
             "_norm_rows"):
    print(name, len(getattr(nk, name).signatures))
"""


@pytest.mark.parametrize("kind", ["moments", "gradient"])
def test_sums_compile_only_their_own_kind(tmp_path, kind):
    # Training (dy None) must not compile the gradient sums, nor the backward the moments: the
    # unit functions choose when typed. From an empty cache, so every callee is compiled.
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", _KIND_SCRIPT, kind], timeout=600, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    compiled = {name: int(n) for name, n in (line.split() for line in result.stdout.split("\n")
                                             if line)}
    gradient = {"_grad_sums", "_span_grad32", "_dx_rows"}
    for name, count in compiled.items():
        assert (count > 0) == ((name in gradient) == (kind == "gradient")), compiled


_FLAGS_SCRIPT = """
import sys
import numpy as np
import fastbn
from fastbn import _numba_kernels as nk

x = np.random.default_rng(0).standard_normal((2, 24, 9, 9)).astype(np.float32)
if sys.argv[1] == "relu":
    fastbn.affine(x, np.ones(24), np.zeros(24), activation="relu", backend="numba")
else:
    fastbn.batch_norm(x, np.zeros(24), np.ones(24), training=False, backend="numba")
for name in ("_chw_normalize", "_norm_rows", "_norm_seg_run", "_hwc_normalize"):
    for signature in getattr(nk, name).signatures:
        print(name, *(str(t) for t in signature if "bool" in str(t)))
"""


@pytest.mark.parametrize("activation", ["none", "relu"])
def test_a_call_compiles_only_its_own_flags(tmp_path, activation):
    # The loops compiled per flag combination (residual, ReLU, streamed stores) are compiled
    # only for the flags of the calls made: the entry of a call is compiled for its flags as
    # constants (_specialized), which reach those loops as literals. From an empty cache.
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", _FLAGS_SCRIPT, activation], timeout=600,
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    relu = f"Literal[bool]({activation == 'relu'})"
    compiled = [line.split() for line in result.stdout.split("\n") if line]
    assert {line[0] for line in compiled} == {"_chw_normalize", "_norm_rows", "_norm_seg_run"}
    for name, *flags in compiled:
        # has_res, relu (and stream) in the order of the arguments
        assert flags[:2] == ["Literal[bool](False)", relu], compiled
        assert all(flag.startswith("Literal[bool]") for flag in flags), compiled


def _offset_empty(shape, dtype, offset):
    """A C-contiguous array whose data starts `offset` elements past a 64-byte boundary."""
    size = int(np.prod(shape))
    raw = np.empty(size + 64, dtype)
    start = (-raw.ctypes.data % 64) // raw.itemsize + offset
    return raw[start:start + size].reshape(shape)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 2, numba_kernels.RUN + 37), (2, 3, 20000), (40, 1, 1),
                                   (31, 3, 1), (17, 15, 1), (13, 16, 1), (11, 17, 1),
                                   (7, 100, 1), (5, 300, 1), (3, 4, 49)])
def test_streamed_outputs_equal_cached_stores(monkeypatch, dtype, shape):
    """Outputs above STREAM_ABOVE go out with non-temporal vector stores (aligned body, scalar
    head and tail, channels-last constants read across the end of a row): bit for bit the
    values of the plain stores, at every alignment of the output, NaN passed by the ReLU; the
    same for dx (training and frozen, masked by a forward output or not). Channels-last rows
    of fewer than RUN_BELOW channels are stored as runs either way, wider ones row by row when
    not streamed (5x300)."""
    rng = np.random.default_rng(8)
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    x.flat[::97] = np.nan
    residual = rng.standard_normal(shape).astype(dtype)
    c = shape[1]
    w, b = np.linspace(0.5, 1.5, c), np.linspace(-1, 1, c)
    mean, scale = np.linspace(2, 4, c), np.linspace(0.3, 0.6, c).astype(dtype)

    # dx: NaN kept to the first channel (elsewhere it would make every dx NaN and every mask
    # false), the mask from a random-sign array
    xb = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    if c > 1:
        xb[:, 0].flat[::7] = np.nan
        dy[:, 0].flat[::5] = np.nan
    invstd = np.linspace(0.5, 2.0, c)

    def run(stream_above, offset):
        monkeypatch.setattr(numba_kernels, "STREAM_ABOVE", stream_above)
        y, ev = _offset_empty(shape, dtype, offset), _offset_empty(shape, dtype, offset)
        stats = numba_kernels.train_forward(x, w, b, 1e-5, residual, True, y, 2)
        numba_kernels.normalize(x, mean, scale, b.astype(dtype), None, False, ev, 2)
        results = [*stats, y.copy(), ev.copy()]
        for output in (None, residual):  # dx, and dx masked where output <= 0
            for training in (True, False):
                dx = _offset_empty(shape, dtype, offset)
                results += [*numba_kernels.backward(dy, xb, mean, invstd, w, output, training,
                                                    dx, 2), dx.copy()]
        return results

    cached = run(1 << 62, 0)
    assert np.isfinite(cached[-1]).mean() > 0.5  # the last dx (frozen, masked) is not all NaN
    for offset in (0, 1, 3, 7, 64 // np.dtype(dtype).itemsize - 1):
        for got, want in zip(run(0, offset), cached):
            assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("channels", [63, 64, 97, 256, 512, 513])
def test_channels_last_moments_by_rows_equal_eight_rows(channels):
    """Channels-last float32 statistics from memory (64 to 512 channels) build the eight-row
    trees one whole row after another; from the cache, eight rows side by side: the same sums
    bit for bit, with a channel whose float32 sums fall back to float64 (NaN) and a constant
    one; 77 rows: nine eight-row groups and a tail."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((77, channels, 1)) * 3 + 100).astype(np.float32)
    x[:, 1] = np.nan
    x[:, 2] = 7.0
    from_memory = numba_kernels._hwc_moments(x, np.bool_(True))
    from_cache = numba_kernels._hwc_moments(x, np.bool_(False))
    for a, b in zip(from_memory, from_cache):
        assert a.tobytes() == b.tobytes()
    want = x[:, 3:, 0].astype(np.float64)
    np.testing.assert_allclose(from_cache[0][3:], want.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(from_cache[1][3:], ((want - want.mean(axis=0)) ** 2).sum(axis=0),
                               rtol=1e-5)


@pytest.mark.parametrize("shape", [(700, 45, 7), (700, 45, 49), (150, 45, 196), (100, 45, 7)])
def test_channels_first_short_rows_moments_by_columns(shape):
    """Channels-first float32 moments of rows shorter than COLUMNS32_BELOW sum each block's
    columns in float32 trees about one center per channel (blocks of fewer than
    COLUMNS32_FROM values per channel, the last shape, keep the float64 lanes): close to
    float64 sums, with channels whose float32 sums fall back to float64 (NaN, a constant
    channel, a center far from the mean: the first eight images offset), a large offset, and
    units of several channels with a partial one."""
    rng = np.random.default_rng(13)
    x = (rng.standard_normal(shape) * 3 + 100).astype(np.float32)
    x[:, 1] = np.nan
    x[:, 2] = 7.0
    x[:8, 3] += 1000.0
    x[:, 4] += 1e4
    mean, m2 = numba_kernels._chw_moments(x)
    assert np.isnan(mean[1]) and np.isnan(m2[1])
    assert mean[2] == 7.0 and m2[2] == 0.0
    want = np.delete(x, 1, axis=1).astype(np.float64)
    want_mean = want.mean(axis=(0, 2))
    np.testing.assert_allclose(np.delete(mean, 1), want_mean, rtol=1e-6)
    np.testing.assert_allclose(
        np.delete(m2, 1), ((want - want_mean[:, None]) ** 2).sum(axis=(0, 2)), rtol=1e-5)


@pytest.mark.parametrize("inner", [numba_kernels.GRAD32_SPANS_FROM, 196, numba_kernels.RUN])
@pytest.mark.parametrize("masked", [False, True])
def test_channels_first_short_rows_backward_sums_in_float32_spans(inner, masked):
    """Backward sums of float32 channels-first rows of GRAD32_SPANS_FROM to RUN values are
    float32 span by span: within float32 rounding of each term of exact float64 sums, with
    channels whose spans fall back to float64 (a NaN, dy all zero, dy near the float32
    underflow), a 1e4 offset, masked by the forward output or not."""
    rng = np.random.default_rng(21)
    shape = (6, 11, inner)
    x = (rng.standard_normal(shape) * 3 + 7).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    x[:, 4] += 1e4
    dy[:, 1] = 0.0
    dy[:, 2] *= np.float32(1e-37)
    dy[2, 3, 5] = np.nan
    x[2, 3, 5] = 30.0  # above the mean: not masked
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=(0, 2))
    invstd = 1 / np.sqrt(x64.var(axis=(0, 2)) + 1e-5)
    output = (x - mean[None, :, None].astype(np.float32)) if masked else None
    g = dy.astype(np.float64)
    if masked:
        g = np.where(output > 0, g, 0.0)
    terms = g * (x64 - mean[None, :, None])
    dx = np.empty_like(x)
    got = numba_kernels.backward(dy, x, mean, invstd, np.ones(11), output, True, dx, 2)
    for sums, want in zip(got, (g, terms)):
        assert np.isnan(sums[3])
        assert sums[1] == 0.0
        keep = np.arange(11) != 3
        bound = 1e-6 * np.abs(want).sum(axis=(0, 2))[keep]
        assert np.all(np.abs(sums[keep] - want.sum(axis=(0, 2))[keep]) <= bound)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("inner", [7, 8, 15, 16, 17, 49, 196, numba_kernels.RUN])
def test_short_rows_normalized_across_channels(monkeypatch, dtype, inner):
    """Channels-first rows of at most RUN values are normalized in runs across channels (a
    vector takes the constants of the one or two channels it covers): bit for bit the
    element-wise formula ((x - hi) - lo) * scale + shift + residual, ReLU, in the data's
    dtype, streamed or not, at several output alignments, with several runs per image."""
    rng = np.random.default_rng(12)
    # several runs per image, streamed (ELEMENTWISE_SPAN values a run) or not (SEG_RUN)
    channels = 2 * numba_kernels.ELEMENTWISE_SPAN // inner + 3
    shape = (3, channels, inner)
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    x.flat[::101] = np.nan
    residual = rng.standard_normal(shape).astype(dtype)
    mean = rng.standard_normal(channels) + 3
    scale = rng.random(channels).astype(dtype) + 0.5
    shift = rng.standard_normal(channels).astype(dtype)
    hi = mean.astype(dtype)
    lo = (mean - hi).astype(dtype)
    per_channel = (None, slice(None), None)
    for res in (None, residual):
        want = ((x - hi[per_channel]) - lo[per_channel]) * scale[per_channel] + shift[per_channel]
        if res is not None:
            want = want + res
        for relu in (False, True):
            expected = np.where(want <= 0, dtype(0), want) if relu else want
            for stream_above, offset in [(1 << 62, 0), (0, 0), (0, 3)]:
                monkeypatch.setattr(numba_kernels, "STREAM_ABOVE", stream_above)
                out = _offset_empty(shape, dtype, offset)
                numba_kernels.normalize(x, mean, scale, shift, res, relu, out, 2)
                assert out.tobytes() == expected.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("inner", [7, 8, 15, 16, 17, 49, 196, numba_kernels.RUN])
def test_short_rows_dx_across_channels(monkeypatch, dtype, inner):
    """dx of channels-first rows of at most RUN values, in runs across channels as the
    normalization: bit for bit g * a + ((x - hi) - lo) * b + c (training; g * a frozen), g
    masked where the forward output <= 0, with the constants from the returned sums, in the
    data's dtype, streamed or not, misaligned."""
    rng = np.random.default_rng(13)
    # several runs per image, streamed (ELEMENTWISE_SPAN values a run) or not (SEG_RUN)
    channels = 2 * numba_kernels.ELEMENTWISE_SPAN // inner + 3
    shape = (3, channels, inner)
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    output = rng.standard_normal(shape).astype(dtype)
    mean = rng.standard_normal(channels) + 3
    invstd, weight = rng.random(channels) + 0.5, rng.standard_normal(channels)
    count = shape[0] * inner
    per_channel = (None, slice(None), None)
    for out in (None, output):
        g = dy if out is None else np.where(out > 0, dy, dtype(0))
        for training in (False, True):
            for stream_above, offset in [(1 << 62, 0), (0, 0), (0, 3)]:
                monkeypatch.setattr(numba_kernels, "STREAM_ABOVE", stream_above)
                dx = _offset_empty(shape, dtype, offset)
                sum_dy, sum_dy_xmu = numba_kernels.backward(dy, x, mean, invstd, weight, out,
                                                            training, dx, 2)
                a = weight * invstd
                want = g * a.astype(dtype)[per_channel]
                if training:
                    b = (-a * invstd * invstd * sum_dy_xmu / count).astype(dtype)
                    c = (-a * sum_dy / count).astype(dtype)
                    hi = mean.astype(dtype)
                    lo = (mean - hi).astype(dtype)
                    want = (want + ((x - hi[per_channel]) - lo[per_channel]) * b[per_channel]
                            + c[per_channel])
                assert dx.tobytes() == want.tobytes()


def _assert_overlap_changes_no_bits(run):
    """run(overlap, offset) -> arrays: the overlapped runs, at two output alignments, give the
    bits of the plain one (NaN payloads aside: the compiler may swap a product's operands)."""
    def bits(a):
        return np.where(np.isnan(a), np.nan, a).tobytes()

    plain = run(False, 0)
    for offset in (0, 3):
        for got, want in zip(run(True, offset), plain):
            assert bits(got) == bits(want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 7, numba_kernels.OVERLAP_FROM + 33), (2, 5, 20000)])
def test_overlapped_backward_equals_one_group_after_the_other(monkeypatch, dtype, shape):
    """The channels-first backward of long rows sums one channel group while it streams the
    dx of the group before, in one loop (OVERLAP): the same sums and dx bit for bit as one
    group after the other (NaN payloads aside), training or frozen, masked or not, dx over
    dy, at several output alignments, with a smaller last group."""
    rng = np.random.default_rng(15)
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    x[1, 2, ::7] = np.nan
    dy = rng.standard_normal(shape).astype(dtype)
    output = rng.standard_normal(shape).astype(dtype)
    channels = shape[1]
    mean = rng.standard_normal(channels) + 3
    invstd, weight = rng.random(channels) + 0.5, rng.standard_normal(channels)
    monkeypatch.setattr(numba_kernels, "STREAM_ABOVE", 0)
    monkeypatch.setattr(numba_kernels, "GROUP_BYTES", 2 * x.nbytes // channels)  # 1 channel
    monkeypatch.setattr(numba_kernels, "SHORT_GROUP_BYTES", 2 * x.nbytes // channels)

    def run(overlap, offset):
        monkeypatch.setattr(numba_kernels, "OVERLAP", overlap)
        results = []
        for out in (None, output):
            for training in (True, False):
                dx = _offset_empty(shape, dtype, offset)
                results += [*numba_kernels.backward(dy, x, mean, invstd, weight, out, training,
                                                    dx, 2), dx]
        in_place = dy.copy()
        results += numba_kernels.backward(in_place, x, mean, invstd, weight, None, True,
                                          in_place, 2)
        return results + [in_place]

    _assert_overlap_changes_no_bits(run)


@pytest.mark.parametrize("shape", [(3, 7, numba_kernels.OVERLAP_FROM + 33), (2, 5, 20000)])
def test_overlapped_training_equals_one_group_after_the_other(monkeypatch, shape):
    """float32 channels-first training of long rows sums one channel group while it streams
    the output of the group before (OVERLAP): the same statistics and output bit for bit as
    one group after the other (NaN payloads aside), with residual and ReLU, misaligned, a
    channel whose float32 sums fall back to float64 (NaN)."""
    rng = np.random.default_rng(16)
    x = (rng.standard_normal(shape) * 2 + 3).astype(np.float32)
    x[1, 2, ::7] = np.nan
    residual = rng.standard_normal(shape).astype(np.float32)
    channels = shape[1]
    weight, bias = rng.standard_normal(channels), rng.standard_normal(channels)
    monkeypatch.setattr(numba_kernels, "STREAM_ABOVE", 0)
    monkeypatch.setattr(numba_kernels, "GROUP_BYTES", x.nbytes // channels)  # 1 channel
    monkeypatch.setattr(numba_kernels, "SHORT_GROUP_BYTES", x.nbytes // channels)

    def run(overlap, offset):
        monkeypatch.setattr(numba_kernels, "OVERLAP", overlap)
        results = []
        for res in (None, residual):
            for relu in (False, True):
                y = _offset_empty(shape, np.float32, offset)
                results += [*numba_kernels.train_forward(x, weight, bias, 1e-5, res, relu, y, 2),
                            y]
        return results

    _assert_overlap_changes_no_bits(run)


def test_channels_first_float32_moments_of_long_rows():
    """float32 rows longer than RUN are summed in float32 about a center from their first
    values (_span_moments32), with float64 where that would lose digits: mean and M2 close to
    exact float64 for offsets, an outlier first value, a step, sorted and ramp data,
    huge and tiny values, constant channels; NaN kept to its channel; 1 and 2 threads alike."""
    rng = np.random.default_rng(14)
    shape = (4, 10, 3 * numba_kernels.RUN + 5)
    base = rng.standard_normal(shape)
    x = np.stack([base[:, 0], base[:, 1] + 1e4, base[:, 2] * 1e-3 + 1e6,
                  np.sort(base[:, 3], axis=-1) * 100 + 5, base[:, 4] * 1e30,
                  base[:, 5] * 1e-30, np.full(shape[::2], 3.7),
                  np.broadcast_to(np.arange(shape[2], dtype=float), shape[::2]),
                  base[:, 8], base[:, 9]], axis=1).astype(np.float32)
    x[:, 8, 0] = 1e4   # an outlier first value
    x[:, 0] *= np.float32(1e-3)
    x[:, 0, :64] = 1.0  # a step: the center far from the mean, a small M2 (cancellation)
    x[1, 9, 7] = np.nan
    exact = x.astype(np.float64)
    mean = exact.mean(axis=(0, 2))
    m2 = ((exact - mean[None, :, None]) ** 2).sum(axis=(0, 2))
    count, got_mean, got_m2 = numba_kernels.moments(x, 2)
    assert count == shape[0] * shape[2]
    std = np.sqrt(m2 / count)
    ok = np.arange(shape[1]) != 9
    assert np.all(np.abs(got_mean - mean)[ok] <= 1e-7 * std[ok])
    assert np.all(np.abs(got_m2 - m2)[ok] <= 1e-6 * m2[ok])
    assert got_m2[6] == 0.0 and got_mean[6] == np.float32(3.7)
    assert np.isnan(got_mean[9]) and np.isnan(got_m2[9])
    one_thread = numba_kernels.moments(x, 1)
    assert got_mean.tobytes() == one_thread[1].tobytes()
    assert got_m2.tobytes() == one_thread[2].tobytes()


def _check_float32_gradient_sums(shape, masked):
    """float32 gradient sums of an (outer, channels, inner) view: the same bits for 1 and 2
    threads, the reference's values, NaN and inf kept to their channels, a tiny gradient not
    lost to underflow, a large offset."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal(shape) * 3 + 1e4).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    x[::3, 1] = np.nan
    dy[1, 2, -1] = np.inf
    dy[:, 3] = 1e-38
    mean = x.astype(np.float64).mean(axis=(0, 2))
    mean[1] = 0.0
    channels = shape[1]
    invstd, weight = np.ones(channels), rng.standard_normal(channels)
    output = None
    if masked:  # the ReLU's forward output: about half masked, NaN masked too
        output = rng.standard_normal(shape).astype(np.float32)
        output[::7, 5] = np.nan
        output[:, 1:4] = 1.0  # the NaN, inf and tiny channels stay unmasked
    runs = []
    for threads in (1, 2):
        dx = np.empty_like(x)
        runs.append([*numba_kernels.backward(dy, x, mean, invstd, weight, output, True, dx,
                                             threads), dx])
    for got, want in zip(*runs):
        assert got.tobytes() == want.tobytes()
    from fastbn import _reference
    dx = np.empty_like(x)
    with np.errstate(invalid="ignore"):  # inf - inf in the inf channel's dx
        want = [*_reference.backward(dy, x, mean, invstd, weight, output, True, dx), dx]
    sum_dy, sum_dy_xmu = runs[0][:2]
    assert np.isnan(sum_dy_xmu[1]) and np.isinf(sum_dy[2]) and sum_dy[3] > 0.0
    keep = np.arange(channels) > 3
    # float32 rounding of each term and each eight-row sum: errors relative to the sum of the
    # terms' magnitudes (the sums themselves cancel)
    g, d = dy.astype(np.float64), x.astype(np.float64) - mean[:, None]
    if masked:
        g = np.where(output > 0, g, 0.0)
    for got, exact, terms in ((sum_dy, want[0], np.abs(g)), (sum_dy_xmu, want[1], np.abs(g * d))):
        bound = 1e-6 * terms.sum(axis=(0, 2))[keep]
        assert (np.abs(got[keep] - exact[keep]) <= bound).all()
    np.testing.assert_allclose(sum_dy[3], want[0][3], rtol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("channels", [64, 97, 1030])
def test_channels_last_float32_gradient_sums(channels, masked):
    """Channels-last float32 gradient sums in float32 lanes (_rows_grad32, below
    GRAD32_BELOW channels) over several row blocks, a partial one among them."""
    rows = max(4, 3 * numba_kernels.BLOCK_NHWC // channels + 5)
    _check_float32_gradient_sums((rows, channels, 1), masked)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("inner", [3 * numba_kernels.RUN + 5, numba_kernels.OVERLAP_FROM + 33])
def test_channels_first_float32_gradient_sums_of_long_rows(inner, masked):
    """Channels-first float32 rows longer than RUN: gradient sums in float32 trees of eight
    rows of LANES values (_span_grad32), the last rows lane by lane, a tail in float64. (These
    outputs are not streamed, so the groups are not overlapped; the overlapped backward is
    checked against this plain one bit for bit above.)"""
    _check_float32_gradient_sums((3, 7, inner), masked)


def test_short_rows_go_in_larger_groups(monkeypatch):
    monkeypatch.setattr(numba_kernels, "GROUP_BYTES", 1 << 20)
    monkeypatch.setattr(numba_kernels, "SHORT_GROUP_BYTES", 1 << 24)
    assert numba_kernels._group_bytes(numba_kernels.SHORT_ROWS - 1) == 1 << 24
    assert numba_kernels._group_bytes(numba_kernels.SHORT_ROWS) == 1 << 20
    monkeypatch.setattr(numba_kernels, "GROUP_BYTES", 1 << 25)
    assert numba_kernels._group_bytes(49) == 1 << 25
