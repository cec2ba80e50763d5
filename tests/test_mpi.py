"""fastbn.mpi: synchronized batch norm, run in real MPI jobs (``mpiexec -n 2`` and ``-n 3``).

The checks themselves are in ``mpi_scripts/check_sync_bn.py`` (each rank compares forward,
backward, parameter gradients and running statistics with a single-process layer fed the
concatenated batch, with uneven batch sizes and, with 3 ranks, an empty rank). The tests skip
when mpi4py or ``mpiexec`` is missing. mpi4py is never imported in the pytest process itself
(MPI initialization and fork-based tests do not mix).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastbn

SCRIPT = Path(__file__).parent / "mpi_scripts" / "check_sync_bn.py"


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"      # the mpich wheel's, in a venv
    if beside.exists():
        return str(beside)
    return shutil.which("mpiexec")


MPIEXEC = _mpiexec()
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="mpi4py not installed"),
    pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found"),
]


def _run(nprocs: int, *args: str, timeout: float = 120,
         results: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(Path(fastbn.__file__).parent.parent)] + sys.path))
    if results is not None:
        env["FASTBN_MPI_RESULTS"] = str(results)
    return subprocess.run([MPIEXEC, "-n", str(nprocs), sys.executable, *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("nprocs, backend", [(2, "default"), (3, "default"), (3, "numpy"),
                                             (1, "default")])
def test_sync_batch_norm_equals_single_process(nprocs, backend, tmp_path):
    if backend not in ("default", *fastbn.available_backends()):
        pytest.skip(f"backend {backend} not available")
    proc = _run(nprocs, str(SCRIPT), backend, results=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ranks = sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("ok-*"))
    assert ranks == list(range(nprocs)), proc.stdout + proc.stderr
    assert len({p.read_text() for p in tmp_path.glob("ok-*")}) == 1


def test_import_and_interface():
    code = ("import numpy as np, fastbn, fastbn.mpi as m\n"
            "bn = m.BatchNorm(3)\n"
            "assert isinstance(bn, fastbn.BatchNorm) and m.SyncBatchNorm is m.BatchNorm\n"
            "assert bn.comm is m.MPI.COMM_WORLD and 'comm_size=1' in repr(bn)\n"
            "assert sorted(bn.state_dict()) == sorted(fastbn.BatchNorm(3).state_dict())\n"
            "for bad in [dict(comm=1), dict(virtual_batch_size=2)]:\n"
            "    try: m.BatchNorm(3, **bad)\n"
            "    except (TypeError, ValueError): pass\n"
            "    else: raise AssertionError(bad)\n"
            "import doctest\n"
            "result = doctest.testmod(m)\n"
            "assert result.failed == 0 and result.attempted >= 3, result\n"
            "print('OK')\n")
    proc = _run(1, "-c", code)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
