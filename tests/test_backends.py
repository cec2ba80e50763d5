"""Every backend against the NumPy reference, over dtype x layout x ndim x mode x memory layout."""
import numpy as np
import pytest

import fastbn
from cases import DTYPES, KINDS, SHAPES, TOL, make


def assert_close(actual, expected, dtype):
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    tol = TOL[dtype] * (1.0 + np.abs(expected.astype(np.float64)))
    err = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    assert np.all((err <= tol) | (np.isnan(actual) & np.isnan(expected))), err.max()


def params(rng, channels):
    return (rng.standard_normal(channels), rng.standard_normal(channels),
            rng.standard_normal(channels), rng.uniform(0.5, 2.0, channels))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("fused", ["plain", "relu", "residual+relu"])
def test_forward_matches_reference(backend, rng, dtype, axis, ndim, training, fused):
    shape = SHAPES[ndim]
    x = make(rng, shape, dtype, offset=3.0)
    channels = shape[axis]
    weight, bias, rm, rv = params(rng, channels)
    kwargs = dict(axis=axis, activation=None if fused == "plain" else "relu",
                  residual=make(rng, shape, dtype) if "residual" in fused else None,
                  return_stats=True)
    rm_ref, rv_ref = rm.copy(), rv.copy()
    expected = fastbn.batch_norm(x, rm_ref, rv_ref, weight, bias, training, 0.3, backend="numpy",
                                 **kwargs)
    actual = fastbn.batch_norm(x, rm, rv, weight, bias, training, 0.3, backend=backend, **kwargs)
    assert_close(actual[0], expected[0], dtype)
    for a, e in zip(actual[1:], expected[1:]):
        np.testing.assert_allclose(a, e, rtol=1e-9 if dtype == np.float64 else 1e-6)
    # float32 data: statistics from float32 partials over short runs, merged in float64 (a
    # mean within ~1e-9 standard deviations, here ~1: a running mean near zero gets an absolute
    # bound); float64 data: float64 throughout.
    stat_tol = 1e-9 if dtype == np.float64 else 1e-7
    np.testing.assert_allclose(rm, rm_ref, rtol=stat_tol,
                               atol=1e-12 if dtype == np.float64 else 1e-8)
    np.testing.assert_allclose(rv, rv_ref, rtol=stat_tol, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("relu", [False, True])
def test_backward_matches_reference(backend, rng, dtype, axis, ndim, training, relu):
    shape = SHAPES[ndim]
    x = make(rng, shape, dtype, offset=-2.0)
    dy = make(rng, shape, dtype)
    weight, bias, _, _ = params(rng, shape[axis])
    activation = "relu" if relu else None
    y, mean, invstd = fastbn.batch_norm(x, None, None, weight, bias, True, axis=axis,
                                        activation=activation, return_stats=True, backend="numpy")
    kwargs = dict(axis=axis, training=training, output=y if relu else None, activation=activation)
    expected = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, backend="numpy", **kwargs)
    actual = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, backend=backend, **kwargs)
    assert_close(actual[0], expected[0], dtype)
    compute = np.float32 if dtype == np.float16 else dtype
    for a, e in zip(actual[1:], expected[1:]):
        assert a.dtype == compute
        np.testing.assert_allclose(a, e, rtol=TOL[compute] * 10, atol=TOL[compute] * 100)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_memory_layouts(backend, rng, kind, axis):
    shape = (6, 5, 7, 9)
    x = make(rng, shape, np.float32, kind)
    expected = fastbn.batch_norm(np.ascontiguousarray(x), None, None, training=True, axis=axis,
                                 backend="numpy")
    actual = fastbn.batch_norm(x, None, None, training=True, axis=axis, backend=backend)
    assert actual.dtype == np.float32 and actual.flags.c_contiguous
    assert_close(actual, expected, np.float32)


@pytest.mark.parametrize("axis", [1, -1])
def test_out_in_place_and_non_contiguous_out(backend, rng, axis):
    x = make(rng, (8, 6, 5, 7), np.float32, offset=1.0)
    expected = fastbn.batch_norm(x, None, None, training=True, axis=axis, activation="relu",
                                 backend="numpy")
    inplace = x.copy()
    result = fastbn.batch_norm(inplace, None, None, training=True, axis=axis, out=inplace,
                               activation="relu", backend=backend)
    assert result is inplace
    assert_close(inplace, expected, np.float32)
    strided_out = make(rng, x.shape, np.float32, "strided")
    assert fastbn.batch_norm(x, None, None, training=True, axis=axis, out=strided_out,
                             activation="relu", backend=backend) is strided_out
    assert_close(strided_out, expected, np.float32)
    half_out = np.empty(x.shape, np.float16)
    fastbn.batch_norm(x.astype(np.float16), None, None, training=True, axis=axis,
                      out=half_out, activation="relu", backend=backend)
    assert_close(half_out, expected.astype(np.float16), np.float16)


def test_residual_aliasing_out(backend, rng):
    x = make(rng, (4, 3, 10), np.float64)
    residual = make(rng, x.shape, np.float64)
    expected = fastbn.batch_norm(x, None, None, training=True, residual=residual,
                                 backend="numpy")
    fastbn.batch_norm(x, None, None, training=True, residual=residual, out=residual,
                      backend=backend)
    assert_close(residual, expected, np.float64)


def test_backward_in_place_into_grad_output(backend, rng):
    x = make(rng, (4, 3, 10), np.float64)
    dy = make(rng, x.shape, np.float64)
    _, mean, invstd = fastbn.batch_norm(x, None, None, training=True, return_stats=True)
    expected = fastbn.batch_norm_backward(dy, x, mean, invstd, backend="numpy")[0]
    assert fastbn.batch_norm_backward(dy, x, mean, invstd, out=dy, backend=backend)[0] is dy
    assert_close(dy, expected, np.float64)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_])
def test_integer_input_promotes_to_float64(backend, rng, dtype):
    x = rng.integers(0, 3, size=(5, 4, 6)).astype(dtype)
    y = fastbn.batch_norm(x, None, None, training=True, backend=backend)
    assert y.dtype == np.float64
    assert_close(y, fastbn.batch_norm(x.astype(np.float64), None, None, training=True), np.float64)


def test_inference_with_empty_batch(backend):
    x = np.empty((0, 3, 4), np.float32)
    y = fastbn.batch_norm(x, np.zeros(3), np.ones(3), backend=backend)
    assert y.shape == x.shape and y.dtype == np.float32


