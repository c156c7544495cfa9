"""The forms an mlx_lm expert stack takes, evaluated one expert at a time (families/experts.py).

SwitchGLU: down(activation(up(x), gate(x))) — SwiGLU, GeGLU, clamped or OAI variants alike, since
the stack's own `activation` module is called (on the CPU, mlx_lm's plain SwiGLU is computed in
numpy: `loop_activation`). SwitchMLP: fc2(activation(fc1(x))) — two
projections (Nemotron-H's relu², Phixtral's GELU). Each projection is a (Quantized)SwitchLinear
whose axis 0 is the expert. A list of expert modules (DBRX): each called as itself.
"""
from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..errors import BadInput
from .expert_source import GLU, MLP


def projections(switch) -> tuple[str, ...]:
    """The projection names of an expert stack (none for a list of expert modules), or one line
    saying it is of no known form."""
    if isinstance(switch, list):
        return ()
    for names in (GLU, MLP):
        if all(hasattr(switch, p) for p in names):
            return names
    raise BadInput("model", f"expert module {type(switch).__name__} is neither a gated (SwitchGLU) nor a "
                            f"two-projection (SwitchMLP) expert stack nor a list of experts")


def num_experts(switch) -> int:
    """The experts a stack holds (its projections' axis 0)."""
    if isinstance(switch, list):
        return len(switch)
    return int(getattr(switch, projections(switch)[0])["weight"].shape[0])


def parameters(switch):
    """The stack's parameters as a tree (mx.eval takes it)."""
    return [m.parameters() for m in switch] if isinstance(switch, list) else switch.parameters()


def out_dims(switch) -> int:
    """Width of the experts' outputs (the hidden size, or a latent size)."""
    if isinstance(switch, list):
        last = list(switch[0].children().values())[-1]
        return int(last["weight"].shape[0])
    last = getattr(switch, projections(switch)[-1])
    return int(last["weight"].shape[1] if "scales" not in last else last["scales"].shape[1])


def expert_forward(switch, e: int, x: mx.array, linear, activation=None) -> mx.array:
    """f_e(x) for expert e of the stack, `linear(lin, e, x)` computing one projection and
    `activation` standing in for the stack's own (None: the stack's)."""
    if isinstance(switch, list):
        return switch[e](x)
    act = activation or switch.activation
    if projections(switch) == GLU:
        up = linear(switch.up_proj, e, x)
        gate = linear(switch.gate_proj, e, x)
        return linear(switch.down_proj, e, act(up, gate))
    return linear(switch.fc2, e, act(linear(switch.fc1, e, x)))


def loop_activation(switch):
    """What the loop kernel calls for the stack's activation on the CPU: silu(gate) * up in numpy
    for mlx_lm's plain SwiGLU (MLX's CPU `exp` is ~10x slower: docs/memory.md), else None (the
    stack's own module). Float32 either way; the two differ in the last bits of `exp`."""
    from mlx_lm.models.switch_layers import SwiGLU

    plain = type(getattr(switch, "activation", None)) is SwiGLU
    return _swiglu_numpy if plain and mx.default_device() == mx.cpu else None


def _swiglu_numpy(up: mx.array, gate: mx.array) -> mx.array:
    g = np.array(gate.astype(mx.float32))   # a copy of our own, computed on in place
    # exp(-g) is inf below g = -88: silu is then -0.0, and NaN at g = -inf, as MLX's (no warning)
    with np.errstate(over="ignore", invalid="ignore"):
        s = np.exp(-g)
        s += 1.0
        np.divide(g, s, out=g)
        g *= np.array(up.astype(mx.float32), copy=False)
    return mx.array(g)
