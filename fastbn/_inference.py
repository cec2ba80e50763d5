"""Inference-side helpers: the fused affine path, BN folding and mergeable moments.

* :func:`scale_shift` turns (running_mean, running_var, weight, bias, eps) into one per-channel
  ``scale`` and ``shift``; :func:`affine` applies ``act(x * scale + shift + residual)`` in a
  single pass on the fast kernels. This is what a CPU inference pipeline runs.
* :func:`fold_into_conv` / :func:`fold_into_linear` fold an evaluation-mode batch norm into the
  preceding layer's weights (same results as ``torch.nn.utils.fusion``).
* :func:`moments` returns per-channel ``(count, mean, M2)`` as a :class:`Moments`, which merge
  exactly (Chan's formula): population statistics streamed over any number of batches.

Validation is shared with :func:`fastbn.batch_norm` (``fastbn._api``): a wrong argument is a
ValueError or TypeError naming it, and a failed call modifies nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._api import (Activation, _as_data, _channel_vector, _check_activation, _check_real,
                   _compute_dtype, _fast_path, _Output, _prepare_input, _same_shape_operand)
from ._backends import get_backend
from ._threads import get_num_threads

__all__ = ["Moments", "affine", "fold_into_conv", "fold_into_linear", "moments", "scale_shift"]


# ----------------------------------------------------------------------------- fused affine

def scale_shift(running_mean: ArrayLike, running_var: ArrayLike, weight: ArrayLike | None = None,
                bias: ArrayLike | None = None, eps: float = 1e-5
                ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per-channel scale and shift equivalent to an evaluation-mode batch norm.

    ``scale = weight / sqrt(running_var + eps)`` and ``shift = bias - running_mean * scale``,
    computed in float64, so that ``x * scale + shift`` equals
    ``(x - running_mean) / sqrt(running_var + eps) * weight + bias``.

    Parameters
    ----------
    running_mean, running_var : array_like of shape (C,)
    weight, bias : array_like of shape (C,), optional
        None means 1 and 0.
    eps : float >= 0

    Returns
    -------
    scale, shift : ndarray of float64, shape (C,)
        For :func:`affine`.

    Raises
    ------
    ValueError, TypeError
        Wrong shapes or dtypes (the message names the argument), negative eps.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> scale, shift = fastbn.scale_shift([1.0, -2.0], [4.0, 0.25], weight=[2.0, 1.0], eps=0.0)
    >>> scale, shift
    (array([1., 2.]), array([-1.,  4.]))
    """
    mean = _as_data(running_mean, "running_mean")
    if mean.ndim != 1:
        raise ValueError(f"running_mean must be 1-D (one value per channel), got shape "
                         f"{mean.shape}")
    channels = mean.shape[0]
    mean = _channel_vector(mean, "running_mean", channels)
    var = _channel_vector(running_var, "running_var", channels)
    weight = _channel_vector(weight, "weight", channels, 1.0)
    bias = _channel_vector(bias, "bias", channels, 0.0)
    eps = _check_real(eps, "eps", 0.0)
    scale = weight / np.sqrt(var + eps)
    return scale, bias - mean * scale


