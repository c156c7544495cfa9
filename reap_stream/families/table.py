"""What each MoE family is, one row of data per family; every other view is derived from the rows.

A row names the family's modules and tensors in the mlx_lm layout (stacked experts, axis 0 =
expert) and the Hugging Face layout (one tensor per expert, or fused [E, ...] stacks), its config
keys, how its router selects and weighs experts (a `Routing` kind whose parameters are a `Route`),
its shared experts, which config keys name dense and never-pruned layers, its GGUF architecture,
the model types mlx_lm loads as the same class, and the extra config.json entries of its tiny test
fixture. Everything that carries an expert axis is found from these names; all other tensors are
copied untouched. A family that cannot be pruned exactly is a row too, with the reason it is refused.

What a row holds is `schema.Family`; families/rows.py holds the rows after the first seven. Adding
a family is one row, plus a routing function (families/routing.py) only when its routing is of a
new kind.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType

from ..errors import BadInput
from .rows import MORE_ROWS
from .schema import (_DEEPSEEK_TINY, _SWIGLU, _W123, DEFAULT_ROUTES, ROUTER_PARAMS, At, Family, Route,  # noqa: F401
                     Routing, at)


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
    "num_dense_layers": lambda cfg, v: range(int(v)),
    "is_moe_layer": lambda cfg, v: [i for i, m in enumerate(v) if not m],
    "hybrid_override_pattern": lambda cfg, v: [i for i, c in enumerate(v) if c != "E"],
})

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
           hf_names=_W123, gguf_arch="llama",
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
           aliases=("kimi_k2", "joyai_llm_flash"),
           tiny={"architectures": ["DeepseekV3ForCausalLM"], **_DEEPSEEK_TINY, "num_attention_heads": 2,
                 "num_key_value_heads": 2, "routed_scaling_factor": 2.5, "moe_layer_freq": 1, "q_lora_rank": 32,
                 "kv_lora_rank": 32, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
                 "attention_bias": False}),
    Family("glm4_moe", "n_routed_experts", Routing.SIGMOID_GROUP, hf_names=_SWIGLU, shared="shared_experts",
           dense=("first_k_dense_replace",), frozen=("num_nextn_predict_layers",), gguf_arch="glm4moe",
           tiny={"architectures": ["Glm4MoeForCausalLM"], **_DEEPSEEK_TINY, "routed_scaling_factor": 1.5,
                 "use_qk_norm": True, "attention_bias": True, "partial_rotary_factor": 0.5}),
    *MORE_ROWS,
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
    # Ling v1 (mlx_lm's bailing_moe is Ling 2.0, llama.cpp's bailingmoe2)
    Family("bailing_moe_v1", "num_experts", Routing.SOFTMAX_TOPK, shared="shared_experts",
           dense=("first_k_dense_replace",), gguf_arch="bailingmoe", mlx=False),
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

# supported mlx_lm families by their own model_type
FAMILIES: MappingProxyType = MappingProxyType({f.model_type: f for f in FAMILY_ROWS if f.mlx and not f.refused})
# every model_type (own or alias) a config.json may name -> its row (refused ones included)
MODEL_TYPES: MappingProxyType = MappingProxyType({
    name: f for f in FAMILY_ROWS if f.mlx for name in (f.model_type, *f.aliases) if ":" not in name})
# (model_type, architecture) -> row, where mlx_lm picks the class by architecture
_ARCH_ALIASES = MappingProxyType({tuple(a.split(":")): f for f in FAMILY_ROWS for a in f.aliases if ":" in a})
# the config keys that count routed experts, in any family (a config may carry several)
EXPERT_COUNT_KEYS: tuple[str, ...] = tuple(sorted({f.experts_key for f in FAMILY_ROWS}))
BY_GGUF_ARCH: MappingProxyType = MappingProxyType({f.gguf_arch: f for f in FAMILY_ROWS if f.gguf_arch})


# "layers.N." of the decoder stack, after the prefixes the mlx_lm and HF layouts put before it
# (a name elsewhere, e.g. a vision tower's or an MTP module's "layers.N.", has no decoder layer)
_LAYER = re.compile(r"^(?:(?:model\.|language_model\.model\.|model\.language_model\.|language_model\.|backbone\.)?"
                    r"layers|transformer\.h|transformer\.blocks)\.(\d{1,9})\.", re.ASCII)


_MISSING = object()


def attr(obj, path: str, default=_MISSING):
    """obj.a.b.c for a row's dotted path "a.b.c" (mlx modules: attributes and children alike);
    `default` when a part is absent (without one: AttributeError)."""
    for part in path.split("."):
        obj = getattr(obj, part, _MISSING)
        if obj is _MISSING:
            if default is _MISSING:
                raise AttributeError(path)
            return default
    return obj


def layer_of(name: str) -> re.Match | None:
    """The decoder-layer match of a tensor name (group 1: the layer), or None."""
    return _LAYER.match(name)


def family_of(config: dict, where: str = "config.json") -> Family:
    """The row of a config.json: by model_type or an alias mlx_lm loads as the same class; a
    family that cannot be pruned exactly is refused here, with its reason."""
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise BadInput(where, f"architectures must be a list of class names (got {archs!r:.80})")
    fam = None
    if isinstance(model_type, str):
        for arch in archs:
            fam = _ARCH_ALIASES.get((model_type, arch))
            if fam:
                break
        fam = fam or MODEL_TYPES.get(model_type)
    if fam is None:
        names = ", ".join(sorted(FAMILIES, key=str.lower))
        raise BadInput(where, f"unsupported model_type {model_type!r}; supported: {names}")
    if fam.refused:
        raise BadInput(where, f"model_type {model_type!r} ({fam.model_type}) cannot be pruned exactly: {fam.refused}")
    return fam


def text_config(config: dict, fam: Family) -> dict:
    """The part of config.json that holds the language model's keys (wrappers: text_config)."""
    inner = config.get("text_config") if fam.text_config else None
    return inner if isinstance(inner, dict) else config


