"""The BatchNorm layer against torch.nn.BatchNorm*d (skipped without torch), plus its own rules."""
import doctest

import numpy as np
import pytest

import fastbn
import fastbn._inference
import fastbn._layers

torch = pytest.importorskip("torch")
F = torch.nn.functional
pytestmark = pytest.mark.torch

TORCH_BN = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
            5: torch.nn.BatchNorm3d}


def to_torch(a, axis):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, axis, 1)))


def from_torch(t, axis):
    return np.moveaxis(t.detach().numpy(), 1, axis)


def make_pair(cls, C, **kwargs):
    bn = fastbn.BatchNorm(C, dtype=np.float64, **{k: v for k, v in kwargs.items()
                                                  if k in ("axis", "activation", "backend")},
                          **{k: v for k, v in kwargs.items()
                             if k in ("eps", "momentum", "affine", "track_running_stats")})
    t = cls(C, **{k: v for k, v in kwargs.items()
                  if k in ("eps", "momentum", "affine", "track_running_stats")}).double()
    if bn.affine:
        rng = np.random.default_rng(7)
        bn.weight[:] = rng.uniform(0.5, 1.5, C)
        bn.bias[:] = rng.standard_normal(C)
        with torch.no_grad():
            t.weight.copy_(torch.from_numpy(bn.weight))
            t.bias.copy_(torch.from_numpy(bn.bias))
    return bn, t


