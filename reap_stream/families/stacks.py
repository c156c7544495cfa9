"""The forms an mlx_lm expert stack takes, evaluated one expert at a time (families/experts.py).

SwitchGLU: down(activation(up(x), gate(x))) — SwiGLU, GeGLU, clamped or OAI variants alike, since
the stack's own `activation` module is called. SwitchMLP: fc2(activation(fc1(x))) — two
projections (Nemotron-H's relu², Phixtral's GELU). Each projection is a (Quantized)SwitchLinear
whose axis 0 is the expert.
"""
from __future__ import annotations

import mlx.core as mx

from ..errors import BadInput

GLU = ("gate_proj", "up_proj", "down_proj")
MLP = ("fc1", "fc2")


def projections(switch) -> tuple[str, ...]:
    """The projection names of an expert stack, or one line saying it is of no known form."""
    for names in (GLU, MLP):
        if all(hasattr(switch, p) for p in names):
            return names
    raise BadInput("model", f"expert module {type(switch).__name__} is neither a gated (SwitchGLU) nor a "
                            f"two-projection (SwitchMLP) expert stack")


def expert_forward(switch, e: int, x: mx.array, linear) -> mx.array:
    """f_e(x) for expert e of the stack, `linear(lin, e, x)` computing one projection."""
    if projections(switch) == GLU:
        up = linear(switch.up_proj, e, x)
        gate = linear(switch.gate_proj, e, x)
        return linear(switch.down_proj, e, switch.activation(up, gate))
    return linear(switch.fc2, e, switch.activation(linear(switch.fc1, e, x)))
