"""A small neural-network toolkit in NumPy, with fastbn's BatchNorm as its normalization layer.

Used by the training tutorial and the best-practice experiments of the fastbn documentation.
Every layer has ``forward(x)`` (``__call__``), ``backward(grad) -> grad_input`` and
``params()``, a list of ``(array, gradient)`` pairs that :class:`SGD` updates in place.
fastbn's :class:`fastbn.BatchNorm` already has this shape (``weight``/``grad_weight``...), so
it is used as is.
"""
from __future__ import annotations

import time

import numpy as np
from threadpoolctl import threadpool_limits

import fastbn


# ----------------------------------------------------------------------------- data

def load_digits_split(seed=0, test_fraction=0.2, images=False):
    """scikit-learn's bundled 8x8 digits (1797 images, no download), split and standardized.

    Returns ``(x_train, y_train, x_test, y_test)``; float32 features scaled to [0, 1] then
    centred with the training mean. With ``images=True`` the features are (N, 1, 8, 8).
    """
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for label in range(10):                       # a stratified split
        idx = rng.permutation(np.flatnonzero(y == label))
        cut = int(round(len(idx) * test_fraction))
        test_idx += list(idx[:cut])
        train_idx += list(idx[cut:])
    train_idx, test_idx = rng.permutation(train_idx), np.array(sorted(test_idx))
    x_train, x_test = x[train_idx], x[test_idx]
    mean = x_train.mean(axis=0)
    x_train, x_test = x_train - mean, x_test - mean
    if images:
        x_train, x_test = x_train.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8)
    return x_train, y[train_idx], x_test, y[test_idx]


# ----------------------------------------------------------------------------- layers

class Linear:
    """``y = x @ W.T + b`` (PyTorch's layout), He-initialized (times `init_scale`)."""

    def __init__(self, n_in, n_out, rng, bias=True, init_scale=1.0):
        std = init_scale * np.sqrt(2.0 / n_in)
        self.weight = (rng.standard_normal((n_out, n_in)) * std).astype(np.float32)
        self.bias = np.zeros(n_out, np.float32) if bias else None
        self.grad_weight = np.zeros_like(self.weight)
        self.grad_bias = None if self.bias is None else np.zeros_like(self.bias)

    def __call__(self, x):
        self.x = x
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias

    def backward(self, grad):
        self.grad_weight[...] = grad.T @ self.x
        if self.bias is not None:
            self.grad_bias[...] = grad.sum(axis=0)
        return grad @ self.weight

    def params(self):
        pairs = [(self.weight, self.grad_weight)]
        return pairs + ([(self.bias, self.grad_bias)] if self.bias is not None else [])


