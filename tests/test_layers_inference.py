"""scale_shift / affine (the fused inference path), BN folding and mergeable moments."""
import numpy as np
import pytest

import fastbn

C = 3


# ----------------------------------------------------------------------------- scale_shift, affine

@pytest.mark.parametrize("shape,axis", [((7, C), 1), ((5, C, 9), 1), ((2, 4, 5, C), -1),
                                        ((2, 3, C, 2, 3), 2)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_affine_equals_eval_batch_norm(backend, rng, shape, axis, dtype, activation):
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    residual = rng.standard_normal(shape).astype(dtype)
    rm, rv = rng.standard_normal(C), rng.uniform(0.5, 2, C)
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    scale, shift = fastbn.scale_shift(rm, rv, w, b, eps=1e-3)
    assert scale.dtype == shift.dtype == np.float64
    expected = fastbn.batch_norm(x, rm, rv, w, b, eps=1e-3, axis=axis, residual=residual,
                                 activation=activation, backend="numpy")
    y = fastbn.affine(x, scale, shift, axis=axis, residual=residual, activation=activation,
                      backend=backend)
    assert y.dtype == dtype and y.shape == shape
    tol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(y, expected, atol=tol, rtol=tol)
    # In place, into the input.
    z = x.copy()
    assert fastbn.affine(z, scale, shift, axis=axis, residual=residual, activation=activation,
                         out=z, backend=backend) is z
    np.testing.assert_array_equal(z, y)


def test_scale_shift_defaults_and_formula():
    scale, shift = fastbn.scale_shift([1.0, 2.0], [3.0, 0.0], eps=1.0)
    np.testing.assert_allclose(scale, [0.5, 1.0])
    np.testing.assert_allclose(shift, [-0.5, -2.0])


def test_affine_other_dtypes(backend):
    x = np.arange(12).reshape(4, 3)
    y = fastbn.affine(x, [1, 2, 3], [0, 0, 1], backend=backend)
    assert y.dtype == np.float64
    np.testing.assert_array_equal(y, x * [1, 2, 3] + [0, 0, 1])
    h = fastbn.affine(x.astype(np.float16), None, None, backend=backend)
    assert h.dtype == np.float16
    np.testing.assert_array_equal(h, x)


def affine_kwargs():
    rng = np.random.default_rng(0)
    return dict(input=rng.standard_normal((4, C, 5)).astype(np.float32), scale=np.ones(C),
                shift=np.zeros(C))


AFFINE_CASES = [
    ("scale length", dict(scale=np.ones(C + 1)), ValueError, "scale"),
    ("shift 2-D", dict(shift=np.zeros((C, 1))), ValueError, "shift"),
    ("complex scale", dict(scale=np.ones(C, complex)), TypeError, "scale"),
    ("out shape", dict(out=np.empty((4, C, 6), np.float32)), ValueError, "out"),
    ("out dtype", dict(out=np.empty((4, C, 5), np.float64)), TypeError, "out"),
    ("out read-only", dict(out="readonly"), ValueError, "out"),
    ("residual shape", dict(residual=np.ones((4, C, 4))), ValueError, "residual"),
    ("ndim < 2", dict(input=np.ones(5, np.float32)), ValueError, "input"),
    ("axis out of range", dict(axis=3), ValueError, "axis"),
    ("axis not int", dict(axis=1.5), TypeError, "axis"),
    ("activation", dict(activation="tanh"), ValueError, "activation"),
    ("backend", dict(backend="gpu"), ValueError, "backend"),
    ("object input", dict(input=np.array([[1, None, 2]] * 4, dtype=object)), TypeError, "input"),
]


@pytest.mark.parametrize("description,overrides,error,words", AFFINE_CASES,
                         ids=[c[0] for c in AFFINE_CASES])
def test_affine_rejects_and_changes_nothing(backend, description, overrides, error, words):
    kwargs = {**affine_kwargs(), "backend": backend, **overrides}
    if isinstance(kwargs.get("out"), str):
        kwargs["out"] = np.zeros((4, C, 5), np.float32)
        kwargs["out"].flags.writeable = False
    snapshot = {k: v.copy() for k, v in kwargs.items() if isinstance(v, np.ndarray)}
    with pytest.raises(error, match=words):
        fastbn.affine(**kwargs)
    for key, before in snapshot.items():
        np.testing.assert_array_equal(kwargs[key], before, err_msg=f"{key} was modified")


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(running_mean=np.zeros((2, 2))), ValueError, "running_mean"),
    (dict(running_var=np.ones(4)), ValueError, "running_var"),
    (dict(weight=np.ones(2)), ValueError, "weight"),
    (dict(bias=np.ones(3, complex)), TypeError, "bias"),
    (dict(eps=-1.0), ValueError, "eps"),
])
def test_scale_shift_rejects(kwargs, error, words):
    kwargs = {"running_mean": np.zeros(3), "running_var": np.ones(3), **kwargs}
    with pytest.raises(error, match=words):
        fastbn.scale_shift(**kwargs)


