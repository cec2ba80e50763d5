"""fastbn.dask: population statistics and batch norm of dask arrays, on a distributed cluster.

Results must equal the in-memory computation for any chunking (the channel axis included),
and no task may hold more than one block of the data (checked from the cluster's task stream:
the size of every task's result).
"""
from __future__ import annotations

import numpy as np
import pytest

import fastbn

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
fd = pytest.importorskip("fastbn.dask")

CHUNKINGS = [
    (8, 6, 5, 4),        # the batch axis only
    (5, 2, 3, 4),        # every axis, the channel axis included
    (31, 1, 5, 4),       # one channel per chunk
    (4, 4, 2, 3),        # many small blocks (uneven along every axis)
]


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=3, threads_per_worker=1, processes=False,
                                       dashboard_address=None)
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(2024)
    x = rng.normal(size=(31, 6, 5, 4)) * rng.uniform(0.5, 3.0, size=(1, 6, 1, 1))
    return (x + 1e3).astype(np.float32)


def _largest_task_result(client, compute):
    with distributed.get_task_stream(client) as stream:
        result = compute()
    # The client's final gathering of the result ("finalize") is not a computation task.
    tasks = [entry for entry in stream.data if "finalize" not in str(entry["key"])]
    return result, max(entry["nbytes"] for entry in tasks), len(tasks)


@pytest.mark.parametrize("chunks", CHUNKINGS)
@pytest.mark.parametrize("axis", [1, -1])
def test_moments_equal_in_memory(client, data, chunks, axis):
    x = da.from_array(data, chunks=chunks)
    got, largest, ntasks = _largest_task_result(
        client, lambda: fd.moments(x, axis=axis, split_every=3))
    want = fastbn.moments(data, axis=axis)
    assert got.count == want.count
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-13)
    np.testing.assert_allclose(got.m2, want.m2, rtol=1e-10)
    np.testing.assert_allclose(got.var(), data.astype(np.float64).var(
        axis=tuple(a for a in range(4) if a != axis % 4)), rtol=1e-9)
    # Only per-channel vectors travel: no task result is larger than a few channels' records.
    assert largest <= 64 * data.shape[axis]
    assert ntasks >= x.npartitions                  # one task (at least) per block


@pytest.mark.parametrize("chunks", CHUNKINGS)
def test_batch_norm_population_stats_equal_in_memory(client, data, chunks):
    x = da.from_array(data, chunks=chunks)
    weight, bias = np.linspace(0.5, 2.0, 6), np.linspace(-1.0, 1.0, 6)
    y = fd.batch_norm(x, weight=weight, bias=bias, activation="relu")
    assert y.chunks == x.chunks and y.dtype == np.float32
    got, largest, _ = _largest_task_result(client, y.compute)
    want = fastbn.batch_norm(data, None, None, weight, bias, training=True, activation="relu")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    block = max(b.nbytes for b in (x.blocks[i] for i in np.ndindex(x.numblocks)))
    assert largest <= block < data.nbytes          # never the whole array


@pytest.mark.parametrize("chunks", CHUNKINGS[:2])
def test_batch_norm_given_stats_and_layers(client, data, chunks):
    x = da.from_array(data, chunks=chunks)
    bn = fastbn.BatchNorm(6, dtype=np.float64)
    for batch in np.array_split(data, 3):
        bn(batch)
    bn.weight[:] = np.arange(1, 7)
    bn.eval()
    np.testing.assert_allclose(fd.apply_layer(bn, x).compute(), bn(data), rtol=1e-5, atol=1e-4)
    # Statistics given as dask arrays, NHWC-style layout.
    nhwc = np.moveaxis(data, 1, -1).copy()
    xh = da.from_array(nhwc, chunks=(7, 3, 2, 4))
    mean, var = da.from_array(bn.running_mean, chunks=2), da.from_array(bn.running_var, 5)
    got = fd.batch_norm(xh, mean, var, axis=-1, eps=1e-3).compute()
    want = fastbn.batch_norm(nhwc, bn.running_mean, bn.running_var, axis=-1, eps=1e-3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    scale, shift = fastbn.scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias)
    np.testing.assert_allclose(fd.affine(x, scale, shift).compute(),
                               fastbn.affine(data, scale, shift), rtol=1e-6, atol=1e-3)