def im2col(x, k, stride=1, pad=1):
    """(N, C, H, W) -> (N, Ho, Wo, C*k*k): the patches a k x k convolution multiplies."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))
    win = win[:, :, ::stride, ::stride]                  # (N, C, Ho, Wo, k, k)
    n, c, ho, wo = win.shape[:4]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n, ho, wo, c * k * k)


class Conv2d:
    """A k x k convolution, NCHW, via im2col and one matrix product; weight OIHW."""

    def __init__(self, c_in, c_out, rng, k=3, stride=1, bias=True, init_scale=1.0):
        std = init_scale * np.sqrt(2.0 / (c_in * k * k))
        self.weight = (rng.standard_normal((c_out, c_in, k, k)) * std).astype(np.float32)
        self.bias = np.zeros(c_out, np.float32) if bias else None
        self.k, self.stride = k, stride
        self.grad_weight = np.zeros_like(self.weight)
        self.grad_bias = None if self.bias is None else np.zeros_like(self.bias)

    def __call__(self, x):
        self.x_shape = x.shape
        self.cols = im2col(x, self.k, self.stride, self.k // 2)     # (N, Ho, Wo, C*k*k)
        y = self.cols @ self.weight.reshape(len(self.weight), -1).T  # (N, Ho, Wo, O)
        if self.bias is not None:
            y += self.bias
        return np.ascontiguousarray(y.transpose(0, 3, 1, 2))

    def backward(self, grad):
        n, c, h, w = self.x_shape
        k, s, p = self.k, self.stride, self.k // 2
        g = grad.transpose(0, 2, 3, 1)                              # (N, Ho, Wo, O)
        o = g.shape[-1]
        self.grad_weight[...] = (g.reshape(-1, o).T @ self.cols.reshape(-1, c * k * k)
                                 ).reshape(self.weight.shape)
        if self.bias is not None:
            self.grad_bias[...] = g.sum(axis=(0, 1, 2))
        dcols = (g @ self.weight.reshape(o, -1)).reshape(n, g.shape[1], g.shape[2], c, k, k)
        dx = np.zeros((n, c, h + 2 * p, w + 2 * p), np.float32)
        ho, wo = g.shape[1], g.shape[2]
        for i in range(k):                                          # col2im, k*k slices
            for j in range(k):
                dx[:, :, i:i + s * ho:s, j:j + s * wo:s] += dcols[..., i, j].transpose(0, 3, 1, 2)
        return dx[:, :, p:p + h, p:p + w]

    def params(self):
        pairs = [(self.weight, self.grad_weight)]
        return pairs + ([(self.bias, self.grad_bias)] if self.bias is not None else [])


class ReLU:
    def __call__(self, x):
        self.mask = x > 0
        return x * self.mask

    def backward(self, grad):
        return grad * self.mask

    def params(self):
        return []


class GlobalAvgPool:
    """(N, C, H, W) -> (N, C)."""

    def __call__(self, x):
        self.shape = x.shape
        return x.mean(axis=(2, 3))

    def backward(self, grad):
        n, c, h, w = self.shape
        return np.broadcast_to(grad[:, :, None, None] / (h * w), self.shape).astype(np.float32)

    def params(self):
        return []


class Flatten:
    def __call__(self, x):
        self.shape = x.shape
        return x.reshape(len(x), -1)

    def backward(self, grad):
        return grad.reshape(self.shape)

    def params(self):
        return []


class BN(fastbn.BatchNorm):
    """fastbn's BatchNorm with the ``params()`` the optimizer asks for."""

    def params(self):
        if not self.affine:
            return []
        if self.grad_weight is None:
            self.zero_grad(set_to_none=False)
        return [(self.weight, self.grad_weight), (self.bias, self.grad_bias)]

    def backward(self, grad):
        self.zero_grad()               # the optimizer reads this step's gradient only
        dx = super().backward(grad)
        return dx


class Sequential:
    def __init__(self, *layers):
        self.layers = list(layers)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def backward(self, grad):
        for layer in reversed(self.layers):
            grad = layer.backward(grad)
        return grad

    def params(self):
        return [p for layer in self.layers for p in layer.params()]

    def bn_layers(self):
        return [layer for layer in self.layers if isinstance(layer, fastbn.BatchNorm)]

    def train(self, mode=True):
        for layer in self.bn_layers():
            layer.train(mode)
        return self

    def eval(self):
        return self.train(False)


def mlp(rng, sizes=(64, 128, 128, 128, 10), bn="before", init_scale=1.0, momentum=0.1,
        virtual_batch_size=None):
    """Linear -> [BN] -> ReLU blocks (``bn`` in {'before', 'after', None}), then a linear head.

    With ``bn='before'`` (the original paper's placement) the linear layers before a BN have no
    bias: the BN's shift replaces it.
    """
    layers = []
    for n_in, n_out in zip(sizes[:-2], sizes[1:-1]):
        layers.append(Linear(n_in, n_out, rng, bias=bn != "before", init_scale=init_scale))
        block = [ReLU()]
        if bn is not None:
            norm = BN(n_out, momentum=momentum, virtual_batch_size=virtual_batch_size)
            block = [norm, ReLU()] if bn == "before" else [ReLU(), norm]
        layers += block
    layers.append(Linear(sizes[-2], sizes[-1], rng, init_scale=init_scale))
    return Sequential(*layers)


