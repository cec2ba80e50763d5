"""The public functional API: validate arguments, view the data as (outer, C, inner), dispatch.

Nothing here mutates anything before every argument has been checked, so a failed call leaves
the running statistics, `out` and the inputs as they were.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._backends import get_backend
from ._threads import get_num_threads

Activation = Literal["relu"] | None
_ACTIVATIONS = (None, "relu")


# ----------------------------------------------------------------------------- argument checks

_FLOAT_BY_SIZE = {2: np.dtype(np.float16), 4: np.dtype(np.float32), 8: np.dtype(np.float64)}


def _compute_dtype(dtype: np.dtype, name: str) -> tuple[np.dtype, np.dtype]:
    """(result dtype, compute dtype) for data of `dtype`, following NumPy's mean.

    Byte-swapped floats give their native equivalent.
    """
    if dtype.kind == "f" and dtype.itemsize in _FLOAT_BY_SIZE:
        result = _FLOAT_BY_SIZE[dtype.itemsize]
        return result, (np.dtype(np.float32) if dtype.itemsize == 2 else result)
    if dtype.kind in "biu":
        return np.dtype(np.float64), np.dtype(np.float64)
    raise TypeError(
        f"{name} must hold real numbers (float16/32/64 or integers), got dtype {dtype}")


def _as_data(value: ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise TypeError(
            f"{name} must hold real numbers (float16/32/64 or integers), got dtype {array.dtype}")
    return array


def _channel_vector(value: ArrayLike | None, name: str, channels: int,
                    default: float | None = None) -> np.ndarray | None:
    """A per-channel parameter as a float64 vector of length `channels`."""
    if value is None:
        return None if default is None else np.full(channels, default)
    if type(value) is np.ndarray and value.dtype.kind == "f":  # the common case, checked fast
        array = value
    else:
        array = _as_data(value, name)
    if array.shape != (channels,):
        raise ValueError(
            f"{name} must have shape ({channels},) (one value per channel), got {array.shape}")
    return np.asarray(array, dtype=np.float64)  # no copy when it is float64: only read


def _check_running_stat(value, name: str, channels: int) -> None:
    """Running statistics are updated in place, so they must be writable float ndarrays."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray (it is updated in place) or None, "
                        f"got {type(value).__name__}")
    if value.dtype.kind != "f":
        raise TypeError(f"{name} must have a floating dtype, got {value.dtype}")
    if value.shape != (channels,):
        raise ValueError(
            f"{name} must have shape ({channels},) (one value per channel), got {value.shape}")
    if not value.flags.writeable:
        raise ValueError(f"{name} must be writable (it is updated in place in training)")


