"""The BatchNorm layer: PyTorch's ``nn.BatchNorm1d/2d/3d`` for NumPy arrays, on the fast kernels.

Built on the functional API (the code paths of :func:`fastbn.batch_norm`, its fast path
included, and :func:`fastbn.batch_norm_backward`), plus what layers need on top: a manual
backward with accumulated parameter gradients, a frozen mode, ghost batch norm, exact
population statistics (precise BN), and PyTorch / Keras weight interchange.
"""
from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._api import (Activation, _as_data, _batch_norm_prepared, _channel_vector,
                   _check_activation, _check_real, _fast_path, _invstd, _prepare_input,
                   _update_running_stats, _view3, batch_norm_backward)
from ._backends import get_backend
from ._inference import Moments, moments
from ._threads import get_num_threads

__all__ = ["BatchNorm"]

_KERAS_NAMES = ("gamma", "beta", "moving_mean", "moving_variance")


class _IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


class _Cache(NamedTuple):
    """What a forward pass keeps for :meth:`BatchNorm.backward`."""

    input: np.ndarray
    output: np.ndarray | None          # only with activation='relu'
    pieces: list                       # [(batch slice, mean, var)], several for ghost BN
    eps: float                         # backward computes invstd = 1 / sqrt(var + eps) (not
                                       # forward: most forward calls have no backward)
    batch_stats: bool                  # the statistics were the batch's (gradient flows)
    result_dtype: np.dtype