def affine(input: ArrayLike, scale: ArrayLike, shift: ArrayLike, *, axis: int = 1,
           out: NDArray | None = None, activation: Activation = None,
           residual: ArrayLike | None = None, backend: str | None = None) -> np.ndarray:
    """``act(x * scale + shift + residual)`` per channel, in one pass on the fast kernels.

    The inference path of a batch norm whose statistics are known: get `scale` and `shift`
    once from :func:`scale_shift`, then apply them to every batch (in place with
    ``out=input``). Dtypes, layouts, `out`, `residual`, `activation` and errors behave exactly
    as in :func:`fastbn.batch_norm`.

    Note that ``x * scale + shift`` cancels digits when ``|mean| >> std`` (a float32 input with
    a large offset): for such data ``fastbn.batch_norm(..., training=False)``, which
    subtracts the mean first, is the more accurate path.

    Parameters
    ----------
    input : array_like, ndim >= 2
    scale, shift : array_like of shape (C,)
        None means 1 and 0.
    axis : int
        The channel axis (1 for NCHW-style data, -1 for NHWC-style).
    out : ndarray, optional
        Receives the result (the input's shape, the result dtype); may be `input`.
    activation : {None, 'relu'}
    residual : array_like of the input's shape, optional
        Added after the affine transform, before the activation.
    backend : {None, 'cython', 'numba', 'numpy'}

    Returns
    -------
    ndarray
        Same shape as `input`, dtype of `input` (float64 for integer input).

    Raises
    ------
    ValueError, TypeError
        For any invalid argument; nothing is modified then.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.array([[1.0, 2.0], [3.0, -4.0]], dtype=np.float32)
    >>> fastbn.affine(x, [2.0, 1.0], [0.5, 1.0], activation="relu")
    array([[2.5, 3. ],
           [6.5, 0. ]], dtype=float32)
    >>> _ = fastbn.affine(x, [1.0, 1.0], [1.0, 1.0], out=x)   # in place
    >>> x
    array([[ 2.,  3.],
           [ 4., -3.]], dtype=float32)
    """
    if residual is None:
        fast = _fast_path("fast_affine", backend)
        if fast is not None:
            y = fast(input, scale, shift, axis, out, activation, get_num_threads())
            if y is not None:
                return y
    module = get_backend(backend)
    x, result_dtype, compute_dtype, axis, dims = _prepare_input(input, axis)
    channels = dims[1]
    relu = _check_activation(activation)
    scale = _channel_vector(scale, "scale", channels, 1.0)
    shift = _channel_vector(shift, "shift", channels, 0.0)
    x3 = np.ascontiguousarray(x, dtype=compute_dtype).reshape(dims)
    residual3 = _same_shape_operand(residual, "residual", x.shape, compute_dtype, dims)
    target = _Output(out, x.shape, result_dtype, compute_dtype, dims, (x3, residual3))
    module.normalize(x3, np.zeros(channels), scale, shift, residual3, relu, target.target,
                     get_num_threads())
    return target.result(x.shape, result_dtype)


# ----------------------------------------------------------------------------- folding

def _fold(weight_name: str, layer_weight, layer_bias, running_mean, running_var, weight, bias,
          eps, channel_axis: int, min_ndim: int):
    w = _as_data(layer_weight, weight_name)
    if w.ndim < min_ndim:
        raise ValueError(f"{weight_name} must have at least {min_ndim} dimensions, "
                         f"got shape {w.shape}")
    w_dtype = _compute_dtype(w.dtype, weight_name)[0]
    channels = w.shape[channel_axis]
    bias_name = weight_name.replace("weight", "bias")
    if layer_bias is None:
        b_dtype = w_dtype
    else:
        b_dtype = _compute_dtype(_as_data(layer_bias, bias_name).dtype, bias_name)[0]
    layer_bias = _channel_vector(layer_bias, bias_name, channels, 0.0)
    mean = _channel_vector(running_mean, "running_mean", channels)
    var = _channel_vector(running_var, "running_var", channels)
    weight = _channel_vector(weight, "weight", channels, 1.0)
    bias = _channel_vector(bias, "bias", channels, 0.0)
    eps = _check_real(eps, "eps", 0.0)
    factor = weight / np.sqrt(var + eps)
    shape = [1] * w.ndim
    shape[channel_axis] = channels
    fused_w = (w.astype(np.float64) * factor.reshape(shape)).astype(w_dtype)
    fused_b = ((layer_bias - mean) * factor + bias).astype(b_dtype)
    return fused_w, fused_b


