"""pytest-benchmark runs of the shared registry (fastbn/bench/_registry.py).

Not collected by the ordinary ``python -m pytest`` (testpaths is ``tests``). Run with::

    python -m pytest bench/pytest                               # all shapes, float32
    python -m pytest bench/pytest --fastbn-quick                # the quick shapes
    python -m pytest bench/pytest --benchmark-autosave          # save a run in .benchmarks/
    python -m pytest bench/pytest --benchmark-compare --benchmark-compare-fail=min:10%
    python -m pytest bench/pytest --fastbn-quick --benchmark-disable   # run once, check only
"""
import pytest

from fastbn.bench import _registry as reg


def pytest_addoption(parser):
    group = parser.getgroup("fastbn", "fastbn benchmark cases (from fastbn.bench._registry)")
    group.addoption("--fastbn-quick", action="store_true", help="the registry's quick shapes")
    for axis, default in (("ops", "all"), ("shapes", "all (quick: the quick ones)"),
                          ("layouts", "nchw,nhwc"), ("dtypes", "float32"),
                          ("backends", "fastbn's available backends and naive")):
        group.addoption(f"--fastbn-{axis}", default=None,
                        help=f"comma-separated {axis} (default: {default})")


def _split(value):
    return [v for v in value.split(",") if v] if value else None


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    opt = metafunc.config.getoption
    backends = _split(opt("--fastbn-backends")) or (
        [b for b in reg.available_backends() if b in reg.FASTBN_BACKENDS] + [reg.BASELINE])
    selected = reg.cases(ops=_split(opt("--fastbn-ops")), shapes=_split(opt("--fastbn-shapes")),
                         layouts=_split(opt("--fastbn-layouts")),
                         dtypes=_split(opt("--fastbn-dtypes")) or ["float32"],
                         backends=backends, quick=opt("--fastbn-quick"))
    metafunc.parametrize("case", selected, ids=[str(c) for c in selected])


@pytest.fixture(autouse=True)
def _threads():
    """Benchmarks use fastbn's default thread count; restore any override afterwards."""
    yield
    reg.fastbn.set_num_threads(None)