@pytest.mark.parametrize("shape,axis", [((1, 3, 1), 1), ((3, 1, 5), 1), ((2, 7), 0),
                                        ((1, 1), 1), ((2, 1, 1), -1)])
def test_degenerate_shapes(backend, rng, shape, axis):
    x = make(rng, shape, np.float64)
    rm, rv = np.zeros(shape[axis]), np.ones(shape[axis])
    expected = fastbn.batch_norm(x, rm, rv, axis=axis, backend="numpy")
    assert_close(fastbn.batch_norm(x, rm, rv, axis=axis, backend=backend), expected, np.float64)


def test_moments_match_reference(backend, rng):
    from fastbn._backends import get_backend
    for dims in [(3, 5, 7), (11, 6, 1), (1, 4, 33), (0, 3, 2), (97, 16, 1), (5, 40, 101)]:
        x = (rng.standard_normal(dims) * 3 + 100).astype(np.float32)
        count, mean, m2 = get_backend(backend).moments(x, 2)
        ref_count, ref_mean, ref_m2 = get_backend("numpy").moments(x, 1)
        assert count == ref_count
        np.testing.assert_allclose(mean, ref_mean, rtol=1e-12)
        # The float32 kernels square x - center in float32: one rounding (2**-24) per term.
        np.testing.assert_allclose(m2, ref_m2, rtol=1e-7)


