"""Every wrong call raises ValueError/TypeError naming the argument, and changes nothing."""
import numpy as np
import pytest

import fastbn

C = 3


def fresh():
    rng = np.random.default_rng(0)
    return dict(x=rng.standard_normal((4, C, 5)).astype(np.float32),
                rm=np.zeros(C, np.float32), rv=np.ones(C, np.float32),
                w=np.ones(C), b=np.zeros(C))


FORWARD_CASES = [
    # (description, overrides of the call, exception, words the message must contain)
    ("running_mean length", dict(running_mean=np.zeros(C + 1, np.float32)), ValueError, "running_mean"),
    ("running_var length", dict(running_var=np.ones(C - 1, np.float32)), ValueError, "running_var"),
    ("running_mean list in training", dict(running_mean=[0.0] * C), TypeError, "running_mean"),
    ("running_var int dtype", dict(running_var=np.ones(C, np.int64)), TypeError, "running_var"),
    ("running_mean read-only", dict(running_mean="readonly"), ValueError, "running_mean"),
    ("only one running stat", dict(running_var=None), ValueError, "running_var"),
    ("weight length", dict(weight=np.ones(C + 2)), ValueError, "weight"),
    ("bias length", dict(bias=np.ones((C, 1))), ValueError, "bias"),
    ("complex weight", dict(weight=np.ones(C, complex)), TypeError, "weight"),
    ("out shape", dict(out=np.empty((4, C, 6), np.float32)), ValueError, "out"),
    ("out dtype", dict(out=np.empty((4, C, 5), np.float64)), TypeError, "out"),
    ("out read-only", dict(out="readonly"), ValueError, "out"),
    ("out not an array", dict(out=[0.0]), TypeError, "out"),
    ("residual shape", dict(residual=np.ones((4, C, 4))), ValueError, "residual"),
    ("residual dtype", dict(residual=np.ones((4, C, 5), complex)), TypeError, "residual"),
    ("ndim < 2", dict(input=np.ones(5, np.float32)), ValueError, "input"),
    ("axis out of range", dict(axis=3), ValueError, "axis"),
    ("axis negative out of range", dict(axis=-4), ValueError, "axis"),
    ("axis not int", dict(axis=1.0), TypeError, "axis"),
    ("negative eps", dict(eps=-1e-5), ValueError, "eps"),
    ("eps not a number", dict(eps="1e-5"), TypeError, "eps"),
    ("momentum out of range", dict(momentum=1.5), ValueError, "momentum"),
    ("unknown activation", dict(activation="gelu"), ValueError, "activation"),
    ("unknown backend", dict(backend="cuda"), ValueError, "backend"),
    ("backend not a str", dict(backend=1), TypeError, "backend"),
    ("complex input", dict(input=np.ones((4, C, 5), complex)), TypeError, "input"),
    ("object input", dict(input=np.array([[1, None, 2]] * 4, dtype=object)), TypeError, "input"),
    ("string input", dict(input=np.array([["a", "b", "c"]] * 4)), TypeError, "input"),
    ("zero-size batch", dict(input=np.ones((0, C, 5), np.float32)), ValueError, "input"),
    ("one value per channel", dict(input=np.ones((1, C, 1), np.float32)), ValueError,
     "more than 1 value per channel"),
]


def call_forward(backend_name, training=True, **overrides):
    args = fresh()
    kwargs = dict(input=args["x"], running_mean=args["rm"], running_var=args["rv"],
                  weight=args["w"], bias=args["b"], training=training, backend=backend_name)
    for key, value in overrides.items():
        if isinstance(value, str) and value == "readonly":
            value = np.zeros(C, np.float32) if key == "running_mean" else np.empty_like(args["x"])
            value.flags.writeable = False
        kwargs[key] = value
    return kwargs


@pytest.mark.parametrize("description,overrides,error,words", FORWARD_CASES,
                         ids=[c[0] for c in FORWARD_CASES])
def test_forward_rejects(backend, description, overrides, error, words):
    kwargs = call_forward(backend, **overrides)
    snapshot = {k: v.copy() for k, v in kwargs.items() if isinstance(v, np.ndarray)}
    with pytest.raises(error, match=words):
        fastbn.batch_norm(**kwargs)
    for key, before in snapshot.items():
        np.testing.assert_array_equal(kwargs[key], before, err_msg=f"{key} was modified")


