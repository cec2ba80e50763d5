"""The comparison report: ``python -m fastbn.bench``.

Runs the registry's cases on this machine and prints, per case: the time, the throughput in GB/s
(the operation's minimum memory traffic divided by the time), the time as a multiple of a
multithreaded copy of the same tensor measured in the same run (the memory roofline: 1.0 means
as fast as a copy), the speedup over naive NumPy and the speedup over PyTorch at the same thread
count (and ONNX Runtime / JAX when installed: they are rows of the table, so their ratios read
off the same columns).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import threadpoolctl

import fastbn
from fastbn._config import last_level_cache_bytes

from . import _registry as reg
from ._registry import measure, measure_interleaved

# ----------------------------------------------------------------------------- the machine


def _cpuinfo() -> dict:
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu cores", "cache size", "flags") and key not in info:
                    info[key] = value.strip()
    except OSError:
        pass
    return info


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    root = Path(fastbn.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--",
                                "fastbn"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode:
        return None
    return out.stdout.strip() + (" (+ uncommitted changes)" if dirty.stdout.strip() else "")


def machine() -> dict:
    """CPU, cores, memory, platform, library versions and the date."""
    cpu = _cpuinfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    flags = cpu.get("flags", "").split()
    simd = [f for f in ("avx2", "avx512f", "avx512bw", "avx512vl") if f in flags]
    mem = _memory_gb()
    return {
        "cpu": cpu.get("model name", platform.processor() or platform.machine()),
        "logical cpus": os.cpu_count(),
        "usable cpus": usable,
        "cores per socket": cpu.get("cpu cores"),
        "cache": cpu.get("cache size"),
        "last-level cache": f"{last_level_cache_bytes() >> 10} KB",
        "simd": " ".join(simd),
        "memory": f"{mem:.0f} GB" if mem else None,
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "fastbn commit": _git_commit(),
        "fastbn backends": ", ".join(fastbn.available_backends()),
        **{f"version {k}": v for k, v in reg.library_versions().items()},
    }


# ----------------------------------------------------------------------------- timing

class Copier:
    """Copies of `src` into a preallocated `dst` with `threads` threads, three ways:

    - ``threads``: the flat array split into one chunk per thread, each chunk copied by
      ``np.copyto`` in a ``ThreadPoolExecutor`` (``np.copyto`` releases the GIL);
    - ``torch``: ``torch.Tensor.copy_`` on zero-copy views (PyTorch's own thread pool), when
      PyTorch is installed;
    - ``fastbn``: ``fastbn._kernels.parallel_copy`` (OpenMP, non-temporal stores for large
      arrays, as memcpy and the kernels use), when the Cython extension has it;
    - ``numpy``: a single-threaded ``np.copyto`` (the fastest for small, in-cache arrays,
      where starting threads costs more than the copy).

    The roofline is the fastest of them, measured in the same run as the cases.
    """

    def __init__(self, src: np.ndarray, threads: int):
        self.src = src.reshape(-1)
        self.dst = reg.empty_beside(self.src)  # (not wherever the heap puts it)
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None
        bounds = np.linspace(0, self.src.size, threads + 1).astype(int)
        self.chunks = [(self.dst[a:b], self.src[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    def numpy(self):
        np.copyto(self.dst, self.src)

    def threaded(self):
        if self.pool is None:
            return self.numpy()
        for f in [self.pool.submit(np.copyto, d, s) for d, s in self.chunks]:
            f.result()

    def methods(self) -> dict:
        found = {"numpy": self.numpy}
        if self.threads > 1:
            found["threads"] = self.threaded
        kernels = _fastbn_kernels()
        if kernels is not None and hasattr(kernels, "parallel_copy"):
            found["fastbn"] = lambda: kernels.parallel_copy(self.src, self.dst, self.threads)
        if reg._installed("torch"):
            import torch
            d, s = torch.from_numpy(self.dst), torch.from_numpy(self.src)
            found["torch"] = lambda: d.copy_(s)
        return found

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()


def _fastbn_kernels():
    try:
        from fastbn import _kernels
    except ImportError:
        return None
    return _kernels


def fastest_copy(copier: Copier, min_time: float) -> tuple[str, object, dict]:
    """The fastest of the copier's methods: (name, function, all timings)."""
    timings = {}
    methods = copier.methods()
    for name, fn in methods.items():
        fn()
        timings[name] = measure(fn, min_time / 2)["best"]
    if not np.array_equal(copier.dst, copier.src):
        raise AssertionError("the copy yardstick copied wrongly")
    method = min(timings, key=timings.get)
    return method, methods[method], timings


# ----------------------------------------------------------------------------- running

def _progress(stream, i, total, text, end="\n"):
    if stream is not None:
        print(f"[{i:>{len(str(total))}}/{total}] {text}", file=stream, end=end, flush=True)


def run_cases(cases, threads: int, min_time: float = 0.2, progress=sys.stderr,
              check: bool = True) -> list[dict]:
    """Time every case (after checking its result). Returns one dict per case.

    The cases of one operation on one tensor (every backend) are timed together with their
    yardstick, the fastest way to copy a tensor of that size, their calls interleaved round by
    round (see measure_interleaved): the x copy, vs naive and vs torch ratios compare times
    taken on the same state of the machine. A tensor that fits in the cache is timed from the
    cache all the same: each timed batch follows an untimed call of its function.

    BLAS is limited to one thread meanwhile: no case calls it, but an OpenBLAS pool that an
    earlier call woke spins on the cores the kernels need (2-7% of the profile samples).
    """
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        return _run_cases(cases, threads, min_time, progress, check)


def _run_cases(cases, threads, min_time, progress, check) -> list[dict]:
    reg.set_threads(threads)
    results: list[dict] = []
    copier = copy_method = copy_fn = None
    i = 0
    while i < len(cases):
        first = cases[i]
        key = (first.shape, first.layout, first.dtype)
        j = i
        while j < len(cases) and (cases[j].op,) + (cases[j].shape, cases[j].layout,
                                                    cases[j].dtype) == (first.op,) + key:
            j += 1
        if copier is None:
            copier = Copier(np.ones(first.nbytes, dtype=np.uint8), threads)
            copy_method, copy_fn, _ = fastest_copy(copier, min_time / 2)
        rows, timed = [], []  # timed: (row, prepared, time of its check call)
        for n, case in enumerate(cases[i:j], i + 1):
            row = {"op": case.op, "shape": case.shape, "dims": list(case.shape_info.dims),
                   "layout": case.layout, "dtype": case.dtype, "backend": case.backend,
                   "threads": threads, "bytes": case.bytes_moved, "nbytes": case.nbytes}
            rows.append(row)
            _progress(progress, n, len(cases),
                      f"{case.op:<13} {case.shape:<17} {case.layout} {case.dtype} "
                      f"{reg.backend_label(case.backend):<15}")
            try:
                prepared = reg.prepare(case)
                row["out"] = prepared.out is not None
                prepared()  # warm up (compiles Numba, JAX)
                if check:
                    reg.reference(case)  # computed once per group, outside the time estimate
                start = time.perf_counter()
                if check:
                    # Other libraries' accuracy is reported, fastbn's is required.
                    row["error"] = prepared.check(strict=case.backend in reg.FASTBN_BACKENDS)
                    row["tolerance"] = prepared.tolerance()
                else:
                    prepared()
                    row["error"] = None
                timed.append((row, prepared, time.perf_counter() - start))
            except Exception as exc:  # noqa: BLE001 -- one failing case must not stop the report
                row.update(status=f"{type(exc).__name__}: {exc}")
                if progress is not None:
                    print(f"    FAILED {row['status'][:200]}", file=progress, flush=True)
        # Every backend and the copy interleaved, round by round: the bandwidth drifts, and a
        # tensor in the cache is timed from the cache all the same (each batch follows an
        # untimed call of its function).
        stats = measure_interleaved([p for _, p, _ in timed] + [copy_fn], min_time,
                                    firsts=[t for _, _, t in timed] + [None])
        pairs = [(t, stats[-1]) for t in stats[:-1]]
        for (row, _, _), (t, c) in zip(timed, pairs):
            row.update(time=t["best"], median=t["median"], samples=t["samples"] * t["number"],
                       gbps=row["bytes"] / t["best"] / 1e9, status="ok",
                       copy_time=c["best"], copy_method=copy_method,
                       copy_gbps=2 * row["nbytes"] / c["best"] / 1e9, x_copy=t["best"] / c["best"])
        del timed
        results.extend(rows)
        i = j
        if i == len(cases) or (cases[i].shape, cases[i].layout, cases[i].dtype) != key:
            copier.close()
            copier = None
            gc.collect()
    _add_ratios(results)
    return results


def _add_ratios(results: list[dict]) -> None:
    groups: dict = {}
    for row in results:
        if row["status"] == "ok":
            groups.setdefault((row["op"], row["shape"], row["layout"], row["dtype"],
                               row["threads"]), {})[row["backend"]] = row["time"]
    for row in results:
        if row["status"] != "ok":
            continue
        times = groups[(row["op"], row["shape"], row["layout"], row["dtype"], row["threads"])]
        row["vs_naive"] = times[reg.BASELINE] / row["time"] if reg.BASELINE in times else None
        row["vs_torch"] = times["torch"] / row["time"] if "torch" in times else None


# ----------------------------------------------------------------------------- tables

COLUMNS = ("operation", "shape", "layout", "dtype", "backend", "time", "GB/s", "x copy",
           "vs naive", "vs torch", "check")


def _fmt_time(t):
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.2f} ms"
    return f"{t * 1e6:.1f} us"


