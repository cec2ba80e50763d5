"""Synchronized batch norm over MPI (mpi4py): data-parallel training on CPUs.

Each rank holds a slice of the global batch. In training, :class:`BatchNorm` normalizes every
rank's slice with the statistics of the *whole* global batch, so a data-parallel run computes
exactly what one process would compute on the concatenated batch (PyTorch's ``SyncBatchNorm``,
which only runs on GPUs, does the same; this one runs on CPUs):

* forward: each rank computes its per-channel ``(count, mean, M2)`` with the fast kernels; one
  ``Allgather`` exchanges them (``2C + 1`` float64 per rank) and every rank merges them with
  Chan's formula in the same fixed balanced tree over the ranks, so ranks with different batch sizes, and empty ranks, are exact
  and every rank gets bitwise identical statistics (and running statistics); the slice is then
  normalized by the fast kernels.
* backward: each rank computes its ``sum(dy)`` and ``sum((x - mean) * dy)`` with the fast
  kernels; one ``Allreduce`` (sum, ``2C + 1`` float64) gives the global ones, which complete the
  input gradient (a second fast-kernel pass) and are ``grad_bias`` and ``grad_weight * invstd``.

Requires ``mpi4py`` (``pip install fastbn[mpi]``) and an MPI library; run the program with
``mpiexec -n P python train.py``.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

try:
    from mpi4py import MPI
except ImportError as exc:  # pragma: no cover - exercised only without mpi4py
    raise ImportError("fastbn.mpi needs mpi4py and an MPI library: pip install 'fastbn[mpi]' "
                      "(mpi4py and the mpich wheel)") from exc

from ._api import (_as_data, _check_activation, _Output, _prepare_input, _same_shape_operand,
                   _update_running_stats)
from ._backends import get_backend
from ._inference import Moments, _merge_tree
from ._layers import BatchNorm as _LocalBatchNorm
from ._layers import _Cache
from ._threads import get_num_threads

__all__ = ["BatchNorm", "SyncBatchNorm", "allreduce_moments"]


def _check_comm(comm) -> MPI.Intracomm:
    if comm is None:
        return MPI.COMM_WORLD
    if not isinstance(comm, MPI.Intracomm):
        raise TypeError(f"comm must be an mpi4py intracommunicator (e.g. MPI.COMM_WORLD) or "
                        f"None, got {type(comm).__name__}")
    return comm


def _pack(count: float, mean: np.ndarray, m2: np.ndarray) -> np.ndarray:
    return np.concatenate(([float(count)], mean, m2))


def _gather_moments(comm: MPI.Intracomm, channels: int, local: Moments | None
                    ) -> list[Moments]:
    """Every rank's moments, in rank order, on every rank (one Allgather).

    A rank that failed before the collective passes ``local=None`` (sent as count -1) so that
    every rank learns of the failure instead of waiting forever.
    """
    if local is None:
        send = _pack(-1.0, np.zeros(channels), np.zeros(channels))
    else:
        send = _pack(local.count, local.mean, local.m2)
    recv = np.empty((comm.Get_size(), send.size))
    comm.Allgather(send, recv)
    failed = [rank for rank, row in enumerate(recv) if row[0] < 0]
    if failed:
        raise ValueError(f"synchronized batch norm: rank(s) {failed} of the communicator had "
                         f"invalid input (see the error raised there)")
    return [Moments(int(row[0]), row[1:channels + 1].copy(), row[channels + 1:].copy())
            for row in recv]


def _announce_failure(comm: MPI.Intracomm, channels: int) -> None:
    """Take part in the Allgather as a failed rank (the caller then raises its own error)."""
    try:
        _gather_moments(comm, channels, None)
    except ValueError:
        pass


def allreduce_moments(local: Moments, comm=None) -> Moments:
    """The moments of the union of every rank's data (a collective: every rank must call it).

    The per-rank ``(count, mean, M2)`` are gathered on every rank and merged with Chan's formula
    in a fixed balanced tree over the ranks, so the result is exact for any split of the data
    (ranks may hold no data) and bitwise identical on every rank.

    Parameters
    ----------
    local : fastbn.Moments
        This rank's moments (:func:`fastbn.moments`), the same number of channels everywhere.
    comm : mpi4py.MPI.Intracomm, optional
        Default ``MPI.COMM_WORLD``.

    Returns
    -------
    fastbn.Moments

    Examples
    --------
    >>> import numpy as np, fastbn, fastbn.mpi
    >>> local = fastbn.moments(np.arange(6.0).reshape(3, 2))
    >>> fastbn.mpi.allreduce_moments(local).count == 3 * fastbn.mpi.MPI.COMM_WORLD.size
    True
    """
    comm = _check_comm(comm)
    if not isinstance(local, Moments):
        raise TypeError(f"local must be a fastbn.Moments, got {type(local).__name__}")
    return _merge_tree(_gather_moments(comm, local.num_channels, local))


class BatchNorm(_LocalBatchNorm):
    """:class:`fastbn.BatchNorm` with statistics synchronized over an MPI communicator.

    The same interface and semantics as :class:`fastbn.BatchNorm` (running statistics,
    momentum, ``state_dict``, ``freeze``, ReLU and residual fusion, any layout), plus `comm`.
    In training (not frozen) :meth:`forward` and :meth:`backward` are **collective**: every
    rank of `comm` must call them, in the same order, with the same channel count; a rank may
    pass an empty batch (zero samples). Their results on each rank are those of a single
    :class:`fastbn.BatchNorm` on the concatenation of all ranks' batches (in rank order):

    * the output is the rank's slice of the global output;
    * ``running_mean`` / ``running_var`` are updated with the global batch statistics
      (unbiased variance over the global count) and are identical on every rank;
    * :meth:`backward` returns the rank's slice of the global input gradient, and
      ``grad_weight`` / ``grad_bias`` are the gradients of the *global* batch, identical on
      every rank (already reduced: do not all-reduce them again with the other parameters'
      gradients). Each rank's ``grad_output`` must be its slice of the gradient of the global
      loss (with a per-rank mean loss averaged over ranks, divide by the number of ranks).

    In evaluation or frozen mode nothing is communicated: the layer is a plain
    :class:`fastbn.BatchNorm` (running statistics; local parameter gradients). As in PyTorch's
    ``SyncBatchNorm``, ``track_running_stats=False`` in evaluation uses each rank's own batch
    statistics.

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats, axis, dtype, activation, backend
        As in :class:`fastbn.BatchNorm`.
    virtual_batch_size : None
        Ghost batch norm is not supported with synchronization (ValueError otherwise).
    comm : mpi4py.MPI.Intracomm, optional
        The ranks that share statistics; default ``MPI.COMM_WORLD``.

    Raises
    ------
    ValueError
        In a collective call, on every rank when any rank's input is invalid (the failing
        rank raises the precise error), or when the global batch has a single value per
        channel.

    Examples
    --------
    Run with ``mpiexec -n 2 python script.py``:

    >>> import numpy as np, fastbn.mpi
    >>> comm = fastbn.mpi.MPI.COMM_WORLD
    >>> bn = fastbn.mpi.BatchNorm(3, comm=comm)
    >>> x = np.random.default_rng(comm.rank).normal(size=(4 + comm.rank, 3, 8))
    >>> y = bn(x)                                   # normalized with the global statistics
    >>> dx = bn.backward(np.ones_like(y))
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *, axis: int = 1,
                 dtype: Any = np.float32, activation=None, backend: str | None = None,
                 virtual_batch_size: int | None = None, comm=None) -> None:
        if virtual_batch_size is not None:
            raise ValueError("virtual_batch_size (ghost batch norm) is not supported by the "
                             "synchronized fastbn.mpi.BatchNorm; use fastbn.BatchNorm")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, axis=axis,
                         dtype=dtype, activation=activation, backend=backend)
        self.comm = _check_comm(comm)
        self._sync_stats: tuple[np.ndarray, np.ndarray, int] | None = None

    # ------------------------------------------------------------------------- forward

    def forward(self, input: ArrayLike, residual: ArrayLike | None = None) -> np.ndarray:
        """Normalize `input`; in training, with the statistics of all ranks' batches.

        Collective in training (not frozen); see the class docstring.
        """
        if not self.training or self.frozen:
            self._sync_stats = None
            return super().forward(input, residual)
        return self._sync_forward(input, residual)

    def _sync_forward(self, input, residual):
        C = self.num_features
        module = get_backend(self.backend)
        try:
            x, result_dtype, compute_dtype, axis, dims = _prepare_input(input, self.axis)
            if dims[1] != C:
                raise ValueError(f"input has {dims[1]} channels along axis {self.axis} (shape "
                                 f"{x.shape}), expected num_features={C}")
            relu = _check_activation(self.activation)
            x3 = np.ascontiguousarray(x, dtype=compute_dtype).reshape(dims)
            residual3 = _same_shape_operand(residual, "residual", x.shape, compute_dtype, dims)
            target = _Output(None, x.shape, result_dtype, compute_dtype, dims, ())
            num_threads = get_num_threads()
            count, mean, m2 = module.moments(x3, num_threads)
            local = Moments(int(count), np.asarray(mean, np.float64), np.asarray(m2, np.float64))
        except (ValueError, TypeError):
            _announce_failure(self.comm, C)        # tell the other ranks, then raise ours
            raise
        total = _merge_tree(_gather_moments(self.comm, C, local))
        n = total.count
        if n <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got "
                             f"{n} over all ranks of the communicator")
        var = total.var()
        invstd = 1.0 / np.sqrt(var + self.eps)
        weight = (np.ones(C) if self.weight is None
                  else self.weight.astype(np.float64))
        bias = np.zeros(C) if self.bias is None else self.bias.astype(np.float64)
        module.normalize(x3, total.mean, weight * invstd, bias, residual3, relu, target.target,
                         num_threads)
        y = target.result(x.shape, result_dtype)
        if self.track_running_stats:
            factor = self._momentum_factor()
            unbiased = total.var(ddof=1)
            _update_running_stats(self.running_mean, self.running_var, total.mean, unbiased,
                                  factor)
            self.num_batches_tracked += 1
        self._cache = _Cache(x, y if relu else None, [(slice(None), total.mean, var)], self.eps,
                             True, result_dtype)
        self._sync_stats = (total.mean, invstd, n)
        return y

    # ------------------------------------------------------------------------- backward

    def backward(self, grad_output: ArrayLike) -> np.ndarray:
        """Gradient of the last forward; after a synchronized forward, a collective.

        The input gradient is this rank's slice of the global one, and ``grad_weight`` /
        ``grad_bias`` accumulate the global batch's parameter gradients (see the class
        docstring).
        """
        if self._sync_stats is None or self._cache is None:
            return super().backward(grad_output)
        mean, invstd, n = self._sync_stats
        cache = self._cache
        C = self.num_features
        module = get_backend(self.backend)
        x = cache.input
        try:
            dy = _as_data(grad_output, "grad_output")
            if dy.shape != x.shape:
                raise ValueError(f"grad_output must have the forward input's shape {x.shape}, "
                                 f"got {dy.shape}")
            _, result_dtype, compute_dtype, axis, dims = _prepare_input(x, self.axis)
            dy3 = np.ascontiguousarray(dy, dtype=compute_dtype).reshape(dims)
            x3 = np.ascontiguousarray(x, dtype=compute_dtype).reshape(dims)
            output3 = _same_shape_operand(cache.output, "output", x.shape, compute_dtype, dims)
            failed = 0.0
        except (ValueError, TypeError) as exc:
            error, failed = exc, 1.0
        weight = np.ones(C) if self.weight is None else self.weight.astype(np.float64)
        num_threads = get_num_threads()
        if not failed:
            # Pass 1 (fast kernel, frozen form): local sums, and dx = weight * invstd * g.
            target = _Output(None, x.shape, result_dtype, compute_dtype, dims, ())
            sum_dy, sum_dy_xmu = module.backward(dy3, x3, mean, invstd, weight, output3, False,
                                                 target.target, num_threads)
            send = np.concatenate(([0.0], sum_dy, sum_dy_xmu))
        else:
            send = np.zeros(2 * C + 1)
        send[0] = failed
        recv = np.empty_like(send)
        self.comm.Allreduce(send, recv, op=MPI.SUM)
        if failed:
            raise error
        if recv[0] > 0:
            raise ValueError(f"synchronized batch norm backward: {int(recv[0])} rank(s) had an "
                             f"invalid grad_output (see the error raised there)")
        sum_dy, sum_dy_xmu = recv[1:C + 1], recv[C + 1:]
        # Pass 2 (fast kernel): dx += (x - mean) * scale + shift, the terms through the
        # global statistics: -weight*invstd * (sum_dy/n + (x-mean) * invstd**2 * sum_dy_xmu/n).
        scale = -weight * invstd**3 * sum_dy_xmu / n
        shift = -weight * invstd * sum_dy / n
        module.normalize(x3, mean, scale, shift, target.target, False, target.target,
                         num_threads)
        grad_input = target.result(x.shape, result_dtype)
        self._cache = None
        self._sync_stats = None
        if self.affine:
            self.grad_weight = self._accumulate(self.grad_weight, sum_dy_xmu * invstd)
            self.grad_bias = self._accumulate(self.grad_bias, sum_dy.copy())
        return grad_input

    # ------------------------------------------------------------------------- statistics

    def set_population_stats(self, batches: Iterable[ArrayLike | Moments], *,
                             ddof: int = 1) -> Moments:
        """Precise BN over all ranks: running statistics from every rank's `batches`.

        Collective: each rank streams its own share of the data; the per-rank moments are
        merged exactly across ranks (:func:`allreduce_moments`) and every rank gets the same
        running statistics. Otherwise as :meth:`fastbn.BatchNorm.set_population_stats`.
        """
        try:
            local = self._merged_moments(batches)
        except (ValueError, TypeError):
            _announce_failure(self.comm, self.num_features)
            raise
        parts = _gather_moments(self.comm, self.num_features, local)
        return super().set_population_stats([_merge_tree(parts)], ddof=ddof)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", comm_size={self.comm.Get_size()})"


SyncBatchNorm = BatchNorm
