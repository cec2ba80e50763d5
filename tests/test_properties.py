"""Property-based tests (hypothesis): any shape, axis, layout and values, every backend."""
import numpy as np
from hypothesis import assume, given, strategies as st
from hypothesis.extra.numpy import arrays

import fastbn

BACKENDS = fastbn.available_backends()


@st.composite
def batches(draw):
    ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    assume(np.prod(shape) // shape[axis] >= 2)  # training needs two values per channel
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    offset = draw(st.sampled_from([0.0, 1.0, -50.0, 1e4]))
    values = draw(arrays(np.float64, shape, elements=st.floats(-1, 1)))
    x = (values * scale + offset).astype(dtype)
    if draw(st.booleans()):
        x = np.asfortranarray(x)
    return x, axis


def reference_normalized(x, axis, eps):
    """In float64, shifted by each channel's first value so that the mean of a constant channel
    is exact (x.mean() of 10000.001 repeated is not)."""
    x64 = np.moveaxis(x.astype(np.float64), axis, 0)
    d = x64 - x64.reshape(x64.shape[0], -1)[:, :1].reshape((-1,) + (1,) * (x.ndim - 1))
    axes = tuple(range(1, x.ndim))
    y = (d - d.mean(axes, keepdims=True)) / np.sqrt(d.var(axes, keepdims=True) + eps)
    return np.moveaxis(y, 0, axis)


def mean_rounding_error(x, axis, eps):
    """The largest output error that rounding the mean to float64 can cause: |x| * 2**-53 *
    invstd per channel. x = [10000.00000781, 10000] is exact, but its mean is not a float64, and
    (x - mean) / std then carries 2e-7 relative error: any method that subtracts a float64 mean
    (every backend, PyTorch, NumPy's x - x.mean()) is that far from the exact answer."""
    x64 = np.moveaxis(x.astype(np.float64), axis, 0).reshape(x.shape[axis], -1)
    invstd = 1 / np.sqrt(x64.var(axis=1) + eps)
    return float((np.abs(x64).max(axis=1) * invstd).max() * 2.0 ** -53)


@given(batches(), st.sampled_from(BACKENDS), st.sampled_from([1e-5, 1e-3, 1.0]))
def test_training_output_is_the_normalized_input(case, backend, eps):
    x, axis = case
    y = fastbn.batch_norm(x, None, None, training=True, eps=eps, axis=axis, backend=backend)
    assert y.dtype == x.dtype and y.shape == x.shape
    expected = reference_normalized(x, axis, eps)
    tol = 1e-4 if x.dtype == np.float32 else 1e-10
    np.testing.assert_allclose(y, expected, atol=tol * (1 + np.abs(expected).max())
                               + 2 * mean_rounding_error(x, axis, eps))


@given(batches(), st.sampled_from(BACKENDS))
def test_every_backend_agrees_with_the_reference(case, backend):
    x, axis = case
    channels = x.shape[axis]
    rng = np.random.default_rng(channels)
    weight, bias = rng.standard_normal(channels), rng.standard_normal(channels)
    got = fastbn.batch_norm(x, None, None, weight, bias, True, axis=axis, activation="relu",
                            return_stats=True, backend=backend)
    want = fastbn.batch_norm(x, None, None, weight, bias, True, axis=axis, activation="relu",
                             return_stats=True, backend="numpy")
    tol = 1e-5 if x.dtype == np.float32 else 1e-11
    np.testing.assert_allclose(got[0], want[0], atol=tol * (1 + np.abs(want[0]).max()))
    # float32 statistics sum float32 differences (x - center): one float32 rounding per value,
    # at the scale of the data (as test_backends' running-statistics tolerance)
    stat_tol = 1e-7 if x.dtype == np.float32 else 1e-9
    np.testing.assert_allclose(got[1], want[1], rtol=1e-9,
                               atol=stat_tol * max(np.abs(want[1]).max(), np.abs(x).max()))
    dy = rng.standard_normal(x.shape).astype(x.dtype)
    grads = [fastbn.batch_norm_backward(dy, x, got[1], got[2], weight, axis=axis, output=got[0],
                                        activation="relu", backend=b) for b in (backend, "numpy")]
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, atol=1e-3 if x.dtype == np.float32 else 1e-8,
                                   rtol=1e-3 if x.dtype == np.float32 else 1e-8)


@given(batches(), st.sampled_from(BACKENDS))
def test_eval_with_the_batch_statistics_equals_training(case, backend):
    x, axis = case
    y, mean, invstd = fastbn.batch_norm(x, None, None, training=True, axis=axis,
                                        return_stats=True, backend=backend)
    var = 1.0 / invstd**2 - 1e-5
    y_eval = fastbn.batch_norm(x, mean, var, axis=axis, backend=backend)
    tol = 1e-4 if x.dtype == np.float32 else 1e-8
    np.testing.assert_allclose(y_eval, y, atol=tol * (1 + np.abs(y).max()))