def _fmt(v, spec="{:.2f}"):
    return "" if v is None else spec.format(v)


def table_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        base = [r["op"], f"{r['shape']} ({'x'.join(map(str, r['dims']))})", r["layout"],
                r["dtype"], reg.backend_label(r["backend"]) + ("" if r.get("out", True) else "*")]
        if r["status"] != "ok":
            rows.append(base + ["failed", "", "", "", "", r["status"][:40]])
            continue
        if r.get("error") is None:
            check = "not checked"
        elif r["error"] <= r.get("tolerance", np.inf):
            check = "ok"
        else:
            check = f"off by {r['error']:.1e}"
        rows.append(base + [_fmt_time(r["time"]), f"{r['gbps']:.1f}", f"{r['x_copy']:.2f}",
                            _fmt(r["vs_naive"]), _fmt(r["vs_torch"]), check])
    return rows


def text_table(results: list[dict]) -> str:
    rows = table_rows(results)
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
              for i, c in enumerate(COLUMNS)]
    right = {5, 6, 7, 8, 9}
    line = lambda cells: "  ".join(  # noqa: E731
        c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(COLUMNS), line(["-" * w for w in widths])]
    previous = None
    for r, cells in zip(results, rows):
        group = (r["op"], r["shape"], r["layout"], r["dtype"])
        if previous is not None and group[:2] != previous[:2]:
            out.append("")
        previous = group
        out.append(line(cells))
    return "\n".join(out)