def _check_real(value, name: str, low: float, high: float = math.inf) -> float:
    if type(value) is not float and (isinstance(value, bool)
                                     or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _normalize_axis(axis, ndim: int) -> int:
    if type(axis) is not int and (isinstance(axis, bool)
                                  or not isinstance(axis, numbers.Integral)):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for an input with {ndim} dimensions")
    return int(axis) % ndim


def _check_activation(activation) -> bool:
    if activation not in _ACTIVATIONS or not (activation is None or isinstance(activation, str)):
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    return activation == "relu"


def _view3(array: np.ndarray, axis: int) -> tuple[int, int, int]:
    shape = array.shape
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


def _prepare_input(value: ArrayLike, axis) -> tuple[np.ndarray, np.dtype, np.dtype, int,
                                                   tuple[int, int, int]]:
    """Check the data and the channel axis: (array, result dtype, compute dtype, axis, dims).

    `dims` is the ``(outer, C, inner)`` shape of the contiguous view the kernels work on.
    Shared by every public function that takes batch-norm input, so they reject alike.
    """
    x = _as_data(value, "input")
    if x.ndim < 2:
        raise ValueError(f"input must have at least 2 dimensions (batch and channel), "
                         f"got shape {x.shape}")
    result_dtype, compute_dtype = _compute_dtype(x.dtype, "input")
    axis = _normalize_axis(axis, x.ndim)
    return x, result_dtype, compute_dtype, axis, _view3(x, axis)


def _same_shape_operand(value, name: str, shape: tuple, compute_dtype: np.dtype,
                        dims: tuple[int, int, int]) -> np.ndarray | None:
    """An input of the data's shape (residual, grad_output, output) as a contiguous 3-D view."""
    if value is None:
        return None
    array = _as_data(value, name)
    if array.shape != shape:
        raise ValueError(f"{name} must have the input's shape {shape}, got {array.shape}")
    return np.ascontiguousarray(array, dtype=compute_dtype).reshape(dims)


class _Output:
    """Where a kernel writes: `out` itself when possible, else a scratch array copied into it."""

    def __init__(self, out, shape, result_dtype, compute_dtype, dims, reads: tuple):
        self.user = out
        self.direct = False
        if out is not None:
            if not isinstance(out, np.ndarray):
                raise TypeError(f"out must be a numpy.ndarray or None, got {type(out).__name__}")
            if out.shape != shape:
                raise ValueError(f"out must have the input's shape {shape}, got {out.shape}")
            if out.dtype != result_dtype:
                raise TypeError(
                    f"out must have dtype {result_dtype} (the result's), got {out.dtype}")
            if not out.flags.writeable:
                raise ValueError("out must be writable")
            self.direct = out.dtype == compute_dtype and out.flags.c_contiguous
            for operand in reads:
                if self.direct and _overlaps_elsewhere(out, operand):
                    self.direct = False
        self.target = out.reshape(dims) if self.direct else np.empty(dims, dtype=compute_dtype)

    def result(self, shape, result_dtype) -> np.ndarray:
        if self.user is None:
            return self.target.reshape(shape).astype(result_dtype, copy=False)
        if not self.direct:
            np.copyto(self.user, self.target.reshape(shape), casting="unsafe")
        return self.user


def _overlaps_elsewhere(out: np.ndarray, operand: np.ndarray | None) -> bool:
    """True when writing `out` element by element could clobber `operand` before it is read.

    The same buffer at the same position (an in-place call) is safe for element-wise kernels.
    """
    if operand is None or not np.may_share_memory(out, operand):
        return False
    same_start = out.__array_interface__["data"][0] == operand.__array_interface__["data"][0]
    return not (same_start and operand.size == out.size and operand.flags.c_contiguous)


def _update_running_stats(running_mean: np.ndarray, running_var: np.ndarray, mean: np.ndarray,
                          unbiased_var: np.ndarray, momentum: float) -> None:
    """new = (1 - momentum) * old + momentum * batch, in float64, rounded once into place."""
    running_mean[...] = (1.0 - momentum) * running_mean.astype(np.float64) + momentum * mean
    running_var[...] = (1.0 - momentum) * running_var.astype(np.float64) + momentum * unbiased_var


_FAST_PATHS: dict = {}


def _fast_path(name: str, backend) -> Callable | None:
    """The backend's function `name` for common calls (it returns None for the others: the
    Cython backend's in C, the Numba backend's in Python), or None when it has none or
    `backend` is not a backend's name (the general path says why)."""
    if backend is not None and type(backend) is not str:  # unhashable, say, as a key below
        return None
    key = (name, backend)
    if key not in _FAST_PATHS:
        try:
            module = get_backend(backend)
        except ValueError:
            return None
        _FAST_PATHS[key] = getattr(module, name, None)
    return _FAST_PATHS[key]


# ----------------------------------------------------------------------------- public functions

def batch_norm(input: ArrayLike, running_mean: NDArray | None, running_var: NDArray | None,
               weight: ArrayLike | None = None, bias: ArrayLike | None = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *,
               axis: int = 1, out: NDArray | None = None, activation: Activation = None,
               residual: ArrayLike | None = None, return_stats: bool = False,
               backend: str | None = None):
    """Batch normalization with PyTorch's semantics, for NumPy arrays of any layout.

    ``y = act((x - mean) / sqrt(var + eps) * weight + bias + residual)`` per channel, where
    mean and var are the batch statistics in training and the running statistics otherwise.

    Parameters
    ----------
    input : array_like, ndim >= 2
        float32 and float64 are computed in their own precision (float64 accumulation),
        float16 in float32; integers are promoted to float64 as ``numpy.mean`` does.
    running_mean, running_var : ndarray of shape (C,) or None
        Required unless `training`. In training, when given, they are updated in place:
        ``new = (1 - momentum) * old + momentum * batch``, with the unbiased batch variance
        for `running_var` (normalization itself uses the biased one).
    weight, bias : array_like of shape (C,), optional
        The affine parameters (gamma, beta); None means 1 and 0.
    training : bool
        Use (and update) batch statistics instead of the running ones.
    momentum : float in [0, 1]
        PyTorch's convention (Keras' momentum m is PyTorch's 1 - m).
    eps : float >= 0
        Added to the variance.
    axis : int
        The channel axis: 1 for NCHW-style data, -1 for NHWC-style, any axis in general.
    out : ndarray, optional
        Receives the result (same shape, the result's dtype) and is returned; may be `input`.
    activation : {None, 'relu'}
        Applied after the affine transform and the residual.
    residual : array_like of the input's shape, optional
        Added after the affine transform, before the activation (a ResNet block's skip).
    return_stats : bool
        Also return the float64 mean and ``invstd = 1/sqrt(var + eps)`` used, for
        :func:`batch_norm_backward`.
    backend : {None, 'cython', 'numba', 'numpy'}
        None picks the fastest available; 'numpy' is the reference implementation.

    Returns
    -------
    y : ndarray
        Same shape as `input`, dtype of `input` (float64 for integer input).
    mean, invstd : ndarray of float64, shape (C,)
        Only with ``return_stats=True``.

    Raises
    ------
    ValueError, TypeError
        For any invalid argument; nothing is modified then.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.arange(12, dtype=np.float32).reshape(2, 3, 2)
    >>> rm, rv = np.zeros(3), np.ones(3)
    >>> y = fastbn.batch_norm(x, rm, rv, training=True)
    >>> y.shape, y.dtype
    ((2, 3, 2), dtype('float32'))
    >>> np.round(y[:, 0].ravel(), 3)
    array([-1.151, -0.822,  0.822,  1.151], dtype=float32)
    >>> rm
    array([0.35, 0.55, 0.75])
    """
    if residual is None and not return_stats:
        fast = _fast_path("fast_batch_norm", backend)
        if fast is not None:
            y = fast(input, running_mean, running_var, weight, bias, training, momentum, eps,
                     axis, out, activation, get_num_threads())
            if y is not None:
                return y
    module = get_backend(backend)
    x, result_dtype, compute_dtype, axis, dims = _prepare_input(input, axis)
    # Called here, not inside: its fork warning names the caller of this function.
    num_threads = get_num_threads()
    y, mean, var = _batch_norm_prepared(module, num_threads, x, result_dtype, compute_dtype, dims,
                                        running_mean, running_var, weight, bias, training,
                                        momentum, eps, out, activation, residual)
    if return_stats:
        # In evaluation `mean` may be the caller's running_mean itself: return a copy. The
        # call above accepted eps, so float(eps) is the value it normalized with.
        return y, (mean if training else mean.copy()), _invstd(var, float(eps))
    return y


def _invstd(var: np.ndarray, eps: float) -> np.ndarray:
    """The ``invstd`` that :func:`batch_norm` returns and :func:`batch_norm_backward` takes."""
    return 1.0 / np.sqrt(var + eps)


def _batch_norm_prepared(module, num_threads: int, x: np.ndarray, result_dtype: np.dtype,
                         compute_dtype: np.dtype, dims: tuple[int, int, int], running_mean,
                         running_var, weight, bias, training, momentum, eps, out, activation,
                         residual) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`batch_norm`'s general path after the backend and the input are checked
    (`x` and `dims` from :func:`_prepare_input`): check the other arguments, normalize.

    Returns ``(y, mean, var)``: in training the batch mean and biased variance (new arrays),
    otherwise the running statistics as float64 vectors (the caller's own arrays when they
    already are). Shared with the layer, which has checked its input already.
    """
    channels = dims[1]
    count = dims[0] * dims[2]
    relu = _check_activation(activation)
    eps = _check_real(eps, "eps", 0.0)
    momentum = _check_real(momentum, "momentum", 0.0, 1.0)
    training = bool(training)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    if training:
        if running_mean is not None:
            _check_running_stat(running_mean, "running_mean", channels)
            _check_running_stat(running_var, "running_var", channels)
        if count == 0:
            raise ValueError(f"input has no values per channel (shape {x.shape}); "
                             "cannot compute batch statistics in training")
        if count == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, "
                             f"got input of shape {x.shape}")
        stats = None
    else:
        if running_mean is None:
            raise ValueError("running_mean and running_var must be given when not training "
                             "(evaluation uses the running statistics)")
        stats = (_channel_vector(running_mean, "running_mean", channels),
                 _channel_vector(running_var, "running_var", channels))
    weight = _channel_vector(weight, "weight", channels, 1.0)
    bias = _channel_vector(bias, "bias", channels, 0.0)
    x3 = np.ascontiguousarray(x, dtype=compute_dtype).reshape(dims)
    residual3 = _same_shape_operand(residual, "residual", x.shape, compute_dtype, dims)
    target = _Output(out, x.shape, result_dtype, compute_dtype, dims, (x3, residual3))

    if training:
        mean, var = module.train_forward(x3, weight, bias, eps, residual3, relu, target.target,
                                         num_threads)
        if running_mean is not None:
            _update_running_stats(running_mean, running_var, mean, var * (count / (count - 1)),
                                  momentum)
    else:
        mean, var = stats
        module.normalize(x3, mean, weight / np.sqrt(var + eps), bias, residual3, relu,
                         target.target, num_threads)
    return target.result(x.shape, result_dtype), mean, var


def batch_norm_backward(grad_output: ArrayLike, input: ArrayLike, mean: ArrayLike,
                        invstd: ArrayLike, weight: ArrayLike | None = None, *, axis: int = 1,
                        training: bool = True, output: ArrayLike | None = None,
                        activation: Activation = None, out: NDArray | None = None,
                        backend: str | None = None):
    """Gradients of :func:`batch_norm` with respect to its input, weight and bias.

    Parameters
    ----------
    grad_output : array_like
        The gradient of the loss with respect to the forward's result; the input's shape.
    input : array_like
        The forward's input.
    mean, invstd : array_like of shape (C,)
        The statistics the forward used (``return_stats=True``).
    weight : array_like of shape (C,), optional
        The forward's weight; None means 1.
    axis : int
        The channel axis, as in the forward.
    training : bool
        True: the statistics were batch statistics and the gradient flows through them.
        False: they were constants (evaluation mode, or frozen batch norm).
    output : array_like, optional
        The forward's result; required with ``activation='relu'`` to mask the gradient
        where the ReLU clipped.
    activation : {None, 'relu'}
        The forward's activation.
    out : ndarray, optional
        Receives grad_input (the input's shape and result dtype); may be `grad_output`.
    backend : {None, 'cython', 'numba', 'numpy'}

    Returns
    -------
    grad_input : ndarray
        The input's shape and result dtype.
    grad_weight, grad_bias : ndarray of shape (C,)
        In the compute dtype (float32 for float16 input). The gradient of the residual, when
        the forward had one, is ``grad_output`` masked by the ReLU: it equals grad_bias's summand.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> x = np.random.default_rng(0).normal(size=(4, 3, 5))
    >>> y, mean, invstd = fastbn.batch_norm(x, None, None, training=True, return_stats=True)
    >>> dx, dw, db = fastbn.batch_norm_backward(np.ones_like(x), x, mean, invstd)
    >>> bool(np.abs(dx).max() < 1e-12), db
    (True, array([20., 20., 20.]))
    """
    fast = _fast_path("fast_batch_norm_backward", backend)
    if fast is not None:
        result = fast(grad_output, input, mean, invstd, weight, axis, training, output,
                      activation, out, get_num_threads())
        if result is not None:
            return result
    module = get_backend(backend)
    x, result_dtype, compute_dtype, axis, dims = _prepare_input(input, axis)
    channels = dims[1]
    relu = _check_activation(activation)
    if relu and output is None:
        raise ValueError("output (the forward's result) is required with activation='relu'")
    for value, name in ((mean, "mean"), (invstd, "invstd")):
        if value is None:
            raise TypeError(f"{name} is required (the forward's, from return_stats=True), "
                            f"got None")
    mean = _channel_vector(mean, "mean", channels)
    invstd = _channel_vector(invstd, "invstd", channels)
    weight = _channel_vector(weight, "weight", channels, 1.0)
    dy3 = _same_shape_operand(grad_output, "grad_output", x.shape, compute_dtype, dims)
    output3 = _same_shape_operand(output, "output", x.shape, compute_dtype, dims) if relu \
        else None
    x3 = np.ascontiguousarray(x, dtype=compute_dtype).reshape(dims)
    target = _Output(out, x.shape, result_dtype, compute_dtype, dims, (dy3, x3, output3))

    sum_dy, sum_dy_xmu = module.backward(dy3, x3, mean, invstd, weight, output3, bool(training),
                                         target.target, get_num_threads())
    grad_input = target.result(x.shape, result_dtype)
    grad_weight = (sum_dy_xmu * invstd).astype(compute_dtype)
    return grad_input, grad_weight, sum_dy.astype(compute_dtype)