def check_state(bn, t):
    if bn.track_running_stats:
        np.testing.assert_allclose(bn.running_mean, t.running_mean.numpy(), rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(bn.running_var, t.running_var.numpy(), rtol=1e-12, atol=1e-13)
        assert bn.num_batches_tracked == int(t.num_batches_tracked)
    else:
        assert bn.running_mean is None and t.running_mean is None


def step(bn, t, x, axis, rng, residual=False, lr=0.1):
    """One forward + backward + SGD step on both; compare everything."""
    res = rng.standard_normal(x.shape) if residual else None
    xt = to_torch(x, axis).requires_grad_()
    yt = t(xt)
    if res is not None:
        yt = yt + to_torch(res, axis)
    if bn.activation == "relu":
        yt = torch.relu(yt)
    y = bn(x, residual=res)
    np.testing.assert_allclose(y, from_torch(yt, axis), atol=1e-11)
    check_state(bn, t)
    dy = rng.standard_normal(x.shape)
    yt.backward(to_torch(dy, axis))
    dx = bn.backward(dy)
    np.testing.assert_allclose(dx, from_torch(xt.grad, axis), atol=1e-10)
    if bn.affine:
        np.testing.assert_allclose(bn.grad_weight, t.weight.grad.numpy(), atol=1e-9)
        np.testing.assert_allclose(bn.grad_bias, t.bias.grad.numpy(), atol=1e-9)
    else:
        assert bn.grad_weight is None and bn.grad_bias is None
    return y


def sgd(bn, t, lr=0.1):
    if bn.affine:
        bn.weight -= lr * bn.grad_weight
        bn.bias -= lr * bn.grad_bias
        with torch.no_grad():
            t.weight -= lr * t.weight.grad
            t.bias -= lr * t.bias.grad


# ----------------------------------------------------------------------------- against torch

@pytest.mark.parametrize("shape,axis", [((16, 5), 1), ((6, 5, 7), 1), ((4, 5, 3, 6), 1),
                                        ((4, 3, 6, 5), -1), ((2, 5, 3, 2, 4), 1)])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
def test_training_steps_then_eval_match_torch(backend, rng, shape, axis, momentum, affine):
    C = shape[axis]
    bn, t = make_pair(TORCH_BN[len(shape)], C, momentum=momentum, affine=affine, eps=1e-3,
                      axis=axis, backend=backend)
    for i in range(3):
        x = rng.standard_normal(shape) * (i + 1) + i
        step(bn, t, x, axis, rng)
        if i == 1:                     # gradients accumulate like .grad until zeroed
            sgd(bn, t)
            bn.zero_grad()
            t.zero_grad()
    check_state(bn, t)
    assert bn.num_batches_tracked == 3
    t.eval()
    assert bn.eval() is bn and not bn.training
    x = rng.standard_normal(shape)
    step(bn, t, x, axis, rng)          # eval: running stats, constant-statistics backward
    check_state(bn, t)
    assert bn.train() is bn and bn.training


@pytest.mark.parametrize("activation", [None, "relu"])
def test_residual_and_relu_match_torch(backend, rng, activation):
    bn, t = make_pair(torch.nn.BatchNorm2d, 4, axis=1, activation=activation, backend=backend)
    for _ in range(2):
        step(bn, t, rng.standard_normal((3, 4, 5, 5)), 1, rng, residual=True)
    t.eval(), bn.eval()
    step(bn, t, rng.standard_normal((3, 4, 5, 5)), 1, rng, residual=True)


def test_no_running_stats_uses_batch_stats_in_eval_too(backend, rng):
    bn, t = make_pair(torch.nn.BatchNorm1d, 3, track_running_stats=False, backend=backend)
    assert bn.running_mean is None and bn.num_batches_tracked is None
    step(bn, t, rng.standard_normal((8, 3, 4)), 1, rng)
    bn.eval(), t.eval()
    y = step(bn, t, rng.standard_normal((8, 3, 4)) + 5, 1, rng)
    np.testing.assert_allclose(y.mean(axis=(0, 2)), bn.bias, atol=1e-12)
    assert bn.state_dict().keys() == t.state_dict().keys()
    with pytest.raises(ValueError, match="track_running_stats"):
        bn.freeze()


def test_float32_layer_matches_torch_float32(rng):
    bn, t = fastbn.BatchNorm(6), torch.nn.BatchNorm2d(6)
    for _ in range(3):
        x = (rng.standard_normal((4, 6, 5, 5)) * 3 + 1).astype(np.float32)
        xt = torch.from_numpy(x).requires_grad_()
        y, yt = bn(x), t(xt)
        assert y.dtype == np.float32
        np.testing.assert_allclose(y, yt.detach().numpy(), atol=2e-5)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        yt.backward(torch.from_numpy(dy))
        dx = bn.backward(dy)
        assert dx.dtype == np.float32 and bn.grad_weight.dtype == np.float32
        np.testing.assert_allclose(dx, xt.grad.numpy(), atol=2e-5)
        np.testing.assert_allclose(bn.grad_weight, t.weight.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bn.running_mean, t.running_mean.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(bn.running_var, t.running_var.numpy(), rtol=1e-6, atol=1e-6)
    assert bn.running_mean.dtype == np.float32


# ----------------------------------------------------------------------------- frozen mode

def test_frozen_keeps_stats_and_trains_affine_like_torch_eval(backend, rng):
    bn, t = make_pair(torch.nn.BatchNorm2d, 3, backend=backend)
    step(bn, t, rng.standard_normal((4, 3, 2, 2)) + 1, 1, rng)      # give it some statistics
    sgd(bn, t), bn.zero_grad(), t.zero_grad()
    assert bn.freeze() is bn and bn.frozen
    t.eval()                        # in torch, frozen BN is emulated by eval mode
    before = bn.state_dict()
    for _ in range(2):
        step(bn, t, rng.standard_normal((4, 3, 2, 2)) * 2, 1, rng)
        sgd(bn, t), bn.zero_grad(), t.zero_grad()
    after = bn.state_dict()
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        np.testing.assert_array_equal(after[key], before[key])
    assert not np.array_equal(after["weight"], before["weight"])  # the affine trained
    assert bn.train().frozen and bn.training                      # train() does not unfreeze
    bn.freeze(False)
    bn(rng.standard_normal((4, 3, 2, 2)))
    assert bn.num_batches_tracked == before["num_batches_tracked"] + 1


def test_frozen_is_distinct_from_eval_in_repr_and_flags():
    bn = fastbn.BatchNorm(2).freeze()
    assert bn.training and bn.frozen and "frozen=True" in repr(bn)
    assert not fastbn.BatchNorm(2).eval().frozen


# ----------------------------------------------------------------------------- ghost batch norm

@pytest.mark.parametrize("n,v,expected", [(12, 4, [(0, 4), (4, 8), (8, 12)]),
                                          (10, 4, [(0, 4), (4, 10)]),
                                          (3, 4, [(0, 3)]), (7, 7, [(0, 7)])])
@pytest.mark.parametrize("axis", [1, -1])
def test_ghost_batch_norm_matches_per_sub_batch_torch(backend, rng, n, v, expected, axis):
    C = 3
    shape = (n, C, 5) if axis == 1 else (n, 5, C)
    bn = fastbn.BatchNorm(C, momentum=0.3, axis=axis, dtype=np.float64, backend=backend,
                          virtual_batch_size=v, activation="relu")
    bn.weight[:] = [0.5, 1.0, 2.0]
    bn.bias[:] = [0.1, -0.2, 0.3]
    x = rng.standard_normal(shape) * 2 + 1
    res = rng.standard_normal(shape)
    y = bn(x, residual=res)
    # Reference: torch on each documented sub-batch, then the documented running-stat update.
    xt = to_torch(x, axis).requires_grad_()
    wt = torch.tensor(bn.weight, requires_grad=True)
    bt = torch.tensor(bn.bias, requires_grad=True)
    parts = [F.batch_norm(xt[a:b], None, None, wt, bt, True, 0.0, bn.eps) for a, b in expected]
    yt = torch.relu(torch.cat(parts) + to_torch(res, axis))
    np.testing.assert_allclose(y, from_torch(yt, axis), atol=1e-12)
    per_sample = x.size // n // C
    counts = np.array([(b - a) * per_sample for a, b in expected])
    xm = np.moveaxis(x, axis, -1).reshape(n, -1, C)
    means = np.array([xm[a:b].reshape(-1, C).mean(0) for a, b in expected])
    m2 = np.array([((xm[a:b].reshape(-1, C) - mu) ** 2).sum(0)
                   for (a, b), mu in zip(expected, means)])
    np.testing.assert_allclose(bn.running_mean, 0.3 * xm.reshape(-1, C).mean(0), atol=1e-13)
    np.testing.assert_allclose(bn.running_var,
                               0.7 + 0.3 * m2.sum(0) / (counts - 1).sum(), atol=1e-12)
    assert bn.num_batches_tracked == 1
    dy = rng.standard_normal(shape)
    yt.backward(to_torch(dy, axis))
    dx = bn.backward(dy)
    np.testing.assert_allclose(dx, from_torch(xt.grad, axis), atol=1e-10)
    np.testing.assert_allclose(bn.grad_weight, wt.grad.numpy(), atol=1e-10)
    np.testing.assert_allclose(bn.grad_bias, bt.grad.numpy(), atol=1e-10)
    # Evaluation ignores the virtual batches.
    plain = fastbn.BatchNorm(C, axis=axis, dtype=np.float64, activation="relu",
                            backend=backend)
    plain.load_state_dict(bn.state_dict())
    np.testing.assert_array_equal(bn.eval()(x, res), plain.eval()(x, res))


def test_ghost_batch_norm_errors(backend):
    bn = fastbn.BatchNorm(3, axis=0, virtual_batch_size=2, backend=backend)
    with pytest.raises(ValueError, match="axis"):
        bn(np.ones((3, 8)))
    bn = fastbn.BatchNorm(3, virtual_batch_size=1, backend=backend)
    with pytest.raises(ValueError, match="1 value per channel"):
        bn(np.ones((4, 3)))
    assert bn.num_batches_tracked == 0
    with pytest.raises(ValueError, match="residual"):
        fastbn.BatchNorm(3, virtual_batch_size=2)(np.ones((4, 3)), residual=np.ones((4, 2)))
    for bad, error in [(0, ValueError), (2.0, TypeError), (True, TypeError)]:
        with pytest.raises(error, match="virtual_batch_size"):
            fastbn.BatchNorm(3, virtual_batch_size=bad)


# ----------------------------------------------------------------------------- precise BN

def test_population_stats_are_exact_over_streamed_batches(backend, rng):
    data = rng.standard_normal((103, 4, 6)) * 3 + 1e3
    bn = fastbn.BatchNorm(4, dtype=np.float64, backend=backend)
    bn.num_batches_tracked = 5
    total = bn.set_population_stats(np.array_split(data, 9))
    flat = np.moveaxis(data, 1, -1).reshape(-1, 4)
    assert total.count == flat.shape[0] and bn.num_batches_tracked == 5
    np.testing.assert_allclose(bn.running_mean, flat.mean(0), rtol=1e-14)
    np.testing.assert_allclose(bn.running_var, flat.var(0, ddof=1), rtol=1e-12)
    # Precomputed Moments, NHWC layout and ddof=0 too.
    nhwc = fastbn.BatchNorm(4, axis=-1, dtype=np.float64, backend=backend)
    chunks = [fastbn.moments(c, axis=-1) for c in np.array_split(np.moveaxis(data, 1, -1), 4)]
    nhwc.set_population_stats(iter(chunks), ddof=0)
    np.testing.assert_allclose(nhwc.running_var, flat.var(0), rtol=1e-12)


def test_population_stats_errors_leave_stats_unchanged():
    bn = fastbn.BatchNorm(4)
    with pytest.raises(ValueError, match="channels"):
        bn.set_population_stats([np.ones((5, 4)), np.ones((5, 3))])
    with pytest.raises(ValueError, match="ddof"):
        bn.set_population_stats([np.ones((1, 4))])
    with pytest.raises(TypeError, match="input"):
        bn.set_population_stats([np.ones((5, 4), complex)])
    np.testing.assert_array_equal(bn.running_var, 1)
    with pytest.raises(ValueError, match="track_running_stats"):
        fastbn.BatchNorm(4, track_running_stats=False).set_population_stats([])


# ----------------------------------------------------------------------------- state dicts

def test_state_dict_round_trip_with_torch(rng):
    t = torch.nn.BatchNorm2d(5, momentum=0.2)
    with torch.no_grad():
        t.weight.uniform_(0.5, 2), t.bias.normal_()
    for _ in range(3):
        t(torch.randn(4, 5, 3, 3) * 2 + 1)
    tsd = t.state_dict()
    bn = fastbn.BatchNorm(5, momentum=0.2)
    assert bn.load_state_dict(tsd) == ([], [])            # tensors directly
    assert bn.num_batches_tracked == 3
    bn2 = fastbn.BatchNorm(5, momentum=0.2)
    bn2.load_state_dict({k: np.asarray(v) for k, v in tsd.items()})
    x = rng.standard_normal((2, 5, 3, 3)).astype(np.float32)
    t.eval()
    expected = t(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(bn.eval()(x), expected, atol=1e-6)
    np.testing.assert_array_equal(bn2.eval()(x), bn.eval()(x))
    # And back: fastbn's state dict loads strictly into torch, values intact.
    bn.train()(rng.standard_normal((4, 5, 3, 3)).astype(np.float32))
    sd = bn.state_dict()
    assert list(sd) == list(tsd)
    assert sd["num_batches_tracked"].dtype == np.int64 and sd["num_batches_tracked"].shape == ()
    t2 = torch.nn.BatchNorm2d(5)
    t2.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    for key, value in t2.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), sd[key])
    sd["running_mean"][:] = 99        # copies, not views
    assert not np.any(bn.running_mean == 99)


@pytest.mark.parametrize("affine,track", [(False, True), (True, False), (False, False)])
def test_state_dict_keys_match_torch(affine, track):
    t = torch.nn.BatchNorm1d(3, affine=affine, track_running_stats=track)
    bn = fastbn.BatchNorm(3, affine=affine, track_running_stats=track)
    assert list(bn.state_dict()) == list(t.state_dict())
    bn.load_state_dict(t.state_dict())


def test_load_state_dict_errors_load_nothing():
    bn = fastbn.BatchNorm(3)
    good = fastbn.BatchNorm(3).state_dict()
    good["running_mean"][:] = 5
    cases = [
        ({k: v for k, v in good.items() if k != "bias"}, ValueError, "missing keys \\['bias'\\]"),
        ({**good, "extra": np.ones(3)}, ValueError, "unexpected keys \\['extra'\\]"),
        ({**good, "running_var": np.ones(4)}, ValueError, "running_var"),
        ({**good, "weight": np.ones(3, complex)}, TypeError, "weight"),
        ({**good, "num_batches_tracked": np.array(1.5)}, ValueError, "num_batches_tracked"),
        ([("weight", np.ones(3))], TypeError, "mapping"),
    ]
    for state, error, words in cases:
        with pytest.raises(error, match=words):
            bn.load_state_dict(state)
        np.testing.assert_array_equal(bn.running_mean, 0)
    keys = bn.load_state_dict({"running_mean": np.ones(3), "other": 1}, strict=False)
    assert keys.unexpected_keys == ["other"] and "weight" in keys.missing_keys
    np.testing.assert_array_equal(bn.running_mean, 1)


# ----------------------------------------------------------------------------- Keras

def test_keras_weights_and_conventions(rng):
    C = 4
    gamma, beta = rng.uniform(0.5, 2, C), rng.standard_normal(C)
    mm, mv = rng.standard_normal(C), rng.uniform(0.5, 2, C)
    bn = fastbn.BatchNorm.from_keras([gamma, beta, mm, mv], momentum=0.9, epsilon=1e-3,
                                     dtype=np.float64)
    assert not bn.training and bn.axis == -1 and bn.eps == 1e-3
    assert bn.momentum == pytest.approx(0.1)
    x = rng.standard_normal((5, 3, C))
    # Keras inference: (x - moving_mean) / sqrt(moving_variance + epsilon) * gamma + beta
    np.testing.assert_allclose(bn(x), (x - mm) / np.sqrt(mv + 1e-3) * gamma + beta, atol=1e-13)
    # Keras' moving update new = m*old + (1-m)*batch, for the mean (no variance-bias issue).
    bn.train()(x)
    batch_mean = x.reshape(-1, C).mean(0)
    np.testing.assert_allclose(bn.running_mean, 0.9 * mm + 0.1 * batch_mean, atol=1e-13)
    # Round trip of weights and config.
    config = bn.keras_config()
    assert config == {"axis": -1, "momentum": pytest.approx(0.9), "epsilon": 1e-3,
                      "center": True, "scale": True}
    again = fastbn.BatchNorm.from_keras(bn.keras_weights(), momentum=config["momentum"],
                                        epsilon=config["epsilon"], dtype=np.float64)
    np.testing.assert_array_equal(again.state_dict()["running_var"], bn.running_var)
    assert again.momentum == pytest.approx(bn.momentum)


def test_keras_named_weights_and_missing_scale():
    named = {"bn/beta:0": [1.0, 2.0], "bn/moving_mean:0": [0.0, 0.0],
             "bn/moving_variance:0": [1.0, 4.0]}           # center=True, scale=False
    bn = fastbn.BatchNorm.from_keras(named, epsilon=0.0)
    np.testing.assert_array_equal(bn.weight, [1.0, 1.0])
    np.testing.assert_allclose(bn(np.array([[2.0, 2.0]])), [[3.0, 3.0]])
    plain = fastbn.BatchNorm.from_keras({"moving_mean": [0.0], "moving_variance": [1.0]})
    assert not plain.affine and len(plain.keras_weights()) == 2


def test_keras_errors_load_nothing():
    bn = fastbn.BatchNorm(2)
    cases = [
        ({"kernel": [1, 1], "moving_mean": [0, 0], "moving_variance": [1, 1]}, ValueError,
         "kernel"),
        ([np.ones(2)] * 3, ValueError, "4 arrays"),
        ({"gamma": [5, 5], "moving_mean": [0, 0]}, ValueError, "moving_variance"),
        ({"gamma": [5, 5, 5], "moving_mean": [0, 0], "moving_variance": [1, 1]}, ValueError,
         "gamma"),
        ("gamma", TypeError, "weights"),
    ]
    for weights, error, words in cases:
        with pytest.raises(error, match=words):
            bn.load_keras_weights(weights)
        np.testing.assert_array_equal(bn.weight, 1)
    with pytest.raises(ValueError, match="affine"):
        fastbn.BatchNorm(2, affine=False).load_keras_weights([np.ones(2)] * 4)
    with pytest.raises(ValueError, match="momentum=None"):
        fastbn.BatchNorm(2, momentum=None).keras_config()


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,error,words", [
    (dict(num_features=0), ValueError, "num_features"),
    (dict(num_features=2.0), TypeError, "num_features"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(momentum=2.0), ValueError, "momentum"),
    (dict(momentum="0.1"), TypeError, "momentum"),
    (dict(axis=1.0), TypeError, "axis"),
    (dict(dtype=np.int32), TypeError, "dtype"),
    (dict(dtype="nonsense"), TypeError, "dtype"),
    (dict(activation="gelu"), ValueError, "activation"),
    (dict(backend="cuda"), ValueError, "backend"),
])
def test_constructor_rejects(kwargs, error, words):
    kwargs = {"num_features": 3, **kwargs}
    with pytest.raises(error, match=words):
        fastbn.BatchNorm(**kwargs)


