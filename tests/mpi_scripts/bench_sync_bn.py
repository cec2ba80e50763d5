"""Measure fastbn.mpi.BatchNorm: ``mpiexec -n P python tests/mpi_scripts/bench_sync_bn.py``.

Weak scaling (the same per-rank batch for every P): the time of a training step (forward +
backward) of the synchronized layer, of the local fastbn.BatchNorm on the same data, and of
the two collectives alone (their difference is the synchronization cost). Rank 0 prints.
"""
import sys
import time

import numpy as np
from mpi4py import MPI

import fastbn
import fastbn.mpi

comm = MPI.COMM_WORLD
shape = tuple(int(s) for s in sys.argv[1].split(",")) if len(sys.argv) > 1 else (16, 64, 28, 28)
repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 30
C = shape[1]
rng = np.random.default_rng(comm.rank)
x = rng.normal(size=shape).astype(np.float32)
dy = rng.normal(size=shape).astype(np.float32)


def measure(*steps):
    """Median time of each step, the steps interleaved (drift affects them alike)."""
    times = [[] for _ in steps]
    for _ in range(repeats):
        for step, record in zip(steps, times):
            comm.Barrier()
            t = time.perf_counter()
            step()
            record.append(time.perf_counter() - t)
    return [float(np.median(record)) for record in times]


sync = fastbn.mpi.BatchNorm(C, comm=comm)
local = fastbn.BatchNorm(C)
for layer in (sync, local):
    layer(x), layer.backward(dy)                      # warm up


def step_sync():
    sync(x)
    sync.backward(dy)


def step_local():
    local(x)
    local.backward(dy)


send1, recv1 = np.zeros(2 * C + 1), np.empty((comm.size, 2 * C + 1))
send2, recv2 = np.zeros(2 * C + 1), np.empty(2 * C + 1)


def collectives():
    comm.Allgather(send1, recv1)
    comm.Allreduce(send2, recv2, op=MPI.SUM)


t_sync, t_local, t_comm = measure(step_sync, step_local, collectives)
if comm.rank == 0:
    mb = x.nbytes / 1e6
    print(f"P={comm.size} per-rank batch {shape} ({mb:.1f} MB float32): "
          f"sync step {t_sync * 1e3:.2f} ms, local step {t_local * 1e3:.2f} ms, "
          f"collectives alone {t_comm * 1e6:.0f} us, overhead {100 * (t_sync / t_local - 1):.1f}%,"
          f" global throughput {comm.size * mb / t_sync:.0f} MB/s")