def test_set_population_stats(client, data):
    x = da.from_array(data, chunks=(4, 5, 5, 2))
    bn = fastbn.BatchNorm(6, dtype=np.float64)
    total = fd.set_population_stats(bn, x)
    flat = np.moveaxis(data.astype(np.float64), 1, 0).reshape(6, -1)
    assert total.count == flat.shape[1]
    np.testing.assert_allclose(bn.running_mean, flat.mean(axis=1), rtol=1e-13)
    np.testing.assert_allclose(bn.running_var, flat.var(axis=1, ddof=1), rtol=1e-9)


def test_lazy_moments_and_integer_and_empty_blocks(client):
    ints = np.arange(2 * 3 * 10).reshape(10, 3, 2)
    x = da.from_array(ints, chunks=((0, 4, 6), (2, 1), 2))     # an empty chunk
    lazy = fd.moments(x, compute=False)
    got = client.compute(lazy).result()
    want = fastbn.moments(ints)
    assert got.count == want.count == 20
    np.testing.assert_allclose(got.mean, want.mean)
    np.testing.assert_allclose(got.m2, want.m2)
    y = fd.batch_norm(x).compute()
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, fastbn.batch_norm(ints, None, None, training=True))


def test_outputs_of_different_inputs_have_different_keys(data):
    """Per-block results are keyed by their inputs: a scheduler that still holds the blocks of
    one call must not serve them to another (it did, with fixed key names)."""
    stats = (np.zeros(6), np.ones(6))
    a = fd.batch_norm(da.from_array(data, chunks=(5, 2, 3, 4)), *stats)
    b = fd.batch_norm(da.from_array(data, chunks=(7, 3, 2, 2)), *stats)
    c = fd.batch_norm(da.from_array(data, chunks=(5, 2, 3, 4)), *stats, eps=1e-3)
    assert len({a.name, b.name, c.name}) == 3
    assert fd.affine(da.from_array(data, chunks=(5, 2, 3, 4)), np.ones(6), np.zeros(6)).name \
        != fd.affine(da.from_array(data, chunks=(7, 3, 2, 2)), np.ones(6), np.zeros(6)).name


def test_graph_is_per_block(data):
    """The graph: one fused task per block, then small reductions (no whole-array task)."""
    x = da.from_array(data, chunks=(5, 2, 3, 4))
    stats = fd.moments_array(x, split_every=4)
    graph = dict(stats.__dask_graph__())
    blocks = x.npartitions
    # Blocks of the input, the per-block moments, and the tree of merges (fewer than blocks).
    assert len(graph) < 3 * blocks
    y = fd.batch_norm(x)
    assert y.numblocks == x.numblocks
    assert len(dict(y.__dask_graph__())) < 5 * blocks


def test_docstring_examples():
    import doctest

    result = doctest.testmod(fd, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted >= 10


def test_bad_arguments():
    x = da.ones((4, 3), chunks=2)
    with pytest.raises(TypeError, match="dask.array"):
        fd.moments(np.ones((4, 3)))
    with pytest.raises(ValueError, match="2 dimensions"):
        fd.moments(da.ones(4, chunks=2))
    with pytest.raises(ValueError, match="running_var"):
        fd.batch_norm(x, running_mean=np.zeros(3))
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        fd.batch_norm(x, weight=np.ones(4))
    with pytest.raises(ValueError, match="activation"):
        fd.batch_norm(x, activation="tanh")
    with pytest.raises(TypeError, match="fastbn.BatchNorm"):
        fd.apply_layer(object(), x)


@pytest.mark.filterwarnings("ignore:Port .* is already in use")
def test_worker_processes(data):
    """Real worker processes (pickled tasks, fastbn imported in each worker)."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster):
        x = da.from_array(data, chunks=(8, 3, 5, 2))
        got = fd.moments(x)
        y = fd.batch_norm(x).compute()
    want = fastbn.moments(data)
    np.testing.assert_allclose(got.m2, want.m2, rtol=1e-10)
    np.testing.assert_allclose(y, fastbn.batch_norm(data, None, None, training=True),
                               rtol=1e-5, atol=1e-5)
