"""The one table of benchmark cases: what is compared with what.

The comparison report (``python -m fastbn.bench``), the asv suite (``bench/benchmarks``) and the
pytest-benchmark runs (``bench/pytest``) all read this module, so they cannot drift apart.

A case is (operation, layout, dtype, backend, shape). :func:`prepare` builds it: the arrays
(deterministic, from a fixed seed), a preallocated ``out=`` buffer (or none, for the allocating
variant), a zero-argument ``run`` callable and a ``check`` that compares the last result with
fastbn's NumPy reference backend.

Backends
--------
``cython``, ``numba``, ``numpy``
    fastbn with that backend (``fastbn.available_backends()`` at run time decides which exist).
``naive``
    Batch norm as a NumPy user writes it by hand (``x.mean``, ``x.var``, broadcasting); it
    always allocates, like the code it stands for.
``torch``, ``onnxruntime``, ``jax``
    Other libraries on the CPU, when installed.
"""
from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import fastbn
from fastbn._backends import get_backend

EPS = 1e-5
SEED = 20240605



# ----------------------------------------------------------------------------- the axes

@dataclass(frozen=True)
class Shape:
    name: str
    dims: tuple  # logical (N, C, H, W) or (N, C)
    network: str
    quick: bool = False

    @property
    def channels(self) -> int:
        return self.dims[1]

    @property
    def size(self) -> int:
        return math.prod(self.dims)

    def __str__(self) -> str:
        return "x".join(map(str, self.dims))


SHAPES = {s.name: s for s in [
    Shape("resnet50-conv1", (32, 64, 112, 112), "ResNet-50 stem BN, batch 32"),
    Shape("resnet50-layer1", (32, 256, 56, 56), "ResNet-50 stage 1 expansion BN, batch 32"),
    Shape("resnet50-layer4", (64, 2048, 7, 7), "ResNet-50 stage 4 expansion BN, batch 64"),
    Shape("resnet-small", (8, 64, 56, 56), "ResNet stage 1 BN, batch 8", quick=True),
    Shape("mobilenetv2-56", (32, 144, 56, 56), "MobileNetV2 expansion BN at 56x56, batch 32"),
    Shape("mobilenetv2-14", (32, 576, 14, 14), "MobileNetV2 expansion BN at 14x14, batch 32"),
    Shape("mobilenetv2-head", (32, 1280, 7, 7), "MobileNetV2 last 1x1 conv BN, batch 32"),
    Shape("bn1d", (256, 1024), "BatchNorm1d on (N, C) features, batch 256", quick=True),
    Shape("tiny", (1, 16, 8, 8), "per-call overhead", quick=True),
]}
QUICK_SHAPES = [name for name, s in SHAPES.items() if s.quick]


@dataclass(frozen=True)
class Layout:
    name: str
    axis: int
    title: str

    def array_shape(self, dims: tuple) -> tuple:
        """The NumPy array shape holding logical (N, C, ...) dims in this layout."""
        if self.axis == 1 or len(dims) == 2:
            return tuple(dims)
        return (dims[0], *dims[2:], dims[1])


LAYOUTS = {
    "nchw": Layout("nchw", 1, "channels-first (axis=1)"),
    "nhwc": Layout("nhwc", -1, "channels-last (axis=-1)"),
}
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class Operation:
    name: str
    title: str
    traffic: float  # minimum DRAM traffic in units of the input's size (a copy is 2)
    outputs: tuple  # names of the checked results


OPERATIONS = {o.name: o for o in [
    Operation("train", "training forward (batch stats + running-stat update)", 2, ("y",)),
    Operation("backward", "backward (grad_input; grad_weight, grad_bias)", 3, ("dx", "dw", "db")),
    Operation("infer", "inference (running statistics)", 2, ("y",)),
    Operation("affine_relu", "fused affine + ReLU", 2, ("y",)),
    Operation("residual_relu", "fused affine + residual + ReLU (inference)", 3, ("y",)),
    Operation("moments", "per-channel mean and variance", 1, ("mean", "var")),
]}