# Outputs above 4 MB take the streamed (non-temporal store) path: long rows split into tiles,
@pytest.mark.parametrize("stream_above", [0, 1 << 40])
@pytest.mark.parametrize("channels", [64, 97, 1024, 1030])
def test_channels_last_float32_gradient_lanes(fast_backend, rng, channels, stream_above):
    """Wide channels-last float32 gradient sums eight rows at a time (Cython: float32 sums
    from the cache below 1024 channels, float64 lanes from 1024 channels, streamed or not, rows
    of 1024 channels copied to a buffer first from the cache): rows that are not a multiple of
    eight, a NaN channel kept to itself, a gradient that underflows in float32; any thread
    count."""
    x = (rng.standard_normal((101, channels)) * 3 + 100).astype(np.float32)
    dy = rng.standard_normal((101, channels)).astype(np.float32)
    x[:, 1] = np.nan
    dy[:, 2] = 1e-36
    mean = x.astype(np.float64).mean(axis=0)
    invstd = np.ones(channels)
    weight = rng.standard_normal(channels)
    previous = None
    if fast_backend == "cython":
        from fastbn._kernels import _tuning
        previous = _tuning(STREAM_ABOVE=stream_above)
    try:
        runs = []
        for threads in (1, 2):
            fastbn.set_num_threads(threads)
            runs.append(fastbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=-1,
                                                   backend=fast_backend))
    finally:
        fastbn.set_num_threads(None)
        if previous is not None:
            _tuning(**previous)
    want = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=-1, backend="numpy")
    for got in runs:
        assert np.isnan(got[0][:, 1]).all() and np.isnan(got[1][1])
        keep = np.arange(channels) != 1
        assert_close(got[0][:, keep], want[0][:, keep], np.float32)
        np.testing.assert_allclose(got[1][keep], want[1][keep], rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(got[2], want[2], rtol=1e-5, atol=1e-30)
        assert got[2][2] != 0.0
    for a, b in zip(*runs):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows,channels", [(101, 1030), (3, 515), (256, 1024)])
def test_few_wide_channels_last_rows(fast_backend, rng, dtype, rows, channels):
    """Few rows of many channels (a BatchNorm1d batch; blocks of at least 32 rows in the Cython
    backend, so 3 rows are one block): training forward with residual and ReLU, moments, full,
    ReLU-masked and frozen backward against the reference, a NaN kept to its channel, a
    constant channel, and the same bits for 1 and 2 threads."""
    x = (rng.standard_normal((rows, channels)) * 3 + 100).astype(dtype)
    x[:, 7] = np.nan
    x[:, 9] = 2.5
    residual = rng.standard_normal((rows, channels)).astype(dtype)
    dy = rng.standard_normal((rows, channels)).astype(dtype)
    weight, bias = rng.standard_normal(channels), rng.standard_normal(channels)
    mean = np.nan_to_num(x.astype(np.float64).mean(axis=0))
    invstd = rng.uniform(0.5, 2.0, channels)

    def run(backend):
        y, batch_mean, batch_invstd = fastbn.batch_norm(
            x, None, None, weight, bias, True, residual=residual, activation="relu",
            return_stats=True, backend=backend)
        m = fastbn.moments(x, axis=1, backend=backend)
        grads = [fastbn.batch_norm_backward(dy, x, mean, invstd, weight, output=output,
                                            training=training, backend=backend)
                 for output, training in ((None, True), (y, True), (None, False))]
        return [y, batch_mean, batch_invstd, m.mean, m.m2] + [g for gs in grads for g in gs]

    runs = []
    for threads in (1, 2):
        fastbn.set_num_threads(threads)
        try:
            runs.append(run(fast_backend))
        finally:
            fastbn.set_num_threads(None)
    want = run("numpy")
    keep = np.arange(channels) != 7
    # The plain call (the Cython backend's C fast path) updates the running statistics.
    stats = {}
    for backend in (fast_backend, "numpy"):
        rm, rv = np.zeros(channels, dtype), np.ones(channels, dtype)
        y = fastbn.batch_norm(x, rm, rv, weight, bias, True, backend=backend)
        stats[backend] = y, rm, rv
    for got_value, want_value in zip(stats[fast_backend], stats["numpy"]):
        assert_close(got_value[..., keep], want_value[..., keep], dtype)
        assert np.isnan(got_value[..., 7]).all()
    for got_value, want_value in zip(runs[0], want):
        assert np.isnan(got_value[..., 7]).all() == np.isnan(want_value[..., 7]).all()
        got_kept, want_kept = got_value[..., keep], want_value[..., keep]
        if got_kept.ndim == 2:
            assert_close(got_kept, want_kept, dtype)
        else:
            scale = np.abs(want_kept).max()
            np.testing.assert_allclose(got_kept, want_kept, rtol=1e-5, atol=1e-5 * scale)
    assert (runs[0][0][:, 9] == np.maximum(dtype(bias[9]) + residual[:, 9], 0)).all()
    for a, b in zip(*runs):
        assert a.tobytes() == b.tobytes()


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the reference on inf
@pytest.mark.parametrize("shape", [(203, 70), (77, 300), (45, 1030)])
def test_channels_last_float32_moments_eight_rows(fast_backend, rng, shape):
    """Channels-last float32 statistics eight rows at a time (Cython: 64 to 511 channels, and
    1030 channels in two column chunks when forced): rows not a multiple of eight, NaN and
    inf confined to their channels, a constant channel exact, a far outlier first; the same
    bits for 1 and 2 threads; equal to the reference within float32's precision."""
    x = (rng.standard_normal(shape) * 2 + 1e3).astype(np.float32)
    x[:, 1] = np.nan
    x[5, 2] = np.inf
    x[:, 3] = 7.25
    x[0, 4] = 1e6
    previous = None
    if fast_backend == "cython":
        from fastbn._kernels import _tuning
        previous = _tuning(MEM_SUMS_BELOW=2048)
    try:
        runs = []
        for threads in (1, 2):
            fastbn.set_num_threads(threads)
            runs.append(fastbn.moments(x, axis=1, backend=fast_backend))
    finally:
        fastbn.set_num_threads(None)
        if previous is not None:
            _tuning(**previous)
    want = fastbn.moments(x, axis=1, backend="numpy")
    for got in runs:
        assert np.isnan(got.mean[1]) and np.isnan(got.m2[1])
        assert not np.isfinite(got.mean[2])
        assert got.mean[3] == 7.25 and got.m2[3] == 0.0
        keep = np.ones(shape[1], bool)
        keep[[1, 2]] = False
        std = np.sqrt(want.m2[keep] / shape[0])  # float32's own precision, as promised
        assert np.all(np.abs(got.mean[keep] - want.mean[keep]) <= 1e-7 * std)
        np.testing.assert_allclose(got.m2[keep], want.m2[keep], rtol=1e-6)
    assert runs[0].mean.tobytes() == runs[1].mean.tobytes()
    assert runs[0].m2.tobytes() == runs[1].m2.tobytes()


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the reference on inf
@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("shape,column_block", [((70, 9, 7, 7), None), ((40, 6, 14, 14), None),
                                                ((33, 6, 250), None), ((35, 200, 7, 7), 1 << 20)])
def test_channels_first_float32_moments_by_columns(rng, shape, column_block):
    """Cython channels-first float32 moments of short rows, summed by columns in blocks of rows
    n (fastbn_cols_sums_f32): blocks of fewer rows at the end (summed in float64), channels
    in several column tiles (column_block), NaN and inf confined to their channels, a constant
    channel exact, a far outlier first, squares beyond float32 (1e20), a first image far from
    the others (its center: cancellation, redone in float64); the same bits for 1 and 2
    threads and in training (one channel group); equal to the reference within float32's
    precision."""
    from fastbn._kernels import _tuning
    x = (rng.standard_normal(shape) * 2 + 1e3).astype(np.float32)
    x[:, 1] = np.nan
    x[5, 2, -1] = np.inf
    x[:, 3] = 7.25
    x[0, 4].flat[0] = 1e6
    x[0, 5] += np.float32(300)
    x[:, 0] *= np.float32(1e17)
    # training sums the columns of one group of channels at a time: one group holding every
    # channel gives the column tiles of the moments (smaller groups tile them differently)
    changes = {"GROUP_BYTES": 1 << 30}
    if column_block is not None:
        changes["COLUMN_BLOCK"] = column_block
    previous = _tuning(**changes)
    try:
        runs = []
        for threads in (1, 2):
            fastbn.set_num_threads(threads)
            runs.append(fastbn.moments(x, axis=1, backend="cython"))
        _, mean, invstd = fastbn.batch_norm(x, None, None, training=True, eps=1e-5,
                                            return_stats=True, backend="cython")
        _tuning(COLUMN_SPAN=0)  # the spans, in float64 for rows this short
        spans = fastbn.moments(x, axis=1, backend="cython")
    finally:
        fastbn.set_num_threads(None)
        _tuning(**previous)
    want = fastbn.moments(x, axis=1, backend="numpy")
    keep = np.ones(shape[1], bool)
    keep[[1, 2]] = False
    std = np.sqrt(want.m2[keep] / want.count)
    for got in runs:
        assert np.isnan(got.mean[1]) and np.isnan(got.m2[1])
        assert not np.isfinite(got.mean[2])
        assert got.mean[3] == 7.25 and got.m2[3] == 0.0
        assert np.all(np.abs(got.mean[keep] - want.mean[keep]) <= 1e-7 * std)
        np.testing.assert_allclose(got.m2[keep], want.m2[keep], rtol=1e-6)
        np.testing.assert_allclose(got.m2[5], want.m2[5], rtol=1e-9)  # float32: 3.5e-8
    # the columns are float32 sums: not the spans' float64 bits (so this test covers them)
    assert not np.array_equal(runs[0].m2[keep], spans.m2[keep])
    assert runs[0].mean.tobytes() == runs[1].mean.tobytes()
    assert runs[0].m2.tobytes() == runs[1].m2.tobytes()
    np.testing.assert_array_equal(mean, runs[0].mean)
    np.testing.assert_array_equal(invstd[keep],
                                  1 / np.sqrt(runs[0].m2[keep] / want.count + 1e-5))


# short rows packed into one tile, channels-last rows wider than a tile.
LARGE_CASES = [((3, 5, 300, 301), 1), ((64, 2048, 9), 1), ((1100, 1030), 1), ((20000, 67), 1),
               ((40, 5, 97, 67), -1)]


@pytest.mark.parametrize("shape,axis", LARGE_CASES)
def test_large_outputs_match_reference(fast_backend, shape, axis):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) + 2).astype(np.float32)
    residual = rng.standard_normal(shape).astype(np.float32)
    channels = shape[axis]
    weight, bias = rng.standard_normal(channels), rng.standard_normal(channels)
    results = []
    for backend in (fast_backend, "numpy"):
        y, mean, invstd = fastbn.batch_norm(x, None, None, weight, bias, True, axis=axis,
                                            residual=residual, activation="relu",
                                            return_stats=True, backend=backend)
        grads = fastbn.batch_norm_backward(residual, x, mean, invstd, weight, axis=axis,
                                           output=y, activation="relu", backend=backend)
        results.append((y, grads[0]))
    for got, want in zip(*results):
        assert_close(got, want, np.float32)


