"""Awkward inputs shared by the tests (and the benchmark registry): odd sizes, every ndim from
2 to 5, both layouts, non-contiguous, Fortran-ordered and byte-swapped arrays."""
from __future__ import annotations

import numpy as np

SHAPES = {2: (97, 5), 3: (7, 5, 101), 4: (3, 5, 9, 11), 5: (2, 3, 5, 7, 3)}
DTYPES = (np.float32, np.float64, np.float16)
# Tolerances against the float64 reference, for outputs of order 1.
TOL = {np.float64: 1e-12, np.float32: 2e-6, np.float16: 2e-3}


def make(rng, shape, dtype, kind="contiguous", offset=0.0):
    """An array of `shape` whose memory layout is `kind`."""
    data = (rng.standard_normal(shape) + offset).astype(dtype)
    if kind == "contiguous":
        return data
    if kind == "fortran":
        return np.asfortranarray(data)
    if kind == "strided":
        big = np.zeros(tuple(2 * s for s in shape), dtype=dtype)
        view = big[tuple(slice(None, None, 2) for _ in shape)]
        view[...] = data
        return view
    if kind == "byteswapped":
        return data.astype(data.dtype.newbyteorder())
    raise ValueError(kind)


KINDS = ("contiguous", "fortran", "strided", "byteswapped")


def channel_count(shape, axis):
    return shape[axis]
