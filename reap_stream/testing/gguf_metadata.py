"""The metadata llama.cpp's converter (convert_hf_to_gguf) writes for a config.json, per
architecture, restated for the test converter (testing/gguf_convert): the generic keys of its
TextModel, then each architecture's own (MLA's wide KV head, Llama-4's widths, ERNIE's shared
width, Hunyuan's folded NTK base, Jamba's per-layer KV heads, ...), and the per-frequency factors
it stores for a Llama-3 RoPE scaling."""
from __future__ import annotations

import math

import numpy as np

from ..families.table import config_value

# config.json key -> (GGUF key under "{arch}.", value type)
CONFIG_KEYS = {
    "num_hidden_layers": ("block_count", "u32"),
    "max_position_embeddings": ("context_length", "u32"),
    "hidden_size": ("embedding_length", "u32"),
    "intermediate_size": ("feed_forward_length", "u32"),
    "moe_intermediate_size": ("expert_feed_forward_length", "u32"),
    "shared_expert_intermediate_size": ("expert_shared_feed_forward_length", "u32"),
    "num_attention_heads": ("attention.head_count", "u32"),
    "num_key_value_heads": ("attention.head_count_kv", "u32"),
    "head_dim": ("attention.key_length", "u32"),
    "rms_norm_eps": ("attention.layer_norm_rms_epsilon", "f32"),
    "rope_theta": ("rope.freq_base", "f32"),
    "num_experts_per_tok": ("expert_used_count", "u32"),
    "n_shared_experts": ("expert_shared_count", "u32"),
    "n_group": ("expert_group_count", "u32"),
    "topk_group": ("expert_group_used_count", "u32"),
    "first_k_dense_replace": ("leading_dense_block_count", "u32"),
    "routed_scaling_factor": ("expert_weights_scale", "f32"),
    "norm_topk_prob": ("expert_weights_norm", "bool"),
}


def _mla_keys(config: dict) -> dict:
    """DeepSeek-V2-style attention as llama.cpp's converter writes it (deepseek2 and the archs built
    on it): MLA stored as one wide KV head, the RoPE part as a dimension count (GLM-5 scales it by
    its partial_rotary_factor), DSA's indexer sizes where the model has one."""
    kv, rope = int(config["kv_lora_rank"]), int(config["qk_rope_head_dim"])
    partial = (config.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)
    keys = {"attention.q_lora_rank": ("u32", config["q_lora_rank"]), "attention.kv_lora_rank": ("u32", kv),
            "attention.key_length": ("u32", kv + rope), "attention.value_length": ("u32", kv),
            "attention.key_length_mla": ("u32", int(config["qk_nope_head_dim"]) + rope),
            "attention.value_length_mla": ("u32", config["v_head_dim"]), "attention.head_count_kv": ("u32", 1),
            "rope.dimension_count": ("u32", int(rope * partial)),
            "expert_feed_forward_length": ("u32", config.get("moe_intermediate_size") or config["intermediate_size"]),
            "expert_shared_count": ("u32", config.get("n_shared_experts") or 0)}
    if not config.get("norm_topk_prob"):
        keys["expert_weights_norm"] = None   # written only when true
    if "index_n_heads" in config:
        keys.update({"attention.indexer.head_count": ("u32", config["index_n_heads"]),
                     "attention.indexer.key_length": ("u32", config["index_head_dim"]),
                     "attention.indexer.top_k": ("u32", config["index_topk"])})
    return keys


def _gpt_oss_keys(config: dict) -> dict:
    """gpt-oss as llama.cpp reads it: expert width, sliding window, YaRN RoPE scaling."""
    keys = {"expert_feed_forward_length": ("u32", config["intermediate_size"]),
            "attention.sliding_window": ("u32", config["sliding_window"]),
            "attention.key_length": ("u32", config["head_dim"]), "attention.value_length": ("u32", config["head_dim"])}
    yarn = config.get("rope_scaling") or {}
    if yarn.get("rope_type") == "yarn":
        keys.update({"rope.scaling.type": ("str", "yarn"), "rope.scaling.factor": ("f32", yarn["factor"]),
                     "rope.scaling.original_context_length": ("u32", yarn["original_max_position_embeddings"]),
                     "rope.scaling.yarn_beta_fast": ("f32", yarn["beta_fast"]),
                     "rope.scaling.yarn_beta_slow": ("f32", yarn["beta_slow"])})
    return keys


