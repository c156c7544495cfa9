"""A model's forward traced with stand-ins for its decoder layers: each layer's call arguments as
the model builds them (masks, caches, extra arguments), so that the runners can call one layer at a
time exactly as the whole forward would. Layers returning (h, *state) get state markers; layers that
do not chain (a layer not fed its predecessor's output as is, state from further back, an output
the model reshapes) are refused, never run wrong.
"""
from __future__ import annotations

import numpy as np

from ..blas import mlx_core
from ..errors import BadInput
from ..families.table import Family


def layer_list(model) -> list:
    """The list object the inner model iterates over (so its items can be swapped): the stored
    list holding model.layers[0], wherever it sits (`model.layers` may be a property returning a
    fresh slice of it, as mlx_lm's pipeline-parallel models do)."""
    first = model.layers[0]
    for path, module in model.named_modules():
        if module is first and path.endswith(".0"):
            holder = model
            for part in path.split(".")[:-2]:
                holder = getattr(holder, part)
            layers = getattr(holder, path.split(".")[-2], None)
            if isinstance(layers, list) and layers and layers[0] is first:
                return layers
    raise BadInput("model", f"cannot find the decoder layer list of {type(model).__module__}")


class Tracer:
    """Stands in for a decoder layer: records its call arguments, passes the hidden state on. The
    model's forward may read the layer's attributes (which mask a hybrid layer takes): those come
    from the layer it stands in for."""

    def __init__(self, out=None, layer=None, index: int = 0, outputs: int = 1, state_is_none: bool = False):
        self.args: tuple = ()
        self.kwargs: dict = {}
        self.x = None
        self.out = out
        self.layer = layer
        self.model_output = None  # set on tracer 0: the model's (lazy) output
        # a layer returning (h, *state) (Family.layer_outputs): the state stands in as markers
        self.extras = tuple(None if state_is_none else State(index, j) for j in range(1, outputs))

    def __getattr__(self, name):
        layer = self.__dict__.get("layer")
        if layer is None:
            raise AttributeError(name)
        return getattr(layer, name)

    def __call__(self, x, *args, **kwargs):
        self.x, self.args, self.kwargs = x, args, kwargs
        h = x if self.out is None else self.out
        return (h, *self.extras) if len(self.extras) else h

    @property
    def needs(self) -> list["State"]:
        """The earlier layers' state outputs this layer is called with."""
        return [v for v in (*self.args, *self.kwargs.values()) if isinstance(v, State)]

    def bind(self, states: dict) -> tuple[tuple, dict]:
        """This layer's call arguments with the state markers replaced by the states themselves."""
        def real(v):
            return states[(v.layer, v.index)] if isinstance(v, State) else v
        return tuple(real(v) for v in self.args), {k: real(v) for k, v in self.kwargs.items()}


def split_outputs(family: Family, out) -> tuple:
    """(h, state) of a layer's output; state is () for layers returning h alone. A state the row
    says is None must be (checked on every call: never carried wrong)."""
    if family.layer_outputs == 1:
        return out, ()
    h, state = out[0], tuple(out[1:])
    if family.state_is_none and any(v is not None for v in state):
        raise BadInput("model", f"{family.model_type}: a decoder layer hands state to the next one "
                                f"(attention residuals?); a layer-by-layer run cannot carry it")
    return h, state


class State:
    """Marks output `index` of layer `layer` where the traced forward hands it to a later layer
    (Hunyuan's cross-layer attention passes K/V on this way)."""

    def __init__(self, layer: int, index: int):
        self.layer, self.index = layer, index


def trace_layers(model, tokens: np.ndarray, final=None, family: Family | None = None) -> list[Tracer]:
    """Run the model's own forward with tracers in place of its layers (nothing heavy is evaluated).

    Tracer i holds layer i's arguments; tracer 0's input `x` is the embedding output. With `final`
    given, every tracer returns it, so the model's output is its head applied to `final`. Layers
    that return (h, *state) (the family's layer_outputs > 1) return state markers; a layer may take
    only its predecessor's state (what the runners carry from one layer to the next).
    """
    mx = mlx_core()
    layers = layer_list(model)
    saved = list(layers)
    outputs, none = (family.layer_outputs, family.state_is_none) if family is not None else (1, False)
    tracers = [Tracer(final, layer, i, outputs, none) for i, layer in enumerate(layers)]
    try:
        layers[:] = tracers
        out = model(mx.array(tokens))
    except (TypeError, ValueError) as e:  # e.g. unpacking a tuple the tracer did not return
        raise _not_layer_by_layer(model, f"its forward failed with layers traced ({e})") from None
    finally:
        layers[:] = saved
    for i in range(1, len(tracers)):
        previous = tracers[i - 1].x if final is None else final
        if tracers[i].x is not previous:
            raise _not_layer_by_layer(model, f"decoder layer {i} does not take layer {i - 1}'s output as its input")
        if any(s.layer != i - 1 for s in tracers[i].needs):
            raise _not_layer_by_layer(model, f"decoder layer {i} takes state from a layer before layer {i - 1}")
    if tuple(getattr(out, "shape", ())[:-1]) != tuple(np.shape(tokens)):
        raise _not_layer_by_layer(model, f"its output has shape {list(getattr(out, 'shape', []))} for tokens of "
                                         f"shape {list(np.shape(tokens))} with layers traced")
    tracers[0].model_output = out
    return tracers


def _not_layer_by_layer(model, why: str) -> BadInput:
    """Layers that return tuples or hand state to the next layer cannot be run one layer at a
    time from recorded arguments: refused, never run wrong (a [B, L, D] output unpacked into
    (h, state) splits along the batch axis without an error)."""
    return BadInput("model", f"{type(model).__module__.rpartition('.')[2]}: {why}; "
                             f"a layer-by-layer run cannot reproduce this model")


# ------------------------------------------------------------------ MoE hook