FASTBN_BACKENDS = ("cython", "numba", "numpy")
EXTERNAL_BACKENDS = ("torch", "onnxruntime", "jax")
ALL_BACKENDS = FASTBN_BACKENDS + ("naive",) + EXTERNAL_BACKENDS
BASELINE = "naive"


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def available_backends() -> list[str]:
    """The backends that run here: fastbn's (fastest first), naive NumPy, then others installed."""
    names = list(fastbn.available_backends()) + [BASELINE]
    return names + [name for name in EXTERNAL_BACKENDS if _installed(name)]


def backend_label(name: str) -> str:
    return f"fastbn[{name}]" if name in FASTBN_BACKENDS else name


# ----------------------------------------------------------------------------- cases

@dataclass(frozen=True)
class Case:
    op: str
    layout: str
    dtype: str
    backend: str
    shape: str

    @property
    def operation(self) -> Operation:
        return OPERATIONS[self.op]

    @property
    def shape_info(self) -> Shape:
        return SHAPES[self.shape]

    @property
    def array_shape(self) -> tuple:
        return LAYOUTS[self.layout].array_shape(self.shape_info.dims)

    @property
    def nbytes(self) -> int:
        return self.shape_info.size * np.dtype(self.dtype).itemsize

    @property
    def bytes_moved(self) -> float:
        """The operation's minimum memory traffic in bytes (for GB/s)."""
        return self.operation.traffic * self.nbytes

    @property
    def group(self) -> tuple:
        """Cases differing only by backend: compared with each other."""
        return (self.op, self.shape, self.layout, self.dtype)

    def __str__(self) -> str:
        return f"{self.op}-{self.shape}-{self.layout}-{self.dtype}-{self.backend}"


def valid(op: str, layout: str, dtype: str, backend: str, shape: str) -> str | None:
    """None when the combination is a real case, else why it is skipped."""
    if layout == "nhwc" and len(SHAPES[shape].dims) == 2:
        return "(N, C) data has a single layout"
    if backend == "onnxruntime" and op in ("train", "backward", "moments"):
        return "ONNX Runtime's BatchNormalization is inference only"
    return None


def cases(ops=None, shapes=None, layouts=None, dtypes=("float32",), backends=None,
          quick=False) -> list[Case]:
    """All valid cases for the chosen values of each axis (None: all; shapes: the quick ones
    when `quick`). Ordered so that the cases of one group (same inputs) are adjacent."""
    ops = list(ops or OPERATIONS)
    shapes = list(shapes or (QUICK_SHAPES if quick else SHAPES))
    layouts = list(layouts or LAYOUTS)
    backends = list(backends or available_backends())
    for name, table in (("operation", OPERATIONS), ("shape", SHAPES), ("layout", LAYOUTS)):
        chosen = {"operation": ops, "shape": shapes, "layout": layouts}[name]
        unknown = [v for v in chosen if v not in table]
        if unknown:
            raise ValueError(f"unknown {name}(s) {unknown}; choose from {list(table)}")
    unknown = [b for b in backends if b not in ALL_BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; choose from {list(ALL_BACKENDS)}")
    return [Case(op, layout, dtype, backend, shape)
            for shape in shapes for op in ops for layout in layouts for dtype in dtypes
            for backend in backends if valid(op, layout, dtype, backend, shape) is None]


# ----------------------------------------------------------------------------- inputs

@dataclass
class Inputs:
    """Deterministic arrays for one (op, shape, layout, dtype) group."""
    x: np.ndarray
    axis: int
    weight: np.ndarray
    bias: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    dy: np.ndarray | None = None
    residual: np.ndarray | None = None
    mean: np.ndarray | None = None  # the batch statistics, for backward
    invstd: np.ndarray | None = None
    reference: dict = field(default_factory=dict)  # op -> {output name: float64 array}

    @property
    def reduce_axes(self) -> tuple:
        return tuple(i for i in range(self.x.ndim) if i != self.axis % self.x.ndim)

    def view3(self) -> np.ndarray:
        """x as the (outer, C, inner) array fastbn's kernels take."""
        axis = self.axis % self.x.ndim
        shape = self.x.shape
        return self.x.reshape(math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:]))


_cache: dict = {}


