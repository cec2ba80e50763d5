"""Accuracy bars and the semantic corner cases of the contract, for every backend."""
import numpy as np
import pytest

import fastbn


def float64_normalized(x, axis=1):
    x = x.astype(np.float64)
    reduce = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    return (x - x.mean(reduce, keepdims=True)) / np.sqrt(x.var(reduce, keepdims=True) + 1e-5)


@pytest.mark.parametrize("axis", [1, -1])
def test_large_offset_float32_is_accurate(backend, rng, axis):
    # PyTorch's error here is 8.1e-4; the bar is 1e-5.
    x = (rng.standard_normal((16, 8, 32, 32)) + 1e4).astype(np.float32)
    y = fastbn.batch_norm(x, None, None, training=True, axis=axis, backend=backend)
    assert np.abs(y - float64_normalized(x, axis)).max() <= 1e-5


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [1, -1])
def test_huge_values_give_finite_correct_output(backend, rng, dtype, axis):
    x = (rng.standard_normal((8, 4, 9, 9)) * 1e29 + 1e30).astype(dtype)
    y = fastbn.batch_norm(x, None, None, training=True, axis=axis, backend=backend)
    assert np.all(np.isfinite(y))
    assert np.abs(y - float64_normalized(x, axis)).max() <= 1e-5


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
def test_constant_channel_gives_exactly_bias(backend, dtype, training):
    x = np.full((5, 3, 7), 0.1, dtype)
    bias = np.array([0.25, -1.5, 3.0])
    y = fastbn.batch_norm(x, x[0, :, 0].astype(np.float64), np.zeros(3), np.array([2.0, 3.0, 4.0]), bias,
                          training, backend=backend)
    assert np.array_equal(y, np.broadcast_to(bias.astype(dtype)[None, :, None], x.shape))


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("training", [True, False])
def test_nan_stays_in_its_channel(backend, rng, axis, training):
    x = rng.standard_normal((6, 4, 5, 7)).astype(np.float32)
    x[0, 2, 0, 0] = np.nan
    x = np.ascontiguousarray(np.moveaxis(x, 1, axis))
    rm, rv = np.zeros(4), np.ones(4)
    y = np.moveaxis(fastbn.batch_norm(x, rm, rv, training=training, axis=axis, backend=backend),
                    axis, 1)
    assert not np.isnan(y[:, [0, 1, 3]]).any()
    assert np.isnan(y[:, 2]).sum() == (y[:, 2].size if training else 1)
    if training:
        assert np.isnan(rm[2]) and not np.isnan(rm[[0, 1, 3]]).any()


def test_running_stats_update_formula(backend, rng):
    x = rng.standard_normal((10, 3, 4)) * 3 + 2
    rm, rv = np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0])
    old_rm, old_rv = rm.copy(), rv.copy()
    fastbn.batch_norm(x, rm, rv, training=True, momentum=0.25, backend=backend)
    mean = x.mean(axis=(0, 2))
    var = x.var(axis=(0, 2), ddof=1)
    np.testing.assert_allclose(rm, 0.75 * old_rm + 0.25 * mean, rtol=1e-13)
    np.testing.assert_allclose(rv, 0.75 * old_rv + 0.25 * var, rtol=1e-13)


def test_float32_running_stats_keep_dtype(backend, rng):
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    fastbn.batch_norm(rng.standard_normal((4, 3)), rm, rv, training=True, backend=backend)
    assert rm.dtype == np.float32 and rv.dtype == np.float32


def test_training_without_running_stats_and_return_stats(backend, rng):
    x = rng.standard_normal((6, 3, 5))
    y, mean, invstd = fastbn.batch_norm(x, None, None, training=True, eps=0.5, return_stats=True,
                                        backend=backend)
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(x.var(axis=(0, 2)) + 0.5), rtol=1e-12)


def test_eval_return_stats_are_running_ones(backend):
    x = np.ones((2, 2, 3))
    _, mean, invstd = fastbn.batch_norm(x, [1.0, 2.0], [3.0, 0.0], eps=1.0, return_stats=True,
                                        backend=backend)
    np.testing.assert_array_equal(mean, [1.0, 2.0])
    np.testing.assert_allclose(invstd, [0.5, 1.0])


def test_eval_accepts_array_likes(backend):
    y = fastbn.batch_norm([[1.0, 2.0], [3.0, 4.0]], [2.0, 3.0], [1.0, 1.0], [2, 2], [0, 1],
                          eps=0.0, backend=backend)
    np.testing.assert_allclose(y, [[-2.0, -1.0], [2.0, 3.0]])


