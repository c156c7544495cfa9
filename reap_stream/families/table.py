"""What each MoE family is, one row of data per family; every other view is derived from the rows.

A row names the family's modules and tensors in the mlx_lm layout (stacked experts, axis 0 =
expert) and the Hugging Face layout (one tensor per expert, or fused [E, ...] stacks), its config
keys, how its router selects and weighs experts (a `Routing` kind plus the top-k spelling), its
shared experts, which config keys name dense and never-pruned layers, its GGUF architecture, and
the extra config.json entries of its tiny test fixture. Everything that carries an expert axis is
found from these names; all other tensors are copied untouched.

Adding a family is one row here, plus a routing function (families/routing.py) only when its
routing is of a new kind.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType

from ..errors import BadInput


class Routing(str, Enum):
    SOFTMAX_TOPK = "softmax_topk"    # softmax over all experts, top-k, optional renorm
    TOPK_SOFTMAX = "topk_softmax"    # top-k on raw logits, softmax over the k
    SIGMOID_GROUP = "sigmoid_group"  # sigmoid, bias for selection only, group-limited top-k

    @property
    def mask_rule(self) -> str:
        """How the masked original keeps pruned experts out of routing (families/masking.py):
        "logits" (-inf router logits) or "selection_bias" (-inf selection bias, for sigmoid
        routers where sigmoid(-inf) = 0 could still be picked)."""
        return "selection_bias" if self is Routing.SIGMOID_GROUP else "logits"


# more layers than any model has: layer counts and indexes beyond it are corrupt input (and would
# otherwise build ranges that take hours)
MAX_LAYERS = 100_000

# config key -> the layers it names, for the dense / frozen rules a row lists (value: the key's value)
LAYER_RULES = MappingProxyType({
    "first_k_dense_replace": lambda cfg, v: range(int(v)),
    "mlp_only_layers": lambda cfg, v: list(v),
    # DeepSeek-V4: "hash_moe" layers route by a fixed token -> expert table (tid2eid)
    "mlp_layer_types": lambda cfg, v: [i for i, t in enumerate(v) if t == "hash_moe"],
    "num_hash_layers": lambda cfg, v: range(int(v)),
    # MTP / NextN layers sit after the decoder stack
    "num_nextn_predict_layers": lambda cfg, v: range(int(cfg["num_hidden_layers"]),
                                                     int(cfg["num_hidden_layers"]) + int(v)),
})

_SWIGLU = MappingProxyType({"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"})
_DEEPSEEK_TINY = {
    "n_shared_experts": 1, "n_group": 2, "topk_group": 1, "norm_topk_prob": True, "topk_method": "noaux_tc",
    "scoring_func": "sigmoid", "first_k_dense_replace": 1, "moe_intermediate_size": 32, "intermediate_size": 128,
}


@dataclass(frozen=True)
class Family:
    model_type: str
    experts_key: str                  # config key holding the routed expert count
    routing: Routing
    block: str = "mlp"                # MoE block module under a decoder layer
    stacked: str = "switch_mlp"       # stacked experts module under the block (mlx_lm layout)
    router: str = "gate"              # router module under the block
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


FAMILY_ROWS: tuple[Family, ...] = (
    Family("qwen3_moe", "num_experts", Routing.SOFTMAX_TOPK, top_k="high", hf_names=_SWIGLU,
           dense=("mlp_only_layers",), gguf_arch="qwen3moe", gguf_config={"decoder_sparse_step": 1},
           tiny={"architectures": ["Qwen3MoeForCausalLM"], "moe_intermediate_size": 32, "intermediate_size": 128,
                 "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, "attention_bias": False,
                 "attention_dropout": 0.0, "use_sliding_window": False, "sliding_window": None,
                 "output_router_logits": False, "router_aux_loss_coef": 0.001}),
    Family("qwen2_moe", "num_experts", Routing.SOFTMAX_TOPK, hf_names=_SWIGLU, shared="shared_expert",
           shared_gate="shared_expert_gate", dense=("mlp_only_layers",), gguf_arch="qwen2moe",
           tiny={"architectures": ["Qwen2MoeForCausalLM"], "num_experts_per_tok": 4, "moe_intermediate_size": 32,
                 "shared_expert_intermediate_size": 64, "intermediate_size": 128, "decoder_sparse_step": 1,
                 "mlp_only_layers": [], "norm_topk_prob": False}),
    Family("olmoe", "num_experts", Routing.SOFTMAX_TOPK, hf_names=_SWIGLU, gguf_arch="olmoe",
           tiny={"architectures": ["OlmoeForCausalLM"], "intermediate_size": 32, "norm_topk_prob": False,
                 "attention_bias": False, "clip_qkv": None}),
    Family("mixtral", "num_local_experts", Routing.TOPK_SOFTMAX, block="block_sparse_moe",
           hf_names=MappingProxyType({"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}), gguf_arch="llama",
           tiny={"architectures": ["MixtralForCausalLM"], "intermediate_size": 32, "sliding_window": None,
                 "attention_dropout": 0.0, "output_router_logits": False, "router_aux_loss_coef": 0.02,
                 "router_jitter_noise": 0.0}),
    Family("gpt_oss", "num_local_experts", Routing.TOPK_SOFTMAX, stacked="experts", router="router", top_k="high",
           gguf_arch="gpt-oss",
           tiny={"architectures": ["GptOssForCausalLM"], "num_experts_per_tok": 4, "intermediate_size": 32,
                 "sliding_window": 128, "layer_types": ["sliding_attention", "full_attention"] * 2,
                 "rope_theta": 150000.0, "max_position_embeddings": 131072,
                 "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                  "truncate": False, "original_max_position_embeddings": 4096}}),
    Family("deepseek_v3", "n_routed_experts", Routing.SIGMOID_GROUP, hf_names=_SWIGLU, shared="shared_experts",
           dense=("first_k_dense_replace",), frozen=("num_nextn_predict_layers",), gguf_arch="deepseek2",
           tiny={"architectures": ["DeepseekV3ForCausalLM"], **_DEEPSEEK_TINY, "num_attention_heads": 2,
                 "num_key_value_heads": 2, "routed_scaling_factor": 2.5, "moe_layer_freq": 1, "q_lora_rank": 32,
                 "kv_lora_rank": 32, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
                 "attention_bias": False}),
    Family("glm4_moe", "n_routed_experts", Routing.SIGMOID_GROUP, hf_names=_SWIGLU, shared="shared_experts",
           dense=("first_k_dense_replace",), frozen=("num_nextn_predict_layers",), gguf_arch="glm4moe",
           tiny={"architectures": ["Glm4MoeForCausalLM"], **_DEEPSEEK_TINY, "routed_scaling_factor": 1.5,
                 "use_qk_norm": True, "attention_bias": True, "partial_rotary_factor": 0.5}),
    # DeepSeek-V4 as its GGUF (ds4): hash-routed layers and fused gate_up experts with per-expert
    # scales; non-uniform prunes as ds4-compact-v1 (docs/gguf.md). No mlx_lm class.
    Family("deepseek_v4", "n_routed_experts", Routing.SIGMOID_GROUP, shared="shared_experts",
           dense=("first_k_dense_replace",), frozen=("mlp_layer_types", "num_hash_layers", "num_nextn_predict_layers"),
           gguf_arch="deepseek4", gguf_hash_tensor="ffn_gate_tid2eid.weight", gguf_compact_layout="ds4-compact-v1",
           gguf_extra_expert_tensors=("exp_probs_b_vl.bias",), mlx=False),
    # GGUF-only rows: llama.cpp architectures with routed experts and no mlx_lm MoE class. apply
    # recompacts them (roles from gguf-py's tables); collect needs an mlx_lm model and refuses
    # them. Routing is what their Hugging Face code does, recorded for the docs only.
    Family("grok", "num_local_experts", Routing.SOFTMAX_TOPK, gguf_arch="grok", mlx=False),
    Family("arctic", "num_local_experts", Routing.SOFTMAX_TOPK, gguf_arch="arctic", mlx=False),
    Family("deepseek_ocr", "n_routed_experts", Routing.SOFTMAX_TOPK, shared="shared_experts",
           dense=("first_k_dense_replace",), gguf_arch="deepseek2-ocr", mlx=False),
    Family("smallthinker", "moe_num_primary_experts", Routing.SOFTMAX_TOPK, gguf_arch="smallthinker", mlx=False),
    Family("llada_moe", "num_experts", Routing.SOFTMAX_TOPK, gguf_arch="llada-moe", mlx=False),
    Family("grove_moe", "num_experts", Routing.SOFTMAX_TOPK, gguf_arch="grovemoe", mlx=False),
    Family("rnd1", "num_experts", Routing.SOFTMAX_TOPK, gguf_arch="rnd1", mlx=False),
    Family("nomic_bert_moe", "num_experts", Routing.SOFTMAX_TOPK, gguf_arch="nomic-bert-moe", mlx=False),
    Family("minicpm_moe", "num_experts", Routing.SOFTMAX_TOPK, gguf_arch="minicpm", mlx=False),
)

# ------------------------------------------------------------------ derived views

FAMILIES: MappingProxyType = MappingProxyType({f.model_type: f for f in FAMILY_ROWS if f.mlx})
BY_GGUF_ARCH: MappingProxyType = MappingProxyType({f.gguf_arch: f for f in FAMILY_ROWS if f.gguf_arch})

# router tensors whose axis 0 is the expert axis
ROUTER_PARAMS = ("weight", "bias", "scales", "biases", "e_score_correction_bias")

_LAYER = re.compile(r"(?:^|\.)layers\.(\d{1,9})\.", re.ASCII)


def family_of(config: dict, where: str = "config.json") -> Family:
    model_type = config.get("model_type")
    fam = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if fam is None:
        raise BadInput(where, f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}")
    return fam


def config_int(config: dict, key: str, where: str = "config.json", *, default: int | None = None,
               limit: int = 1 << 20) -> int:
    """config[key] as a positive integer of at most `limit` (`default` when absent or null)."""
    value = config.get(key)
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise BadInput(where, f"{key} must be a positive integer up to {limit:,} (got {value!r:.80})")
    return value



def num_experts(config: dict, fam: Family, where: str = "config.json") -> int:
    return config_int(config, fam.experts_key, where)


def top_k(config: dict, where: str = "config.json") -> int:
    return config_int(config, "num_experts_per_tok", where)


def _rule_layers(config: dict, keys: tuple[str, ...], where: str) -> set[int]:
    out: set[int] = set()
    for key in keys:
        value = config.get(key)
        if not value:
            continue
        try:
            layers = [int(i) for i in _bounded(LAYER_RULES[key](config, value))]
        except (TypeError, ValueError, KeyError, OverflowError):
            raise BadInput(where, f"{key} {value!r:.80} does not name layers") from None
        if any(not 0 <= i < 2 * MAX_LAYERS for i in layers):
            raise BadInput(where, f"{key} {value!r:.80} names a layer outside 0..{2 * MAX_LAYERS - 1}")
        out.update(layers)
    return out


def _bounded(layers):
    if len(layers) > MAX_LAYERS:
        raise ValueError("too many layers")
    return layers


def dense_layers(config: dict, fam: Family, where: str = "config.json") -> list[int]:
    """Layers whose MLP is dense (nothing to prune), by the family's config keys."""
    return sorted(_rule_layers(config, fam.dense, where))


def frozen_layers(config: dict, fam: Family, where: str = "config.json") -> list[int]:
    """Hash-routed and MTP layers a plan must leave whole, by the family's config keys."""
    return sorted(_rule_layers(config, fam.frozen, where))


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
            if first.isascii() and first.isdigit() and len(first) <= 9:
                return ExpertTensor(layer, "per_expert", int(first),
                                    name[: len(name) - len(tail)], after)
            return ExpertTensor(layer, "stacked")
    if rest.startswith(fam.router + "."):
        param = rest[len(fam.router) + 1:]
        if param in ROUTER_PARAMS:
            return ExpertTensor(layer, "router")
    return None