def markdown_table(results: list[dict]) -> str:
    rows = table_rows(results)
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(out)


def copy_table(results: list[dict], markdown=False) -> str:
    seen = {}
    for r in results:
        key = (r["shape"], r["layout"], r["dtype"], r["threads"])
        if "copy_time" in r and (key not in seen or r["copy_time"] < seen[key]["copy_time"]):
            seen[key] = r
    lines = []
    head = ("shape", "layout", "dtype", "threads", "copy time", "copy GB/s", "method")
    for (shape, layout, dtype, threads), r in seen.items():
        lines.append((f"{shape} ({'x'.join(map(str, r['dims']))})", layout, dtype, str(threads),
                      _fmt_time(r["copy_time"]), f"{r['copy_gbps']:.1f}", r["copy_method"]))
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(l) + " |" for l in lines])
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h)
              for i, h in enumerate(head)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths))
                     for row in [head, tuple("-" * w for w in widths), *lines])


SUMMARY_OPS = {"train": "training forward", "backward": "backward", "infer": "inference",
               "residual_relu": "fused residual + ReLU"}
SUMMARY_SHAPES = ("resnet50-conv1", "resnet50-layer1", "resnet50-layer4", "resnet-small", "bn1d")
README_START = "<!-- bench summary: generated by python -m fastbn.bench --readme -->"
README_END = "<!-- end of bench summary -->"