def test_bad_calls_leave_the_layer_unchanged(backend):
    bn = fastbn.BatchNorm(3, backend=backend)
    x = np.random.default_rng(0).standard_normal((4, 3, 2))
    with pytest.raises(RuntimeError, match="forward"):
        bn.backward(np.ones_like(x))
    before = bn.state_dict()
    for args, error, words in [((np.ones((4, 2, 2)),), ValueError, "num_features=3"),
                               ((np.ones(3),), ValueError, "input"),
                               ((np.ones((4, 3), complex),), TypeError, "input"),
                               ((np.ones((1, 3)),), ValueError, "more than 1 value"),
                               ((x, np.ones((4, 3, 3))), ValueError, "residual")]:
        with pytest.raises(error, match=words):
            bn(*args)
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(value, before[key])
    bn(x)
    with pytest.raises(ValueError, match="grad_output"):
        bn.backward(np.ones((4, 3, 3)))
    assert bn.grad_weight is None
    bn.backward(np.ones_like(x))
    with pytest.raises(RuntimeError, match="forward"):
        bn.backward(np.ones_like(x))
    bn.zero_grad(set_to_none=False)
    np.testing.assert_array_equal(bn.grad_bias, 0)


def test_integer_and_float16_input():
    bn = fastbn.BatchNorm(2)
    y = bn(np.arange(8).reshape(4, 2))
    assert y.dtype == np.float64
    y16 = bn(np.arange(8, dtype=np.float16).reshape(4, 2))
    assert y16.dtype == np.float16
    assert bn.backward(np.ones((4, 2), np.float16)).dtype == np.float16