def group_keys(fam: Family) -> tuple[str, str] | None:
    """The config keys of a grouped route's n_group / topk_group (the attribute the block reads
    them from is named after them), or None for an ungrouped route."""
    route = fam.route
    if route.groups is None:
        return None
    return tuple(v.path.rpartition(".")[2] for v in (route.n_group, route.topk_group))


def expert_rows(shape: tuple[int, ...]) -> int:
    """The expert count of an expert-axis tensor: axis 0 (a [1, E] row vector: its length)."""
    return shape[1] if len(shape) == 2 and shape[0] == 1 else shape[0]


def identity_rows(config: dict, fam: Family) -> int:
    """Router rows past the routed experts (LongCat's identity experts); 0 for other families."""
    if fam.identity_experts is None:
        return 0
    value = text_config(config, fam).get(fam.identity_experts[0]) or 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadInput("config.json", f"{fam.identity_experts[0]} must be a count (got {value!r})")
    return value


def config_value(config: dict, key: str, default=None):
    """config[key]; a dotted key reads a nested dict (DBRX's ffn_config.moe_num_experts)."""
    for part in key.split("."):
        if not isinstance(config, dict) or part not in config:
            return default
        config = config[part]
    return config


def set_config_value(config: dict, key: str, value) -> None:
    *path, last = key.split(".")
    for part in path:
        config = config.setdefault(part, {})
    config[last] = value


def config_int(config: dict, key: str, where: str = "config.json", *, default: int | None = None,
               limit: int = 1 << 20, fam: Family | None = None, what: str = "") -> int:
    """config[key] as a positive integer of at most `limit` (a dotted key reads nested dicts; with
    `fam`, the language model's section); `default` when absent or null, else absent is refused
    naming `what` the family reads from it."""
    section = text_config(config, fam) if fam is not None else config
    value = config_value(section, key)
    name = f"text_config.{key}" if section is not config else key
    if value is None and default is not None:
        return default
    if value is None and fam is not None:
        raise BadInput(where, f"{name} is missing: {fam.model_type} reads its {what} from it")
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise BadInput(where, f"{name} must be a positive integer up to {limit:,} (got {value!r:.80})")
    return value


def num_experts(config: dict, fam: Family, where: str = "config.json") -> int:
    return config_int(config, fam.experts_key, where, fam=fam, what="routed expert count")


def top_k(config: dict, where: str = "config.json", fam: Family | None = None) -> int:
    return config_int(config, fam.top_k_key if fam else "num_experts_per_tok", where, fam=fam, what="top-k")


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
    return sorted(_rule_layers(text_config(config, fam), fam.dense, where))


def frozen_layers(config: dict, fam: Family, where: str = "config.json") -> list[int]:
    """Hash-routed and MTP layers a plan must leave whole, by the family's config keys."""
    return sorted(_rule_layers(text_config(config, fam), fam.frozen, where))


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
    m = _LAYER.match(name)
    if not m:
        return None
    layer = int(m.group(1))
    rest = name[m.end():]
    for block in dict.fromkeys((fam.block, fam.hf_block or fam.block)):
        if not block or rest.startswith(block + "."):
            inner = rest[len(block) + 1:] if block else rest
            return _classify_in_block(name, inner, layer, fam, block == (fam.hf_block or fam.block))
    return None


def _classify_in_block(name: str, rest: str, layer: int, fam: Family, hf_block: bool) -> ExpertTensor | None:
    for module in dict.fromkeys((fam.stacked, fam.hf_experts)):
        if rest.startswith(module + "."):
            tail = rest[len(module) + 1:]
            first, _, after = tail.partition(".")
            if first.isascii() and first.isdigit() and len(first) <= 9:
                return ExpertTensor(layer, "per_expert", int(first),
                                    name[: len(name) - len(tail)], after)
            return ExpertTensor(layer, "stacked")
    if hf_block and any(rest == s or rest.startswith(s + ".") for s in fam.hf_stacked):
        return ExpertTensor(layer, "stacked")
    if rest in fam.expert_tensors:
        return ExpertTensor(layer, "router")
    return None