def inputs(case: Case) -> Inputs:
    """The arrays of `case`'s group; the last group is cached so backends share them."""
    key = (case.shape, case.layout, case.dtype)
    if key in _cache:
        return _cache[key]
    _cache.clear()
    rng = np.random.default_rng(SEED)
    dtype = np.dtype(case.dtype)
    shape = case.array_shape
    channels = case.shape_info.channels

    def data():
        return rng.standard_normal(shape, dtype=np.float64 if dtype == np.float64 else np.float32
                                   ).astype(dtype, copy=False)

    x = data()
    x *= 2.0
    x += 0.5
    vec = lambda lo, hi: rng.uniform(lo, hi, channels).astype(dtype)  # noqa: E731
    made = Inputs(x=x, axis=LAYOUTS[case.layout].axis, weight=vec(0.5, 1.5),
                  bias=vec(-0.5, 0.5), running_mean=vec(0.0, 1.0), running_var=vec(3.0, 5.0),
                  dy=data(), residual=data())
    _, mean, m2 = get_backend("numpy").moments(made.view3())
    count = case.shape_info.size // channels
    made.mean, made.invstd = mean, 1.0 / np.sqrt(m2 / count + EPS)
    _cache[key] = made
    return made


def _per_channel(inp: Inputs, v: np.ndarray) -> np.ndarray:
    """A (C,) vector shaped to broadcast against x as a NumPy user would write it."""
    shape = [1] * inp.x.ndim
    shape[inp.axis] = -1
    return v.reshape(shape)


def reference(case: Case) -> dict:
    """The NumPy reference backend's results for `case`'s operation and inputs (float64)."""
    inp = inputs(case)
    if case.op not in inp.reference:
        inp.reference[case.op] = {
            k: np.asarray(v, dtype=np.float64)
            for k, v in _FASTBN_RUNNERS[case.op](inp, "numpy", None)().items()}
    return inp.reference[case.op]


# ----------------------------------------------------------------------------- fastbn

def _fastbn_affine(inp, backend, out, residual=None):
    """Fused y = relu(x * scale + shift [+ residual]) per channel."""
    scale = inp.weight / np.sqrt(inp.running_var.astype(np.float64) + EPS)
    shift = inp.bias - inp.running_mean * scale
    return lambda: fastbn.affine(inp.x, scale, shift, axis=inp.axis, residual=residual,
                                 activation="relu", out=out, backend=backend)


def _fastbn_moments(inp, backend):
    """Per-channel (mean, var) as a callable returning them."""
    def run():
        m = fastbn.moments(inp.x, axis=inp.axis, backend=backend)
        return m.mean, m.m2 / m.count
    return run


def _fb_train(inp, backend, out):
    rm, rv = inp.running_mean.copy(), inp.running_var.copy()
    call = lambda: fastbn.batch_norm(inp.x, rm, rv, inp.weight, inp.bias, True, 0.1, EPS,  # noqa
                                     axis=inp.axis, out=out, backend=backend)
    return lambda: {"y": call()}


def _fb_infer(inp, backend, out):
    call = lambda: fastbn.batch_norm(inp.x, inp.running_mean, inp.running_var, inp.weight,  # noqa
                                     inp.bias, False, 0.1, EPS, axis=inp.axis, out=out,
                                     backend=backend)
    return lambda: {"y": call()}


def _fb_affine_relu(inp, backend, out):
    call = _fastbn_affine(inp, backend, out)
    return lambda: {"y": call()}


def _fb_residual_relu(inp, backend, out):
    call = _fastbn_affine(inp, backend, out, residual=inp.residual)
    return lambda: {"y": call()}


def _fb_backward(inp, backend, out):
    def run():
        dx, dw, db = fastbn.batch_norm_backward(inp.dy, inp.x, inp.mean, inp.invstd, inp.weight,
                                                axis=inp.axis, out=out, backend=backend)
        return {"dx": dx, "dw": dw, "db": db}
    return run


def _fb_moments(inp, backend, out):
    call = _fastbn_moments(inp, backend)

    def run():
        mean, var = call()
        return {"mean": mean, "var": var}
    return run


_FASTBN_RUNNERS = {"train": _fb_train, "infer": _fb_infer, "affine_relu": _fb_affine_relu,
                   "residual_relu": _fb_residual_relu, "backward": _fb_backward,
                   "moments": _fb_moments}


