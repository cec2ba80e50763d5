"""Import plus first call of the Numba backend, from an empty cache (cold) and from the cache
the cold run filled (warm), per operation and layout (float32, one small tensor each).

Each measurement is a new Python process (the time a user waits for): ``import fastbn`` and
one call, with NUMBA_CACHE_DIR pointing at a fresh directory for the cold run and at the same
directory for the warm one::

    python bench/first_call.py [--ops infer,train,backward] [--layouts nchw,nhwc]

The figures go into docs/performance.rst ("Backend").
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

CALL = {
    "infer": "fastbn.batch_norm(x, rm, rv, w, b, training=False, axis=axis, backend='numba')",
    "train": "fastbn.batch_norm(x, rm, rv, w, b, training=True, axis=axis, backend='numba')",
    "backward": "fastbn.batch_norm_backward(x, x, rm, rv, w, axis=axis, backend='numba')",
}
SHAPES = {"nchw": ((8, 16, 12, 12), 1), "nhwc": ((8, 12, 12, 16), -1)}


def _script(op: str, layout: str) -> str:
    shape, axis = SHAPES[layout]
    return f"""
import time
t0 = time.perf_counter()
import numpy as np
import fastbn
x = np.random.default_rng(0).standard_normal({shape}).astype(np.float32)
axis = {axis}
c = x.shape[axis]
rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
{CALL[op]}
print(time.perf_counter() - t0)
"""


def first_call(op: str, layout: str, cache_dir: str) -> float:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    done = subprocess.run([sys.executable, "-c", _script(op, layout)], env=env, check=True,
                          capture_output=True, text=True)
    return float(done.stdout.split()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default="infer,train,backward")
    parser.add_argument("--layouts", default="nchw,nhwc")
    args = parser.parse_args(argv)
    print(f"{'operation':10s} {'layout':6s} {'cold (s)':>9s} {'warm (s)':>9s}")
    for op in args.ops.split(","):
        for layout in args.layouts.split(","):
            with tempfile.TemporaryDirectory() as cache:
                cold = first_call(op, layout, cache)
                warm = first_call(op, layout, cache)
            print(f"{op:10s} {layout:6s} {cold:9.1f} {warm:9.2f}", flush=True)


if __name__ == "__main__":
    main()
