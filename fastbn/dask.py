"""Batch-norm statistics and normalization of Dask arrays (data larger than one machine's memory).

* :func:`moments` gives the exact per-channel population ``(count, mean, M2)`` of a
  ``dask.array.Array``: :func:`fastbn.moments` (the fast kernels) on every block, then a tree
  reduction that merges partial results with Chan's formula (``dask.array.reduction``). Only
  per-channel vectors travel between tasks; no task ever holds more than one block.
* :func:`batch_norm` normalizes a dask array block by block with :func:`fastbn.batch_norm`
  (evaluation mode, the fast kernels), with given statistics or with the array's own
  population statistics (computed lazily in the same graph); :func:`affine` applies a
  precomputed ``scale`` / ``shift`` (:func:`fastbn.scale_shift`), :func:`apply_layer` an
  evaluation-mode :class:`fastbn.BatchNorm`, and :func:`set_population_stats` sets a layer's
  running statistics from a dask array (precise BN on data that does not fit in memory).

Chunks may split any axis, the channel axis included. Everything is lazy except
:func:`moments` (unless ``compute=False``) and :func:`set_population_stats`; compute with the
scheduler of your choice, e.g. a ``dask.distributed`` cluster.

Requires ``dask[array]`` (``pip install 'fastbn[dask]'``).

Threads: each task runs fastbn's multithreaded kernels with :func:`fastbn.get_num_threads`
threads. Dask already runs one task per worker thread, so give the workers one kernel thread
each (``client.run(fastbn.set_num_threads, 1)``, or ``OMP_NUM_THREADS=1``, which
``dask.distributed`` sets for its worker processes by default) unless workers have spare cores.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

try:
    import dask
    import dask.array as da
except ImportError as exc:  # pragma: no cover - exercised only without dask
    raise ImportError("fastbn.dask needs dask[array]: pip install 'fastbn[dask]'") from exc

from ._api import _check_activation, _check_real, _normalize_axis
from ._api import batch_norm as _batch_norm
from ._inference import Moments, _merge_tree
from ._inference import affine as _affine
from ._inference import moments as _moments
from ._layers import BatchNorm

__all__ = ["affine", "apply_layer", "batch_norm", "moments", "set_population_stats"]

#: One record per channel: what :func:`moments` reduces to (count is the same for all channels).
STATS_DTYPE = np.dtype([("count", np.float64), ("mean", np.float64), ("m2", np.float64)])


def _as_dask(x, name: str = "x") -> da.Array:
    if not isinstance(x, da.Array):
        raise TypeError(f"{name} must be a dask.array.Array, got {type(x).__name__} (use "
                        f"dask.array.from_array, or fastbn.moments for in-memory data)")
    if x.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (batch and channel), got "
                         f"shape {x.shape}")
    if x.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers (float16/32/64 or integers), got "
                        f"dtype {x.dtype}")
    if any(math.isnan(s) for s in x.shape):
        raise ValueError(f"{name} must have known chunk sizes (call x.compute_chunk_sizes())")
    return x


# ----------------------------------------------------------------------------- moments

def _pack(m: Moments, shape: tuple[int, ...]) -> np.ndarray:
    out = np.empty(m.num_channels, STATS_DTYPE)
    out["count"], out["mean"], out["m2"] = m.count, m.mean, m.m2
    return out.reshape(shape)


def _unpack(stats: np.ndarray) -> Moments:
    stats = stats.reshape(-1)
    count = int(stats["count"][0]) if stats.size else 0
    return Moments(count, np.array(stats["mean"]), np.array(stats["m2"]))


def _leaves(parts) -> Iterable[Moments]:
    """The partial results under a (nested, for several reduced axes) list from dask."""
    if isinstance(parts, np.ndarray):
        yield _unpack(parts)
    else:
        for part in parts:
            yield from _leaves(part)


def _merge_all(parts) -> Moments:
    return _merge_tree(list(_leaves(parts)))


def _keepdims_shape(ndim: int, channels: int, channel_axis: int) -> tuple[int, ...]:
    return tuple(channels if a == channel_axis else 1 for a in range(ndim))


def _chunk(block, axis=None, keepdims=None, *, channel_axis, backend):
    """Per-block moments (fast kernels), as STATS_DTYPE records of the keepdims shape."""
    m = _moments(block, axis=channel_axis, backend=backend)
    return _pack(m, _keepdims_shape(block.ndim, m.num_channels, channel_axis))


def _combine(parts, axis=None, keepdims=None, *, channel_axis, ndim):
    m = _merge_all(parts)
    return _pack(m, _keepdims_shape(ndim, m.num_channels, channel_axis))


def _aggregate(parts, axis=None, keepdims=None):
    m = _merge_all(parts)
    return _pack(m, (m.num_channels,))


def moments_array(x: da.Array, *, axis: int = 1, split_every: int | dict | None = None,
                  backend: str | None = None) -> da.Array:
    """The lazy per-channel statistics of `x`: a dask array of :data:`STATS_DTYPE` records.

    Shape ``(C,)``, chunked like `x`'s channel axis; fields ``count``, ``mean`` and ``m2``
    (float64). The building block of :func:`moments` and :func:`batch_norm`.

    Examples
    --------
    >>> import dask.array as da, fastbn.dask
    >>> s = fastbn.dask.moments_array(da.ones((6, 4), chunks=(2, 3)))
    >>> s.shape, s.chunks, s.compute()["count"].tolist()
    ((4,), ((3, 1),), [6.0, 6.0, 6.0, 6.0])
    """
    x = _as_dask(x)
    channel_axis = _normalize_axis(axis, x.ndim)
    reduced = tuple(a for a in range(x.ndim) if a != channel_axis)
    chunk = _Partial(_chunk, channel_axis=channel_axis, backend=backend)
    combine = _Partial(_combine, channel_axis=channel_axis, ndim=x.ndim)
    return da.reduction(x, chunk, _aggregate, combine=combine, axis=reduced, keepdims=False,
                        dtype=STATS_DTYPE, split_every=split_every, concatenate=False,
                        meta=np.empty((0,), STATS_DTYPE), name="fastbn-moments")


class _Partial:
    """functools.partial with a readable name in dask dashboards and task keys."""

    def __init__(self, func, **kwargs):
        self.func, self.kwargs = func, kwargs
        self.__name__ = func.__name__.lstrip("_")

    def __call__(self, *args, **kwargs):
        return self.func(*args, **kwargs, **self.kwargs)


def moments(x: da.Array, *, axis: int = 1, split_every: int | dict | None = None,
            backend: str | None = None, compute: bool = True) -> Moments | Any:
    """Exact per-channel population ``(count, mean, M2)`` of a dask array.

    Every block goes through :func:`fastbn.moments` (the fast kernels, float64 statistics);
    the partial moments are tree-merged with Chan's formula (``dask.array.reduction``, at most
    `split_every` partial results per task), so the result equals :func:`fastbn.moments` of
    the whole array in memory up to float64 rounding, for any chunking.

    Parameters
    ----------
    x : dask.array.Array, ndim >= 2
    axis : int
        The channel axis (1 for NCHW-style data, -1 for NHWC-style).
    split_every : int or dict, optional
        The fan-in of the tree reduction (dask's default when None).
    backend : {None, 'cython', 'numba', 'numpy'}
    compute : bool
        True: compute now (with the current dask scheduler or distributed client) and return
        a :class:`fastbn.Moments`. False: return a ``dask.delayed`` object that computes to
        one, to compute together with other work.

    Returns
    -------
    fastbn.Moments or dask.delayed.Delayed

    Examples
    --------
    >>> import numpy as np, dask.array as da, fastbn.dask
    >>> data = np.arange(24.0).reshape(4, 3, 2)
    >>> m = fastbn.dask.moments(da.from_array(data, chunks=(3, 2, 1)))
    >>> m.count, np.allclose(m.var(), data.var(axis=(0, 2)))
    (8, True)
    """
    stats = moments_array(x, axis=axis, split_every=split_every, backend=backend)
    if compute:
        return _unpack(stats.compute())
    return dask.delayed(_unpack)(stats)


def set_population_stats(layer: BatchNorm, x: da.Array, *, ddof: int = 1,
                         split_every: int | dict | None = None) -> Moments:
    """Precise BN: set `layer`'s running statistics to the exact statistics of a dask array.

    Computes :func:`moments` of `x` (the layer's inputs, channel axis ``layer.axis``) and
    passes them to :meth:`fastbn.BatchNorm.set_population_stats`.

    Returns
    -------
    fastbn.Moments

    Examples
    --------
    >>> import numpy as np, dask.array as da, fastbn, fastbn.dask
    >>> data = np.random.default_rng(0).normal(size=(100, 3))
    >>> bn = fastbn.BatchNorm(3, dtype=np.float64)
    >>> _ = fastbn.dask.set_population_stats(bn, da.from_array(data, chunks=(30, 2)))
    >>> np.allclose(bn.running_var, data.var(axis=0, ddof=1))
    True
    """
    if not isinstance(layer, BatchNorm):
        raise TypeError(f"layer must be a fastbn.BatchNorm, got {type(layer).__name__}")
    total = moments(x, axis=layer.axis, split_every=split_every, backend=layer.backend)
    return layer.set_population_stats([total], ddof=ddof)


# ----------------------------------------------------------------------------- normalization

def _channel_chunks(value, name: str, x: da.Array, channel_axis: int) -> da.Array | None:
    """A per-channel vector as a dask array chunked like x's channel axis."""
    if value is None:
        return None
    channels = x.shape[channel_axis]
    if isinstance(value, da.Array):
        if value.shape != (channels,):
            raise ValueError(f"{name} must have shape ({channels},) (one value per channel), "
                             f"got {value.shape}")
        return value.astype(np.float64).rechunk((x.chunks[channel_axis],))
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if array.shape != (channels,):
        raise ValueError(f"{name} must have shape ({channels},) (one value per channel), got "
                         f"{array.shape}")
    return da.from_array(array.astype(np.float64), chunks=(x.chunks[channel_axis],))


def _block_batch_norm(block, mean, var, weight, bias, *, channel_axis, eps, activation,
                      backend):
    return _batch_norm(block, mean, var, weight, bias, False, eps=eps, axis=channel_axis,
                       activation=activation, backend=backend)


def _block_stats_norm(block, stats, weight, bias, *, channel_axis, eps, activation, backend):
    var = stats["m2"] / np.maximum(stats["count"], 1.0)
    return _batch_norm(block, stats["mean"], var, weight, bias, False, eps=eps,
                       axis=channel_axis, activation=activation, backend=backend)


def _block_affine(block, scale, shift, *, channel_axis, activation, backend):
    return _affine(block, scale, shift, axis=channel_axis, activation=activation,
                   backend=backend)


def _result_dtype(x: da.Array) -> np.dtype:
    return x.dtype if x.dtype.kind == "f" else np.dtype(np.float64)


def _per_block(func, x: da.Array, channel_axis: int, vectors: list, **kwargs) -> da.Array:
    """Apply func(block, *channel-slices of vectors) to every block of x (blockwise)."""
    index = tuple(range(x.ndim))
    args: list = [x, index]
    for v in vectors:
        args += [v, None] if v is None else [v, (channel_axis,)]
    # token, not name: blockwise takes `name` as the output's key as it is, so two calls on
    # different arrays shared keys, and a distributed scheduler that still held the first
    # call's blocks served them to the second (a flaky wrong-shape failure in test_dask).
    return da.blockwise(_Partial(func, channel_axis=channel_axis, **kwargs), index, *args,
                        dtype=_result_dtype(x), meta=np.empty((0,) * x.ndim, _result_dtype(x)),
                        token=f"fastbn-{func.__name__.lstrip('_')}")


def batch_norm(x: da.Array, running_mean: ArrayLike | None = None,
               running_var: ArrayLike | None = None, weight: ArrayLike | None = None,
               bias: ArrayLike | None = None, eps: float = 1e-5, *, axis: int = 1,
               activation: str | None = None, backend: str | None = None,
               split_every: int | dict | None = None) -> da.Array:
    """Batch-norm a dask array block by block with the fast kernels (lazy).

    ``y = act((x - mean) / sqrt(var + eps) * weight + bias)`` per channel, each block computed
    by :func:`fastbn.batch_norm` in evaluation mode. With `running_mean` / `running_var`
    given (NumPy or dask arrays of shape (C,)) this is batch-norm inference; without them
    the array's own exact population statistics (:func:`moments`, biased variance, as a
    training-mode batch norm over the whole array) are computed in the same graph, so
    computing the result reads the data twice (once for the statistics, once to normalize),
    block by block.

    Parameters
    ----------
    x : dask.array.Array, ndim >= 2
    running_mean, running_var : array_like or dask array of shape (C,), optional
        Both or neither.
    weight, bias : array_like or dask array of shape (C,), optional
        None means 1 and 0.
    eps : float >= 0
    axis : int
        The channel axis.
    activation : {None, 'relu'}
    backend : {None, 'cython', 'numba', 'numpy'}
    split_every : int or dict, optional
        Fan-in of the statistics' tree reduction.

    Returns
    -------
    dask.array.Array
        `x`'s shape and chunks, its dtype (float64 for integers).

    Examples
    --------
    >>> import numpy as np, dask.array as da, fastbn, fastbn.dask
    >>> data = np.random.default_rng(0).normal(5.0, 2.0, size=(64, 3, 4))
    >>> y = fastbn.dask.batch_norm(da.from_array(data, chunks=(16, 2, 4)))
    >>> want = fastbn.batch_norm(data, None, None, training=True)
    >>> np.allclose(y.compute(), want)
    True
    """
    x = _as_dask(x)
    channel_axis = _normalize_axis(axis, x.ndim)
    eps = _check_real(eps, "eps", 0.0)
    _check_activation(activation)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None, "
                         "to use the array's own population statistics)")
    w = _channel_chunks(weight, "weight", x, channel_axis)
    b = _channel_chunks(bias, "bias", x, channel_axis)
    common = dict(eps=eps, activation=activation, backend=backend)
    if running_mean is None:
        stats = moments_array(x, axis=channel_axis, split_every=split_every, backend=backend)
        return _per_block(_block_stats_norm, x, channel_axis, [stats, w, b], **common)
    mean = _channel_chunks(running_mean, "running_mean", x, channel_axis)
    var = _channel_chunks(running_var, "running_var", x, channel_axis)
    return _per_block(_block_batch_norm, x, channel_axis, [mean, var, w, b], **common)


def affine(x: da.Array, scale: ArrayLike, shift: ArrayLike, *, axis: int = 1,
           activation: str | None = None, backend: str | None = None) -> da.Array:
    """``act(x * scale + shift)`` per channel, block by block with :func:`fastbn.affine` (lazy).

    The fused inference path: get `scale` and `shift` once with :func:`fastbn.scale_shift`.

    Examples
    --------
    >>> import numpy as np, dask.array as da, fastbn.dask
    >>> x = da.ones((4, 2), chunks=2)
    >>> fastbn.dask.affine(x, [2.0, 3.0], [1.0, -1.0]).compute()[0]
    array([3., 2.])
    """
    x = _as_dask(x)
    channel_axis = _normalize_axis(axis, x.ndim)
    _check_activation(activation)
    s = _channel_chunks(scale, "scale", x, channel_axis)
    t = _channel_chunks(shift, "shift", x, channel_axis)
    return _per_block(_block_affine, x, channel_axis, [s, t], activation=activation,
                      backend=backend)


def apply_layer(layer: BatchNorm, x: da.Array) -> da.Array:
    """An evaluation-mode :class:`fastbn.BatchNorm` applied to a dask array (lazy).

    Uses the layer's running statistics, weight, bias, eps, axis, activation and backend (a
    snapshot: later changes to the layer do not affect the result). A layer with
    ``track_running_stats=False`` normalizes with the array's own population statistics.

    Examples
    --------
    >>> import numpy as np, dask.array as da, fastbn, fastbn.dask
    >>> bn = fastbn.BatchNorm(3).eval()
    >>> x = np.ones((4, 3), np.float32)
    >>> np.allclose(fastbn.dask.apply_layer(bn, da.from_array(x, chunks=2)).compute(), bn(x))
    True
    """
    if not isinstance(layer, BatchNorm):
        raise TypeError(f"layer must be a fastbn.BatchNorm, got {type(layer).__name__}")

    def copy(v):
        return None if v is None else np.array(v, dtype=np.float64)

    return batch_norm(x, copy(layer.running_mean), copy(layer.running_var), copy(layer.weight),
                      copy(layer.bias), layer.eps, axis=layer.axis, activation=layer.activation,
                      backend=layer.backend)