# ----------------------------------------------------------------------------- naive NumPy

def _naive(inp: Inputs, op: str):
    """What a NumPy user writes by hand: whole-array expressions, new arrays every call."""
    x, axes = inp.x, inp.reduce_axes
    pc = lambda v: _per_channel(inp, v)  # noqa: E731
    w, b = pc(inp.weight), pc(inp.bias)
    if op == "train":
        rm, rv = inp.running_mean.copy(), inp.running_var.copy()
        n = x.size // x.shape[inp.axis]

        def run():
            mean = x.mean(axis=axes, keepdims=True)
            var = x.var(axis=axes, keepdims=True)
            rm[...] = 0.9 * rm + 0.1 * mean.ravel()
            rv[...] = 0.9 * rv + 0.1 * var.ravel() * (n / (n - 1))
            return {"y": (x - mean) / np.sqrt(var + EPS) * w + b}
        return run
    if op in ("infer", "affine_relu", "residual_relu"):
        rm, rv = pc(inp.running_mean), pc(inp.running_var)
        if op == "infer":
            return lambda: {"y": (x - rm) / np.sqrt(rv + EPS) * w + b}
        if op == "affine_relu":
            scale = w / np.sqrt(rv + EPS)
            shift = b - rm * scale
            return lambda: {"y": np.maximum(x * scale + shift, 0)}
        r = inp.residual
        return lambda: {"y": np.maximum((x - rm) / np.sqrt(rv + EPS) * w + b + r, 0)}
    if op == "backward":
        dy = inp.dy
        mean, invstd = pc(inp.mean.astype(x.dtype)), pc(inp.invstd.astype(x.dtype))
        n = x.size // x.shape[inp.axis]

        def run():
            xhat = (x - mean) * invstd
            db = dy.sum(axis=axes)
            dw = (dy * xhat).sum(axis=axes)
            dx = w * invstd / n * (n * dy - pc(db) - xhat * pc(dw))
            return {"dx": dx, "dw": dw, "db": db}
        return run
    if op == "moments":
        return lambda: {"mean": x.mean(axis=axes), "var": x.var(axis=axes)}
    raise ValueError(op)


# ----------------------------------------------------------------------------- PyTorch

def _torch(inp: Inputs, op: str, out):
    import torch
    aten = torch.ops.aten

    def tensor(a):
        t = torch.from_numpy(a)
        if nhwc:  # NHWC data: an NCHW tensor in channels_last memory format
            t = t.permute(0, 3, 1, 2)
        return t

    nhwc = inp.x.ndim == 4 and inp.axis % 4 == 3

    def back(t):  # results in the NumPy layout of the inputs
        return t.permute(0, 2, 3, 1) if nhwc else t

    x = tensor(inp.x)
    w, b = torch.from_numpy(inp.weight), torch.from_numpy(inp.bias)
    rm, rv = torch.from_numpy(inp.running_mean.copy()), torch.from_numpy(inp.running_var.copy())
    ot = tensor(out) if out is not None else None
    channels = x.shape[1]
    save = (torch.empty(channels, dtype=x.dtype), torch.empty(channels, dtype=x.dtype))

    def bn(training, running_mean=rm, running_var=rv):
        if ot is None:  # the allocating path, as a user calls it
            return torch.nn.functional.batch_norm(x, running_mean, running_var, w, b, training,
                                                  0.1, EPS)
        aten.native_batch_norm.out(x, w, b, running_mean, running_var, training, 0.1, EPS,
                                   out=ot, save_mean=save[0], save_invstd=save[1])
        return ot

    if op == "train":
        return lambda: {"y": back(bn(True))}
    if op == "infer":
        return lambda: {"y": back(bn(False))}
    if op == "affine_relu":
        return lambda: {"y": back(bn(False).relu_())}
    if op == "residual_relu":
        r = tensor(inp.residual)
        return lambda: {"y": back(bn(False).add_(r).relu_())}
    if op == "backward":
        dy = tensor(inp.dy)
        mean = torch.from_numpy(inp.mean.astype(inp.x.dtype))
        invstd = torch.from_numpy(inp.invstd.astype(inp.x.dtype))
        grads = (torch.empty(channels, dtype=x.dtype), torch.empty(channels, dtype=x.dtype))

        def run():
            if ot is None:
                dx, dw, db = aten.native_batch_norm_backward(
                    dy, x, w, rm, rv, mean, invstd, True, EPS, [True, True, True])
            else:
                dx, dw, db = aten.native_batch_norm_backward.out(
                    dy, x, w, rm, rv, mean, invstd, True, EPS, [True, True, True],
                    out0=ot, out1=grads[0], out2=grads[1])
            return {"dx": back(dx), "dw": dw, "db": db}
        return run
    if op == "moments":
        dims = tuple(i for i in range(x.ndim) if i != 1)

        def run():
            var, mean = torch.var_mean(x, dim=dims, correction=0)
            return {"mean": mean, "var": var}
        return run
    raise ValueError(op)


