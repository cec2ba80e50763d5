"""The NumPy reference backend: the specification every fast backend is tested against.

Every function works on a C-contiguous ``(outer, C, inner)`` view of float32 or float64 data
(the public layer moves the channel axis into the middle and chooses the compute dtype).
Per-channel vectors are float64 arrays of length C. All arithmetic is done in float64 and
rounded once to the compute dtype at the end, so this backend is as accurate as it is readable.

Backend interface (the fast backends implement the same four functions)::

    moments(x, num_threads) -> (count, mean, m2)
    normalize(x, mean, scale, shift, residual, relu, out, num_threads) -> None
    train_forward(x, weight, bias, eps, residual, relu, out, num_threads) -> (mean, var)
    backward(dy, x, mean, invstd, weight, output, training, out, num_threads) -> (sum_dy, sum_dy_xmu)

A fast backend may also have ``fast_batch_norm``, ``fast_batch_norm_backward`` and
``fast_affine``: the public functions' whole call for common arguments (C-contiguous native float32/float64 arrays,
per-channel ndarrays), returning None for any other call, which then takes the general path.
"""
from __future__ import annotations

import numpy as np

CHANNEL_AXES = (0, 2)


def _per_channel(v: np.ndarray) -> np.ndarray:
    """Broadcast a length-C vector against an (outer, C, inner) array."""
    return v[None, :, None]


def moments(x, num_threads=1):
    """Per-channel count, mean and sum of squared deviations (M2).

    Parameters
    ----------
    x : ndarray, shape (outer, C, inner)   # IN
    num_threads : int, ignored

    Returns
    -------
    count : int
    mean, m2 : ndarray of float64, shape (C,)
        The mean is shifted by each channel's first value, so a constant channel has an exact
        mean and a zero M2. Empty input gives zeros (the identity of Chan's merge).
    """
    channels = x.shape[1]
    count = x.shape[0] * x.shape[2]
    if count == 0:
        return 0, np.zeros(channels), np.zeros(channels)
    x64 = x.astype(np.float64)
    shift = x64[0, :, 0]
    deviation = x64 - _per_channel(shift)
    mean_deviation = deviation.sum(axis=CHANNEL_AXES) / count
    m2 = ((deviation - _per_channel(mean_deviation)) ** 2).sum(axis=CHANNEL_AXES)
    return count, shift + mean_deviation, m2


def normalize(x, mean, scale, shift, residual, relu, out, num_threads=1):
    """out = act((x - mean) * scale + shift + residual), per channel.

    Parameters
    ----------
    x : ndarray, shape (outer, C, inner)        # IN
    mean, scale, shift : float64 ndarray (C,)   # IN
    residual : ndarray like x or None           # IN
    relu : bool
    out : ndarray like x                        # OUT (may be x itself)
    """
    y = (x.astype(np.float64) - _per_channel(mean)) * _per_channel(scale) + _per_channel(shift)
    if residual is not None:
        y += residual
    if relu:
        # Written as `y <= 0` so that NaN passes through (as in PyTorch) and -0.0 becomes +0.0.
        y = np.where(y <= 0, 0.0, y)
    out[...] = y


def train_forward(x, weight, bias, eps, residual, relu, out, num_threads=1):
    """Normalize with the batch statistics; return the batch mean and biased variance.

    Parameters
    ----------
    x : ndarray, shape (outer, C, inner)   # IN
    weight, bias : float64 ndarray (C,)    # IN
    eps : float
    residual, relu, out : as in `normalize`

    Returns
    -------
    mean, var : float64 ndarray (C,)
    """
    count, mean, m2 = moments(x)
    var = m2 / count
    invstd = 1.0 / np.sqrt(var + eps)
    normalize(x, mean, weight * invstd, bias, residual, relu, out)
    return mean, var


def backward(dy, x, mean, invstd, weight, output, training, out, num_threads=1):
    """Gradient of batch norm (and of a ReLU after it when `output` is given).

    With ``g = dy * (output > 0)`` (or ``dy`` without ReLU) and ``xmu = x - mean``::

        sum_dy = sum(g), sum_dy_xmu = sum(g * xmu)          per channel
        training:  dx = weight*invstd * (g - sum_dy/n - xmu * invstd**2 * sum_dy_xmu/n)
        frozen:    dx = weight*invstd * g

    Parameters
    ----------
    dy, x : ndarray, shape (outer, C, inner)        # IN
    mean, invstd, weight : float64 ndarray (C,)     # IN
    output : ndarray like x or None                 # IN, the forward output when masking a ReLU
    training : bool
    out : ndarray like x                            # OUT, dx (may be dy itself)

    Returns
    -------
    sum_dy, sum_dy_xmu : float64 ndarray (C,)
    """
    g = dy.astype(np.float64)
    if output is not None:
        g = np.where(output > 0, g, 0.0)
    xmu = x.astype(np.float64) - _per_channel(mean)
    sum_dy = g.sum(axis=CHANNEL_AXES)
    sum_dy_xmu = (g * xmu).sum(axis=CHANNEL_AXES)
    scale = _per_channel(weight * invstd)
    if training:
        n = x.shape[0] * x.shape[2]
        dx = scale * (g - _per_channel(sum_dy / n) - xmu * _per_channel(invstd**2 * sum_dy_xmu / n))
    else:
        dx = scale * g
    out[...] = dx
    return sum_dy, sum_dy_xmu