def test_reset():
    bn = fastbn.BatchNorm(2)
    bn(np.arange(8.0).reshape(4, 2))
    bn.weight[:] = 3
    bn.reset_parameters()
    np.testing.assert_array_equal(bn.running_mean, 0)
    np.testing.assert_array_equal(bn.weight, 1)
    assert bn.num_batches_tracked == 0


@pytest.mark.parametrize("module", [fastbn._layers, fastbn._inference, fastbn._api,
                                    fastbn._threads, fastbn._config])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted >= 2


def test_ghost_running_variance_is_exact_when_eps_dominates(backend):
    """The pooled sub-batch variance must not be rebuilt from invstd (1/invstd**2 - eps)."""
    x = np.random.default_rng(0).standard_normal((8, 3, 5)) * 1e-6
    bn = fastbn.BatchNorm(3, eps=1.0, momentum=1.0, virtual_batch_size=4, dtype=np.float64,
                          backend=backend)
    bn(x)
    n = 4 * 5
    pooled = sum(p.var(axis=(0, 2)) * n for p in (x[:4], x[4:])) / (2 * (n - 1))
    np.testing.assert_allclose(bn.running_var, pooled, rtol=1e-9)
    np.testing.assert_allclose(bn.running_mean, x.mean(axis=(0, 2)), rtol=1e-9, atol=1e-20)


@pytest.mark.parametrize("affine,track", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("training", [True, False])
def test_wrong_channel_count_is_rejected_and_changes_nothing(affine, track, training):
    """Also when nothing of the layer's own has the channel count to compare with (no weight,
    no running statistics): the error names num_features and the layer keeps its state."""
    bn = fastbn.BatchNorm(3, affine=affine, track_running_stats=track)
    bn.train(training)
    state = {k: np.copy(v) for k, v in bn.state_dict().items()}
    x = np.random.default_rng(0).standard_normal((4, 5, 6)).astype(np.float32)
    with pytest.raises(ValueError, match="num_features=3"):
        bn(x)
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(value, state[key])