# ----------------------------------------------------------------------------- ONNX Runtime, JAX
# Not installed on the machine this was written on: the adapters follow the libraries' documented
# APIs, and any failure shows as an error in that case's row instead of stopping the report.

def _onnxruntime(inp: Inputs, op: str, out):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    x = inp.x if inp.axis % inp.x.ndim == 1 else np.ascontiguousarray(np.moveaxis(inp.x, -1, 1))
    elem = TensorProto.FLOAT if x.dtype == np.float32 else TensorProto.DOUBLE
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (inp.weight, "w"), (inp.bias, "b"), (inp.running_mean, "m"), (inp.running_var, "v"))]
    nodes = [helper.make_node("BatchNormalization", ["x", "w", "b", "m", "v"], ["bn"],
                              epsilon=EPS)]
    feeds = {"x": x}
    graph_inputs = [helper.make_tensor_value_info("x", elem, list(x.shape))]
    last = "bn"
    if op == "residual_relu":
        feeds["r"] = inp.residual if inp.axis % inp.x.ndim == 1 else \
            np.ascontiguousarray(np.moveaxis(inp.residual, -1, 1))
        graph_inputs.append(helper.make_tensor_value_info("r", elem, list(x.shape)))
        nodes.append(helper.make_node("Add", ["bn", "r"], ["sum"]))
        last = "sum"
    if op in ("affine_relu", "residual_relu"):
        nodes.append(helper.make_node("Relu", [last], ["y"]))
    else:
        nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "bn", graph_inputs,
                              [helper.make_tensor_value_info("y", elem, list(x.shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    def run():
        y = session.run(None, feeds)[0]
        return {"y": y if inp.axis % inp.x.ndim == 1 else np.moveaxis(y, 1, -1)}
    return run


def _jax(inp: Inputs, op: str, out):
    import jax
    import jax.numpy as jnp
    if inp.x.dtype == np.float64:
        jax.config.update("jax_enable_x64", True)
    axes = inp.reduce_axes
    pc = lambda v: jnp.asarray(_per_channel(inp, v))  # noqa: E731
    x = jnp.asarray(inp.x)
    w, b, rm, rv = (pc(v) for v in (inp.weight, inp.bias, inp.running_mean, inp.running_var))

    def train(x):
        mean = x.mean(axis=axes, keepdims=True)
        var = x.var(axis=axes, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + EPS) * w + b

    fns = {
        "train": lambda x: {"y": train(x)},
        "infer": lambda x: {"y": (x - rm) * jax.lax.rsqrt(rv + EPS) * w + b},
        "affine_relu": lambda x: {"y": jax.nn.relu((x - rm) * jax.lax.rsqrt(rv + EPS) * w + b)},
        "moments": lambda x: {"mean": x.mean(axis=axes), "var": x.var(axis=axes)},
    }
    if op == "residual_relu":
        r = jnp.asarray(inp.residual)
        fn = jax.jit(lambda x: {"y": jax.nn.relu((x - rm) * jax.lax.rsqrt(rv + EPS) * w + b + r)})
    elif op == "backward":
        dy = jnp.asarray(inp.dy)

        def grads(x, w, b):
            y, vjp = jax.vjp(lambda x, w, b: (x - x.mean(axis=axes, keepdims=True)) * jax.lax.rsqrt(
                x.var(axis=axes, keepdims=True) + EPS) * w + b, x, w, b)
            dx, dw, db = vjp(dy)
            return {"dx": dx, "dw": dw.ravel(), "db": db.ravel()}
        fn = jax.jit(lambda x: grads(x, w, b))
    else:
        fn = jax.jit(fns[op])
    return lambda: {k: v.block_until_ready() for k, v in fn(x).items()}


# ----------------------------------------------------------------------------- prepared cases

@dataclass
class Prepared:
    case: Case
    run: Callable[[], dict]
    out: np.ndarray | None
    last: dict | None = None

    def __call__(self):
        self.last = self.run()
        return self.last

    def tolerance(self) -> float:
        return 1e-4 if self.case.dtype == "float32" else 1e-9

    def check(self, strict: bool = True) -> float:
        """Run once and compare with the NumPy reference backend. Returns the worst error
        relative to the reference's magnitude; raises AssertionError when it is larger than
        `tolerance()` (when not `strict`, only for wrong shapes, NaN or a missed ``out=``:
        the report shows how inaccurate the baselines are instead of dropping them)."""
        got = self()
        want = reference(self.case)
        tol = self.tolerance() if strict else np.inf
        worst = 0.0
        for name in self.case.operation.outputs:
            g = np.asarray(_to_numpy(got[name]), dtype=np.float64)
            w = want[name]
            if g.shape != w.shape:
                raise AssertionError(f"{self.case}: {name} has shape {g.shape}, want {w.shape}")
            scale = max(1.0, float(np.abs(w).max(initial=0.0)))
            if name in ("dw", "db"):  # sums over the batch: errors grow with the count
                scale = max(scale, float(np.sqrt(self.case.shape_info.size / w.size)))
            err = float(np.abs(g - w).max(initial=0.0)) / scale
            if not err <= tol:  # NaN fails too
                raise AssertionError(
                    f"{self.case}: {name} differs from the NumPy reference by {err:.3g} "
                    f"(relative to its magnitude; tolerance {tol:g})")
            worst = max(worst, err)
        if self.out is not None and "y" in got and got["y"] is not self.out \
                and isinstance(got["y"], np.ndarray):
            raise AssertionError(f"{self.case}: the result was not written to out=")
        return worst


def _to_numpy(value):
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # torch
        return value.detach().numpy()
    return np.asarray(value)


def supports_out(case: Case) -> bool:
    """Whether the backend can write into a preallocated output in this operation."""
    if case.op == "moments" or case.backend in ("naive", "onnxruntime", "jax"):
        return False
    return True


def empty_beside(a: np.ndarray) -> np.ndarray:
    """An uninitialized C-contiguous array like `a` whose data starts at a's offset within a
    4 KB page. A pass that reads `a` while it writes an output a little past it modulo 4 KB
    stalls its loads behind stores with the same low 12 address bits, and where NumPy puts an
    output relative to its input depends on the heap (an array of a multiple of 4 KB lands 16
    bytes past the one allocated before it): a copy of 6.4 MB took 0.1 or 1.15 ms on a Zen 3
    depending on it. Outputs and copy buffers are placed this way so that the benchmark does
    not measure the heap."""
    raw = np.empty(a.nbytes + 4096, np.uint8)
    start = (a.ctypes.data - raw.ctypes.data) % 4096
    return raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)


def prepare(case: Case, allocate: bool = False) -> Prepared:
    """Arrays, output buffer and the call for `case`. ``allocate=True`` drops ``out=``
    (the allocating path, as for asv's peakmem benchmarks)."""
    reason = valid(case.op, case.layout, case.dtype, case.backend, case.shape)
    if reason:
        raise ValueError(f"{case}: {reason}")
    inp = inputs(case)
    out = None if allocate or not supports_out(case) else empty_beside(inp.x)
    if case.backend in FASTBN_BACKENDS:
        if case.backend not in fastbn.available_backends():
            raise RuntimeError(f"fastbn backend {case.backend!r} is not available here")
        run = _FASTBN_RUNNERS[case.op](inp, case.backend, out)
    elif case.backend == "naive":
        run = _naive(inp, case.op)
    elif case.backend == "torch":
        run = _torch(inp, case.op, out)
    elif case.backend == "onnxruntime":
        run = _onnxruntime(inp, case.op, out)
    elif case.backend == "jax":
        run = _jax(inp, case.op, out)
    else:
        raise ValueError(case.backend)
    return Prepared(case, run, out)


def _calls_per_sample(first: float) -> int:
    """Calls per timed sample: calls shorter than 0.5 ms are timed in batches of about 0.5 ms."""
    return max(1, int(5e-4 / max(first, 1e-9))) if first < 5e-4 else 1


def measure(fn, min_time: float = 0.2, min_repeat: int = 3, max_repeat: int = 10000,
            first: float | None = None) -> dict:
    """Best and median time of one call of `fn` (already warmed up).

    Calls shorter than 0.5 ms are timed in batches so the timer's resolution does not matter;
    `first`, the time of an earlier call, saves the call that estimates it.
    """
    if first is None:
        start = time.perf_counter()
        fn()
        first = time.perf_counter() - start
    number = _calls_per_sample(first)
    samples = []
    total = 0.0
    while len(samples) < min_repeat or (total < min_time and len(samples) < max_repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        elapsed = time.perf_counter() - start
        samples.append(elapsed / number)
        total += elapsed
    return {"best": min(samples), "median": float(np.median(samples)), "samples": len(samples),
            "number": number}


def measure_interleaved(fns: list, min_time: float = 0.2, min_repeat: int = 3,
                        firsts: list | None = None) -> list[dict]:
    """`measure` of several functions with their batches interleaved, round by round, so that
    all of them see the same machine. (The memory bandwidth of a shared VM drifts by up to 2x
    within seconds: timed one after the other, the same kernel's ratio to a copy or to PyTorch
    moved by that much between runs.) Stops once the fastest function has run for `min_time`
    and every function `min_repeat` times. Each timed batch follows an untimed call of the
    same function, so that tensors that fit in the cache are timed from the cache, as when
    timed alone."""
    def once(f):
        start = time.perf_counter()
        f()
        return time.perf_counter() - start
    firsts = list(firsts) if firsts is not None else [None] * len(fns)
    firsts = [once(f) if t is None else t for f, t in zip(fns, firsts)]
    numbers = [_calls_per_sample(t) for t in firsts]
    samples: list[list[float]] = [[] for _ in fns]
    spent = [0.0 for _ in fns]
    while len(samples[0]) < min_repeat or min(spent) < min_time and max(
            len(s) for s in samples) < 10000:
        for k, (f, number) in enumerate(zip(fns, numbers)):
            f()  # untimed: brings its data back into the caches the others used
            start = time.perf_counter()
            for _ in range(number):
                f()
            elapsed = time.perf_counter() - start
            samples[k].append(elapsed / number)
            spent[k] += elapsed
        if len(samples[0]) >= min_repeat and max(spent) > 50 * min_time:
            break  # a slow function (naive NumPy) has had its share
    return [{"best": min(s), "median": float(np.median(s)), "samples": len(s), "number": n}
            for s, n in zip(samples, numbers)]


def set_threads(n: int) -> None:
    """Use `n` threads in fastbn and in the other libraries that have a setting for it."""
    fastbn.set_num_threads(n)
    if _installed("torch"):
        import torch
        torch.set_num_threads(n)


def library_versions() -> dict:
    """Versions of everything the benchmarks touch."""
    import platform
    versions = {"python": platform.python_version(), "fastbn": fastbn.__version__,
                "numpy": np.__version__}
    for name in ("numba", "torch", "onnxruntime", "jax", "Cython"):
        if _installed(name):
            try:
                versions[name] = importlib.import_module(name).__version__
            except Exception as exc:  # noqa: BLE001 -- report, do not fail
                versions[name] = f"import failed: {exc}"
    return versions


__all__ = ["Case", "Inputs", "Layout", "Operation", "Prepared", "Shape", "ALL_BACKENDS",
           "BASELINE", "DTYPES", "LAYOUTS", "OPERATIONS", "QUICK_SHAPES", "SHAPES",
           "available_backends", "backend_label", "cases", "inputs", "prepare", "reference",
           "set_threads", "supports_out", "valid", "library_versions", "measure"]