def test_eval_requires_running_stats(backend):
    with pytest.raises(ValueError, match="running_mean"):
        fastbn.batch_norm(np.ones((2, 3)), None, None, training=False, backend=backend)


def test_failed_call_leaves_running_stats_and_out(backend):
    rm, rv = np.full(C, 0.5), np.full(C, 2.0)
    out = np.full((4, C, 5), 7.0, np.float32)
    with pytest.raises(ValueError, match="residual"):
        fastbn.batch_norm(fresh()["x"], rm, rv, training=True, out=out,
                          residual=np.ones((4, C, 6)), backend=backend)
    assert (rm == 0.5).all() and (rv == 2.0).all() and (out == 7.0).all()


class _LooksLikeRelu:
    """Equal to "relu" without being a str."""
    def __eq__(self, other):
        return other == "relu"

    def __ne__(self, other):
        return other != "relu"

    __hash__ = object.__hash__


BACKWARD_CASES = [
    ("shape mismatch", dict(grad_output=np.ones((4, C, 6))), ValueError, "grad_output"),
    ("relu without output", dict(activation="relu"), ValueError, "output"),
    ("output shape", dict(activation="relu", output=np.ones((4, C, 6))), ValueError, "output"),
    ("mean length", dict(mean=np.zeros(C + 1)), ValueError, "mean"),
    ("invstd length", dict(invstd=np.ones(1)), ValueError, "invstd"),
    ("weight length", dict(weight=np.ones(C + 1)), ValueError, "weight"),
    ("out dtype", dict(out=np.empty((4, C, 5), np.float64)), TypeError, "out"),
    ("out read-only", dict(out="readonly"), ValueError, "out"),
    ("unknown activation", dict(activation="tanh"), ValueError, "activation"),
    ("complex grad", dict(grad_output=np.ones((4, C, 5), complex)), TypeError, "grad_output"),
    ("ndim < 2", dict(input=np.ones(4), grad_output=np.ones(4)), ValueError, "input"),
    ("axis out of range", dict(axis=-5), ValueError, "axis"),
    ("mean None", dict(mean=None, out="writable"), TypeError, "mean"),
    ("invstd None", dict(invstd=None, out="writable"), TypeError, "invstd"),
    ("activation not a str", dict(activation=_LooksLikeRelu(), output=np.ones((4, C, 5)),
                                  out="writable"), ValueError, "activation"),
]


@pytest.mark.parametrize("description,overrides,error,words", BACKWARD_CASES,
                         ids=[c[0] for c in BACKWARD_CASES])
def test_backward_rejects(backend, description, overrides, error, words):
    x = fresh()["x"]
    kwargs = dict(grad_output=np.ones_like(x), input=x, mean=np.zeros(C), invstd=np.ones(C),
                  backend=backend)
    for key, value in overrides.items():
        if isinstance(value, str) and value == "readonly":
            value = np.empty_like(x)
            value.flags.writeable = False
        elif isinstance(value, str) and value == "writable":  # must stay as it is
            value = np.full_like(x, 7.0)
        kwargs[key] = value
    snapshot = {k: v.copy() for k, v in kwargs.items() if isinstance(v, np.ndarray)}
    with pytest.raises(error, match=words):
        fastbn.batch_norm_backward(**kwargs)
    for key, before in snapshot.items():
        np.testing.assert_array_equal(kwargs[key], before)


def test_set_num_threads_rejects():
    with pytest.raises(ValueError, match="n must be"):
        fastbn.set_num_threads(0)
    with pytest.raises(TypeError, match="n must be"):
        fastbn.set_num_threads(1.5)


def test_huge_axis_is_a_value_error(backend):
    with pytest.raises(ValueError, match="axis"):
        fastbn.batch_norm(np.ones((4, 3), np.float32), None, None, training=True, axis=2**40,
                          backend=backend)


@pytest.mark.parametrize("backend", [["numba"], 3])
def test_backend_of_another_type_is_named(backend):
    """A backend that is not a str reaches get_backend's message, on the fast paths' lookup
    too (an unhashable one once gave 'unhashable type')."""
    x = np.ones((4, 3))
    with pytest.raises(TypeError, match="backend must be"):
        fastbn.batch_norm(x, None, None, training=True, backend=backend)
    with pytest.raises(TypeError, match="backend must be"):
        fastbn.batch_norm_backward(x, x, np.zeros(3), np.ones(3), backend=backend)
