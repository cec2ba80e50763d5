"""The benchmark instruments in quick mode, so that they cannot rot: the registry's cases give
right results, the report runs end to end (table, JSON, plot, Markdown), the pytest-benchmark
file runs with --benchmark-disable, and the asv suite's functions run (in-process; through asv
itself when it is installed).

Kept to a few tens of seconds on 2 cores: the smallest shapes, short timings.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

import fastbn
from fastbn.bench import _registry as reg
from fastbn.bench import _report

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
SMALL = ["tiny", "bn1d"]  # the quick shapes without the 6 MB one


def test_registry_axes():
    assert set(reg.OPERATIONS) == {"train", "backward", "infer", "affine_relu",
                                   "residual_relu", "moments"}
    assert set(reg.QUICK_SHAPES) <= set(reg.SHAPES)
    for dims in [(32, 64, 112, 112), (32, 256, 56, 56), (64, 2048, 7, 7), (8, 64, 56, 56),
                 (256, 1024)]:
        assert dims in [s.dims for s in reg.SHAPES.values()]
    backends = reg.available_backends()
    assert backends[:len(fastbn.available_backends())] == fastbn.available_backends()
    assert reg.BASELINE in backends
    # NHWC arrays hold the channels last; (N, C) data has a single layout.
    assert reg.LAYOUTS["nhwc"].array_shape((2, 3, 4, 5)) == (2, 4, 5, 3)
    assert not [c for c in reg.cases(shapes=["bn1d"]) if c.layout == "nhwc"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_quick_case_is_right(dtype):
    """Every backend on every operation and layout matches the NumPy reference."""
    for case in reg.cases(shapes=SMALL, dtypes=[dtype]):
        prepared = reg.prepare(case)
        assert prepared.check() >= 0.0
        if prepared.out is not None and case.backend in reg.FASTBN_BACKENDS:
            assert prepared.last[case.operation.outputs[0]] is prepared.out


def test_check_catches_a_wrong_result():
    case = reg.Case("infer", "nchw", "float32", "numpy", "tiny")
    prepared = reg.prepare(case)
    right = prepared.run
    prepared.run = lambda: {"y": right()["y"] + 1e-2}
    with pytest.raises(AssertionError, match="differs from the NumPy reference"):
        prepared.check()


def test_allocating_path_returns_fresh_arrays():
    case = reg.Case("train", "nhwc", "float32", fastbn.available_backends()[0], "tiny")
    prepared = reg.prepare(case, allocate=True)
    assert prepared.out is None
    prepared.check()


def test_report_quick(tmp_path, capsys):
    """`python -m fastbn.bench --quick` through the same code, with a short timing."""
    json_path, md_path = tmp_path / "r.json", tmp_path / "RESULTS.md"
    argv = ["--quick", "--shapes", ",".join(SMALL), "--min-time", "0.002", "--json",
            str(json_path), "--markdown", str(md_path)]
    if importlib.util.find_spec("matplotlib") is not None:
        argv += ["--plot", str(tmp_path / "r.png")]
    results = _report.main(argv)
    out = capsys.readouterr().out
    assert not [r for r in results if r["status"] != "ok"]
    assert {r["op"] for r in results} == set(reg.OPERATIONS)
    for r in results:
        assert r["time"] > 0 and r["gbps"] > 0 and r["copy_time"] > 0
        assert r["copy_method"] in ("numpy", "threads", "torch", "fastbn")
        assert r["vs_naive"] is not None
    assert "x copy" in out and "vs naive" in out and "logical cpus" in out
    saved = json.loads(json_path.read_text())
    assert saved["machine"]["cpu"] and len(saved["results"]) == len(results)
    assert "| operation |" in md_path.read_text()
    if "--plot" in argv:
        assert (tmp_path / "r.png").stat().st_size > 10_000
    # Re-rendering from the JSON needs no run.
    _report.main(["--from-json", str(json_path)])
    assert "vs torch" in capsys.readouterr().out


def test_readme_summary_is_rewritten_from_a_run(tmp_path):
    """--readme replaces only the marked block, with one row per (shape, layout) that ran."""
    json_path = tmp_path / "r.json"
    _report.main(["--shapes", "bn1d,resnet-small", "--ops", "train,infer",
                  "--backends", f"{fastbn.available_backends()[0]},naive", "--layouts", "nchw",
                  "--min-time", "0.002",
                  "--json", str(json_path), "-q"])
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{_report.README_START}\nstale table\n{_report.README_END}\nafter\n")
    _report.main(["--from-json", str(json_path), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith(f"{_report.README_END}\nafter\n")
    assert "stale" not in text and "| bn1d 256x1024 | nchw |" in text
    assert "| resnet-small 8x64x56x56 | nchw |" in text and "x copy" in text
    assert "x naive" in text and text.count("| nchw |") == 2
    # A failed case is marked, not left blank; float64 rows do not overwrite float32 ones.
    saved = json.loads(json_path.read_text())
    failed = dict(saved["results"][0], status="error: boom")
    assert failed["backend"] != "naive" and failed["op"] == "train"
    other = dict(saved["results"][0], dtype="float64", x_copy=99.0)
    table = _report.summary_table([failed, other] + saved["results"][1:])
    assert "failed" in table and "99.0x copy" not in table
    # Errors come before any measurement: a missing file or block, --scaling.
    readme.write_text("no markers\n")
    for argv in (["--readme", str(readme)], ["--readme", str(tmp_path / "missing.md")],
                 ["--scaling", "--readme", str(ROOT / "README.md")]):
        with pytest.raises(SystemExit):
            _report.main(argv + ["--shapes", "bn1d", "--ops", "infer"])
    # The project README carries the block that the command rewrites.
    project = (ROOT / "README.md").read_text()
    assert project.index(_report.README_START) < project.index(_report.README_END)


def test_report_scaling(tmp_path):
    argv = ["--scaling", "--threads", "2", "--shapes", "bn1d", "--ops", "infer",
            "--backends", f"{fastbn.available_backends()[0]},naive", "--min-time", "0.002",
            "-q"]
    if importlib.util.find_spec("matplotlib") is not None:
        argv += ["--plot", str(tmp_path / "s.png")]
    results = _report.main(argv)
    assert sorted({r["threads"] for r in results}) == [1, 2]
    assert all(r["status"] == "ok" for r in results)


def test_copy_yardstick_is_multithreaded_and_right():
    x = np.arange(1_000_003, dtype=np.float32)
    copier = _report.Copier(x, 2)
    try:
        assert "threads" in copier.methods()
        copier.threaded()
        assert np.array_equal(copier.dst, x)
    finally:
        copier.close()


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_pytest_benchmark_file_runs():
    """The pytest-benchmark suite, run once per case (--benchmark-disable): outputs checked."""
    cmd = [sys.executable, "-m", "pytest", str(BENCH / "pytest"), "-q", "-p", "no:cacheprovider",
           "--benchmark-disable", "--fastbn-shapes=tiny", "--fastbn-ops=train,backward,moments",
           "--fastbn-layouts=nchw,nhwc"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout


def _asv_module():
    spec = importlib.util.spec_from_file_location("_fastbn_asv_bn", BENCH / "benchmarks" /
                                                  "bn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_asv_suite_functions_run():
    """Every asv benchmark function on the tiny shape, called as asv calls them."""
    bn = _asv_module()
    assert bn.BatchNorm.param_names == ["operation", "layout", "dtype", "backend", "shape"]
    ran = 0
    for backend in bn.BACKENDS:
        for op in reg.OPERATIONS:
            params = (op, "nchw", "float32", backend, "tiny")
            bench = bn.BatchNorm()
            try:
                bench.setup(*params)
            except NotImplementedError:
                assert backend not in fastbn.available_backends()
                continue
            bench.time_call(*params)
            assert bench.track_gbps(*params) > 0
            assert bench.track_speedup_vs_naive(*params) > 0
            bench.teardown(*params)
            if op in bn.ALLOCATING_OPS:
                alloc = bn.BatchNormAllocating()
                alloc.setup(*params)
                alloc.peakmem_call(*params)
                alloc.time_call(*params)
            ran += 1
    assert ran >= len(reg.OPERATIONS) * 2  # at least the reference backend and naive NumPy


@pytest.mark.skipif(shutil.which("asv") is None and importlib.util.find_spec("asv") is None,
                    reason="asv is not installed (pip install '.[bench]')")
def test_asv_quick_run(tmp_path):
    """`asv run --python=same --quick` on a tiny grid (~10 s): the suite loads and runs in asv."""
    env = _env()
    env.update(FASTBN_ASV_SHAPES="tiny", FASTBN_ASV_DTYPES="float32", FASTBN_ASV_OPS="train",
               FASTBN_ASV_LAYOUTS="nchw",
               FASTBN_ASV_BACKENDS=f"{fastbn.available_backends()[0]},naive")
    env["HOME"] = str(tmp_path)  # asv's machine file goes to $HOME/.asv-machine.json
    asv = [sys.executable, "-m", "asv"]
    subprocess.run(asv + ["machine", "--yes"], cwd=BENCH, env=env, capture_output=True,
                   text=True, timeout=120, check=True)
    proc = subprocess.run(asv + ["run", "--python=same", "--quick", "--dry-run",
                                 "--show-stderr"], cwd=BENCH, env=env, capture_output=True,
                          text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "failed" not in out.lower(), out[-4000:]
    for name in ("time_call", "track_gbps", "track_speedup_vs_naive", "peakmem_call"):
        assert name in out


def test_phases_script_times_every_pass():
    """bench/phases.py: every pass timed, as a multiple of the copy, in both views."""
    if "cython" not in fastbn.available_backends():
        pytest.skip("the Cython extension is not built")
    spec = importlib.util.spec_from_file_location("phases", BENCH / "phases.py")
    phases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(phases)
    assert phases.view((4, 8, 5, 5), "nchw") == (4, 8, 25)
    assert phases.view((4, 8, 5, 5), "nhwc") == (100, 8, 1)
    for layout in ("nchw", "nhwc"):
        r = phases.phases((4, 8, 5, 5), layout, 1, 0.001)
        assert r["copy"] == 1.0
        for name in ("moments", "normalize", "2 reads + write", "train", "backward"):
            assert 0 < r[name] < np.inf