# ----------------------------------------------------------------------------- moments

@pytest.mark.parametrize("shape,axis", [((50, C), 1), ((6, C, 17), 1), ((3, 5, 7, C), -1),
                                        ((C, 40), 0), ((2, 3, 4, C, 2), 3)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32])
def test_moments_match_numpy(backend, rng, shape, axis, dtype):
    x = (rng.standard_normal(shape) * 10 + 3).astype(dtype)
    m = fastbn.moments(x, axis=axis, backend=backend)
    flat = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, C)
    assert m.count == flat.shape[0] and m.mean.dtype == np.float64
    tol = 1e-6 if dtype in (np.float16, np.float32) else 1e-12  # float16 computes in float32
    np.testing.assert_allclose(m.mean, flat.mean(0), rtol=tol, atol=tol)
    np.testing.assert_allclose(m.var(), flat.var(0), rtol=tol)
    np.testing.assert_allclose(m.var(ddof=1), flat.var(0, ddof=1), rtol=tol)
    np.testing.assert_allclose(m.m2, flat.var(0) * flat.shape[0], rtol=tol)


def test_moments_large_offset_and_constant(backend):
    x = np.full((100, 2), 1e8)
    x[:, 1] += np.arange(100) % 2
    m = fastbn.moments(x, backend=backend)
    np.testing.assert_array_equal(m.var(), [0.0, 0.25])


def test_moments_empty_and_identity(backend):
    m = fastbn.moments(np.ones((0, C)), backend=backend)
    assert m.count == 0
    assert np.isnan(m.var()).all() and np.isnan(fastbn.Moments.empty(C).var(ddof=1)).all()
    full = fastbn.moments(np.arange(12.0).reshape(4, C), backend=backend)
    for merged in (m.merge(full), full.merge(m)):
        np.testing.assert_array_equal(merged.mean, full.mean)
        np.testing.assert_array_equal(merged.m2, full.m2)


def test_merge_is_exact_associative_and_commutative(backend, rng):
    data = rng.standard_normal((60, C, 3)) * 5 + 100
    cuts = [0, 7, 8, 31, 60]
    parts = [fastbn.moments(data[a:b], backend=backend) for a, b in zip(cuts[:-1], cuts[1:])]
    left = parts[0].merge(parts[1]).merge(parts[2]).merge(parts[3])
    right = parts[0].merge(parts[1].merge(parts[2].merge(parts[3])))
    shuffled = parts[3].merge(parts[1]).merge(parts[0].merge(parts[2]))
    whole = fastbn.moments(data, backend=backend)
    for m in (left, right, shuffled):
        assert m.count == whole.count == 180
        np.testing.assert_allclose(m.mean, whole.mean, rtol=1e-14)
        np.testing.assert_allclose(m.m2, whole.m2, rtol=1e-12)


def test_moments_rejects():
    with pytest.raises(ValueError, match="input"):
        fastbn.moments(np.ones(4))
    with pytest.raises(TypeError, match="input"):
        fastbn.moments(np.ones((2, 2), complex))
    with pytest.raises(ValueError, match="axis"):
        fastbn.moments(np.ones((2, 2)), axis=2)
    m = fastbn.moments(np.ones((2, 2)))
    with pytest.raises(ValueError, match="channels"):
        m.merge(fastbn.Moments.empty(3))
    with pytest.raises(TypeError, match="Moments"):
        m.merge((2, np.ones(2), np.ones(2)))


# ----------------------------------------------------------------------------- folding

@pytest.fixture
def torch_fusion():
    pytest.importorskip("torch")
    import torch.nn.utils.fusion
    return torch.nn.utils.fusion


def bn_params(rng, channels):
    return (rng.standard_normal(channels), rng.uniform(0.1, 3, channels),
            rng.uniform(0.5, 2, channels), rng.standard_normal(channels))


