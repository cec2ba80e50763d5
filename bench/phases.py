"""Where the time of the Cython kernels goes: each pass alone, against a copy of the tensor.

    python bench/phases.py                      # the issue's shapes, both layouts, 2 threads
    python bench/phases.py 32x64x112x112 --threads 1

A full operation is made of passes over memory: the statistics read x once (``moments``); the
element-wise pass reads x and writes y (``normalize``), and dx reads two arrays and writes one
(timed as ``normalize`` with a residual, the same traffic). Each is timed alone, interleaved
with a multithreaded copy of the same tensor, and printed as a multiple of the copy time; so
are training forward and backward, next to the floor their memory traffic sets (in units of
the copy's traffic, which reads and writes the tensor once):

- channels-first, cache-blocked (a channel group's second read comes from the cache):
  training 1.0 (x read once, y written), backward 1.5 (dy and x read once, dx written);
- channels-last (every row's statistics are needed before any row is normalized, so a tensor
  larger than the cache is read twice): training 1.5, backward 2.5.
"""
from __future__ import annotations

import argparse

import numpy as np

from fastbn import _kernels
from fastbn.bench._registry import empty_beside, measure_interleaved

SHAPES = ["32x64x112x112", "32x256x56x56", "64x2048x7x7", "8x64x56x56", "256x1024"]
FLOOR = {("train", "nchw"): 1.0, ("backward", "nchw"): 1.5,
         ("train", "nhwc"): 1.5, ("backward", "nhwc"): 2.5}


def view(shape: tuple[int, ...], layout: str) -> tuple[int, int, int]:
    """The (outer, C, inner) view the kernels see."""
    n, c, inner = shape[0], shape[1], int(np.prod(shape[2:], dtype=np.int64))
    if layout == "nhwc" or inner == 1:
        return n * inner, c, 1
    return n, c, inner


def phases(shape: tuple[int, ...], layout: str, threads: int, min_time: float) -> dict:
    outer, channels, inner = view(shape, layout)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((outer, channels, inner), dtype=np.float32) + 3
    dy = rng.standard_normal(x.shape, dtype=np.float32)
    y = empty_beside(x)  # (see empty_beside)
    ones, zeros = np.ones(channels), np.zeros(channels)
    calls = {
        "copy": lambda: _kernels.parallel_copy(x, y, threads),
        "moments": lambda: _kernels.moments(x, threads),
        "normalize": lambda: _kernels.normalize(x, zeros, ones, zeros, None, False, y, threads),
        "2 reads + write": lambda: _kernels.normalize(x, zeros, ones, zeros, dy, False, y,
                                                      threads),
        "train": lambda: _kernels.train_forward(x, ones, zeros, 1e-5, None, False, y, threads),
        "backward": lambda: _kernels.backward(dy, x, zeros, ones, ones, None, True, y, threads),
    }
    stats = measure_interleaved(list(calls.values()), min_time)
    best = {name: s["best"] for name, s in zip(calls, stats)}
    return {name: t / best["copy"] for name, t in best.items()} | {"copy ms": best["copy"] * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", nargs="*", default=SHAPES)
    parser.add_argument("--layouts", default="nchw,nhwc")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per pass")
    args = parser.parse_args()
    names = ["moments", "normalize", "2 reads + write", "train", "backward"]
    print(f"x copy time, float32, {args.threads} threads; floor: the memory traffic's minimum")
    print(f"{'shape':16} {'layout':6} {'copy ms':>8} " + " ".join(f"{n:>15}" for n in names)
          + f" {'train floor':>11} {'bwd floor':>9}")
    for text in args.shapes:
        shape = tuple(int(s) for s in text.split("x"))
        for layout in args.layouts.split(","):
            if len(shape) == 2 and layout == "nhwc":
                continue  # (N, C): one layout
            kind = "nhwc" if view(shape, layout)[2] == 1 else "nchw"
            r = phases(shape, layout, args.threads, args.min_time)
            print(f"{text:16} {layout:6} {r['copy ms']:8.2f} "
                  + " ".join(f"{r[n]:15.2f}" for n in names)
                  + f" {FLOOR['train', kind]:11.1f} {FLOOR['backward', kind]:9.1f}")


if __name__ == "__main__":
    main()