def summary_backend(results: list[dict]) -> str | None:
    """The backend the summary shows: the first fastbn backend of the run, Cython first."""
    ran = {r["backend"] for r in results}
    return next((b for b in reg.FASTBN_BACKENDS if b in ran), None)


def _summary_cell(r: dict | None) -> str:
    if r is None:
        return ""
    if r["status"] != "ok":
        return "failed"
    ratios = [f"{r['x_copy']:.1f}x copy"]
    if r.get("vs_torch") is not None:
        ratios.append(f"{r['vs_torch']:.1f}x torch")
    if r.get("vs_naive") is not None:
        ratios.append(f"{r['vs_naive']:.0f}x naive")
    return ", ".join(ratios)


def summary_table(results: list[dict], backend: str | None = None) -> str:
    """One backend's float32 ratios (x copy, vs torch, vs naive) per shape, layout and
    operation; a failed case says so."""
    backend = backend or summary_backend(results)
    found = {(r["shape"], r["layout"], r["op"]): r for r in results
             if r["backend"] == backend and r["dtype"] == "float32"}
    lines = ["| shape | layout | " + " | ".join(SUMMARY_OPS.values()) + " |",
             "|---|---|" + "---|" * len(SUMMARY_OPS)]
    for shape in SUMMARY_SHAPES:
        for layout in reg.LAYOUTS:
            row = [found.get((shape, layout, op)) for op in SUMMARY_OPS]
            if any(row):
                dims = "x".join(map(str, next(r for r in row if r)["dims"]))
                lines.append(f"| {shape} {dims} | {layout} | "
                             + " | ".join(map(_summary_cell, row)) + " |")
    return "\n".join(lines)


def summary_heading(info: dict, results: list[dict]) -> str:
    """The machine, versions and settings of the run, for the line above the table."""
    threads = max((r["threads"] for r in results), default=1)
    versions = ", ".join(f"{k.split()[1]} {v}" for k, v in info.items()
                         if k.startswith("version ") and k != "version fastbn" and v)
    return (f"Latest run of fastbn[{summary_backend(results)}]: {info['cpu']} "
            f"({info.get('simd', '')}), {info['usable cpus']} cpus, "
            f"{info['last-level cache']} last-level cache, {info.get('memory', '?')}; "
            f"{threads} threads, float32, `out=` preallocated; fastbn {info['version fastbn']} "
            f"(commit {info.get('fastbn commit', '?')}), {versions}; {info['date']}.")