def convnet(rng, channels=(16, 32), bn=True, momentum=0.1):
    """conv3x3 -> BN -> ReLU -> conv3x3/2 -> BN -> ReLU -> global average pool -> linear."""
    c1, c2 = channels
    layers = [Conv2d(1, c1, rng, bias=not bn)]
    layers += [BN(c1, momentum=momentum), ReLU()] if bn else [ReLU()]
    layers += [Conv2d(c1, c2, rng, stride=2, bias=not bn)]
    layers += [BN(c2, momentum=momentum), ReLU()] if bn else [ReLU()]
    layers += [GlobalAvgPool(), Linear(c2, 10, rng)]
    return Sequential(*layers)


# ----------------------------------------------------------------------------- training

def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy and its gradient with respect to the logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = len(labels)
    loss = -np.log(p[np.arange(n), labels] + 1e-12).mean()
    p[np.arange(n), labels] -= 1.0
    return float(loss), (p / n).astype(np.float32)


class SGD:
    """SGD with (heavy-ball) momentum, updating the parameters in place."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0):
        self.params, self.lr, self.momentum, self.wd = params, lr, momentum, weight_decay
        self.velocity = [np.zeros_like(p) for p, _ in params]

    def step(self):
        for (p, g), v in zip(self.params, self.velocity):
            v *= self.momentum
            v += g + self.wd * p if self.wd else g
            p -= self.lr * v


def accuracy(model, x, y, batch_size=256):
    """Test accuracy in evaluation mode (running statistics)."""
    model.eval()
    correct = 0
    with np.errstate(all="ignore"):
        for start in range(0, len(x), batch_size):
            logits = model(x[start:start + batch_size])
            correct += int((logits.argmax(axis=1) == y[start:start + batch_size]).sum())
    model.train()
    return correct / len(x)


def train(model, data, epochs, lr, batch_size=32, seed=0, momentum=0.9, weight_decay=0.0,
          on_epoch=None):
    """Mini-batch SGD; returns a dict of per-epoch ``loss`` and ``test_acc`` and ``seconds``.

    A run whose loss becomes NaN/inf (divergence) stops early; its remaining epochs count as
    chance accuracy (0.1) and infinite loss.
    """
    # Small tensors: one thread (BLAS and fastbn) is fastest, and immune to a busy machine.
    previous = fastbn.get_num_threads()
    fastbn.set_num_threads(1)
    try:
        with threadpool_limits(1, user_api="blas"):
            return _train(model, data, epochs, lr, batch_size, seed, momentum, weight_decay,
                          on_epoch)
    finally:
        fastbn.set_num_threads(previous)


def _train(model, data, epochs, lr, batch_size, seed, momentum, weight_decay, on_epoch):
    x_train, y_train, x_test, y_test = data
    rng = np.random.default_rng(seed)
    opt = SGD(model.params(), lr, momentum, weight_decay)
    history = {"loss": [], "test_acc": []}
    start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        order = rng.permutation(len(x_train))
        losses = []
        with np.errstate(all="ignore"):
            for b in range(0, len(order) - batch_size + 1, batch_size):   # full batches only
                idx = order[b:b + batch_size]
                loss, grad = softmax_cross_entropy(model(x_train[idx]), y_train[idx])
                if not np.isfinite(loss):
                    break
                model.backward(grad)
                opt.step()
                losses.append(loss)
        diverged = not losses or not np.isfinite(losses[-1]) or len(losses) < len(order) // batch_size
        if diverged:
            history["loss"] += [np.inf] * (epochs - epoch)
            history["test_acc"] += [0.1] * (epochs - epoch)
            break
        history["loss"].append(float(np.mean(losses)))
        history["test_acc"].append(accuracy(model, x_test, y_test))
        if on_epoch is not None:
            on_epoch(epoch, history)
    history["seconds"] = time.perf_counter() - start
    return history


def precise_bn(model, x, batch_size=256):
    """Set every BN layer's running statistics to the exact statistics of its inputs over `x`.

    Layer by layer (each BN sees the outputs of the already corrected layers before it), with
    :meth:`fastbn.BatchNorm.set_population_stats`.
    """
    model.eval()
    h = x
    for layer in model.layers:
        if isinstance(layer, fastbn.BatchNorm):
            layer.set_population_stats(np.array_split(h, max(1, len(h) // batch_size)))
        h = layer(h)
    model.train()