def test_backward_matches_finite_differences(backend, rng):
    x = rng.standard_normal((3, 2, 4))
    weight, bias = rng.standard_normal(2), rng.standard_normal(2)
    dy = rng.standard_normal(x.shape)

    def loss(xx):
        return np.sum(fastbn.batch_norm(xx, None, None, weight, bias, True, backend=backend) * dy)

    y, mean, invstd = fastbn.batch_norm(x, None, None, weight, bias, True, return_stats=True)
    dx, _, _ = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, backend=backend)
    numeric = np.zeros_like(x)
    h = 1e-6
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        numeric[i] = (loss(x + e) - loss(x - e)) / (2 * h)
    np.testing.assert_allclose(dx, numeric, atol=1e-6)


def test_default_backend_is_fastest_available():
    from fastbn._backends import get_backend
    assert get_backend(None).__name__ == {
        "cython": "fastbn._kernels", "numba": "fastbn._numba_kernels",
        "numpy": "fastbn._reference"}[fastbn.available_backends()[0]]


def _awkward_float32_channels(rng, shape):
    """float32 data whose statistics are easy to get wrong with float32 arithmetic."""
    normal = rng.standard_normal(shape)
    outlier_first = normal.copy()
    first = (0, slice(None), 0) if len(shape) == 3 else (0, slice(None))
    outlier_first[first] = 1e4           # a shift taken from the first value is far off
    return {
        "tiny": normal * 1e-30,          # squares underflow float32
        "huge": normal * 1e25,           # squares overflow float32
        "outlier-first": outlier_first,
        "heavy-tail": np.exp(2 * normal),
        "binary": (normal > 1.3).astype(np.float64),
        "offset": normal + 1e4,
        "constant": np.full(shape, 0.1),
    }


# Channels-last: 43 channels = one tile of 32, one of 8 and 3 left over in the fast kernels'
# float32 register tiles; 70 channels (eight rows per pass, 6 left over) and 600 (float64
# lanes) take the Cython backend's other kernels.
@pytest.mark.parametrize("shape,axis", [((6, 3, 1000), 1), ((3000, 43), -1), ((1000, 70), -1),
                                        ((203, 600), -1)])
def test_float32_statistics_accuracy(backend, rng, shape, axis):
    """Batch statistics of float32 data within float32's own precision of the exact ones:
    mean within 1e-7 standard deviations, M2 within 1e-6 relative."""
    for name, data in _awkward_float32_channels(rng, shape).items():
        x = data.astype(np.float32)
        stats = fastbn.moments(x, axis=axis, backend=backend)
        count, mean, m2 = stats.count, stats.mean, stats.m2
        xd = np.moveaxis(x.astype(np.float64), axis, 0).reshape(x.shape[axis], -1)
        exact_mean = xd.mean(axis=1)
        exact_m2 = ((xd - exact_mean[:, None]) ** 2).sum(axis=1)
        std = np.sqrt(exact_m2 / count)
        assert np.all(np.abs(mean - exact_mean) <= 1e-7 * std + 1e-300), name
        assert np.all(np.abs(m2 - exact_m2) <= 1e-6 * exact_m2), name


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # dx of the 1e25 data
@pytest.mark.parametrize("shape,axis", [((6, 3, 1000), 1), ((40, 3, 49), 1), ((3000, 43), -1)])
def test_float32_gradient_sums_accuracy(backend, rng, shape, axis):
    """grad_weight = sum(dy * xhat) and grad_bias = sum(dy) of float32 data within 1e-6 of
    the float64 sums (relative to the sums of magnitudes: these sums may cancel), including
    products dy * (x - mean) that underflow float32 (1e-25 * 1e-30) and all-zero gradients.
    Long rows, 7x7 rows (49 values) and channels-last rows take different kernels."""
    channels = shape[axis]
    for dy_scale in (1.0, 1e-25, 0.0):
        for name, data in _awkward_float32_channels(rng, shape).items():
            x = data.astype(np.float32)
            dy = (rng.standard_normal(shape) * dy_scale).astype(np.float32)
            xd = np.moveaxis(x.astype(np.float64), axis, 0).reshape(channels, -1)
            gd = np.moveaxis(dy.astype(np.float64), axis, 0).reshape(channels, -1)
            mean = xd.mean(axis=1)
            invstd = 1.0 / np.sqrt(xd.var(axis=1) + 1e-300)  # eps ~ 0: tiny data stays tiny
            _, grad_weight, grad_bias = fastbn.batch_norm_backward(
                dy, x, mean, invstd, np.ones(channels), axis=axis, backend=backend)
            xhat = (xd - mean[:, None]) * invstd[:, None]
            exact_w, scale_w = (gd * xhat).sum(1), np.abs(gd * xhat).sum(1)
            exact_b, scale_b = gd.sum(1), np.abs(gd).sum(1)
            assert np.all(np.abs(grad_weight - exact_w) <= 1e-6 * scale_w), (name, dy_scale)
            assert np.all(np.abs(grad_bias - exact_b) <= 1e-6 * scale_b), (name, dy_scale)