def _spy(fast, taken):
    """`fast`, recording in `taken` whether each call took the fast path."""
    def spy(*args):
        result = fast(*args)
        taken.append(result is not None)
        return result
    return spy


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("stat_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("out", ["none", "given", "inplace"])
def test_fast_path_equals_general_path(monkeypatch, fast_backend, rng, dtype, stat_dtype, axis,
                                       training, relu, out):
    """A fast backend's own argument handling for common calls (the Cython backend's in C, the
    Numba backend's in Python) against the general path (return_stats=True always takes it):
    the fast path is taken, and gives bitwise the same output and running statistics."""
    from fastbn import _api
    fast = fastbn._backends.get_backend(fast_backend).fast_batch_norm
    taken = []
    spy = _spy(fast, taken)
    monkeypatch.setitem(_api._FAST_PATHS, ("fast_batch_norm", fast_backend), spy)
    shape = (5, 6, 7, 3)
    x = make(rng, shape, dtype, offset=2.0)
    weight = rng.standard_normal(shape[axis]).astype(stat_dtype)
    bias = rng.standard_normal(shape[axis]).astype(stat_dtype)
    results = []
    for general in (False, True):
        data = x.copy()
        rm = np.full(shape[axis], 0.5, stat_dtype)
        rv = np.full(shape[axis], 2.0, stat_dtype)
        target = {"none": None, "given": np.empty_like(data), "inplace": data}[out]
        y = fastbn.batch_norm(data, rm, rv, weight, bias, training, 0.25, 1e-3, axis=axis,
                              out=target, activation="relu" if relu else None,
                              return_stats=general, backend=fast_backend)
        y = y[0] if general else y
        if target is not None:
            assert y is target
        results.append((y, rm, rv))
    assert taken == [True]
    for a, b in zip(*results):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("stat_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("out", ["none", "given", "grad_output", "input", "output"])
@pytest.mark.parametrize("with_weight", [True, False])
def test_fast_path_backward_equals_general_path(monkeypatch, fast_backend, rng, dtype,
                                                stat_dtype, axis, training, relu, out,
                                                with_weight):
    """batch_norm_backward's fast argument handling against the general path: the fast path
    is taken for these common calls, and gives the same bits, into `out` when given (which
    may be grad_output, the input or the forward's output)."""
    from fastbn import _api
    fast_backward = fastbn._backends.get_backend(fast_backend).fast_batch_norm_backward
    shape = (5, 6, 7, 3)
    channels = shape[axis]
    x = make(rng, shape, dtype, offset=2.0)
    dy = rng.standard_normal(shape).astype(dtype)
    weight = rng.standard_normal(channels).astype(stat_dtype) if with_weight else None
    y, mean, invstd = fastbn.batch_norm(x, None, None, weight, None, True, axis=axis,
                                        activation="relu", return_stats=True)
    mean, invstd = mean.astype(stat_dtype), invstd.astype(stat_dtype)
    taken = []
    spy = _spy(fast_backward, taken)
    results = []
    for fast in (spy, None):
        monkeypatch.setitem(_api._FAST_PATHS, ("fast_batch_norm_backward", fast_backend), fast)
        arrays = {"grad_output": dy.copy(), "input": x.copy(), "output": y.copy()}
        target = {"none": None, "given": np.empty_like(x)}.get(out, arrays.get(out))
        grads = fastbn.batch_norm_backward(
            arrays["grad_output"], arrays["input"], mean, invstd, weight, axis=axis,
            training=training, output=arrays["output"], activation="relu" if relu else None,
            out=target, backend=fast_backend)
        if target is not None:
            assert grads[0] is target
        results.append(grads)
    assert taken == [True]
    for got, want in zip(*results):
        assert got.dtype == want.dtype == dtype and got.tobytes() == want.tobytes()


@pytest.mark.parametrize("shape,axis", [((8, 64, 56, 56), 1), ((8, 56, 56, 64), -1),
                                        ((3, 200000), 0)])
def test_fast_path_backward_large(monkeypatch, fast_backend, rng, shape, axis):
    """The fast path on tensors split over threads and channel groups (and axis 0): the
    general path's bits, written over grad_output, with and without the ReLU mask."""
    from fastbn import _api
    fast_backward = fastbn._backends.get_backend(fast_backend).fast_batch_norm_backward
    x = (rng.standard_normal(shape) + 1).astype(np.float32)
    y, mean, invstd = fastbn.batch_norm(x, None, None, training=True, axis=axis,
                                        activation="relu", return_stats=True)
    dy = rng.standard_normal(shape).astype(np.float32)
    for relu in (False, True):
        results = []
        for fast in (True, False):
            with monkeypatch.context() as patch:
                path = fast_backward if fast else None
                patch.setitem(_api._FAST_PATHS, ("fast_batch_norm_backward", fast_backend),
                              path)
                grad = dy.copy()
                results.append(fastbn.batch_norm_backward(
                    grad, x, mean, invstd, axis=axis, output=y,
                    activation="relu" if relu else None, out=grad, backend=fast_backend))
            assert results[-1][0] is grad
        for got, want in zip(*results):
            assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("shape,axis", [((4, 8, 40, 40), 1), ((4, 40, 40, 72), -1),
                                        ((3000, 96), 1)])
def test_dead_relu_channels(fast_backend, rng, shape, axis):
    """Channels whose ReLU never fired get exactly zero gradient sums (the float32 sums keep
    their exact zeros instead of redoing the channel in float64) and the reference's dx; the
    live channels are unaffected; any thread count."""
    x = (rng.standard_normal(shape) + 3).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    output = rng.standard_normal(shape).astype(np.float32)
    channels = shape[axis]
    dead = np.zeros(channels, bool)
    dead[::3] = True
    index = [slice(None)] * len(shape)
    index[axis] = dead
    output[tuple(index)] = -1.0
    mean = x.astype(np.float64).mean(axis=tuple(a for a in range(len(shape))
                                                if a != axis % len(shape)))
    invstd = np.full(channels, 0.7)
    runs = []
    for threads in (1, 2):
        fastbn.set_num_threads(threads)
        try:
            runs.append(fastbn.batch_norm_backward(dy, x, mean, invstd, axis=axis, output=output,
                                                   activation="relu", backend=fast_backend))
        finally:
            fastbn.set_num_threads(None)
    for got, want in zip(*runs):
        assert got.tobytes() == want.tobytes()
    dx, dweight, dbias = runs[0]
    assert (dweight[dead] == 0).all() and (dbias[dead] == 0).all()
    assert (dx[tuple(index)] == 0).all()
    want = fastbn.batch_norm_backward(dy, x, mean, invstd, axis=axis, output=output,
                                      activation="relu", backend="numpy")
    assert_close(dx, want[0], np.float32)
    np.testing.assert_allclose(dbias, want[2], rtol=1e-5, atol=1e-4)


class _Subclass(np.ndarray):
    pass


@pytest.mark.parametrize("case", ["strided", "dtypes", "overlap", "list", "relu_no_output",
                                  "bad_weight", "readonly_out", "activation_object", "axis",
                                  "numpy_bool", "empty", "byteswapped", "subclass",
                                  "overlaps_input", "mean_none"])
def test_fast_path_backward_declines(fast_backend, rng, case):
    """Calls the fast path does not handle return None (the general path takes them, and
    raises for the invalid ones)."""
    fast_backward = fastbn._backends.get_backend(fast_backend).fast_batch_norm_backward
    x = rng.standard_normal((4, 3, 5))
    dy, out = rng.standard_normal(x.shape), np.empty_like(x)
    mean, invstd, weight, activation, output = np.zeros(3), np.ones(3), None, None, None
    axis, training = 1, True
    if case == "strided":
        x = np.asfortranarray(x)
    elif case == "dtypes":
        dy = dy.astype(np.float32)
    elif case == "overlap":  # out one element past grad_output
        buffer = rng.standard_normal(x.size + 1)
        dy, out = buffer[:-1].reshape(x.shape), buffer[1:].reshape(x.shape)
    elif case == "list":
        mean = [0.0, 0.0, 0.0]
    elif case == "relu_no_output":
        activation = "relu"
    elif case == "bad_weight":
        weight = np.ones(4)
    elif case == "readonly_out":
        out.flags.writeable = False
    elif case == "activation_object":
        activation, output = _RELU_LIKE, x.copy()
    elif case == "axis":
        axis = 3
    elif case == "numpy_bool":
        training = np.bool_(True)
    elif case == "empty":
        x, dy, out = x[:0], dy[:0], out[:0]
    elif case == "byteswapped":
        x = x.astype(x.dtype.newbyteorder())
    elif case == "subclass":
        x = x.view(_Subclass)
    elif case == "overlaps_input":  # out one element past the input
        buffer = rng.standard_normal(x.size + 1)
        x, out = buffer[:-1].reshape(x.shape), buffer[1:].reshape(x.shape)
    elif case == "mean_none":
        mean = None
    assert fast_backward(dy, x, mean, invstd, weight, axis, training, output, activation, out,
                         2) is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("param_dtype", [np.float32, np.float64, None])
@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("out", ["none", "given", "inplace"])
def test_fast_affine_equals_general_path(monkeypatch, fast_backend, rng, dtype, param_dtype,
                                         axis, relu, out):
    """fastbn.affine's fast argument handling against the general path: taken for these
    common calls (scale and shift float32, float64 or None), the same bits, into `out`."""
    from fastbn import _api
    fast = fastbn._backends.get_backend(fast_backend).fast_affine
    taken = []
    spy = _spy(fast, taken)
    shape = (5, 6, 7, 3)
    x = make(rng, shape, dtype, offset=2.0)
    scale = shift = None
    if param_dtype is not None:
        scale = rng.standard_normal(shape[axis]).astype(param_dtype)
        shift = rng.standard_normal(shape[axis]).astype(param_dtype)
    results = []
    for path in (spy, None):
        monkeypatch.setitem(_api._FAST_PATHS, ("fast_affine", fast_backend), path)
        data = x.copy()
        target = {"none": None, "given": np.empty_like(data), "inplace": data}[out]
        y = fastbn.affine(data, scale, shift, axis=axis, out=target,
                          activation="relu" if relu else None, backend=fast_backend)
        if target is not None:
            assert y is target
        results.append(y)
    assert taken == [True]
    assert results[0].dtype == results[1].dtype == dtype
    assert results[0].tobytes() == results[1].tobytes()
    want = x * (1.0 if scale is None else scale.reshape([-1] + [1] * (3 - axis % 4)))
    want = want + (0.0 if shift is None else shift.reshape([-1] + [1] * (3 - axis % 4)))
    np.testing.assert_allclose(results[0], np.maximum(want, 0) if relu else want,
                               rtol=TOL[dtype], atol=10 * TOL[dtype])


def _awkward_input(case, rng):
    """(x, out) of shape (4, 3, 5) for the input cases every fast path declines (see below),
    plain float64 arrays for the other cases."""
    x = rng.standard_normal((4, 3, 5))
    out = np.empty_like(x)
    if case == "strided":
        x = np.asfortranarray(x)
    elif case == "float16":
        x, out = x.astype(np.float16), None
    elif case == "byteswapped":
        x, out = x.astype(x.dtype.newbyteorder()), None
    elif case == "subclass":
        x = x.view(_Subclass)
    elif case == "overlap":  # out one element past the input
        buffer = rng.standard_normal(x.size + 1)
        x, out = buffer[:-1].reshape(x.shape), buffer[1:].reshape(x.shape)
    elif case == "empty":
        x, out = x[:0], out[:0]
    return x, out


# equal to "relu" without being a str
_RELU_LIKE = type("R", (), {"__eq__": lambda s, o: o == "relu",
                            "__ne__": lambda s, o: o != "relu",
                            "__hash__": object.__hash__})()


@pytest.mark.parametrize("case", ["strided", "float16", "byteswapped", "subclass", "list_scale",
                                  "int_scale", "bad_shift", "out_dtype", "overlap", "readonly_out",
                                  "axis", "numpy_axis", "empty", "one_dim", "activation_object"])
def test_fast_affine_declines(fast_backend, rng, case):
    """affine calls the fast path does not handle return None before they change anything (the
    general path takes them, and raises for the invalid ones)."""
    fast = fastbn._backends.get_backend(fast_backend).fast_affine
    x, out = _awkward_input(case, rng)
    scale, shift, axis, activation = np.ones(3), np.zeros(3), 1, None
    if case == "activation_object":
        activation = _RELU_LIKE
    elif case == "list_scale":
        scale = [1.0, 2.0, 3.0]
    elif case == "int_scale":
        scale = np.ones(3, np.int64)
    elif case == "bad_shift":
        shift = np.zeros(4)
    elif case == "out_dtype":
        out = np.empty(x.shape, np.float32)
    elif case == "readonly_out":
        out.flags.writeable = False
    elif case == "axis":
        axis = 3
    elif case == "numpy_axis":
        axis = np.int64(1)
    elif case == "one_dim":
        x, out, scale, shift = x.ravel(), None, None, None
    before = [None if a is None else a.copy() for a in (x, out)]
    assert fast(x, scale, shift, axis, out, activation, 2) is None
    for a, b in zip((x, out), before):
        assert (a is None and b is None) or a.tobytes() == b.tobytes()


@pytest.mark.parametrize("case", ["strided", "float16", "byteswapped", "subclass", "list_weight",
                                  "float32_stats_out", "numpy_float_eps", "negative_eps",
                                  "momentum_above_one", "one_value", "overlap", "readonly_stat",
                                  "one_stat", "no_stats_eval", "bad_weight", "axis", "empty",
                                  "activation_object", "bad_stats_buffer"])
def test_fast_path_declines(fast_backend, rng, case):
    """Forward calls the fast path does not handle return None before they change anything
    (the general path takes them, and raises for the invalid ones)."""
    fast = fastbn._backends.get_backend(fast_backend).fast_batch_norm
    x, out = _awkward_input(case, rng)
    rm, rv, weight, stats = np.zeros(3), np.ones(3), None, None
    training, momentum, eps, axis, activation = True, 0.1, 1e-5, 1, None
    if case == "activation_object":
        activation = _RELU_LIKE
    elif case == "list_weight":
        weight = [1.0, 2.0, 3.0]
    elif case == "float32_stats_out":  # out of another dtype than the input
        out = np.empty(x.shape, np.float32)
    elif case == "numpy_float_eps":
        eps = np.float64(1e-5)
    elif case == "negative_eps":
        eps = -1.0
    elif case == "momentum_above_one":
        momentum = 1.5
    elif case == "one_value":
        x, out = x[:1, :, :1], None
    elif case == "readonly_stat":
        rv.flags.writeable = False
    elif case == "one_stat":
        rv = None
    elif case == "no_stats_eval":
        rm, rv, training = None, None, False
    elif case == "bad_weight":
        weight = np.ones(4)
    elif case == "axis":
        axis = 3
    elif case == "bad_stats_buffer":
        stats = np.empty((2, 4))
    before = [None if a is None else a.copy() for a in (x, rm, rv, out)]
    assert fast(x, rm, rv, weight, None, training, momentum, eps, axis, out, activation, 2,
                stats) is None
    for a, b in zip((x, rm, rv, out), before):
        assert (a is None and b is None) or a.tobytes() == b.tobytes()


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("axis", [1, -1])
def test_zero_variance_with_zero_eps(backend, training, axis):
    """A constant channel with eps=0 gives NaN in training (0 * inf) and a zero running
    variance gives inf in evaluation, as in NumPy and PyTorch, on every backend and both
    paths (the Numba backend raised ZeroDivisionError: Python's error model)."""
    x = np.ones((4, 3, 5) if axis == 1 else (4, 5, 3), np.float32)
    results = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for return_stats in (False, True):
            y = fastbn.batch_norm(x, np.zeros(3), np.zeros(3), training=training, eps=0.0,
                                  axis=axis, return_stats=return_stats, backend=backend)
            results.append(y[0] if return_stats else y)
    want = np.nan if training else np.inf
    for y in results:
        np.testing.assert_array_equal(y, np.full(x.shape, want, np.float32))


@pytest.mark.parametrize("momentum", [0.1, 0.3, 0.7])
def test_fast_path_running_stats_bitwise(fast_backend, rng, momentum):
    """Fused multiply-adds in the fast path's update would differ from NumPy's in the last
    bit."""
    for trial in range(20):
        x = rng.standard_normal((6, 5, 7)) * rng.uniform(0.1, 10) + rng.uniform(-5, 5)
        stats = []
        for general in (False, True):
            rm, rv = np.full(5, 0.3), np.full(5, 1.7)
            fastbn.batch_norm(x, rm, rv, training=True, momentum=momentum,
                              return_stats=general, backend=fast_backend)
            stats.append((rm, rv))
        assert stats[0][0].tobytes() == stats[1][0].tobytes()
        assert stats[0][1].tobytes() == stats[1][1].tobytes()


@pytest.mark.parametrize("axis", [1, -1])
def test_frozen_backward_does_not_read_input(backend, rng, axis):
    """With constant statistics dx = dy * weight * invstd: an infinite input changes nothing."""
    x = rng.standard_normal((4, 3, 5) if axis == 1 else (4, 5, 3))
    x[0, 1, 2] = np.inf
    dy = rng.standard_normal(x.shape)
    mean, invstd, weight = np.zeros(3), np.full(3, 2.0), np.array([1.0, -1.0, 0.5])
    dx, _, _ = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis,
                                          training=False, backend=backend)
    scale = weight * invstd
    expected = dy * (scale[None, :, None] if axis == 1 else scale[None, None, :])
    np.testing.assert_allclose(dx, expected, rtol=1e-15)


def test_zero_channels(backend):
    for axis in (1, -1):
        x = np.ones((4, 0, 3), np.float32) if axis == 1 else np.ones((4, 3, 0), np.float32)
        y = fastbn.batch_norm(x, None, None, training=True, axis=axis, backend=backend)
        assert y.shape == x.shape and y.dtype == np.float32


def test_parallel_copy_rejects_unsafe_destinations():
    if "cython" not in fastbn.available_backends():
        pytest.skip("the cython backend is not built")
    from fastbn._kernels import parallel_copy
    src = np.arange(10.0)
    with pytest.raises(ValueError, match="writable"):
        parallel_copy(src, np.frombuffer(bytes(80)), 2)
    with pytest.raises(ValueError, match="overlap"):
        parallel_copy(src, src, 2)
    dst = np.empty_like(src)
    parallel_copy(src, dst, 2)
    assert np.array_equal(src, dst)


@pytest.mark.parametrize("gap", [0, 1, 16, 100, 2047, 2048, 4095])
@pytest.mark.parametrize("nbytes", [0, 5, 127, 128, 1000, 1 << 18, (1 << 18) * 3 + 77])
def test_parallel_copy_copies_every_byte_whatever_the_gap_modulo_4k(gap, nbytes):
    # outputs a little past the input modulo 4 KB are copied downwards, the others upwards; with
    # a tiny STREAM_ABOVE the large ones also go through the non-temporal copies
    if "cython" not in fastbn.available_backends():
        pytest.skip("the cython backend is not built")
    from fastbn import _kernels
    pool = np.zeros(2 * nbytes + 3 * 4096, np.uint8)
    base = -pool.ctypes.data % 4096 + 3  # odd starts
    src = pool[base:base + nbytes]
    src[:] = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    start = base + nbytes + (gap - nbytes) % 4096 + 4096
    for stream_above in (None, 1024):
        dst = pool[start:start + nbytes]
        dst[:] = 0
        previous = _kernels._tuning(**({} if stream_above is None else
                                        {"STREAM_ABOVE": stream_above}))
        try:
            _kernels.parallel_copy(src, dst, 2)
        finally:
            _kernels._tuning(**previous)
        assert nbytes == 0 or (dst.ctypes.data - src.ctypes.data) % 4096 == gap
        assert np.array_equal(dst, src)
        assert not pool[start + nbytes:].any() and not pool[base + nbytes:start].any()


def _misaligned_empty(shape, dtype, shift):
    """A C-contiguous array whose data starts `shift` elements past a 64-byte boundary."""
    size = int(np.prod(shape))
    itemsize = np.dtype(dtype).itemsize
    raw = np.empty(size + 64 // itemsize + shift, dtype)
    start = (-raw.ctypes.data % 64) // itemsize + shift
    return raw[start:start + size].reshape(shape)


def _cython_train_and_backward(x, residual, dy, weight, bias, axis, y, dx, stream_above,
                               frozen=False, alias_guard=False):
    """Training forward (residual, ReLU) into y and its backward into dx with the Cython
    backend, streaming outputs larger than `stream_above` bytes (through an L1 tile where they
    alias an input, with `alias_guard`); also the frozen backward."""
    from fastbn._kernels import _tuning
    previous = _tuning(STREAM_ABOVE=stream_above, ALIAS_GUARD=alias_guard)
    try:
        _, mean, invstd = fastbn.batch_norm(x, None, None, weight, bias, True, axis=axis,
                                            residual=residual, activation="relu", out=y,
                                            return_stats=True, backend="cython")
        fastbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis, output=y,
                                   activation="relu", out=dx, backend="cython")
        if not frozen:
            return y, dx
        return y, dx, fastbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis,
                                                 training=False, backend="cython")[0]
    finally:
        _tuning(**previous)