def fold_into_conv(conv_weight: ArrayLike, conv_bias: ArrayLike | None, running_mean: ArrayLike,
                   running_var: ArrayLike, weight: ArrayLike | None, bias: ArrayLike | None,
                   eps: float = 1e-5, *, transpose: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Fold an evaluation-mode batch norm into the convolution before it.

    ``bn(conv(x, w, b)) == conv(x, w_fused, b_fused)`` with, per output channel ``o``,
    ``f = weight / sqrt(running_var + eps)``, ``w_fused = w * f`` (along the output channel
    axis) and ``b_fused = (b - running_mean) * f + bias``. Same results as
    ``torch.nn.utils.fusion.fuse_conv_bn_weights`` (computed in float64 here).

    Parameters
    ----------
    conv_weight : array_like, ndim >= 2
        OIHW-style weight (``(out, in/groups, *kernel)``), output channels on axis 0; with
        ``transpose=True`` a transposed convolution's ``(in, out/groups, *kernel)``
        weight, output channels on axis 1 (as in PyTorch, ``groups=1`` is assumed then).
    conv_bias : array_like of shape (C,) or None
        None means no bias (zeros).
    running_mean, running_var : array_like of shape (C,)
    weight, bias : array_like of shape (C,) or None
        The batch norm's affine parameters; None means 1 and 0.
    eps : float >= 0
    transpose : bool
        The convolution is transposed (output channels on axis 1).

    Returns
    -------
    w, b : ndarray
        The fused weight (conv_weight's shape and float dtype) and bias (shape (C,),
        conv_bias's float dtype, or the weight's when conv_bias is None).

    Raises
    ------
    ValueError, TypeError
        Wrong shapes or dtypes (the message names the argument), negative eps.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> w = np.ones((2, 1, 3, 3), dtype=np.float32)
    >>> fw, fb = fastbn.fold_into_conv(w, None, [0.0, 1.0], [4.0, 1.0], [1.0, 3.0], [0.0, 0.5],
    ...                                eps=0.0)
    >>> fw[:, 0, 0, 0], fb
    (array([0.5, 3. ], dtype=float32), array([ 0. , -2.5], dtype=float32))
    """
    return _fold("conv_weight", conv_weight, conv_bias, running_mean, running_var, weight, bias,
                 eps, 1 if transpose else 0, 2)


def fold_into_linear(linear_weight: ArrayLike, linear_bias: ArrayLike | None,
                     running_mean: ArrayLike, running_var: ArrayLike,
                     weight: ArrayLike | None, bias: ArrayLike | None, eps: float = 1e-5
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Fold an evaluation-mode batch norm into the linear (dense) layer before it.

    ``bn(x @ W.T + b) == x @ W_fused.T + b_fused`` with ``f = weight / sqrt(running_var +
    eps)``, ``W_fused = W * f[:, None]`` and ``b_fused = (b - running_mean) * f + bias``.
    Same results as ``torch.nn.utils.fusion.fuse_linear_bn_weights`` (float64 here).

    Parameters
    ----------
    linear_weight : array_like of shape (C, in_features)
        PyTorch's ``(out_features, in_features)`` layout. (A Keras Dense kernel is its
        transpose: pass ``kernel.T``.)
    linear_bias : array_like of shape (C,) or None
    running_mean, running_var : array_like of shape (C,)
    weight, bias : array_like of shape (C,) or None
        None means 1 and 0.
    eps : float >= 0

    Returns
    -------
    w, b : ndarray
        The fused weight (linear_weight's shape and float dtype) and bias.

    Raises
    ------
    ValueError, TypeError
        Wrong shapes or dtypes (the message names the argument), negative eps.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> W, b = np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([1.0, 1.0])
    >>> fw, fb = fastbn.fold_into_linear(W, b, [1.0, 0.0], [1.0, 4.0], None, None, eps=0.0)
    >>> fw, fb
    (array([[1. , 2. ],
           [1.5, 2. ]]), array([0. , 0.5]))
    """
    w = _as_data(linear_weight, "linear_weight")
    if w.ndim != 2:
        raise ValueError(f"linear_weight must be 2-D (out_features, in_features), got shape "
                         f"{w.shape}")
    return _fold("linear_weight", w, linear_bias, running_mean, running_var, weight, bias,
                 eps, 0, 2)


# ----------------------------------------------------------------------------- moments

@dataclass(frozen=True, eq=False)
class Moments:
    """Per-channel count, mean and M2 (sum of squared deviations) of some data; mergeable.

    Two ``Moments`` of disjoint data merge exactly into those of their union (Chan's
    parallel formula), so population statistics stream over any number of batches:
    ``total = total.merge(fastbn.moments(batch))``. An empty ``Moments`` (count 0) is the
    identity of the merge.

    Attributes
    ----------
    count : int
        Values per channel (the same for every channel).
    mean, m2 : ndarray of float64, shape (C,)

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.arange(12.0).reshape(4, 3)
    >>> m = fastbn.moments(x[:1]).merge(fastbn.moments(x[1:]))
    >>> m.count, m.mean, m.var()
    (4, array([4.5, 5.5, 6.5]), array([11.25, 11.25, 11.25]))
    >>> fastbn.Moments.empty(3).merge(m).var(ddof=1)
    array([15., 15., 15.])
    """

    count: int
    mean: NDArray[np.float64]
    m2: NDArray[np.float64]

    @classmethod
    def empty(cls, channels: int) -> Moments:
        """The moments of no data (count 0): the identity of :meth:`merge`.

        Examples
        --------
        >>> import fastbn
        >>> fastbn.Moments.empty(2)
        Moments(count=0, mean=array([0., 0.]), m2=array([0., 0.]))
        """
        return cls(0, np.zeros(int(channels)), np.zeros(int(channels)))

    @property
    def num_channels(self) -> int:
        """The number of channels C."""
        return self.mean.shape[0]

    def var(self, ddof: int = 0) -> NDArray[np.float64]:
        """Per-channel variance ``m2 / (count - ddof)``; NaN when ``count <= ddof``.

        ``ddof=0`` is the biased (population) variance, ``ddof=1`` the unbiased one that
        PyTorch keeps in ``running_var``.

        Examples
        --------
        >>> import numpy as np, fastbn
        >>> fastbn.moments(np.array([[1.0], [3.0]])).var(ddof=1)
        array([2.])
        """
        if self.count - ddof <= 0:
            return np.full(self.num_channels, np.nan)
        return self.m2 / (self.count - ddof)

    def merge(self, other: Moments) -> Moments:
        """The moments of the union of both data sets (Chan et al.'s formula, in float64).

        ``n = na + nb``, ``d = mean_b - mean_a``, ``mean = mean_a + d * nb / n``,
        ``m2 = m2_a + m2_b + d**2 * na * nb / n``.

        Examples
        --------
        >>> import numpy as np, fastbn
        >>> a, b = fastbn.moments(np.array([[0.0], [2.0]])), fastbn.moments(np.array([[10.0]]))
        >>> a.merge(b)
        Moments(count=3, mean=array([4.]), m2=array([56.]))
        """
        if not isinstance(other, Moments):
            raise TypeError(f"other must be a Moments, got {type(other).__name__}")
        if other.num_channels != self.num_channels:
            raise ValueError(f"other has {other.num_channels} channels, expected "
                             f"{self.num_channels}")
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / n)
        return Moments(n, mean, m2)


