"""fastbn against torch.nn.functional.batch_norm and autograd (skipped without torch)."""
import numpy as np
import pytest

import fastbn

torch = pytest.importorskip("torch")
F = torch.nn.functional
pytestmark = pytest.mark.torch


def to_torch_layout(a, axis):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, axis, 1)))


@pytest.mark.parametrize("shape", [(97, 5), (7, 5, 101), (3, 5, 9, 11), (2, 3, 5, 7, 3)])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_forward_backward_and_running_stats_match_torch(backend, rng, shape, axis, training,
                                                        activation):
    x = rng.standard_normal(shape) * 2 + 1
    channels = shape[axis]
    weight, bias = rng.standard_normal(channels), rng.standard_normal(channels)
    residual = rng.standard_normal(shape)
    rm, rv = rng.standard_normal(channels), rng.uniform(0.5, 2, channels)
    trm, trv = torch.tensor(rm), torch.tensor(rv)
    xt = to_torch_layout(x, axis).requires_grad_()
    wt, bt = torch.tensor(weight, requires_grad=True), torch.tensor(bias, requires_grad=True)
    yt = F.batch_norm(xt, trm, trv, wt, bt, training, 0.2, 1e-3) + to_torch_layout(residual, axis)
    if activation:
        yt = torch.relu(yt)
    dy = rng.standard_normal(shape)
    yt.backward(to_torch_layout(dy, axis))

    y, mean, invstd = fastbn.batch_norm(x, rm, rv, weight, bias, training, 0.2, 1e-3, axis=axis,
                                        residual=residual, activation=activation,
                                        return_stats=True, backend=backend)
    np.testing.assert_allclose(np.moveaxis(y, axis, 1), yt.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(rm, trm.numpy(), atol=1e-13)
    np.testing.assert_allclose(rv, trv.numpy(), atol=1e-13)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis,
                                            training=training, output=y, activation=activation,
                                            backend=backend)
    np.testing.assert_allclose(np.moveaxis(dx, axis, 1), xt.grad.numpy(), atol=1e-11)
    np.testing.assert_allclose(dw, wt.grad.numpy(), atol=1e-10)
    np.testing.assert_allclose(db, bt.grad.numpy(), atol=1e-10)


def test_float32_matches_torch(backend, rng):
    x = rng.standard_normal((16, 8, 12, 12)).astype(np.float32)
    rm, rv = np.zeros(8, np.float32), np.ones(8, np.float32)
    trm, trv = torch.zeros(8), torch.ones(8)
    expected = F.batch_norm(torch.from_numpy(x), trm, trv, training=True)
    y = fastbn.batch_norm(x, rm, rv, training=True, backend=backend)
    np.testing.assert_allclose(y, expected.numpy(), atol=2e-6)
    np.testing.assert_allclose(rm, trm.numpy(), atol=1e-7)
    np.testing.assert_allclose(rv, trv.numpy(), atol=1e-6)


def test_single_value_per_channel_raises_like_torch(backend):
    x = np.ones((1, 3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        fastbn.batch_norm(x, None, None, training=True, backend=backend)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        F.batch_norm(torch.from_numpy(x), None, None, training=True)
