"""What a family row is (`Family`), and how a family routes, as data: the routing kind
(`Routing`) and its parameters (`Route`, computed by families/routing.py). The rows are in
families/table.py (the first seven) and families/rows.py; the views of them in table.py."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType


class Routing(str, Enum):
    SOFTMAX_TOPK = "softmax_topk"    # scores over all experts (softmax), top-k, optional renorm
    TOPK_SOFTMAX = "topk_softmax"    # top-k on raw logits, softmax over the k
    SIGMOID_GROUP = "sigmoid_group"  # scores (sigmoid), bias for selection only, group-limited top-k
    TOP1_SIGMOID_INPUT = "top1_sigmoid_input"  # Llama-4: top-1, sigmoid(logit) scales the expert INPUT
    SPARSEMIXER = "sparsemixer"      # PhiMoE: k rounds of argmax, softmax over the jitter band
    LAYER_ROUTER = "layer_router"    # Gemma-4: the decoder layer's own router module selects and weighs

    @property
    def mask_rule(self) -> str:
        """How the masked original keeps pruned experts out of routing (families/masking.py), for
        this kind's default route: "logits" (-inf router logits) or "selection_bias" (-inf selection
        bias, for sigmoid routers where sigmoid(-inf) = 0 could still be picked)."""
        return "selection_bias" if self is Routing.SIGMOID_GROUP else "logits"


@dataclass(frozen=True)
class At:
    """A routing parameter read from the MoE block when it routes: a dotted attribute path under
    the block (e.g. "gate.routed_scaling_factor"), so the capture uses the very value the block's
    forward uses. `default` stands in when the attribute is absent (else that is an error)."""
    path: str
    default: object = None
    required: bool = True


def at(path: str, *default) -> At:
    return At(path, default[0], False) if default else At(path)


@dataclass(frozen=True)
class Route:
    """The parameters of a scored router (kinds SOFTMAX_TOPK, TOPK_SOFTMAX, SIGMOID_GROUP), as
    routing.scored computes them, op for op as mlx_lm's blocks do:

        logits -> [float32] -> score -> (+ selection bias) -> [group limit] -> top-k
               -> weights = unbiased scores of the k [renormalised] [* scale]

    score "logits" selects on the raw logits and weighs by a softmax over the k (TOPK_SOFTMAX).
    Values given as `At` are read from the block when it routes."""
    logits: str = "router"       # "router": router(x); "router_f32_input": router(x.astype(f32));
    #                              "weight": x @ router.weight.T; "weight_f32": both cast to f32 first
    score: object = "softmax"     # "softmax" | "sigmoid" | "sqrtsoftplus" | "logits", or At(...) naming
    #                              one of these or the block's own activation module
    f32: bool = False            # logits cast to float32 before scoring (TOPK_SOFTMAX: the k selected)
    precise: bool = True         # softmax(precise=...)
    bias: str | None = None      # selection-only bias under the block
    bias_optional: bool = False  # a config switch may leave the block without it
    bias_cast: bool = False      # the bias is cast to the scores' dtype before the add
    groups: str | None = None    # group-limited top-k: groups scored by "top2sum" or "max"
    n_group: object = 1
    topk_group: object = 1
    group_fill: float = 0.0      # what losing groups are filled with (mlx_lm: 0.0, or -inf)
    group_if: tuple | None = None  # (path, value): groups only while that attribute has that value
    renorm: str | None = None    # "sum": w / (sum + eps); "max": w / max(sum, eps); "l1": w / |w|_1
    renorm_eps: float = 0.0
    renorm_if: object = True     # At(flag) or True
    renorm_k1: bool = True       # renormalise with k == 1 too
    scale: object = None         # At(...) or a number: the routed scaling factor (None: none)
    softcap: object = None       # At(...): float32 logits -> tanh(l / cap) * cap when cap > 0
    post_scale: str | None = None  # a per-expert [E] factor under the block, taken at the selection


# the route each kind has unless the row gives its own (the first seven families' routing)
DEFAULT_ROUTES = MappingProxyType({
    # Qwen2/3-MoE, OLMoE: softmax over all experts, top-k, renormalised if the block says so
    Routing.SOFTMAX_TOPK: Route(renorm="sum", renorm_if=at("norm_topk_prob", False)),
    # Mixtral, gpt-oss: top-k on the raw logits (router bias included), softmax over the k
    Routing.TOPK_SOFTMAX: Route(score="logits"),
    # DeepSeek-V3, GLM-4.5: sigmoid of float32 logits of the raw gate weight, correction bias for
    # selection only, top-2-sum groups zero-filled, unbiased weights renormalised (k > 1) * scale
    Routing.SIGMOID_GROUP: Route(logits="weight", f32=True, score="sigmoid", bias="gate.e_score_correction_bias",
                                 groups="top2sum", n_group=at("gate.n_group"), topk_group=at("gate.topk_group"),
                                 renorm="sum", renorm_if=at("gate.norm_topk_prob"), renorm_k1=False,
                                 scale=at("gate.routed_scaling_factor")),
    Routing.TOP1_SIGMOID_INPUT: Route(score="sigmoid"),
    Routing.SPARSEMIXER: Route(score="logits"),
    Routing.LAYER_ROUTER: Route(score="logits"),
})


_SWIGLU = MappingProxyType({"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"})
_W123 = MappingProxyType({"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"})
_DEEPSEEK_TINY = {
    "n_shared_experts": 1, "n_group": 2, "topk_group": 1, "norm_topk_prob": True, "topk_method": "noaux_tc",
    "scoring_func": "sigmoid", "first_k_dense_replace": 1, "moe_intermediate_size": 32, "intermediate_size": 128,
}


# router tensors whose axis 0 is the expert axis
ROUTER_PARAMS = ("weight", "bias", "scales", "biases", "e_score_correction_bias")


@dataclass(frozen=True)
class Family:
    model_type: str
    experts_key: str                  # config key holding the routed expert count
    routing: Routing
    block: str = "mlp"                # MoE block module under a decoder layer ("": the layer itself)
    stacked: str = "switch_mlp"       # stacked experts module under the block (mlx_lm layout)
    router: str = "gate"              # router module under the block (dotted path when nested)
    top_k: str = "low"                # how the block spells its top-k (routing.TOP_K): "low" / "high"
    shared: str | None = None         # shared-expert module under the block, never pruned
    shared_gate: str | None = None    # module whose sigmoid scales the shared expert (Qwen2-MoE)
    hf_experts: str = "experts"       # per-expert modules under the block (HF layout)
    hf_names: MappingProxyType | None = None  # HF per-expert projection -> mlx_lm projection
    dense: tuple[str, ...] = ()       # LAYER_RULES keys naming dense layers (nothing to prune)
    frozen: tuple[str, ...] = ()      # LAYER_RULES keys naming MoE layers a plan must leave whole
    gguf_arch: str | None = None      # llama.cpp architecture of the same model
    gguf_hash_tensor: str | None = None     # GGUF: present in layers routed by a fixed table
    gguf_compact_layout: str | None = None  # GGUF: per-layer expert counts its loader understands
    gguf_extra_expert_tensors: tuple[str, ...] = ()  # GGUF expert-axis tensors gguf-py's tables do not list
    gguf_config: dict = field(default_factory=dict)  # config.json entries a GGUF does not carry
    mlx: bool = True                  # mlx_lm has a model class for it (else: GGUF surgery only)
    tiny: dict = field(default_factory=dict)  # the tiny fixture's config.json beyond the common keys
    # --- beyond the first seven families
    route: Route | None = None        # routing parameters (None: the kind's DEFAULT_ROUTES entry)
    top_k_key: str = "num_experts_per_tok"  # config key holding the top-k
    text_config: bool = False         # expert and top-k keys live in config["text_config"] (wrappers)
    aliases: tuple[str, ...] = ()     # other model types mlx_lm loads as this class ("type:Architecture"
    #                                   when mlx_lm remaps by architecture)
    hf_block: str | None = None       # the block's name in the HF layout, where it differs
    hf_router: str | None = None      # the router's name in the HF layout, where it differs
    hf_stacked: tuple[str, ...] = ()  # fused [E, ...] HF expert tensors under the block (no expert id)
    expert_params: tuple[str, ...] = ()  # more expert-axis tensors under the block (HF bias names ...)
    latent: tuple[str, ...] | None = None  # modules projecting into / out of the experts' latent space
    #                                 (and a norm applied to the weighted sum before the way out)
    shared_mix: str | None = None     # Linear whose softmax mixes the routed sum with the shared experts
    layer_outputs: int = 1            # decoder layers return (h, *state), the state going to the next layer
    state_is_none: bool = False       # ... a state that must be None (checked on every call; else refused)
    identity_experts: tuple[str, str] | None = None  # (config key, block attribute): the count of router
    #                      rows past the experts, identity ("zero-computation") experts adding w * x, never
    #                      pruned; and where the block keeps the routed count that tells them apart
    tiny_outer: dict = field(default_factory=dict)  # wrappers: config.json keys beside text_config
    quantizable: bool = True          # mlx_lm quantises its expert stacks (the 4-bit variant applies)
    refused: str | None = None        # why it cannot be pruned exactly (collect and apply refuse it)

    def __post_init__(self):
        if self.route is None:
            object.__setattr__(self, "route", DEFAULT_ROUTES[self.routing])

    @functools.cached_property   # classify asks for it per tensor name
    def expert_tensors(self) -> frozenset[str]:
        """Block-relative names of the tensors with an expert axis that are not stacked experts:
        the router's parameters (both layouts), the selection bias, per-expert factors."""
        names = {f"{r}.{p}" for r in (self.router, self.hf_router) if r for p in ROUTER_PARAMS}
        names.update(p for p in (self.route.bias, self.route.post_scale) if p)
        names.update(self.expert_params)
        return frozenset(names)
