"""asv benchmarks for fastbn, built from the shared registry (fastbn/bench/_registry.py).

Parameters: operation x layout x dtype x backend x shape. The grid is the same on every
commit and machine (asv compares results by parameter); combinations that do not apply (a
backend not built here, NHWC for (N, C) data) are skipped by raising NotImplementedError in
setup, which asv reports as n/a.

Environment variables (read when asv imports the suite):

FASTBN_ASV_SHAPES
    ``quick`` for the registry's small shapes, or a comma-separated list of shape names
    (default: all shapes).
FASTBN_ASV_DTYPES, FASTBN_ASV_OPS, FASTBN_ASV_LAYOUTS, FASTBN_ASV_BACKENDS
    comma-separated subsets of the other axes (default: all; backends: cython, numba, numpy
    and naive). Use them for smoke runs only: asv compares results by parameter grid.
"""
import importlib.util
import os
import pathlib
import sys


def _load_registry():
    """The registry from this working tree (so that old commits, which may not have it, are
    benchmarked with today's cases), else the installed one."""
    path = pathlib.Path(__file__).resolve().parents[2] / "fastbn" / "bench" / "_registry.py"
    if path.exists():
        spec = importlib.util.spec_from_file_location("_fastbn_bench_registry", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module
    from fastbn.bench import _registry
    return _registry


reg = _load_registry()



def _env_list(name, default):
    value = os.environ.get(name, "").strip()
    return [v.strip() for v in value.split(",") if v.strip()] if value else list(default)


_shapes = _env_list("FASTBN_ASV_SHAPES", reg.SHAPES)
SHAPES = reg.QUICK_SHAPES if _shapes == ["quick"] else _shapes
DTYPES = _env_list("FASTBN_ASV_DTYPES", reg.DTYPES)
OPS = _env_list("FASTBN_ASV_OPS", reg.OPERATIONS)
LAYOUTS = _env_list("FASTBN_ASV_LAYOUTS", reg.LAYOUTS)
# A fixed list (unavailable ones are n/a) so that results stay comparable across commits.
BACKENDS = _env_list("FASTBN_ASV_BACKENDS", list(reg.FASTBN_BACKENDS) + [reg.BASELINE])
ALLOCATING_OPS = [op for op in OPS if op != "moments"]


def _case(op, layout, dtype, backend, shape):
    """The registry case, or NotImplementedError (asv: skipped) when it does not apply."""
    reason = reg.valid(op, layout, dtype, backend, shape)
    if reason is None and backend in reg.FASTBN_BACKENDS and \
            backend not in reg.fastbn.available_backends():
        reason = f"fastbn backend {backend} is not available"
    if reason:
        raise NotImplementedError(reason)
    return reg.Case(op, layout, dtype, backend, shape)


class BatchNorm:
    """time_*, track_* with a preallocated out= (where the backend has one)."""
    params = [OPS, LAYOUTS, DTYPES, BACKENDS, SHAPES]
    param_names = ["operation", "layout", "dtype", "backend", "shape"]
    timeout = 600
    # Memory-bound kernels on big arrays: a few samples are enough and keep runs short.
    number = 1
    repeat = (1, 10, 10.0)
    rounds = 1
    warmup_time = 0.05

    def setup(self, op, layout, dtype, backend, shape):
        self.case = _case(op, layout, dtype, backend, shape)
        self.prepared = reg.prepare(self.case)
        self.prepared.check()  # the output is right (and Numba has compiled)

    def teardown(self, *params):
        self.prepared = None

    def time_call(self, *params):
        self.prepared()

    def track_gbps(self, *params):
        """Minimum memory traffic of the operation / best time."""
        best = reg.measure(self.prepared, min_time=0.1)["best"]
        return self.case.bytes_moved / best / 1e9
    track_gbps.unit = "GB/s"

    def track_speedup_vs_naive(self, op, layout, dtype, backend, shape):
        """Time of naive NumPy / time of this backend, both measured here."""
        naive = reg.prepare(reg.Case(op, layout, dtype, reg.BASELINE, shape))
        naive()
        t_naive = reg.measure(naive, min_time=0.1)["best"]
        t_self = reg.measure(self.prepared, min_time=0.1)["best"]
        return t_naive / t_self
    track_speedup_vs_naive.unit = "x naive NumPy"


class BatchNormAllocating:
    """peakmem_* of the allocating paths (no out=): the peak resident memory of the process,
    which includes the inputs that setup created."""
    params = [ALLOCATING_OPS, LAYOUTS, DTYPES, BACKENDS, SHAPES]
    param_names = ["operation", "layout", "dtype", "backend", "shape"]
    timeout = 600

    def setup(self, op, layout, dtype, backend, shape):
        self.case = _case(op, layout, dtype, backend, shape)
        self.prepared = reg.prepare(self.case, allocate=True)

    def peakmem_call(self, *params):
        self.prepared()

    def time_call(self, *params):
        """The allocating call's time (a fresh output costs page faults)."""
        self.prepared()
    time_call.number = 1
    time_call.repeat = (1, 5, 10.0)
    time_call.rounds = 1