@pytest.mark.torch
@pytest.mark.parametrize("wshape,transpose", [((6, 4, 3, 3), False), ((4, 6, 3, 3), True),
                                              ((6, 2, 5), False), ((6, 2, 1, 3, 3), False),
                                              ((2, 6, 3, 3, 3), True)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fold_into_conv_matches_torch(torch_fusion, rng, wshape, transpose, with_bias, dtype):
    channels = wshape[1] if transpose else wshape[0]
    cw = rng.standard_normal(wshape).astype(dtype)
    cb = rng.standard_normal(channels).astype(dtype) if with_bias else None
    rm, rv, w, b = bn_params(rng, channels)
    import torch
    fw, fb = fastbn.fold_into_conv(cw, cb, rm, rv, w, b, 1e-3, transpose=transpose)
    tw, tb = torch_fusion.fuse_conv_bn_weights(
        torch.from_numpy(cw.astype(np.float64)),
        None if cb is None else torch.from_numpy(cb.astype(np.float64)),
        torch.from_numpy(rm), torch.from_numpy(rv), 1e-3, torch.from_numpy(w),
        torch.from_numpy(b), transpose=transpose)
    assert fw.dtype == dtype and fb.dtype == dtype and fw.shape == wshape
    rtol = 1e-6 if dtype == np.float32 else 1e-15
    np.testing.assert_allclose(fw, tw.detach().numpy(), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(fb, tb.detach().numpy(), rtol=rtol, atol=rtol)


@pytest.mark.torch
def test_folded_conv_computes_conv_then_bn(torch_fusion, rng):
    import torch
    F = torch.nn.functional
    x = torch.from_numpy(rng.standard_normal((2, 4, 7, 7)))
    cw, cb = rng.standard_normal((5, 4, 3, 3)), rng.standard_normal(5)
    rm, rv, w, b = bn_params(rng, 5)
    expected = fastbn.batch_norm(F.conv2d(x, torch.from_numpy(cw), torch.from_numpy(cb)).numpy(),
                                 rm, rv, w, b)
    fw, fb = fastbn.fold_into_conv(cw, cb, rm, rv, w, b)
    got = F.conv2d(x, torch.from_numpy(fw), torch.from_numpy(fb)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-12)
    # transposed convolution: weight (in, out, kh, kw)
    tw = rng.standard_normal((4, 5, 3, 3))
    expected = fastbn.batch_norm(F.conv_transpose2d(x, torch.from_numpy(tw)).numpy(),
                                 rm, rv, w, b)
    fw, fb = fastbn.fold_into_conv(tw, None, rm, rv, w, b, transpose=True)
    got = F.conv_transpose2d(x, torch.from_numpy(fw), torch.from_numpy(fb)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-12)


@pytest.mark.torch
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fold_into_linear_matches_torch(torch_fusion, rng, with_bias, dtype):
    lw = rng.standard_normal((6, 9)).astype(dtype)
    lb = rng.standard_normal(6).astype(dtype) if with_bias else None
    rm, rv, w, b = bn_params(rng, 6)
    import torch
    fw, fb = fastbn.fold_into_linear(lw, lb, rm, rv, w, b, 1e-4)
    tw, tb = torch_fusion.fuse_linear_bn_weights(
        torch.from_numpy(lw.astype(np.float64)),
        None if lb is None else torch.from_numpy(lb.astype(np.float64)),
        torch.from_numpy(rm), torch.from_numpy(rv), 1e-4, torch.from_numpy(w),
        torch.from_numpy(b))
    assert fw.dtype == fb.dtype == dtype
    rtol = 1e-6 if dtype == np.float32 else 1e-15
    np.testing.assert_allclose(fw, tw.detach().numpy(), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(fb, tb.detach().numpy(), rtol=rtol, atol=rtol)
    # and the folded layer computes bn(linear(x))
    x = rng.standard_normal((5, 9))
    expected = fastbn.batch_norm(x @ lw.T.astype(np.float64) + (0 if lb is None else lb),
                                 rm, rv, w, b, eps=1e-4)
    np.testing.assert_allclose(x @ fw.T.astype(np.float64) + fb, expected, rtol=1e-5, atol=1e-5)


def test_fold_defaults_and_errors(rng):
    fw, fb = fastbn.fold_into_linear(np.ones((2, 3)), None, [1.0, 2.0], [1.0, 1.0], None, None,
                                     eps=0.0)
    np.testing.assert_array_equal(fw, np.ones((2, 3)))
    np.testing.assert_array_equal(fb, [-1.0, -2.0])
    ok = dict(conv_weight=np.ones((4, 2, 3, 3)), conv_bias=np.zeros(4), running_mean=np.zeros(4),
              running_var=np.ones(4), weight=np.ones(4), bias=np.zeros(4))
    for overrides, error, words in [
            (dict(conv_weight=np.ones(4)), ValueError, "conv_weight"),
            (dict(conv_weight=np.ones((4, 2), complex)), TypeError, "conv_weight"),
            (dict(conv_bias=np.zeros(3)), ValueError, "conv_bias"),
            (dict(running_mean=np.zeros(5)), ValueError, "running_mean"),
            (dict(running_var=np.ones((4, 1))), ValueError, "running_var"),
            (dict(weight=np.ones(2)), ValueError, "weight"),
            (dict(bias=np.ones(4, complex)), TypeError, "bias"),
            (dict(eps=-1.0), ValueError, "eps"),
            (dict(transpose=True), ValueError, "conv_bias")]:   # axis 1 has 2 channels
        with pytest.raises(error, match=words):
            fastbn.fold_into_conv(**{**ok, **overrides})
    with pytest.raises(ValueError, match="linear_weight"):
        fastbn.fold_into_linear(np.ones((4, 2, 1)), None, np.zeros(4), np.ones(4), None, None)
    with pytest.raises(ValueError, match="linear_bias"):
        fastbn.fold_into_linear(np.ones((4, 2)), np.ones(2), np.zeros(4), np.ones(4), None, None)
