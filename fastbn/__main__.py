"""``python -m fastbn``: what this installation is, and how fast it is against naive NumPy."""
from __future__ import annotations

import time

import numpy as np

import fastbn


def _best_time(fn, repeat=5) -> float:
    best = np.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _copy(src, dst) -> None:
    """The yardstick: a multithreaded copy of the tensor (batch norm is memory-bound)."""
    try:
        from fastbn._kernels import parallel_copy
    except ImportError:
        np.copyto(dst, src)
    else:
        parallel_copy(src, dst, fastbn.get_num_threads())


def naive_numpy_batch_norm(x, eps=1e-5):
    """What a NumPy user writes by hand (channels-first)."""
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


def main() -> None:
    fastbn.show_config()
    shape = (32, 64, 56, 56)
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    out = np.empty_like(x)
    rm, rv = np.zeros(shape[1], np.float32), np.ones(shape[1], np.float32)
    print(f"\nbatch norm, training forward, float32 {shape}, {fastbn.get_num_threads()} threads")
    copy = _best_time(lambda: _copy(x, out))
    naive = _best_time(lambda: naive_numpy_batch_norm(x))
    print(f"{'method':<28}{'ms':>9}{'x copy':>9}{'speedup':>9}")
    print(f"{'copy of the tensor':<28}{copy * 1e3:9.2f}{1.0:9.2f}{'':>9}")
    print(f"{'naive NumPy':<28}{naive * 1e3:9.2f}{naive / copy:9.2f}{1.0:9.2f}")
    for backend in fastbn.available_backends():
        fastbn.batch_norm(x, rm, rv, training=True, out=out, backend=backend)  # compile/warm up
        t = _best_time(lambda: fastbn.batch_norm(x, rm, rv, training=True, out=out,
                                                 backend=backend))
        label = f"fastbn {backend}" + (" (reference)" if backend == "numpy" else "")
        print(f"{label:<28}{t * 1e3:9.2f}{t / copy:9.2f}{naive / t:9.2f}")
    error = np.abs(fastbn.batch_norm(x, None, None, training=True).astype(np.float64)
                   - naive_numpy_batch_norm(x.astype(np.float64))).max()
    print(f"max |error| of the default backend against float64: {error:.2e}")


if __name__ == "__main__":
    main()