def _merge_tree(parts: list[Moments]) -> Moments:
    """Chan's pairwise merge of `parts` as a balanced tree, in a fixed order (rounding grows
    with log P, not P). Shared by the MPI and Dask scale-out."""
    while len(parts) > 1:
        parts = [parts[i].merge(parts[i + 1]) if i + 1 < len(parts) else parts[i]
                 for i in range(0, len(parts), 2)]
    return parts[0]


def moments(input: ArrayLike, *, axis: int = 1, backend: str | None = None) -> Moments:
    """Per-channel count, mean and M2 of `input`, computed by the fast kernels.

    Parameters
    ----------
    input : array_like, ndim >= 2
        Any real dtype (statistics are float64); may be empty (count 0).
    axis : int
        The channel axis (1 for NCHW-style data, -1 for NHWC-style).
    backend : {None, 'cython', 'numba', 'numpy'}

    Returns
    -------
    Moments
        ``count`` values per channel with their float64 ``mean`` and ``m2``; ``var(ddof)``
        gives the variance and ``merge`` combines batches.

    Raises
    ------
    ValueError, TypeError
        Wrong dimensions, axis or dtype (the message names the argument).

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.array([[[1.0, 2.0], [0.0, 0.0]], [[3.0, 6.0], [4.0, 4.0]]])   # (N, C, L)
    >>> m = fastbn.moments(x)
    >>> m.count, m.mean, m.var()
    (4, array([3., 2.]), array([3.5, 4. ]))
    """
    module = get_backend(backend)
    x, _, compute_dtype, axis, dims = _prepare_input(input, axis)
    x3 = np.ascontiguousarray(x, dtype=compute_dtype).reshape(dims)
    count, mean, m2 = module.moments(x3, get_num_threads())
    return Moments(int(count), np.asarray(mean, dtype=np.float64),
                   np.asarray(m2, dtype=np.float64))
