"""Run under ``mpiexec -n P``: fastbn.mpi.BatchNorm equals fastbn.BatchNorm on the whole batch.

Every rank builds the same global data, takes its (uneven, possibly empty) share, and compares
forward, backward, parameter gradients and running statistics over several training steps with
a single-process layer fed the concatenated batch. Prints ``OK <rank> <cases>`` on success; any
failure aborts the whole job with a non-zero exit status.
"""
import os
import sys
import traceback

import numpy as np
from mpi4py import MPI

import fastbn
import fastbn.mpi

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
BACKEND = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "default" else None


def shares(total):
    """Uneven batch sizes, the middle rank empty when there are 3 or more ranks."""
    if size == 1:
        return [total]
    weights = np.arange(1, size + 1, dtype=float)
    if size >= 3:
        weights[1] = 0.0
    cuts = np.floor(np.cumsum(weights) / weights.sum() * total).astype(int)
    sizes = np.diff(np.concatenate(([0], cuts)))
    return list(sizes)


def check(name, got, want, rtol, atol):
    if not np.allclose(got, want, rtol=rtol, atol=atol):
        err = np.max(np.abs(np.asarray(got, float) - np.asarray(want, float)))
        raise AssertionError(f"{name}: max abs error {err} (rank {rank} of {size})")


def run_case(shape, axis, dtype, *, activation=None, residual=False, momentum=0.1,
             affine=True, steps=3, eval_after=True):
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == np.float64 else dict(rtol=2e-4, atol=2e-5)
    rng = np.random.default_rng(12345)
    C = shape[axis]
    sizes = shares(shape[0])
    start = int(np.sum(sizes[:rank]))
    mine = slice(start, start + int(sizes[rank]))
    sync = fastbn.mpi.BatchNorm(C, momentum=momentum, affine=affine, axis=axis, dtype=dtype,
                                activation=activation, backend=BACKEND, comm=comm)
    ref = fastbn.BatchNorm(C, momentum=momentum, affine=affine, axis=axis, dtype=dtype,
                           activation=activation, backend="numpy")
    for step in range(steps):
        x = (rng.normal(size=shape) * rng.uniform(0.5, 3.0) + 5.0).astype(dtype)
        r = rng.normal(size=shape).astype(dtype) if residual else None
        dy = rng.normal(size=shape).astype(dtype)
        y_ref = ref(x, r)
        y = sync(x[mine], None if r is None else r[mine])
        check(f"forward step {step}", y, y_ref[mine], **tol)
        dx_ref = ref.backward(dy)
        dx = sync.backward(dy[mine])
        check(f"grad_input step {step}", dx, dx_ref[mine], **tol)
        if affine:
            check("grad_weight", sync.grad_weight, ref.grad_weight, **tol)
            check("grad_bias", sync.grad_bias, ref.grad_bias, **tol)
            for layer in (sync, ref):            # an SGD step, the same on every rank
                layer.weight -= 0.1 * layer.grad_weight
                layer.bias -= 0.1 * layer.grad_bias
                layer.zero_grad()
        check("running_mean", sync.running_mean, ref.running_mean, **tol)
        check("running_var", sync.running_var, ref.running_var, **tol)
        assert sync.num_batches_tracked == ref.num_batches_tracked
    # Identical running statistics on every rank (bitwise).
    every = comm.allgather(sync.running_var.tobytes() + sync.running_mean.tobytes())
    assert all(b == every[0] for b in every), "running statistics differ between ranks"
    if eval_after:                                # no communication in evaluation
        x = rng.normal(size=shape).astype(dtype)
        sync.eval(), ref.eval()
        check("eval forward", sync(x[mine]), ref(x)[mine], **tol)


def run_population():
    rng = np.random.default_rng(7)
    data = rng.normal(3.0, 2.0, size=(101, 4, 3))
    sizes = shares(data.shape[0])
    start = int(np.sum(sizes[:rank]))
    mine = data[start:start + int(sizes[rank])]
    bn = fastbn.mpi.BatchNorm(4, dtype=np.float64, comm=comm)
    total = bn.set_population_stats(np.array_split(mine, 3))
    assert total.count == 101 * 3
    check("population mean", bn.running_mean, data.mean(axis=(0, 2)), 1e-12, 1e-12)
    check("population var", bn.running_var, data.var(axis=(0, 2), ddof=1), 1e-12, 1e-12)
    local = fastbn.moments(mine)
    merged = fastbn.mpi.allreduce_moments(local, comm)
    check("allreduce_moments", merged.var(), data.var(axis=(0, 2)), 1e-12, 1e-12)


def run_errors():
    bn = fastbn.mpi.BatchNorm(3, comm=comm)
    bad = np.zeros((2, 4, 5)) if rank == size - 1 else np.zeros((2, 3, 5))
    try:
        bn(bad)
    except ValueError as exc:
        ok = ("channels" in str(exc)) if rank == size - 1 else ("rank" in str(exc))
        assert ok, str(exc)
    else:
        raise AssertionError("a bad input on one rank must raise on every rank")
    # One value over all ranks: the global batch is too small (same error everywhere).
    one = np.ones((1 if rank == 0 else 0, 3))
    try:
        bn(one)
    except ValueError as exc:
        assert "more than 1 value" in str(exc)
    else:
        raise AssertionError("a single global value must raise")


def main():
    cases = 0
    for dtype in (np.float64, np.float32):
        run_case((13, 3, 5), 1, dtype); cases += 1
        run_case((11, 4, 2, 3), 1, dtype, activation="relu", residual=True); cases += 1
        run_case((10, 3, 3, 2), -1, dtype, momentum=None); cases += 1
    run_case((9, 5), 1, np.float64, affine=False); cases += 1
    run_case((8, 3, 4), 1, np.float16); cases += 1
    run_population(); cases += 1
    run_errors(); cases += 1
    comm.Barrier()
    # One file per rank: mpiexec may merge or drop lines of the ranks' forwarded stdout.
    results = os.environ.get("FASTBN_MPI_RESULTS")
    if results:
        with open(os.path.join(results, f"ok-{rank}"), "w") as f:
            f.write(str(cases))
    print(f"OK {rank} {cases}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush(), sys.stderr.flush()
        comm.Abort(1)