# Channels-last widths around the vector width (8 float32 lanes) and above the channel tile
# (512), spans around the direct/tile threshold (256), rows longer than a segment (4096, taken
# whole by the streamed element-wise pass), at every output alignment.
STREAM_CASES = [((37, 1), -1), ((37, 3), -1), ((29, 7), -1), ((23, 8), -1), ((19, 9), -1),
                ((11, 97), -1), ((5, 1030), -1), ((3, 4, 7, 7), 1), ((3, 5, 255), 1), ((2, 3, 16, 16), 1),
                ((2, 3, 301), 1), ((4, 6, 8), 1), ((4, 6, 9), 1), ((2, 7, 3, 5), 1),
                ((2, 3, 4099), 1), ((2, 5, 4160), 1)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", STREAM_CASES)
def test_streamed_stores_equal_cached_stores(rng, dtype, shape, axis):
    """Non-temporal stores (outputs above STREAM_ABOVE) split the work at other points (aligned
    vectors, tiles): every element must still be bitwise what the cached-store path gives."""
    if "cython" not in fastbn.available_backends():
        pytest.skip("the cython backend is not built")
    from fastbn._kernels import _tuning
    x = (rng.standard_normal(shape) + 3).astype(dtype)
    residual = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    channels = shape[axis]
    weight, bias = rng.standard_normal(channels), rng.standard_normal(channels)

    def run(stream_above, shift):
        y = _misaligned_empty(shape, dtype, shift)
        dx = _misaligned_empty(shape, dtype, shift)
        return _cython_train_and_backward(x, residual, dy, weight, bias, axis, y, dx,
                                          stream_above, frozen=True)

    cached = run(1 << 40, 0)
    y_ref = fastbn.batch_norm(x, None, None, weight, bias, True, axis=axis, residual=residual,
                              activation="relu", backend="numpy")
    assert_close(cached[0], y_ref, dtype)
    for shift in range(3):
        for got, want in zip(run(0, shift), cached):
            assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("channels", [5, 40, 97, 576, 1024, 1030, 2048])
def test_streamed_channels_last_gradient_sums_equal_cached(rng, channels):
    """Channels-last float32 gradient sums of fewer than 1024 channels go row by row from
    memory (streamed outputs) and eight rows per pass from the cache (from 1024 channels on,
    float64 lanes both ways; rows 2048 bytes apart through a buffer from the cache): the same
    sums bit for bit, masked or not, including the channels whose float32 sums fall back to
    float64 (NaN, a gradient that underflows)."""
    if "cython" not in fastbn.available_backends():
        pytest.skip("the cython backend is not built")
    from fastbn._kernels import _tuning
    x = (rng.standard_normal((77, channels)) * 3 + 100).astype(np.float32)
    dy = rng.standard_normal((77, channels)).astype(np.float32)
    x[:, 1] = np.nan
    dy[:, 2] = 1e-36
    mean, invstd = np.full(channels, 100.0), np.ones(channels)
    weight = rng.standard_normal(channels)

    def run(stream_above):
        previous = _tuning(STREAM_ABOVE=stream_above)
        try:
            return [fastbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=-1,
                                               output=output, backend="cython")
                    for output in (None, x - 100)]  # x - 100: about half of dy masked
        finally:
            _tuning(**previous)

    for got, want in zip(run(0), run(1 << 40)):
        for a, b in zip(got, want):
            assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("channels", [64, 97, 256, 504, 511, 512])