def _readme_block(path) -> tuple[str, int, int]:
    """The text of `path` and where its summary block starts and ends; SystemExit if the file
    or its markers are missing (checked before a run, so that no measurement is lost)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SystemExit(f"--readme {path}: {exc.strerror}") from None
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise SystemExit(f"--readme {path}: no '{README_START}' ... '{README_END}' block to "
                         "replace")
    return text, start, end


def update_readme(path, info: dict, results: list[dict]) -> None:
    """Replace the text between README_START and README_END with the summary table."""
    text, start, end = _readme_block(path)
    if summary_backend(results) is None:
        raise SystemExit(f"--readme {path}: no fastbn backend in these results")
    block = "\n".join([README_START, summary_heading(info, results), "",
                       summary_table(results), ""])
    Path(path).write_text(text[:start] + block + text[end:])


LEGEND = (
    "time: best of repeated calls. GB/s: the operation's minimum memory traffic (train, infer,\n"
    "affine_relu: read x + write y; residual_relu, backward: 2 reads + 1 write; moments: read x)\n"
    "divided by the time. x copy: time / time of a copy of the same tensor into a preallocated\n"
    "buffer with the same thread count (the memory roofline; fastest of a ThreadPoolExecutor\n"
    "of np.copyto chunks, torch copy_, fastbn's OpenMP parallel_copy and single-threaded\n"
    "np.copyto), timed with the calls of every backend of the operation interleaved. The\n"
    "roofline table: the fastest copy of each tensor.\n"
    "vs naive / vs torch: that backend's time / this row's time (> 1: this row is faster).\n"
    "*: allocates its result (no out=). check: the result matched fastbn's NumPy reference\n"
    "(max error / max(1, |reference|) <= 1e-4 for float32, 1e-9 for float64; 'off by' shows a\n"
    "larger error of another library, which fastbn's backends are not allowed).")


def machine_text(info: dict) -> str:
    return "\n".join(f"{k:<18} {v}" for k, v in info.items() if v is not None)


# ----------------------------------------------------------------------------- plots

_COLORS = {"cython": "tab:blue", "numba": "tab:cyan", "numpy": "tab:gray", "naive": "tab:red",
           "torch": "tab:orange", "onnxruntime": "tab:green", "jax": "tab:purple"}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_results(results: list[dict], path, title: str = "") -> None:
    """Throughput bars per case against the copy roofline, one panel per operation."""
    plt = _pyplot()
    ok = [r for r in results if r["status"] == "ok"]
    ops = [op for op in reg.OPERATIONS if any(r["op"] == op for r in ok)]
    backends = [b for b in reg.ALL_BACKENDS if any(r["backend"] == b for r in ok)]
    fig, axes = plt.subplots(len(ops), 1, figsize=(13, 3.6 * len(ops) + 0.8), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        rows = [r for r in ok if r["op"] == op]
        groups = list(dict.fromkeys((r["shape"], r["layout"], r["dtype"]) for r in rows))
        width = 0.8 / max(1, len(backends))
        labelled = set()
        for g, group in enumerate(groups):
            in_group = {r["backend"]: r for r in rows
                        if (r["shape"], r["layout"], r["dtype"]) == group}
            any_row = next(iter(in_group.values()))
            roof = any_row["copy_gbps"]
            ax.hlines(roof, g - 0.45, g + 0.45, colors="black", linestyles="--", linewidth=1.2,
                      label="copy (roofline)" if g == 0 else None)
            for b, backend in enumerate(backends):
                if backend in in_group:
                    ax.bar(g - 0.4 + width * (b + 0.5), in_group[backend]["gbps"], width,
                           color=_COLORS.get(backend),
                           label=None if backend in labelled else reg.backend_label(backend))
                    labelled.add(backend)
        ax.set_xticks(range(len(groups)))
        multi_dtype = len({g[2] for g in groups}) > 1
        ax.set_xticklabels([f"{s} {l}" + (f" {d}" if multi_dtype else "") for s, l, d in groups],
                           fontsize=7, rotation=30, ha="right")
        ax.set_ylabel("GB/s")
        ax.set_title(f"{op}: {reg.OPERATIONS[op].title}", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(results: list[dict], path, title: str = "") -> None:
    """GB/s against the thread count, one panel per operation, the copy as a dashed line."""
    plt = _pyplot()
    ok = [r for r in results if r["status"] == "ok"]
    ops = [op for op in reg.OPERATIONS if any(r["op"] == op for r in ok)]
    fig, axes = plt.subplots(1, len(ops), figsize=(4.2 * len(ops), 3.8), squeeze=False)
    for ax, op in zip(axes[0], ops):
        rows = [r for r in ok if r["op"] == op]
        series = dict.fromkeys((r["backend"], r["shape"], r["layout"], r["dtype"]) for r in rows)
        copies = {}
        for key in series:
            pts = sorted((r["threads"], r["gbps"]) for r in rows
                         if (r["backend"], r["shape"], r["layout"], r["dtype"]) == key)
            ax.plot(*zip(*pts), marker="o", color=_COLORS.get(key[0]),
                    linestyle="-" if key[2] == "nchw" else ":",
                    label=f"{reg.backend_label(key[0])} {key[2]}")
            for r in rows:
                if (r["backend"], r["shape"], r["layout"], r["dtype"]) == key:
                    copies.setdefault((key[1], key[2], key[3]), {})[r["threads"]] = r["copy_gbps"]
        for i, (k, pts) in enumerate(copies.items()):
            ax.plot(sorted(pts), [pts[t] for t in sorted(pts)], "k--", linewidth=1,
                    label="copy (roofline)" if i == 0 else None)
        ax.set_xlabel("threads")
        ax.set_ylabel("GB/s")
        ax.set_title(op, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scaling_table(results: list[dict]) -> str:
    threads = sorted({r["threads"] for r in results})
    keys = list(dict.fromkeys((r["op"], r["shape"], r["layout"], r["dtype"], r["backend"])
                              for r in results))
    head = ["operation", "shape", "layout", "dtype", "backend"] + [f"{t} thr GB/s" for t in threads]
    lines = []
    for key in keys:
        cells = [key[0], key[1], key[2], key[3], reg.backend_label(key[4])]
        for t in threads:
            r = next((r for r in results if r["threads"] == t and
                      (r["op"], r["shape"], r["layout"], r["dtype"], r["backend"]) == key), None)
            cells.append(f"{r['gbps']:.1f}" if r and r["status"] == "ok" else "-")
        lines.append(cells)
    for key in dict.fromkeys((r["shape"], r["layout"], r["dtype"]) for r in results):
        cells = ["copy", key[0], key[1], key[2], "roofline"]
        for t in threads:
            r = next((r for r in results if r["threads"] == t and "copy_gbps" in r and
                      (r["shape"], r["layout"], r["dtype"]) == key), None)
            cells.append(f"{r['copy_gbps']:.1f}" if r else "-")
        lines.append(cells)
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths))
                     for row in [head, ["-" * w for w in widths], *lines])


# ----------------------------------------------------------------------------- command line

def _split(value):
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastbn.bench",
        description="Benchmark fastbn against naive NumPy, PyTorch (and ONNX Runtime, JAX when "
                    "installed) and against a multithreaded copy of the same tensor.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="operations: " + ", ".join(reg.OPERATIONS) + "\nshapes: " + ", ".join(
            f"{n} {s}" for n, s in reg.SHAPES.items()) + "\nquick shapes: "
        + ", ".join(reg.QUICK_SHAPES) + "\nbackends: " + ", ".join(reg.ALL_BACKENDS))
    p.add_argument("--quick", action="store_true", help="small shapes only, shorter timing")
    p.add_argument("--ops", help="comma-separated operations (default: all)")
    p.add_argument("--shapes", help="comma-separated shape names (default: all, or the quick "
                                    "ones with --quick)")
    p.add_argument("--layouts", help="comma-separated: nchw,nhwc (default: both)")
    p.add_argument("--dtypes", default="float32", help="comma-separated (default: float32)")
    p.add_argument("--backends", help="comma-separated (default: every one available here: "
                                      + ", ".join(reg.available_backends()) + ")")
    p.add_argument("--threads", type=int, default=None,
                   help="thread count for fastbn, PyTorch and the copy (default: fastbn's, "
                        f"now {fastbn.get_num_threads()}); with --scaling, the largest count")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds of timing per case (default 0.2, 0.05 with --quick)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the comparison with the NumPy reference")
    p.add_argument("--json", metavar="FILE", help="write machine info and results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write a bar chart, one panel per operation")
    p.add_argument("--markdown", metavar="FILE.md",
                   help="write machine, table and plot link as Markdown (as bench/RESULTS.md)")
    p.add_argument("--scaling", action="store_true",
                   help="thread scaling: run with 1..--threads threads (shapes default to one "
                        "representative shape); --plot then draws GB/s against threads")
    p.add_argument("--from-json", metavar="FILE",
                   help="do not run: print/plot/write the results of an earlier --json FILE")
    p.add_argument("--readme", metavar="FILE.md",
                   help="replace the summary table (float32 ratios of the first fastbn backend "
                        "run, Cython first) between the bench-summary markers of FILE.md, as "
                        "in the README")
    p.add_argument("--note", action="append", default=[],
                   help="a remark printed under the machine in the Markdown (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return p


def main(argv=None) -> list[dict]:
    p = parser()
    args = p.parse_args(argv)
    if args.readme:
        if args.scaling:
            p.error("--readme takes a comparison run, not --scaling")
        _readme_block(args.readme)
    threads = args.threads or fastbn.get_num_threads()
    min_time = args.min_time if args.min_time is not None else (0.05 if args.quick else 0.2)
    shapes = _split(args.shapes)
    if args.scaling and not shapes:
        shapes = ["resnet-small"] if args.quick else ["resnet50-layer1"]
    selected = reg.cases(ops=_split(args.ops), shapes=shapes, layouts=_split(args.layouts),
                         dtypes=_split(args.dtypes), backends=_split(args.backends),
                         quick=args.quick)
    if not selected and not args.from_json:
        raise SystemExit("no case matches the options")
    counts = list(range(1, threads + 1)) if args.scaling else [threads]
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        info, results, counts = saved["machine"], saved["results"], saved["threads"]
        threads, argv = counts[-1], saved.get("argv", argv)
        print("fastbn benchmark report (from " + args.from_json + ")\n" + machine_text(info)
              + "\n", flush=True)
    else:
        info = machine()
        progress = None if args.quiet else sys.stderr
        print("fastbn benchmark report\n" + machine_text(info) + "\n", flush=True)
        results = []
        for n in counts:
            print(f"{len(selected)} cases, {n} thread(s), {min_time:g} s each", file=sys.stderr,
                  flush=True)
            results += run_cases(selected, n, min_time, progress, check=not args.no_check)
    title = (f"fastbn {info['version fastbn']} on {info['cpu']} ({info['usable cpus']} cpus), "
             f"{info['date']}")
    if args.scaling:
        print("\nThroughput (GB/s) by thread count\n" + scaling_table(results))
    else:
        print(f"\n{threads} thread(s)\n" + text_table(results) + "\n\n" + LEGEND)
        print("\nRoofline (copy of the same tensor)\n" + copy_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": info, "threads": counts, "argv": argv if argv is not None else
             sys.argv[1:], "results": results}, indent=1, default=str))
    if args.plot:
        (plot_scaling if args.scaling else plot_results)(results, args.plot, title)
        print(f"\nplot written to {args.plot}")
    if args.markdown:
        write_markdown(args.markdown, info, results, args, argv, threads)
        print(f"markdown written to {args.markdown}")
    if args.readme:
        update_readme(args.readme, info, results)
        print(f"summary table written to {args.readme}")
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        print(f"\n{len(failed)} case(s) failed:", file=sys.stderr)
        for r in failed:
            print(f"  {r['op']} {r['shape']} {r['layout']} {r['dtype']} {r['backend']}: "
                  f"{r['status']}", file=sys.stderr)
    return results


def write_markdown(path, info, results, args, argv, threads) -> None:
    command = "python -m fastbn.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# fastbn benchmark results", "",
             f"Generated by `{command.strip()}` on {info['date']}.", "",
             "## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info.items() if v is not None]
    for note in args.note:
        lines += ["", f"Note: {note}"]
    if args.plot:
        rel = os.path.relpath(args.plot, os.path.dirname(os.path.abspath(path)))
        lines += ["", f"![throughput per case against the copy roofline]({rel})"]
    if args.scaling:
        lines += ["", "## Thread scaling (GB/s)", "", "```", scaling_table(results), "```"]
    else:
        lines += ["", f"## Summary: fastbn[{summary_backend(results)}]", "",
                  summary_table(results)]
        lines += ["", f"## Results ({threads} threads)", "", markdown_table(results), "",
                  LEGEND.replace("\n", " ")]
        lines += [f"Re-measured {r['remeasured']}: {r['op']} {r['shape']} {r['layout']} "
                  f"{r['dtype']} {r['backend']}." for r in results if r.get("remeasured")]
        lines += ["", "## Roofline: copy of the same tensor", "",
                  copy_table(results, markdown=True)]
    Path(path).write_text("\n".join(lines) + "\n")