def _glm4_keys(config: dict) -> dict:
    """GLM-4.5 as llama.cpp reads it: partial RoPE as a rotated dimension count, sigmoid gating."""
    return {"rope.dimension_count": ("u32", int(config["head_dim"] * config.get("partial_rotary_factor", 0.5))),
            "expert_gating_func": ("u32", 2)}


def _llama4_keys(config: dict) -> dict:
    """Llama-4: the dense width is intermediate_size_mlp, the expert width intermediate_size; the
    MoE layer step; RoPE over the whole head (LlamaModel's rope dimension count)."""
    return {"feed_forward_length": ("u32", config["intermediate_size_mlp"]),
            "expert_feed_forward_length": ("u32", config["intermediate_size"]),
            "interleave_moe_layer_step": ("u32", config["interleave_moe_layer_step"]),
            "rope.dimension_count": ("u32", config["head_dim"]), "vocab_size": ("u32", config["vocab_size"])}


def _ernie_keys(config: dict) -> dict:
    """ERNIE-4.5-MoE: the MoE layer step and first MoE layer, the shared experts' count, and as
    shared width config.json's intermediate_size over the KV head count (what its converter writes)."""
    keys = {"interleave_moe_layer_step": ("u32", config["moe_layer_interval"]),
            "leading_dense_block_count": ("u32", config["moe_layer_start_index"])}
    if config.get("moe_num_shared_experts") is not None:
        keys["expert_shared_count"] = ("u32", config["moe_num_shared_experts"])
        if config["moe_num_shared_experts"] > 0:
            keys["expert_shared_feed_forward_length"] = (
                "u32", config["intermediate_size"] // config["num_key_value_heads"])
    return keys


def _afmoe_keys(config: dict) -> dict:
    """AFMoE: shared count, dense lead, route normalisation and scale, sliding window."""
    keys = {"expert_shared_count": ("u32", config.get("num_shared_experts")),
            "leading_dense_block_count": ("u32", config.get("num_dense_layers")),
            "expert_weights_norm": ("bool", config.get("route_norm")),
            "expert_weights_scale": ("f32", config.get("route_scale")),
            "attention.sliding_window": ("u32", config.get("sliding_window"))}
    return {k: (None if v[1] is None else v) for k, v in keys.items()}


def _hunyuan_keys(config: dict) -> dict:
    """Hunyuan-MoE: shared width = intermediate_size, one expert width / top-k / shared count for
    all layers, NTK-alpha RoPE folded into the base (the converter also pins the context at 256k;
    its assertion that only the real model's alpha 1000 and head dim 128 occur is not repeated)."""
    one = lambda v: v[0] if isinstance(v, list) else v  # noqa: E731
    keys = {"expert_shared_feed_forward_length": ("u32", config["intermediate_size"]),
            "expert_feed_forward_length": ("u32", one(config["moe_intermediate_size"])),
            "expert_shared_count": ("u32", one(config["num_shared_expert"]))}
    rope = config.get("rope_scaling") or {}
    if rope.get("type", rope.get("rope_type")) == "dynamic":
        dim = config["hidden_size"] // config["num_attention_heads"]
        base = config.get("rope_theta", 10000.0) * rope.get("alpha", 1000) ** (dim / (dim - 2))
        keys.update({"rope.freq_base": ("f32", base), "rope.scaling.type": ("str", "none"),
                     "rope.scaling.factor": ("f32", 1.0), "rope.scaling.original_context_length": ("u32", 256 * 1024),
                     "context_length": ("u32", 256 * 1024)})
    return keys


def _exaone_moe_keys(config: dict) -> dict:
    """EXAONE-MoE: expert and shared widths, shared count, scale, renormalisation, dense lead,
    sliding window with its per-layer pattern from layer_types."""
    keys = {"expert_feed_forward_length": ("u32", config["moe_intermediate_size"]),
            "expert_shared_count": ("u32", config["num_shared_experts"]),
            "expert_shared_feed_forward_length": ("u32",
                                                  config["moe_intermediate_size"] * config["num_shared_experts"]),
            "expert_weights_scale": ("f32", config["routed_scaling_factor"]),
            "expert_weights_norm": ("bool", config["norm_topk_prob"]),
            "leading_dense_block_count": ("u32", config.get("first_k_dense_replace",
                                                            config.get("first_last_k_dense_replace", 0))),
            "rope.scaling.type": ("str", "none")}
    if config.get("sliding_window") is not None:
        keys["attention.sliding_window"] = ("u32", config["sliding_window"])
        if "layer_types" in config:
            keys["attention.sliding_window_pattern"] = ("bools",
                                                        [t == "sliding_attention" for t in config["layer_types"]])
    return keys


def _jamba_keys(config: dict) -> dict:
    """Jamba: KV heads per layer (0 where Mamba), Mamba's sizes."""
    offset, period = config["attn_layer_offset"], config["attn_layer_period"]
    kv = [config["num_key_value_heads"] if i >= offset and (i - offset) % period == 0 else 0
          for i in range(config["num_hidden_layers"])]
    return {"attention.head_count_kv": ("u32s", kv), "ssm.conv_kernel": ("u32", config.get("mamba_d_conv") or 4),
            "ssm.inner_size": ("u32", config["mamba_expand"] * config["hidden_size"]),
            "ssm.state_size": ("u32", config.get("mamba_d_state") or 16),
            "ssm.time_step_rank": ("u32", config.get("mamba_dt_rank") if isinstance(config.get("mamba_dt_rank"), int)
                                   else -(config["hidden_size"] // -16))}


def _minimax_m2_keys(config: dict) -> dict:
    """MiniMax-M2: the expert width is config.json's intermediate_size, partial RoPE as rotary_dim."""
    return {"expert_feed_forward_length": ("u32", config["intermediate_size"]),
            "rope.dimension_count": ("u32", config["rotary_dim"])}


# arch -> keys llama.cpp needs beyond the config.json table (they win over it)
_ARCH_KEYS = {"deepseek2": _mla_keys, "glm-dsa": _mla_keys, "mistral4": _mla_keys, "gpt-oss": _gpt_oss_keys,
              "glm4moe": _glm4_keys, "minimax-m2": _minimax_m2_keys, "llama4": _llama4_keys, "ernie4_5-moe": _ernie_keys,
              "afmoe": _afmoe_keys, "hunyuan-moe": _hunyuan_keys, "exaone-moe": _exaone_moe_keys, "jamba": _jamba_keys}
_GATING = {"softmax": 1, "sigmoid": 2}
# where the converter looks for the router's score function, in order
_SCORE_KEYS = ("score_function", "scoring_func", "score_func", "moe_router_activation", "moe_router_activation_func",
               "expert_selection_fn")


def metadata_keys(arch: str, fam, config: dict) -> dict:
    """GGUF key (under "{arch}.") -> (value type, value): the config.json table, top-k in the
    family's own spelling, the head dims, multimodal RoPE sections, the gating function, then the
    architecture's own keys (which win)."""
    keys = {"expert_count": ("u32", config_value(config, fam.experts_key))}
    for ckey, (gkey, vt) in CONFIG_KEYS.items():
        v = config.get(ckey)
        if v is not None and not isinstance(v, (list, dict)):
            keys[gkey] = (vt, v)
    # top-k in the family's own spelling (ernie's moe_k, hunyuan's moe_topk)
    keys["expert_used_count"] = ("u32", config_value(config, fam.top_k_key))
    if config.get("head_dim"):
        keys["attention.value_length"] = ("u32", config["head_dim"])
    sections = (config.get("rope_parameters") or config.get("rope_scaling") or {}).get("mrope_section")
    if sections:   # multimodal RoPE's sections, padded to 4
        keys["rope.dimension_sections"] = ("u32s", (list(sections) + [0] * 4)[:4])
    score = next((config[k] for k in _SCORE_KEYS if k in config), None)
    if score in _GATING:
        keys["expert_gating_func"] = ("u32", _GATING[score])
    keys.update(_ARCH_KEYS.get(arch, lambda c: {})(config))
    return {k: kv for k, kv in keys.items() if kv is not None}


def hparams(config: dict) -> dict:
    """The keys llama.cpp's converter reads: a wrapper's text_config moved to the top level."""
    return {**config, **config.get("text_config", {})}


def llama3_rope_factors(theta: float, dims: int, rope: dict) -> np.ndarray:
    """llama.cpp's converter's `rope_freqs` for a Llama-3 RoPE scaling: per frequency, 1 below the
    high-frequency wavelength, `factor` above the low-frequency one, a smooth ramp between."""
    factor, old = rope["factor"], rope.get("original_max_position_embeddings", 8192)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    out = []
    for i in range(0, dims, 2):
        wavelen = 2 * math.pi * theta ** (i / dims)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)