def test_streamed_channels_last_moments_equal_cached(rng, channels):
    """Channels-last float32 moments of 64 to 511 channels go row by row from memory (streamed
    outputs) and eight rows per pass from the cache: the same sums bit for bit, in training's
    statistics and output, including a channel whose float32 sums fall back to float64 (NaN)
    and a constant one; 77 rows: nine eight-row groups and a tail."""
    if "cython" not in fastbn.available_backends():
        pytest.skip("the cython backend is not built")
    from fastbn._kernels import _tuning
    x = (rng.standard_normal((77, channels)) * 3 + 100).astype(np.float32)
    x[:, 1] = np.nan
    x[:, 2] = 7.0

    def run(stream_above):
        previous = _tuning(STREAM_ABOVE=stream_above)
        try:
            stats = fastbn.moments(x, axis=-1, backend="cython")
            y = fastbn.batch_norm(x, None, None, None, None, True, axis=-1, backend="cython")
            return stats.mean, stats.m2, y
        finally:
            _tuning(**previous)

    streamed, cached = run(0), run(1 << 40)
    for a, b in zip(streamed, cached):
        assert a.tobytes() == b.tobytes()
    want = fastbn._backends.get_backend("numpy").moments(x.reshape(77, channels, 1))
    np.testing.assert_allclose(cached[0][3:], want[1][3:], rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(6, 37, 7, 7), (5, 11, 300), (3, 9, 9)])
