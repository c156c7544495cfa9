"""Load a pruned MLX checkpoint whose MoE layers keep different numbers of experts.

mlx_lm builds every MoE layer with the single count in config.json, so it cannot load a
non-uniform prune. The shapes of the stored tensors say how many experts each layer holds; the
routing code never depends on the count itself (top-k, softmax and group reshapes all follow the
router's output width), so the model is built as usual and loaded without the shape check, then
every parameter is checked against the stored tensors by hand.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import BadInput
from ..io.reading import read_json_object
from .table import attr


def fit_layer_counts(model, layer_experts: dict[int, int], fam=None) -> None:
    """mlx_lm builds every MoE layer with config.json's one count. Where the count is more than
    the shapes of stacked tensors, fit each pruned layer to its own: a list of expert modules
    (DBRX) loses the modules past it; where router ids past the routed experts are identity
    experts (LongCat), the block's own count of routed experts (which tells them apart) is set."""
    from .masking import moe_blocks, moe_spec

    fam = fam or moe_spec(model)
    for layer, block in moe_blocks(model, fam).items():
        if layer not in layer_experts:
            continue
        owner_path, _, name = fam.stacked.rpartition(".")
        owner = attr(block, owner_path) if owner_path else block
        if isinstance(owner[name], list):
            owner[name] = owner[name][: layer_experts[layer]]
        if fam.identity_experts is not None:
            owner_path, _, name = fam.identity_experts[1].rpartition(".")
            setattr(attr(block, owner_path) if owner_path else block, name, layer_experts[layer])


def load_pruned(path: str | Path) -> tuple:
    """(model, tokenizer) for any reap-stream output (and any model mlx_lm.load takes)."""
    from mlx_lm.utils import load_tokenizer

    model, config = load_pruned_model(path)
    return model, load_tokenizer(Path(path), eos_token_ids=config.get("eos_token_id"))


def load_pruned_model(path: str | Path) -> tuple:
    """(model, config): mlx_lm's load_model, building non-uniform prunes with per-layer counts."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    path = Path(path)
    config = read_json_object(path / "config.json", "config")
    if (config.get("reap_stream") or {}).get("uniform", True):
        return load_model(path)
    model, config = load_model(path, lazy=True, strict=False)
    fit_layer_counts(model, {int(k): v for k, v in config["reap_stream"]["layer_experts"].items()})
    stored: dict[str, tuple] = {}
    for shard in sorted(path.glob("model*.safetensors")):
        stored.update({k: v.shape for k, v in mx.load(str(shard)).items()})
    params = dict(tree_flatten(model.parameters()))
    missing = sorted(set(params) - set(stored))
    if missing:
        raise BadInput(path, f"parameter {missing[0]} is not stored in the checkpoint")
    wrong = [k for k, v in params.items() if tuple(v.shape) != tuple(stored[k])]
    if wrong:
        raise BadInput(path, f"parameter {wrong[0]} has shape {params[wrong[0]].shape}, stored {stored[wrong[0]]}")
    mx.eval(model.parameters())
    model.eval()
    return model, config
