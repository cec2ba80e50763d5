"""Thread count, determinism across thread counts, Python threads, fork, threadpoolctl."""
import multiprocessing
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastbn

# Big enough to be split into many blocks and run in parallel (above the serial threshold);
# (1, 40, 60, 61): a batch of one, split into blocks of channels.
SHAPES_AND_AXES = [((6, 5, 150, 37), 1), ((700, 3, 49), 1), ((3000, 37), 1), ((40, 33, 97), -1),
                   ((2, 3, 40000), 1), ((1, 40, 60, 61), 1)]


def run_everything(x, axis, backend):
    """Every kernel once: the arrays they produce, for bitwise comparison."""
    channels = x.shape[axis]
    rng = np.random.default_rng(1)
    weight, bias = rng.standard_normal(channels), rng.standard_normal(channels)
    residual = rng.standard_normal(x.shape).astype(x.dtype)
    rm, rv = np.zeros(channels), np.ones(channels)
    y, mean, invstd = fastbn.batch_norm(x, rm, rv, weight, bias, True, axis=axis,
                                        residual=residual, activation="relu",
                                        return_stats=True, backend=backend)
    infer = fastbn.batch_norm(x, rm, rv, weight, bias, axis=axis, backend=backend)
    grads = fastbn.batch_norm_backward(residual, x, mean, invstd, weight, axis=axis, output=y,
                                       activation="relu", backend=backend)
    return [y, mean, invstd, rm, rv, infer, *grads]


@pytest.mark.parametrize("shape,axis", SHAPES_AND_AXES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bitwise_identical_for_any_thread_count(fast_backend, shape, axis, dtype):
    x = (np.random.default_rng(0).standard_normal(shape) * 3 + 7).astype(dtype)
    results = []
    try:
        for threads in (1, 2, 3, 4) * 3:  # repeated: a data race shows up only sometimes
            fastbn.set_num_threads(threads)
            results.append(run_everything(x, axis, fast_backend))
    finally:
        fastbn.set_num_threads(None)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.tobytes() == b.tobytes()


def test_concurrent_python_threads_are_safe(fast_backend):
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((8, 16, 40, 40)).astype(np.float32) for _ in range(6)]
    expected = [run_everything(x, 1, fast_backend) for x in inputs]
    with ThreadPoolExecutor(6) as pool:
        for _ in range(3):
            got = list(pool.map(lambda x: run_everything(x, 1, fast_backend), inputs))
            for want, have in zip(expected, got):
                for a, b in zip(want, have):
                    assert a.tobytes() == b.tobytes()


def _child(queue, backend, x, expected):
    # Correct, though not necessarily bitwise equal: a Numba child on GNU OpenMP falls back to
    # the reference backend (see fastbn._numba_kernels).
    y = fastbn.batch_norm(x, None, None, training=True, backend=backend)
    queue.put(bool(np.allclose(y, expected, rtol=0, atol=1e-5)))


def test_fork_after_parallel_use_works(fast_backend):
    x = np.random.default_rng(0).standard_normal((8, 16, 64, 64)).astype(np.float32)
    expected = fastbn.batch_norm(x, None, None, training=True, backend=fast_backend)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child, args=(queue, fast_backend, x, expected))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung")
    assert child.exitcode == 0
    assert queue.get(timeout=5)


def test_set_and_get_num_threads():
    try:
        fastbn.set_num_threads(3)
        assert fastbn.get_num_threads() == 3
    finally:
        fastbn.set_num_threads(None)
    assert fastbn.get_num_threads() >= 1


def test_omp_num_threads_and_threadpoolctl_are_respected():
    pytest.importorskip("threadpoolctl")
    if "cython" not in fastbn.available_backends():
        pytest.skip("the cython backend is not built")
    code = textwrap.dedent("""
        import fastbn
        from threadpoolctl import threadpool_info, threadpool_limits
        from fastbn import _kernels
        assert _kernels.OPENMP_ENABLED
        assert fastbn.get_num_threads() == 3, fastbn.get_num_threads()
        assert any(p["user_api"] == "openmp" for p in threadpool_info()), threadpool_info()
        with threadpool_limits(1, user_api="openmp"):
            assert fastbn.get_num_threads() == 1
        print("ok")
    """)
    env = {"OMP_NUM_THREADS": "3", "PATH": ""}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