# ----------------------------------------------------------------------------- the layer

def same_bits(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.tobytes() == expected.tobytes()


@pytest.mark.parametrize("mode", ["train", "cumulative", "eval", "eval_strided", "frozen",
                                  "no_running_stats", "no_running_stats_eval"])
@pytest.mark.parametrize("dtype,param_dtype", [(np.float32, np.float32),
                                               (np.float64, np.float64),
                                               (np.float64, np.float16)])
@pytest.mark.parametrize("axis,activation", [(1, None), (-1, "relu")])
def test_layer_equals_functional_api_bitwise(backend, rng, mode, dtype, param_dtype, axis,
                                             activation):
    """BatchNorm's output, running statistics and gradients are bitwise what the functional
    API gives (whichever of its code paths the layer takes), also when the running
    statistics and eps change between a forward and its backward."""
    C, eps = 5, 1e-3
    shape = (6, C, 4) if axis == 1 else (6, 4, C)
    bn = fastbn.BatchNorm(C, eps, None if mode == "cumulative" else 0.3, axis=axis,
                          dtype=param_dtype, activation=activation, backend=backend,
                          track_running_stats=not mode.startswith("no_running_stats"))
    bn.weight[:] = rng.uniform(0.5, 1.5, C)
    bn.bias[:] = rng.standard_normal(C)
    if bn.track_running_stats:
        bn.running_mean[:] = rng.standard_normal(C)
        bn.running_var[:] = rng.uniform(0.5, 2.0, C)
    if mode.endswith("eval") or mode == "eval_strided":
        bn.eval()
    if mode == "frozen":
        bn.freeze()
    batch_stats = mode in ("train", "cumulative") or mode.startswith("no_running_stats")
    for step in range(3):
        x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
        if mode == "eval_strided":
            x = np.repeat(x, 2, axis=0)[::2]                      # not C-contiguous
        residual = rng.standard_normal(shape).astype(dtype) if step == 1 else None
        dy = rng.standard_normal(shape).astype(dtype)
        rm = None if bn.running_mean is None else bn.running_mean.copy()
        rv = None if bn.running_var is None else bn.running_var.copy()
        common = dict(axis=axis, activation=activation, backend=backend)
        if batch_stats:
            factor = 1.0 / (step + 1) if mode == "cumulative" else 0.3
            y, mean, invstd = fastbn.batch_norm(x, rm, rv, bn.weight, bn.bias, True, factor, eps,
                                                residual=residual, return_stats=True, **common)
        else:
            y = fastbn.batch_norm(x, rm, rv, bn.weight, bn.bias, False, eps=eps,
                                  residual=residual, **common)
            mean, invstd = rm.astype(np.float64), 1.0 / np.sqrt(rv.astype(np.float64) + eps)
        dx, gw, gb = fastbn.batch_norm_backward(dy, x, mean, invstd, bn.weight,
                                                training=batch_stats,
                                                output=y if activation else None, **common)
        grads = (bn.grad_weight, bn.grad_bias)
        grads = [None if g is None else g.copy() for g in grads]

        same_bits(bn(x, residual), y)
        if bn.track_running_stats:
            same_bits(bn.running_mean, rm)
            same_bits(bn.running_var, rv)
            assert bn.num_batches_tracked == (step + 1 if batch_stats else 0)
            bn.running_mean += 1.0                     # the forward's statistics are kept
            bn.running_var *= 2.0
        bn.eps = 0.5
        same_bits(bn.backward(dy), dx)
        bn.eps = eps
        for grad, before, new in zip((bn.grad_weight, bn.grad_bias), grads, (gw, gb)):
            new = (0.0 + new.astype(np.float64)).astype(param_dtype)
            same_bits(grad, new if before is None else before + new)
