"""Thread count shared by the fast backends.

By default fastbn follows OpenMP's current limit (``omp_get_max_threads()`` of the runtime the
Cython kernels link), so ``OMP_NUM_THREADS`` and ``threadpoolctl.threadpool_limits`` apply to it,
as in scikit-learn's ``_openmp_helpers``. ``set_num_threads(n)`` overrides that for fastbn only.
"""
from __future__ import annotations

import os
import threading
import warnings

_override: int | None = None
_lock = threading.Lock()
# GNU OpenMP is not fork-safe: a child forked after the parent ran a parallel region hangs in
# its next one. Such a child runs fastbn single-threaded instead (and says so once).
_threads_started = False
_forked_after_threads = False


def _after_fork_in_child() -> None:
    global _forked_after_threads, _warned
    _forked_after_threads = _threads_started
    _warned = False


_warned = False
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


try:
    from . import _kernels
except ImportError:  # not built: the NumPy and Numba backends still work
    _kernels = None


def _openmp_max_threads() -> int | None:
    if _kernels is None or not _kernels.OPENMP_ENABLED:
        return None
    return _kernels.openmp_max_threads()


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
    global _threads_started, _warned
    if _forked_after_threads:
        if not _warned:
            _warned = True
            warnings.warn("fastbn runs single-threaded in this process: it was forked after its "
                          "parent used threads (OpenMP is not fork-safe). Use the 'spawn' or "
                          "'forkserver' start method for multithreaded kernels in children.",
                          RuntimeWarning, stacklevel=3)
        return 1
    n = _override
    n = n if n is not None else _default_num_threads()
    if n > 1:
        _threads_started = True
    return n