def test_channel_groups_and_blocks_match_the_reference(rng, dtype, shape):
    """Large channels-first tensors run channel group by channel group, each split into blocks
    of rows and channels; tiny tuning constants make a small tensor do the same, with a last
    group smaller than the others (blocks past its end) and runs across channels."""
    if "cython" not in fastbn.available_backends():
        pytest.skip("the cython backend is not built")
    from fastbn._kernels import _tuning
    x = (rng.standard_normal(shape) * 2 + 5).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    channels = shape[1]
    weight, bias = rng.standard_normal(channels), rng.standard_normal(channels)

    def run(backend):
        y, mean, invstd = fastbn.batch_norm(x, None, None, weight, bias, True, axis=1,
                                            activation="relu", return_stats=True, backend=backend)
        grads = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=1, output=y,
                                           activation="relu", backend=backend)
        return (y, mean, invstd) + tuple(grads)

    want = run("numpy")
    for group_bytes, segment in [(1024, 64), (3000, 100), (6000, 100), (50000, 4096)]:
        previous = _tuning(GROUP_BYTES=group_bytes, SEGMENT=segment, SERIAL_BELOW=0,
                           STREAM_ABOVE=0)
        try:
            got = run("cython")
        finally:
            _tuning(**previous)
        for a, b in zip(got, want):
            assert_close(a, b, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,segment", [((5, 11, 300), 4096), ((3, 7, 1000), 256),
                                           ((4, 9, 17, 19), 4096)])
