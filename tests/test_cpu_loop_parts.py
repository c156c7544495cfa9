"""Two CPU speed-ups that must not change what is computed: mlx_lm's SwiGLU in numpy inside the
experts' loop kernel, and the float32 matmuls evaluated one at a time inside the lanes."""
from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest

from reap_stream.blas import mlx_core
from reap_stream.families.stacks import loop_activation
from reap_stream.runner.cpu import eager_linears, float32_linears


def _switch(activation=None):
    from mlx_lm.models.switch_layers import SwitchGLU

    return SwitchGLU(16, 8, 4) if activation is None else SwitchGLU(16, 8, 4, activation=activation)


def test_the_loop_computes_mlx_lm_swiglu_in_numpy_within_float32_rounding():
    mx = mlx_core()
    rng = np.random.default_rng(0)
    gate = np.concatenate([rng.standard_normal((64, 8)).astype(np.float32) * 6,
                           np.array([[-200, -89, -88, -1e-30, 0, 1e-30, 88, 200]], np.float32)])
    up = rng.standard_normal(gate.shape).astype(np.float32)
    switch = _switch()
    numpy_swiglu = loop_activation(switch)
    assert numpy_swiglu is not None
    ours = np.array(numpy_swiglu(mx.array(up), mx.array(gate)))
    theirs = np.array(switch.activation(mx.array(up), mx.array(gate)))
    assert ours.dtype == np.float32 and np.all(np.isfinite(ours))
    np.testing.assert_allclose(ours, theirs, rtol=2e-6, atol=1e-37)   # a few units in the last place: two exps
    assert np.array_equal(np.signbit(ours[-1, :3]), np.signbit(theirs[-1, :3]))   # where exp overflows: the zeros' signs too


def test_non_finite_values_give_mlx_lm_values_and_no_warning():
    mx = mlx_core()
    gate = np.array([[-np.inf, np.inf, np.nan, 1.0, 1.0, -200.0]], np.float32)
    up = np.array([[1.0, 1.0, 1.0, np.inf, np.nan, np.inf]], np.float32)
    switch = _switch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # numpy's overflow / invalid-value warnings would reach the user
        ours = np.array(loop_activation(switch)(mx.array(up), mx.array(gate)))
    theirs = np.array(switch.activation(mx.array(up), mx.array(gate)))
    assert np.array_equal(ours, theirs, equal_nan=True)


def test_the_inputs_of_the_numpy_swiglu_are_left_as_they_were():
    mx = mlx_core()
    gate, up = mx.array(np.linspace(-3, 3, 32, dtype=np.float32).reshape(4, 8)), mx.array(np.ones((4, 8), np.float32))
    before = np.array(gate), np.array(up)
    loop_activation(_switch())(up, gate)
    assert np.array_equal(np.array(gate), before[0]) and np.array_equal(np.array(up), before[1])


def test_other_activations_keep_the_stack_own_module():
    from mlx_lm.models.activations import SwigluOAI

    assert loop_activation(_switch(SwigluOAI())) is None
    assert loop_activation([object()]) is None   # a list of expert modules (DBRX)


def _counting_evals(monkeypatch) -> list:
    """The threads mx.eval is called from, from now on."""
    mx = mlx_core()
    calls: list = []
    real = mx.eval

    def counting(*arrays):
        calls.append(threading.get_ident())
        return real(*arrays)

    monkeypatch.setattr(mx, "eval", counting)
    return calls


def _bf16_linear(in_dims: int, out_dims: int, quantised: bool = False):
    """A bf16 (or 4-bit) Linear as the CPU runs it: through the float32 BLAS."""
    mx = mlx_core()
    import mlx.nn as nn

    layer = nn.Linear(in_dims, out_dims)
    layer.update({"weight": layer.weight.astype(mx.bfloat16), "bias": layer.bias.astype(mx.bfloat16)})
    if quantised:
        nn.quantize(layer, group_size=64, bits=4)
    float32_linears(layer)
    mx.eval(layer.parameters())
    return layer


@pytest.mark.parametrize("quantised", [False, True])
def test_inside_eager_linears_each_matmul_is_evaluated_as_it_is_made(monkeypatch, quantised):
    mx = mlx_core()
    layer = _bf16_linear(64, 32, quantised)
    x = mx.array(np.random.default_rng(1).standard_normal((3, 64), dtype=np.float32)).astype(mx.bfloat16)
    lazy = layer(x)
    calls = _counting_evals(monkeypatch)
    layer(x)
    assert calls == []           # outside the context nothing is evaluated early
    with eager_linears():
        eager = layer(x)
        with eager_linears():    # re-entrant
            layer(x)
        assert len(calls) == 2
    layer(x)
    assert len(calls) == 2       # the context is left as it was found
    assert np.array_equal(np.array(eager.astype(mx.float32)), np.array(lazy.astype(mx.float32)))


def test_eager_linears_holds_for_its_own_thread_only(monkeypatch):
    mx = mlx_core()
    layer = _bf16_linear(8, 8)
    x = mx.ones((2, 8), mx.bfloat16)
    mx.eval(x)
    calls = _counting_evals(monkeypatch)
    inside, outside = threading.Event(), threading.Event()

    def other():
        inside.wait()
        layer(x)   # built, never evaluated
        outside.set()

    t = threading.Thread(target=other)
    t.start()
    with eager_linears():
        inside.set()
        outside.wait()
    t.join()
    assert calls == []
