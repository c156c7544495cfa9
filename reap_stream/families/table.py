"""What each MoE family calls its tensors and config keys, kept as data.

Tensor names are matched against the mlx_lm layout (stacked experts, axis 0 = expert) and the
Hugging Face layout (one tensor per expert, or fused [E, ...] stacks). Everything that carries an
expert axis is listed here; all other tensors are copied untouched.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from ..errors import BadInput


class Routing(str, Enum):
    SOFTMAX_TOPK = "softmax_topk"    # softmax over all experts, top-k, optional renorm
    TOPK_SOFTMAX = "topk_softmax"    # top-k on raw logits, softmax over the k
    SIGMOID_GROUP = "sigmoid_group"  # sigmoid, bias for selection only, group-limited top-k


@dataclass(frozen=True)
class Family:
    model_type: str
    experts_key: str        # config key holding the routed expert count
    routing: Routing
    block: str              # MoE block module under a decoder layer
    stacked: str            # stacked experts module under the block (mlx_lm layout)
    router: str             # router module under the block
    hf_experts: str = "experts"   # per-expert modules under the block (HF layout)
    hf_names: dict[str, str] | None = None  # HF per-expert projection -> mlx_lm projection
    shared: str | None = None     # shared-expert module, never pruned
    gguf_arch: str | None = None


_SWIGLU = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}

FAMILIES: dict[str, Family] = {f.model_type: f for f in [
    Family("qwen3_moe", "num_experts", Routing.SOFTMAX_TOPK, "mlp", "switch_mlp", "gate",
           hf_names=_SWIGLU, gguf_arch="qwen3moe"),
    Family("qwen2_moe", "num_experts", Routing.SOFTMAX_TOPK, "mlp", "switch_mlp", "gate",
           hf_names=_SWIGLU, shared="shared_expert", gguf_arch="qwen2moe"),
    Family("olmoe", "num_experts", Routing.SOFTMAX_TOPK, "mlp", "switch_mlp", "gate",
           hf_names=_SWIGLU, gguf_arch="olmoe"),
    Family("mixtral", "num_local_experts", Routing.TOPK_SOFTMAX, "block_sparse_moe", "switch_mlp",
           "gate", hf_names={"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"},
           gguf_arch="llama"),
    Family("gpt_oss", "num_local_experts", Routing.TOPK_SOFTMAX, "mlp", "experts", "router",
           gguf_arch="gpt-oss"),
    Family("deepseek_v3", "n_routed_experts", Routing.SIGMOID_GROUP, "mlp", "switch_mlp", "gate",
           hf_names=_SWIGLU, shared="shared_experts", gguf_arch="deepseek2"),
    Family("glm4_moe", "n_routed_experts", Routing.SIGMOID_GROUP, "mlp", "switch_mlp", "gate",
           hf_names=_SWIGLU, shared="shared_experts", gguf_arch="glm4moe"),
]}

# router tensors whose axis 0 is the expert axis
ROUTER_PARAMS = ("weight", "bias", "scales", "biases", "e_score_correction_bias")

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def family_of(config: dict, where: str = "config.json") -> Family:
    model_type = config.get("model_type")
    fam = FAMILIES.get(model_type)
    if fam is None:
        raise BadInput(where, f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}")
    return fam


def _config_int(config: dict, key: str, where: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadInput(where, f"{key} must be a positive integer (got {value!r})")
    return value


def num_experts(config: dict, fam: Family, where: str = "config.json") -> int:
    return _config_int(config, fam.experts_key, where)


def top_k(config: dict, where: str = "config.json") -> int:
    return _config_int(config, "num_experts_per_tok", where)


@dataclass(frozen=True)
class ExpertTensor:
    """How a tensor relates to the experts of its layer."""

    layer: int
    kind: str               # "stacked" (axis 0 = expert), "router" (axis 0 = expert) or "per_expert"
    expert: int | None = None  # for per_expert
    prefix: str = ""        # per_expert: name up to and including "experts."
    suffix: str = ""        # per_expert: name after the expert id


def classify(name: str, fam: Family) -> ExpertTensor | None:
    """Return the expert relation of a tensor name, or None for tensors without an expert axis."""
    m = _LAYER.search(name)
    if not m:
        return None
    layer = int(m.group(1))
    rest = name[m.end():]
    head = fam.block + "."
    if not rest.startswith(head):
        return None
    rest = rest[len(head):]
    for module in dict.fromkeys((fam.stacked, fam.hf_experts)):
        if rest.startswith(module + "."):
            tail = rest[len(module) + 1:]
            first, _, after = tail.partition(".")
            if first.isdigit():
                return ExpertTensor(layer, "per_expert", int(first),
                                    name[: len(name) - len(tail)], after)
            return ExpertTensor(layer, "stacked")
    if rest.startswith(fam.router + "."):
        param = rest[len(fam.router) + 1:]
        if param in ROUTER_PARAMS:
            return ExpertTensor(layer, "router")
    return None
