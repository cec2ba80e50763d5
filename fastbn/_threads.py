"""Thread count shared by the fast backends.

By default fastbn follows OpenMP's current limit (``omp_get_max_threads()`` of the runtime the
Cython kernels link), so ``OMP_NUM_THREADS`` and ``threadpoolctl.threadpool_limits`` apply to it,
as in scikit-learn's ``_openmp_helpers``. ``set_num_threads(n)`` overrides that for fastbn only.
"""
from __future__ import annotations

import os
import threading

_override: int | None = None
_lock = threading.Lock()


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _openmp_max_threads() -> int | None:
    try:
        from . import _kernels
    except ImportError:
        return None
    return _kernels.openmp_max_threads() if _kernels.OPENMP_ENABLED else None


def _default_num_threads() -> int:
    n = _openmp_max_threads()
    if n is None:
        env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
        n = int(env) if env.isdigit() and int(env) > 0 else _cpu_count()
    return n


def set_num_threads(n: int | None) -> None:
    """Set the number of threads fastbn's kernels use.

    Parameters
    ----------
    n : int or None
        A positive thread count, or None to restore the default (OpenMP's current limit,
        which follows ``OMP_NUM_THREADS`` and ``threadpoolctl``).

    Examples
    --------
    >>> import fastbn
    >>> fastbn.set_num_threads(1)
    >>> fastbn.get_num_threads()
    1
    >>> fastbn.set_num_threads(None)
    """
    global _override
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) and not hasattr(n, "__index__"):
            raise TypeError(f"n must be a positive int or None, got {type(n).__name__}")
        n = int(n.__index__())
        if n < 1:
            raise ValueError(f"n must be a positive int or None, got {n}")
    with _lock:
        _override = n


def get_num_threads() -> int:
    """The number of threads the next fastbn call will use.

    Examples
    --------
    >>> import fastbn
    >>> fastbn.get_num_threads() >= 1
    True
    """
    n = _override
    return n if n is not None else _default_num_threads()