def test_overlapped_groups_equal_one_group_after_the_other(rng, dtype, shape, segment):
    """Channels-first training and backward sum one channel group while they write the
    output of the group before, span beside span in one loop (OVERLAP): every output and
    statistic must be the bits of the plain order (sums, then output, group by group), with
    streamed or cached, aligned or misaligned outputs, a smaller last group, frozen and
    masked backward, and dx written over dy (NaN stays NaN)."""
    if "cython" not in fastbn.available_backends():
        pytest.skip("the cython backend is not built")
    from fastbn._kernels import _tuning
    x = (rng.standard_normal(shape) * 2 + 5).astype(dtype)
    x[1, 2] = np.nan  # one channel's sums fall back to float64
    residual = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    channels = shape[1]
    weight, bias = rng.standard_normal(channels), rng.standard_normal(channels)
    group_bytes = 2 * int(np.prod(shape)) // channels * np.dtype(dtype).itemsize  # 2 channels

    def run(overlap, stream_above, shift):
        previous = _tuning(OVERLAP=overlap, GROUP_BYTES=group_bytes, SEGMENT=segment,
                           SERIAL_BELOW=0)
        try:
            y = _misaligned_empty(shape, dtype, shift)
            dx = _misaligned_empty(shape, dtype, shift)
            results = list(_cython_train_and_backward(x, residual, dy, weight, bias, 1, y, dx,
                                                      stream_above, frozen=True))
            _, mean, invstd = fastbn.batch_norm(x, None, None, weight, bias, True, axis=1,
                                                return_stats=True, backend="cython")
            in_place = dy.copy()
            results += fastbn.batch_norm_backward(in_place, x, mean, invstd, weight, axis=1,
                                                  out=in_place, backend="cython")
            return results + [mean, invstd]
        finally:
            _tuning(**previous)

    plain = run(False, 1 << 40, 0)
    y_ref = fastbn.batch_norm(x, None, None, weight, bias, True, axis=1, residual=residual,
                              activation="relu", backend="numpy")
    assert_close(plain[0], y_ref, dtype)
    def bits(a):  # NaN payloads may differ: the compiler may swap a product's operands
        return np.where(np.isnan(a), np.nan, a).tobytes()

    for stream_above in (0, 1 << 40):
        for shift in (0, 1, 3):
            for got, want in zip(run(True, stream_above, shift), plain):
                assert bits(got) == bits(want)


def _page_offset_empty(shape, dtype, offset):
    """A C-contiguous array whose data starts `offset` bytes past a 4 KB boundary."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 8192, np.uint8)
    start = (-raw.ctypes.data % 4096) + offset
    return raw[start:start + nbytes].view(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((3, 40, 7, 7), 1), ((2, 3, 1500), 1), ((2, 3, 5000), 1),
                                        ((300, 20), -1), ((9, 2100), -1)])
def test_streamed_output_that_aliases_an_input(rng, dtype, shape, axis):
    """An output a few bytes past an input modulo 4 KB goes through an L1 tile instead of
    streaming from registers where that stalls (the alias guard), or straight from registers
    where it does not: the same bits as cached stores either way."""
    if "cython" not in fastbn.available_backends():
        pytest.skip("the cython backend is not built")
    from fastbn._kernels import _tuning
    x = _page_offset_empty(shape, dtype, 0)
    x[...] = rng.standard_normal(shape) + 3
    residual = _page_offset_empty(shape, dtype, 64)
    residual[...] = rng.standard_normal(shape)
    dy = _page_offset_empty(shape, dtype, 2048)
    dy[...] = rng.standard_normal(shape)
    channels = shape[axis]
    weight, bias = rng.standard_normal(channels), rng.standard_normal(channels)

    def run(stream_above, out_offset, alias_guard):
        y = _page_offset_empty(shape, dtype, out_offset)
        dx = _page_offset_empty(shape, dtype, 2048 + out_offset)
        return _cython_train_and_backward(x, residual, dy, weight, bias, axis, y, dx,
                                          stream_above, alias_guard=alias_guard)

    cached = run(1 << 40, 16, False)
    # Both group schedules (the default depends on the processor): one after the other, the
    # tiles once held channels longer than a tile whole, past the tile's end.
    for overlap in (True, False):
        previous = _tuning(OVERLAP=overlap)
        try:
            for alias_guard in (True, False):
                for out_offset in (4 * np.dtype(dtype).itemsize, 16, 96, 1024):
                    for got, want in zip(run(0, out_offset, alias_guard), cached):
                        assert got.tobytes() == want.tobytes()
        finally:
            _tuning(**previous)