def _check_count(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


class BatchNorm:
    """Batch normalization layer with the semantics of PyTorch's ``nn.BatchNorm1d/2d/3d``.

    Works on any ``ndim >= 2`` with the channel axis chosen by `axis` (1: NCHW-style, -1:
    NHWC-style). In training (``training=True``, the initial mode) each call normalizes with
    the batch statistics and updates ``running_mean`` / ``running_var`` (PyTorch's
    conventions: ``new = (1 - momentum) * old + momentum * batch``, unbiased variance for
    ``running_var``); after :meth:`eval` the running statistics are used.

    Parameters
    ----------
    num_features : int
        The number of channels C.
    eps : float >= 0
        Added to the variance.
    momentum : float in [0, 1] or None
        PyTorch's convention (Keras' momentum ``m`` is ``1 - m`` here). None is the
        cumulative moving average: the factor is ``1 / num_batches_tracked``, so the running
        statistics are the plain average of every batch's.
    affine : bool
        Learnable ``weight`` (ones) and ``bias`` (zeros); without it both are None.
    track_running_stats : bool
        Keep running statistics. Without them (``running_mean`` etc. are None) batch
        statistics are used in evaluation too, as in PyTorch.
    axis : int
        The channel axis of the input.
    dtype : float dtype
        Of the parameters and running statistics (the data may have any real dtype; the
        result has the data's, as in :func:`fastbn.batch_norm`).
    activation : {None, 'relu'}
        Fused after the affine transform and the residual.
    backend : {None, 'cython', 'numba', 'numpy'}
    virtual_batch_size : int or None
        Ghost batch norm: in training, the batch (axis 0) is split into consecutive
        sub-batches of `virtual_batch_size` samples, each normalized with its own
        statistics. **Remainder rule**: a batch of N samples gives ``max(1, N // v)``
        sub-batches; the ``N % v`` leftover samples join the *last* sub-batch (which then
        has ``v + N % v`` samples), so no sub-batch is smaller than `v` and a batch smaller
        than `v` is one sub-batch (plain batch norm). The running statistics are updated
        once per call (one momentum step, one ``num_batches_tracked``) with the batch mean
        and the pooled unbiased within-sub-batch variance ``sum(M2_k) / sum(n_k - 1)``.
        Evaluation and frozen mode use the running statistics as usual. The channel axis
        must not be 0.

    Attributes
    ----------
    weight, bias : ndarray of shape (C,) or None
    running_mean, running_var : ndarray of shape (C,) or None
    num_batches_tracked : int or None
    training : bool
        Set by :meth:`train` / :meth:`eval`.
    frozen : bool
        Set by :meth:`freeze`: statistics fixed, unaffected by :meth:`train`.
    grad_weight, grad_bias : ndarray of shape (C,) or None
        Accumulated by :meth:`backward` like PyTorch's ``.grad``; :meth:`zero_grad` resets.

    Notes
    -----
    The layer keeps a reference to the last forward input (and output, with ReLU) for
    :meth:`backward`: do not modify the input in place between the two.

    Examples
    --------
    A training step, then inference:

    >>> import numpy as np, fastbn
    >>> bn = fastbn.BatchNorm(3)                                   # like nn.BatchNorm2d(3)
    >>> x = np.random.default_rng(0).normal(2.0, 3.0, size=(8, 3, 4, 4)).astype(np.float32)
    >>> y = bn(x)
    >>> bool(abs(y.mean()) < 1e-6), bn.num_batches_tracked
    (True, 1)
    >>> dx = bn.backward(np.ones_like(y))
    >>> bn.grad_bias
    array([128., 128., 128.], dtype=float32)
    >>> bn.weight -= 0.1 * bn.grad_weight; bn.bias -= 0.1 * bn.grad_bias; bn.zero_grad()
    >>> y_eval = bn.eval()(x)
    >>> bn
    BatchNorm(3, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True, axis=1, training=False)
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *, axis: int = 1,
                 dtype: Any = np.float32, activation: Activation = None,
                 backend: str | None = None, virtual_batch_size: int | None = None) -> None:
        self.num_features = _check_count(num_features, "num_features", 1)
        self.eps = _check_real(eps, "eps", 0.0)
        self.momentum = None if momentum is None else _check_real(momentum, "momentum", 0.0, 1.0)
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"axis must be an int, got {type(axis).__name__}")
        self.axis = int(axis)
        try:
            dtype = np.dtype(dtype)
        except TypeError as exc:
            raise TypeError(f"dtype must be a float dtype, got {dtype!r}") from exc
        if dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
            raise TypeError(f"dtype must be float16, float32 or float64, got {dtype}")
        self.dtype = dtype
        _check_activation(activation)
        self.activation = activation
        if backend is not None:
            get_backend(backend)       # an unknown or unavailable backend fails here
        self.backend = backend
        self.virtual_batch_size = None if virtual_batch_size is None else _check_count(
            virtual_batch_size, "virtual_batch_size", 1)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        C = self.num_features
        self.weight: NDArray | None = np.ones(C, dtype) if self.affine else None
        self.bias: NDArray | None = np.zeros(C, dtype) if self.affine else None
        self.running_mean: NDArray | None = None
        self.running_var: NDArray | None = None
        self.num_batches_tracked: int | None = None
        if self.track_running_stats:
            self.running_mean, self.running_var = np.zeros(C, dtype), np.ones(C, dtype)
            self.num_batches_tracked = 0
        self.training = True
        self.frozen = False
        self.grad_weight: NDArray | None = None
        self.grad_bias: NDArray | None = None
        self._cache: _Cache | None = None

    # ------------------------------------------------------------------------- modes

    def train(self, mode: bool = True) -> BatchNorm:
        """Set training mode (batch statistics, running statistics updated); return self.

        Examples
        --------
        >>> import fastbn
        >>> fastbn.BatchNorm(4).train(False).training
        False
        """
        self.training = bool(mode)
        return self

    def eval(self) -> BatchNorm:
        """Set evaluation mode (running statistics); same as ``train(False)``; return self.

        Examples
        --------
        >>> import fastbn
        >>> fastbn.BatchNorm(4).eval().training
        False
        """
        return self.train(False)

    def freeze(self, mode: bool = True) -> BatchNorm:
        """Freeze the statistics while the affine parameters keep training; return self.

        A frozen layer normalizes with its running statistics, never updates them (nor
        ``num_batches_tracked``), and its :meth:`backward` treats them as constants while
        still producing ``grad_weight`` and ``grad_bias``. Unlike :meth:`eval` this is a
        separate flag that :meth:`train` does not clear, so putting a whole model into
        training mode leaves frozen layers frozen (the usual fine-tuning setup, which in
        PyTorch needs the module's ``train`` overridden). ``freeze(False)`` unfreezes.

        Raises
        ------
        ValueError
            With ``track_running_stats=False`` (there are no statistics to freeze).

        Examples
        --------
        >>> import numpy as np, fastbn
        >>> bn = fastbn.BatchNorm(2, eps=0.0).freeze()
        >>> y = bn.train()(np.array([[1.0, 2.0], [3.0, 5.0]]))   # running stats: 0 and 1
        >>> y, bn.running_mean, bn.num_batches_tracked
        (array([[1., 2.],
               [3., 5.]]), array([0., 0.], dtype=float32), 0)
        """
        if mode and not self.track_running_stats:
            raise ValueError("cannot freeze a BatchNorm with track_running_stats=False: it has "
                             "no running statistics")
        self.frozen = bool(mode)
        return self

    # ------------------------------------------------------------------------- forward

    def __call__(self, input: ArrayLike, residual: ArrayLike | None = None) -> np.ndarray:
        """``act(bn(input) + residual)``; see :meth:`forward`."""
        return self.forward(input, residual)

    def forward(self, input: ArrayLike, residual: ArrayLike | None = None) -> np.ndarray:
        """Normalize `input` (statistics chosen by the mode), add `residual`, apply the activation.

        Parameters
        ----------
        input : array_like, ndim >= 2, with ``num_features`` channels along ``axis``
        residual : array_like of the input's shape, optional

        Returns
        -------
        ndarray
            The input's shape and dtype (float64 for integer input).

        Raises
        ------
        ValueError, TypeError
            For a wrong input or residual; the layer is left unchanged then.

        Examples
        --------
        >>> import numpy as np, fastbn
        >>> bn = fastbn.BatchNorm(2, eps=0.0, axis=-1, activation="relu")   # NHWC-style
        >>> bn(np.array([[1.0, 5.0], [3.0, 1.0]]), residual=np.full((2, 2), 0.5))
        array([[0. , 1.5],
               [1.5, 0. ]])
        """
        batch_stats = (self.training and not self.frozen) or not self.track_running_stats
        if residual is None and (not batch_stats or self.virtual_batch_size is None):
            y = self._fast_forward(input, batch_stats)
            if y is not None:
                return y
        x, result_dtype, compute_dtype, axis, dims = _prepare_input(input, self.axis)
        if dims[1] != self.num_features:
            raise ValueError(f"input has {dims[1]} channels along axis {self.axis} (shape "
                             f"{x.shape}), expected num_features={self.num_features}")
        update = self.training and not self.frozen and self.track_running_stats
        factor = self._momentum_factor() if update else 0.0
        groups = self._ghost_bounds(x, axis) if batch_stats and self.training else None
        if groups is None:
            # The functional API's general path minus the input checks done just above.
            with_stats = update or not batch_stats
            y, mean, var = _batch_norm_prepared(
                get_backend(self.backend), get_num_threads(), x, result_dtype, compute_dtype, dims,
                self.running_mean if with_stats else None,
                self.running_var if with_stats else None, self.weight, self.bias,
                batch_stats, factor, self.eps, None, self.activation, residual)
            if not batch_stats:
                mean, var = self._constant_stats()
            pieces = [(slice(None), mean, var)]
        else:
            y, pieces = self._ghost_forward(x, residual, groups, result_dtype, compute_dtype,
                                            axis, dims, factor if update else None)
        if update:
            self.num_batches_tracked += 1
        # The calls above accepted eps, so float(eps) is the value they normalized with.
        self._cache = _Cache(x, y if self.activation == "relu" else None, pieces,
                             float(self.eps), batch_stats, result_dtype)
        return y

    def _fast_forward(self, input, batch_stats: bool) -> np.ndarray | None:
        """The forward through the backend's fast path (what :func:`fastbn.batch_norm` does
        for the same call), or None when the call needs the general path (which then gives
        the same result, or the error): another backend, input that is not a C-contiguous
        float32/float64 array, anything the general path must check and reject. With batch
        statistics the fast path also updates the running statistics and hands back the batch
        mean and variance for the backward cache."""
        fast = _fast_path("fast_batch_norm", self.backend)
        if fast is None:
            return None
        update = batch_stats and self.training and not self.frozen and self.track_running_stats
        with_running = update or not batch_stats
        stats = np.empty((2, self.num_features)) if batch_stats else None
        y = fast(input, self.running_mean if with_running else None,
                 self.running_var if with_running else None, self.weight, self.bias,
                 batch_stats, self._momentum_factor() if update else 0.0, self.eps, self.axis,
                 None, self.activation, get_num_threads(), stats)
        # Without running statistics, weight and bias the fast path cannot match the input's
        # channels against num_features (nor when the user replaced those arrays): an output
        # of another width is discarded, nothing else has changed then, and the general path
        # reports the mismatch.
        if y is None or y.shape[self.axis] != self.num_features:
            return None
        if update:
            self.num_batches_tracked += 1
        mean, var = (stats[0], stats[1]) if batch_stats else self._constant_stats()
        self._cache = _Cache(input, y if self.activation == "relu" else None,
                             [(slice(None), mean, var)], self.eps, batch_stats, y.dtype)
        return y

    def _constant_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Backward's constants in evaluation or frozen mode: float64 copies, so that later
        changes to the running statistics do not reach the cache."""
        return self.running_mean.astype(np.float64), self.running_var.astype(np.float64)

    def _momentum_factor(self) -> float:
        """The weight of this batch in the running statistics (momentum=None: 1/(n + 1))."""
        if self.momentum is None:
            return 1.0 / (self.num_batches_tracked + 1)
        return self.momentum

    def _ghost_bounds(self, x: np.ndarray, axis: int) -> list[int] | None:
        """Sub-batch boundaries along axis 0, or None when there is a single sub-batch."""
        v = self.virtual_batch_size
        if v is None:
            return None
        if axis == 0:
            raise ValueError("virtual_batch_size needs the batch on axis 0, but the channel "
                             "axis is 0")
        n = x.shape[0]
        groups = max(1, n // v)
        if groups == 1:
            return None
        return [k * v for k in range(groups)] + [n]

    def _ghost_forward(self, x, residual, bounds, result_dtype, compute_dtype, axis, dims,
                       factor):
        if residual is not None:
            residual = _as_data(residual, "residual")
            if residual.shape != x.shape:
                raise ValueError(f"residual must have the input's shape {x.shape}, got "
                                 f"{residual.shape}")
        per_sample = dims[0] * dims[2] // x.shape[0]
        if (bounds[1] - bounds[0]) * per_sample < 2:
            raise ValueError(f"virtual_batch_size={self.virtual_batch_size} gives sub-batches "
                             f"with 1 value per channel (input shape {x.shape}); expected more "
                             f"than 1 value per channel when training")
        module, num_threads = get_backend(self.backend), get_num_threads()
        y = np.empty(x.shape, result_dtype)
        pieces = []
        for start, stop in zip(bounds[:-1], bounds[1:]):
            part = slice(start, stop)
            _, mean, var = _batch_norm_prepared(
                module, num_threads, x[part], result_dtype, compute_dtype, _view3(x[part], axis),
                None, None, self.weight, self.bias, True, 0.0, self.eps, y[part],
                self.activation, None if residual is None else residual[part])
            pieces.append((part, mean, var))
        if factor is not None:
            # Each sub-batch's exact M2 from the moments kernel (one more read of the input):
            # rebuilt from the biased variance as var * count it would be rounded.
            parts = [moments(x[p], axis=axis, backend=self.backend)
                     for p, _, _ in pieces]
            counts = np.array([m.count for m in parts], float)
            batch_mean = counts @ np.array([m.mean for m in parts]) / counts.sum()
            pooled_var = np.sum([m.m2 for m in parts], axis=0) / (counts - 1).sum()
            _update_running_stats(self.running_mean, self.running_var, batch_mean, pooled_var,
                                  factor)
        return y, pieces

    # ------------------------------------------------------------------------- backward

    def backward(self, grad_output: ArrayLike) -> np.ndarray:
        """Gradient with respect to the last forward's input; accumulates parameter gradients.

        Uses the fused backward kernels. After a forward with batch statistics (training,
        or ``track_running_stats=False``) the gradient flows through the statistics; in
        evaluation or frozen mode they are constants. ``grad_weight`` and ``grad_bias``
        (when ``affine``) are *added to* (PyTorch's ``.grad`` semantics; start from None);
        call :meth:`zero_grad` between steps. The gradient of the forward's residual is
        ``grad_output`` itself (masked where the ReLU output is 0).

        Each forward supports one backward (its saved input is released).

        Parameters
        ----------
        grad_output : array_like of the forward input's shape

        Returns
        -------
        ndarray
            grad_input, the forward input's shape and result dtype.

        Raises
        ------
        RuntimeError
            Without a preceding forward.
        ValueError, TypeError
            For a wrong grad_output (nothing is modified then).

        Examples
        --------
        >>> import numpy as np, fastbn
        >>> bn = fastbn.BatchNorm(1, dtype=np.float64)
        >>> x = np.array([[1.0], [2.0], [3.0], [6.0]])
        >>> y = bn(x)
        >>> dx = bn.backward(np.ones_like(x))                   # a constant shift: no gradient
        >>> bool(np.abs(dx).max() < 1e-12), bn.grad_bias
        (True, array([4.]))
        """
        cache = self._cache
        if cache is None:
            raise RuntimeError("backward needs a forward pass first (each forward supports "
                               "one backward)")
        x = cache.input
        dy = _as_data(grad_output, "grad_output")
        if dy.shape != x.shape:
            raise ValueError(f"grad_output must have the forward input's shape {x.shape}, "
                             f"got {dy.shape}")
        single = len(cache.pieces) == 1
        grad_input = None if single else np.empty(x.shape, cache.result_dtype)
        sum_w = sum_b = 0.0
        for part, mean, var in cache.pieces:
            gi, gw, gb = batch_norm_backward(
                dy[part], x[part], mean, _invstd(var, cache.eps), self.weight, axis=self.axis,
                training=cache.batch_stats,
                output=None if cache.output is None else cache.output[part],
                activation=self.activation, out=None if single else grad_input[part],
                backend=self.backend)
            if single:
                grad_input = gi
            sum_w = sum_w + gw.astype(np.float64)
            sum_b = sum_b + gb.astype(np.float64)
        self._cache = None
        if self.affine:
            self.grad_weight = self._accumulate(self.grad_weight, sum_w)
            self.grad_bias = self._accumulate(self.grad_bias, sum_b)
        return grad_input

    def _accumulate(self, grad: NDArray | None, new: NDArray) -> NDArray:
        if grad is None:
            return new.astype(self.dtype)
        grad += new.astype(self.dtype)
        return grad

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset ``grad_weight`` and ``grad_bias``: to None (default, as PyTorch) or to zeros.

        Examples
        --------
        >>> import fastbn
        >>> bn = fastbn.BatchNorm(2)
        >>> bn.zero_grad(set_to_none=False); bn.grad_weight
        array([0., 0.], dtype=float32)
        """
        if set_to_none or not self.affine:
            self.grad_weight = self.grad_bias = None
        else:
            self.grad_weight = np.zeros(self.num_features, self.dtype)
            self.grad_bias = np.zeros(self.num_features, self.dtype)

    # ------------------------------------------------------------------------- statistics

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, ``num_batches_tracked`` 0 (as in PyTorch).

        Examples
        --------
        >>> import fastbn
        >>> bn = fastbn.BatchNorm(2); bn.running_mean += 1; bn.reset_running_stats()
        >>> bn.running_mean
        array([0., 0.], dtype=float32)
        """
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked = 0

    def reset_parameters(self) -> None:
        """Reset the running statistics and the affine parameters (weight 1, bias 0).

        Examples
        --------
        >>> import fastbn
        >>> bn = fastbn.BatchNorm(2); bn.weight *= 3; bn.reset_parameters(); bn.weight
        array([1., 1.], dtype=float32)
        """
        self.reset_running_stats()
        if self.affine:
            self.weight[...] = 1
            self.bias[...] = 0

    def _merged_moments(self, batches: Iterable) -> Moments:
        """The exact per-channel moments of `batches` (arrays or Moments), merged in order."""
        total = Moments.empty(self.num_features)
        for batch in batches:
            part = batch if isinstance(batch, Moments) else moments(
                batch, axis=self.axis, backend=self.backend)
            if part.num_channels != self.num_features:
                raise ValueError(f"a batch has {part.num_channels} channels, expected "
                                 f"num_features={self.num_features}")
            total = total.merge(part)
        return total

    def set_population_stats(self, batches: Iterable[ArrayLike | Moments], *,
                             ddof: int = 1) -> Moments:
        """Precise BN: set the running statistics to the exact statistics of all `batches`.

        Instead of an exponential average of per-batch statistics taken while the weights
        were still changing, stream the data once through the trained network and give this
        layer's inputs here: their per-channel moments (:func:`fastbn.moments`, the fast
        kernels) are merged exactly with Chan's formula, then ``running_mean`` becomes the
        population mean and ``running_var`` the population variance with `ddof` (1, the
        unbiased estimate PyTorch keeps, by default; ``ddof=0`` for Keras' convention).
        ``num_batches_tracked`` is left as it is. Items may also be precomputed
        :class:`fastbn.Moments` (e.g. merged across processes).

        Parameters
        ----------
        batches : iterable of array_like or Moments
            Inputs of this layer (channel axis ``self.axis``); consumed once.
        ddof : int
            Delta degrees of freedom of the variance.

        Returns
        -------
        Moments
            The merged moments.

        Raises
        ------
        ValueError, TypeError
            No running statistics, a batch with the wrong channel count or dtype, or too few
            values; the running statistics are unchanged then.

        Examples
        --------
        >>> import numpy as np, fastbn
        >>> data = np.random.default_rng(0).normal(size=(1000, 4))
        >>> bn = fastbn.BatchNorm(4, dtype=np.float64)
        >>> total = bn.set_population_stats(np.array_split(data, 7))
        >>> total.count, np.allclose(bn.running_var, data.var(axis=0, ddof=1))
        (1000, True)
        """
        if not self.track_running_stats:
            raise ValueError("set_population_stats needs track_running_stats=True")
        ddof = _check_count(ddof, "ddof", 0)
        total = self._merged_moments(batches)
        if total.count <= ddof:
            raise ValueError(f"batches hold {total.count} values per channel, need more than "
                             f"ddof={ddof}")
        self.running_mean[...] = total.mean
        self.running_var[...] = total.var(ddof)
        return total

    # ------------------------------------------------------------------------- PyTorch state

    def _state_keys(self) -> list[str]:
        keys = ["weight", "bias"] if self.affine else []
        if self.track_running_stats:
            keys += ["running_mean", "running_var", "num_batches_tracked"]
        return keys

    def state_dict(self) -> dict[str, np.ndarray]:
        """The state with PyTorch's key names, as copies.

        Keys: ``weight``, ``bias`` (when ``affine``), ``running_mean``, ``running_var`` and
        ``num_batches_tracked`` (a 0-d int64 array; when ``track_running_stats``), exactly
        those of ``torch.nn.BatchNorm2d.state_dict()``: ``{k: torch.from_numpy(v)}`` loads
        into PyTorch.

        Examples
        --------
        >>> import fastbn
        >>> sorted(fastbn.BatchNorm(3).state_dict())
        ['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight']
        """
        state = {}
        for key in self._state_keys():
            value = getattr(self, key)
            state[key] = (np.array(value, dtype=np.int64) if key == "num_batches_tracked"
                          else value.copy())
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True
                        ) -> _IncompatibleKeys:
        """Load a state with PyTorch's key names (from :meth:`state_dict` or PyTorch).

        Values may be NumPy arrays or anything ``np.asarray`` accepts, such as the CPU
        tensors of a ``torch.nn.BatchNorm*d.state_dict()``; they are cast to the layer's
        dtype and copied into the existing arrays.

        Parameters
        ----------
        state_dict : mapping
        strict : bool
            Require exactly the layer's keys (missing or unexpected keys are an error);
            otherwise load the keys present and ignore the rest.

        Returns
        -------
        namedtuple (missing_keys, unexpected_keys)

        Raises
        ------
        ValueError, TypeError
            Wrong keys (with `strict`), shapes or dtypes; nothing is loaded then.

        Examples
        --------
        >>> import numpy as np, fastbn
        >>> a, b = fastbn.BatchNorm(2), fastbn.BatchNorm(2)
        >>> a.running_mean[:] = [1, 2]
        >>> b.load_state_dict(a.state_dict())
        _IncompatibleKeys(missing_keys=[], unexpected_keys=[])
        >>> b.running_mean
        array([1., 2.], dtype=float32)
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        expected = self._state_keys()
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        if strict and (missing or unexpected):
            raise ValueError(f"state_dict does not match the layer: missing keys {missing}, "
                             f"unexpected keys {unexpected}")
        staged = {}
        for key in expected:
            if key not in state_dict:
                continue
            value = _to_numpy(state_dict[key], f"state_dict[{key!r}]")
            if key == "num_batches_tracked":
                if value.size != 1 or value.dtype.kind not in "iu":
                    raise ValueError(f"state_dict['num_batches_tracked'] must be one integer, "
                                     f"got {value.dtype} of shape {value.shape}")
                staged[key] = int(value.reshape(()))
            else:
                staged[key] = _channel_vector(value, f"state_dict[{key!r}]", self.num_features)
        for key, value in staged.items():
            if key == "num_batches_tracked":
                self.num_batches_tracked = value
            else:
                getattr(self, key)[...] = value
        return _IncompatibleKeys(missing, unexpected)

    # ------------------------------------------------------------------------- Keras

    @classmethod
    def from_keras(cls, weights: Mapping[str, ArrayLike] | Iterable[ArrayLike], *,
                   momentum: float = 0.99, epsilon: float = 1e-3, axis: int = -1,
                   dtype: Any = np.float32, activation: Activation = None,
                   backend: str | None = None,
                   virtual_batch_size: int | None = None) -> BatchNorm:
        """A layer equivalent to a Keras ``BatchNormalization`` with these weights and settings.

        Conversions (explicit, so that results agree):

        * ``momentum``: Keras' ``new = m * old + (1 - m) * batch`` is PyTorch's with
          momentum ``1 - m``; the default 0.99 becomes 0.01 here.
        * ``epsilon``: copied (Keras' default is 1e-3, PyTorch's 1e-5: pass the Keras
          layer's value).
        * ``axis``: Keras' default -1 (channels last) is kept.
        * ``moving_variance`` is copied unchanged into ``running_var``: both frameworks use
          the stored variance identically at inference, so evaluation outputs agree. Only
          the *training update* differs: fastbn (like PyTorch) blends in the unbiased batch
          variance, Keras 3 the biased one (a factor ``n / (n - 1)``, not converted).
        * ``gamma``/``beta`` become ``weight``/``bias``; a Keras layer with ``scale=False``
          (no gamma) or ``center=False`` (no beta) gives weight 1 or bias 0.
        * ``num_batches_tracked`` (no Keras equivalent) starts at 0.

        Parameters
        ----------
        weights : mapping or sequence
            A mapping from names to arrays (``gamma``, ``beta``, ``moving_mean``,
            ``moving_variance``; Keras variable paths such as
            ``"batch_normalization/gamma:0"`` are accepted), or the 4-list of Keras'
            ``get_weights()`` with ``center=scale=True``: ``[gamma, beta, moving_mean,
            moving_variance]``.
        momentum, epsilon, axis
            The Keras layer's settings (Keras conventions and defaults).
        dtype, activation, backend, virtual_batch_size
            As in :class:`BatchNorm`.

        Returns
        -------
        BatchNorm
            In evaluation mode.

        Examples
        --------
        >>> import numpy as np, fastbn
        >>> keras_weights = [np.ones(3), np.zeros(3), np.full(3, 0.5), np.full(3, 4.0)]
        >>> bn = fastbn.BatchNorm.from_keras(keras_weights, momentum=0.9)
        >>> bn.momentum, bn.eps, bn.axis, bn.running_var
        (0.09999999999999998, 0.001, -1, array([4., 4., 4.], dtype=float32))
        """
        named = _keras_mapping(weights)
        if "moving_mean" not in named:
            raise ValueError("weights must include moving_mean and moving_variance")
        num_features = named["moving_mean"].shape[0] if named["moving_mean"].ndim == 1 else 0
        if num_features == 0:
            raise ValueError(f"moving_mean must be a non-empty 1-D array, got shape "
                             f"{named['moving_mean'].shape}")
        momentum = _check_real(momentum, "momentum", 0.0, 1.0)
        layer = cls(num_features, epsilon, 1.0 - momentum,
                    affine="gamma" in named or "beta" in named, axis=axis, dtype=dtype,
                    activation=activation, backend=backend,
                    virtual_batch_size=virtual_batch_size)
        layer.load_keras_weights(named)
        return layer.eval()

    def load_keras_weights(self, weights: Mapping[str, ArrayLike] | Iterable[ArrayLike]
                           ) -> None:
        """Load Keras ``BatchNormalization`` weights into this layer (values copied as is).

        ``gamma``/``beta`` go to ``weight``/``bias`` (a missing one means 1 or 0),
        ``moving_mean``/``moving_variance`` to ``running_mean``/``running_var``. The layer's
        own ``momentum`` and ``eps`` are not touched: set them to ``1 - keras_momentum`` and
        the Keras ``epsilon`` (or build the layer with :meth:`from_keras`, which documents
        every conversion).

        Parameters
        ----------
        weights : mapping or sequence
            As in :meth:`from_keras`.

        Raises
        ------
        ValueError, TypeError
            Unknown names, wrong shapes, gamma/beta for a layer without ``affine``, missing
            moving statistics; nothing is loaded then.

        Examples
        --------
        >>> import numpy as np, fastbn
        >>> bn = fastbn.BatchNorm(2, axis=-1)
        >>> bn.load_keras_weights({"gamma": [2, 2], "beta": [0, 1],
        ...                        "moving_mean": [0, 0], "moving_variance": [1, 1]})
        >>> bn.weight, bn.bias
        (array([2., 2.], dtype=float32), array([0., 1.], dtype=float32))
        """
        named = _keras_mapping(weights)
        if not self.affine and ("gamma" in named or "beta" in named):
            raise ValueError("the layer has affine=False and cannot hold gamma or beta")
        moving = [k for k in ("moving_mean", "moving_variance") if k in named]
        if self.track_running_stats and len(moving) != 2:
            raise ValueError("weights must include moving_mean and moving_variance")
        if not self.track_running_stats and moving:
            raise ValueError("the layer has track_running_stats=False and cannot hold "
                             "moving_mean or moving_variance")
        values = {k: _channel_vector(v, k, self.num_features) for k, v in named.items()}
        if self.affine:
            self.weight[...] = values.get("gamma", 1.0)
            self.bias[...] = values.get("beta", 0.0)
        if self.track_running_stats:
            self.running_mean[...] = values["moving_mean"]
            self.running_var[...] = values["moving_variance"]

    def keras_weights(self) -> list[np.ndarray]:
        """The weights in Keras' ``get_weights()`` order, for ``keras_layer.set_weights``.

        ``[gamma, beta, moving_mean, moving_variance]`` (without gamma and beta when not
        ``affine``, as a Keras layer with ``center=scale=False``); copies, values unchanged
        (see :meth:`from_keras` for why the variance needs no conversion). Build the Keras
        layer with :meth:`keras_config`.

        Examples
        --------
        >>> import fastbn
        >>> [w.tolist() for w in fastbn.BatchNorm(2).keras_weights()]
        [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]
        """
        if not self.track_running_stats:
            raise ValueError("Keras layers always keep moving statistics; this layer has "
                             "track_running_stats=False")
        weights = [self.weight.copy(), self.bias.copy()] if self.affine else []
        return weights + [self.running_mean.copy(), self.running_var.copy()]

    def keras_config(self) -> dict[str, Any]:
        """Keyword arguments for an equivalent ``keras.layers.BatchNormalization``.

        ``momentum = 1 - self.momentum`` (Keras' convention), ``epsilon = self.eps``,
        ``axis``, and ``center = scale = self.affine``.

        Raises
        ------
        ValueError
            For ``momentum=None`` (Keras has no cumulative average).

        Examples
        --------
        >>> import fastbn
        >>> fastbn.BatchNorm(8, momentum=0.01, eps=1e-3, axis=-1).keras_config()
        {'axis': -1, 'momentum': 0.99, 'epsilon': 0.001, 'center': True, 'scale': True}
        """
        if self.momentum is None:
            raise ValueError("momentum=None (cumulative average) has no Keras equivalent")
        return {"axis": self.axis, "momentum": 1.0 - self.momentum, "epsilon": self.eps,
                "center": self.affine, "scale": self.affine}

    # ------------------------------------------------------------------------- misc

    def __repr__(self) -> str:
        extra = ""
        if self.dtype != np.float32:
            extra += f", dtype={self.dtype}"
        if self.activation is not None:
            extra += f", activation={self.activation!r}"
        if self.virtual_batch_size is not None:
            extra += f", virtual_batch_size={self.virtual_batch_size}"
        if self.frozen:
            extra += ", frozen=True"
        return (f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
                f"axis={self.axis}{extra}, training={self.training})")


def _to_numpy(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):      # a torch.Tensor
        value = value.detach().cpu()
    try:
        return np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} cannot be converted to a numpy array: {exc}") from exc


def _keras_mapping(weights) -> dict[str, np.ndarray]:
    if isinstance(weights, Mapping):
        named = {}
        for key, value in weights.items():
            if not isinstance(key, str):
                raise TypeError(f"weights keys must be str, got {type(key).__name__}")
            name = key.rsplit("/", 1)[-1].split(":", 1)[0]
            if name not in _KERAS_NAMES:
                raise ValueError(f"unknown Keras weight {key!r}; expected names "
                                 f"{list(_KERAS_NAMES)}")
            if name in named:
                raise ValueError(f"Keras weight {name!r} given twice")
            named[name] = _to_numpy(value, name)
        return named
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Iterable):
        raise TypeError(f"weights must be a mapping or a list of arrays, got "
                        f"{type(weights).__name__}")
    values = list(weights)
    if len(values) != 4:
        raise ValueError(f"a list of Keras weights must have 4 arrays [gamma, beta, "
                         f"moving_mean, moving_variance], got {len(values)} (pass a mapping "
                         f"for a layer with center=False or scale=False)")
    return {name: _to_numpy(v, name) for name, v in zip(_KERAS_NAMES, values)}
