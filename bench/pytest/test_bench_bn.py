"""Batch-norm benchmarks, one per registry case, grouped by operation, shape, layout and dtype
(so that backends are compared within a group and a saved run is compared case by case)."""
import pytest

from fastbn.bench import _registry as reg

pytestmark = pytest.mark.benchmark(min_rounds=3, max_time=0.5, warmup=False)


def test_batch_norm(benchmark, case):
    prepared = reg.prepare(case)
    prepared.check()  # right result, and warmed up (Numba compiled)
    dims = "x".join(map(str, case.shape_info.dims))
    benchmark.group = f"{case.op} | {case.shape} ({dims}) | {case.layout} {case.dtype}"
    benchmark.name = reg.backend_label(case.backend)
    benchmark.extra_info.update(bytes_moved=case.bytes_moved, op=case.op, shape=case.shape,
                                layout=case.layout, dtype=case.dtype, backend=case.backend,
                                threads=reg.fastbn.get_num_threads())
    benchmark(prepared)
    prepared.check()  # still right after the timed calls
