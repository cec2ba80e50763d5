"""``fastbn.show_config()``: what this installation can do, reported from what is loaded."""
from __future__ import annotations

import functools
import glob
import os
import platform
import sys

import numpy as np


def _simd_features() -> list[str]:
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # NumPy 1.x
        from numpy.core._multiarray_umath import __cpu_features__
    wanted = ("SSE42", "AVX", "F16C", "FMA3", "AVX2", "AVX512F", "AVX512BW", "AVX512VL",
              "AVX512_SKX", "ASIMD", "SVE")
    return [name for name in wanted if __cpu_features__.get(name)]


DEFAULT_LAST_LEVEL_CACHE = 8 << 20


def _cache_size_bytes(text: str) -> int:
    """'32768K', '1M', '512' (bytes) as sysfs writes them, in bytes."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


@functools.cache
def _data_caches() -> dict[int, int]:
    """Bytes of each level of cpu0's data (or unified) caches, from Linux sysfs: {1: ..., 2: ...}."""
    sizes = {}
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(os.path.join(index, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(index, "level")) as f:
                level = int(f.read())
            with open(os.path.join(index, "size")) as f:
                nbytes = _cache_size_bytes(f.read())
        except (OSError, ValueError):
            continue
        if kind in ("Unified", "Data") and nbytes > 0:
            sizes[level] = nbytes
    return sizes


def last_level_cache_bytes() -> int:
    """Size of the CPU's last-level data cache (Linux sysfs), or 8 MB when it cannot be read.

    The Cython kernels stream (non-temporal stores) only outputs larger than half of it: an
    output that fits stays in the cache for whatever reads it next.
    """
    caches = _data_caches()
    return caches[max(caches)] if caches else DEFAULT_LAST_LEVEL_CACHE


# Outputs of more than this bypass the cache whatever its size. A large L3 is shared by the whole
# socket: a 2-vCPU guest of an Intel Xeon with a 480 MB L3 (2 MB L2 per core) wrote float32
# inference outputs (2 threads, Cython, x the unstreamed copy) of 12.8 MB equally fast either way,
# 25.7 MB 0.68 -> 0.73 streamed, 51 MB 0.83 -> 0.68, 103 MB 1.16 -> 0.75 (4.5 against 6.9 ms).
STREAM_CAP = 32 << 20


def stream_above_bytes() -> int:
    """Output bytes above which the kernels write with non-temporal stores (bypassing the cache):
    half the last-level cache, at most STREAM_CAP. An output that fits stays in the cache for
    whatever reads it next; a larger one would only evict the input being read."""
    return min(last_level_cache_bytes() // 2, STREAM_CAP)


DEFAULT_L2 = 512 << 10


def channel_group_bytes() -> int:
    """Bytes of input per channel group in the channels-first training and backward passes.

    The second pass over a group re-reads it from the cache. Eight times one core's L2, at most
    half the last-level cache: 4 MB on both the Zen 1 (512 KB L2, 8 MB L3) and the Zen 3 (512 KB
    L2, 32 MB L3 shared with other tenants) this was measured on; 8 MB on a Zen 5 (1 MB L2).
    Float32, 2 threads, Cython, x copy, 4 MB / 16 MB groups on the Zen 3: 32x256x56x56 training
    1.83 / 2.03, backward 2.37 / 2.54; 32x64x112x112 1.62 / 1.71, 2.15 / 2.64; Numba backward
    3.18 / 3.59 and 2.90 / 3.39. On the Zen 5 16 MB beat 4 MB by 3-15% (8 MB not measured).

    On Intel processors, half one core's L2 (at least 1 MB): the groups are re-read from the L2,
    not the L3. An Intel Xeon guest (2 MB L2, 480 MB L3 shared by the socket), float32, 2
    threads, x copy, 16 MB / 1 MB groups: Cython training 32x64x112x112 1.65 / 1.42, 32x256x56x56
    1.83 / 1.53; backward 2.54 / 2.50, 2.71 / 2.03; Numba training 6.9 / 6.0 ms and 8.3 / 7.4 ms,
    backward 15.3 / 12.7 ms on 32x256x56x56 (32x64x112x112 equal).
    """
    caches = _data_caches()
    l2 = caches.get(2, DEFAULT_L2)
    if cpu_vendor() == "GenuineIntel":
        return max(1 << 20, l2 // 2)
    return max(1 << 20, min(8 * l2, last_level_cache_bytes() // 2))


@functools.cache
def _cpu_id() -> tuple[str, int, int]:
    """('AuthenticAMD', 25, 17) and the like (vendor, family, model) from /proc/cpuinfo;
    ('', 0, 0) when it cannot be read."""
    vendor, family, model = "", 0, 0
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "vendor_id":
                    vendor = value.strip()
                elif key == "cpu family":
                    family = int(value)
                elif key == "model":
                    model = int(value)
                elif not line.strip() and vendor:
                    break  # the first processor is enough
    except (OSError, ValueError):
        pass
    return vendor, family, model


def _cpu_vendor_family() -> tuple[str, int]:
    """('AuthenticAMD', 23) and the like; ('', 0) when /proc/cpuinfo cannot be read."""
    return _cpu_id()[:2]


def _is_zen4() -> bool:
    """AMD family 0x19 (Zen 3 and Zen 4) with a Zen 4 model number (Genoa, Raphael, Phoenix)."""
    vendor, family, model = _cpu_id()
    return (vendor == "AuthenticAMD" and family == 0x19
            and (0x10 <= model <= 0x1F or 0x60 <= model <= 0x7F or 0xA0 <= model <= 0xAF))


def cpu_vendor() -> str:
    """'GenuineIntel', 'AuthenticAMD', ... from /proc/cpuinfo; '' when it cannot be read."""
    return _cpu_vendor_family()[0]


def streamed_store_alias_stall() -> bool:
    """Whether loads stall behind pending non-temporal stores that share their low 12 address
    bits, so that an output a few bytes past an input modulo 4 KB should not be streamed from
    registers. Measured, not guessed: AMD family 0x17 (Zen 1) stalls (8x256x56x56 inference
    2.0 -> 5.4 ms with the output 16 bytes past the input); family 0x1A (Zen 5) does not (a
    streamed 98 MB affine pass 1.78 ms at 16 bytes, 1.82 ms at 2 KB), and there the detour
    through an L1 tile cost 1.7x. Other processors are not measured: no detour.
    """
    return _cpu_vendor_family() == ("AuthenticAMD", 0x17)


def gradient_prefetch() -> bool:
    """Whether the channels-first float32 gradient sums prefetch their inputs from memory, 2 KB
    ahead of the reads (both backends). Measured, not guessed: on an Intel Xeon guest the
    hardware prefetchers alone left the reads short (Cython, float32 backward x copy,
    32x64x112x112 3.0 -> 2.7, 32x256x56x56 3.3 -> 2.9); on an AMD EPYC Zen 4 the prefetches
    cost time (32x256x56x56, in one run: Cython 3.78 -> 3.37-3.43 and 2.66-2.69 -> 2.49 without
    them, in the VM's two memory speeds; Numba 2.8 -> 3.6 with them), as on the Zen 3 before.
    The Cython column sums of short channels-first rows (7x7, 14x14 float32 statistics) follow
    the same flag: on the Zen 4 their prefetch of the next eight rows made 64x2048x7x7 moments
    0.73-0.76 ms instead of 0.48-0.53 (Numba, without: 0.45-0.57). Other processors: no
    prefetch.
    """
    return cpu_vendor() == "GenuineIntel"


def overlap_groups(backward: bool = False) -> bool:
    """Whether the Cython channels-first training (or, with `backward`, backward) overlaps the
    channel groups: one pass sums group k from memory while it writes group k - 1's output
    from the cache, instead of one group after the other (the same bits either way).

    Measured, not guessed: on a Zen 3 (512 KB L2) the overlap gained about 10% in both
    (32x64x112x112 float32 training 1.86 -> 1.66x copy, backward 2.46 -> 2.10). On a Zen 4
    (1 MB L2), whose memory switches between two speeds, in one process, interleaved, 2
    threads, x copy, overlap / one after the other:

    - backward, lost in both speeds: 32x256x56x56 3.41-3.56 / 2.75-2.80 (fast memory) and
      2.52-2.56 / 2.38-2.41 (slow), 32x64x112x112 2.94-3.04 / 2.60-2.68 (fast);
    - training, won in the slow speed and lost in the fast one, by about as much time:
      32x64x112x112 1.37-1.41 / 1.64-1.67 (slow), 1.96-2.20 / 1.72-1.81 (fast), 32x256x56x56
      2.10-2.22 / 1.68-1.83 (fast). Training keeps the overlap.

    Other processors keep the overlap, as measured first.
    """
    return not (backward and _is_zen4())


def _numba_threading_layer() -> str:
    try:
        import numba
    except ImportError:
        return "numba not installed"
    try:
        active = numba.threading_layer()
    except ValueError:  # no parallel function has run yet
        active = "not started yet"
    return (f"{active} (configured: {numba.config.THREADING_LAYER}, "
            f"priority: {', '.join(numba.config.THREADING_LAYER_PRIORITY)})")


def config() -> dict:
    """The facts `show_config` prints, as a dict."""
    from . import __version__
    from ._backends import available_backends, unavailable_backends
    from ._threads import get_num_threads
    try:
        from . import _kernels
        openmp = "on" if _kernels.OPENMP_ENABLED else "off (the extension was built without it: serial)"
    except ImportError as exc:
        openmp = f"extension not built ({exc})"
    return {
        "fastbn": __version__,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "platform": platform.platform(),
        "backends available": ", ".join(available_backends()),
        "backends unavailable": "; ".join(f"{k}: {v}" for k, v in unavailable_backends().items())
        or "none",
        "default backend": available_backends()[0],
        "openmp": openmp,
        "threads": get_num_threads(),
        "numba threading layer": _numba_threading_layer(),
        "cpu simd": " ".join(_simd_features()),
        "last-level cache": f"{last_level_cache_bytes() >> 10} KB (outputs larger than "
                            f"{stream_above_bytes() >> 10} KB bypass the cache)",
        "channel groups": f"{channel_group_bytes() >> 10} KB of input (channels-first training "
                          f"and backward)",
        "gradient prefetch": "on (channels-first gradient sums read 2 KB ahead, column sums "
                             "8 rows ahead)"
        if gradient_prefetch() else "off (the hardware prefetchers suffice here)",
        "group overlap": ", ".join(
            f"{name} {'on' if overlap_groups(name == 'backward') else 'off'}"
            for name in ("training", "backward"))
        + " (channels-first: a group's sums beside the previous group's output)",
        "4 KB alias guard": "on (streamed outputs that alias an input go through an L1 tile)"
        if streamed_store_alias_stall() else "off (not needed on this processor)",
    }


def show_config() -> None:
    """Print the version, backends, OpenMP status, thread count, Numba threading layer and SIMD.

    Examples
    --------
    >>> import fastbn
    >>> fastbn.show_config()  # doctest: +ELLIPSIS
    fastbn ...
    """
    for key, value in config().items():
        print(f"{key:<22} {value}")
