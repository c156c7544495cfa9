"""The mlx_lm config of a GGUF model, rebuilt from its metadata (what llama.cpp's converter wrote
from the Hugging Face config.json, read back with llama.cpp's meaning).

Keys map one to one for most of a config (GENERIC). The rest is derived:
- `num_hidden_layers` is `block_count` less the NextN blocks; the expert count goes to the
  family's own key; the vocabulary size is the embedding's row count;
- `tie_word_embeddings` when the file has no `output.weight`; `attention_bias` / `use_qk_norm`
  from the tensors of the first block;
- MLA (DeepSeek-V2/V3 style): the real head dims are `key_length_mla` / `value_length_mla` (the
  converter stores the latent as one wide KV head in `key_length`), the RoPE part is
  `rope.dimension_count`;
- Llama-3 RoPE scaling recovered from its per-frequency factors (`rope_freqs`);
- partial RoPE (`rope.dimension_count` below the head dim, as a factor and as a dimension), YaRN
  scaling (`rope.scaling.*`), sigmoid gating (`expert_gating_func` 2) and the selection bias
  (`exp_probs_b`) of the router;
- whether the top-k weights are renormalised: llama.cpp fixes it for some architectures whatever
  the file says (NORM_TOPK), and reads `expert_weights_norm` (default false) for the others;
- sliding-window layer types from the file's pattern or llama.cpp's per-architecture one
  (SWA_PATTERN);
- dense layers listed by the family's `mlp_only_layers` / `is_moe_layer` rule from the blocks
  without experts;
- Jamba's attention / expert / Mamba layout from the per-layer KV head counts, the blocks and
  the ssm keys;
- the family row's `gguf_config`: config entries a GGUF does not carry.
"""
from __future__ import annotations

from types import MappingProxyType

import numpy as np

from ..errors import BadInput
from ..io.gguf import BLOCK_TENSOR, GGUFFile, VType
from ..io.gguf_read import read_tensor
from .structure import MoEStructure
from .table import Family

# GGUF key (after "{arch}.") -> Hugging Face config key
GENERIC = MappingProxyType({
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "expert_feed_forward_length": "moe_intermediate_size",
    "expert_shared_feed_forward_length": "shared_expert_intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.sliding_window": "sliding_window",
    "attention.clamp_kqv": "clip_qkv",
    "attention.q_lora_rank": "q_lora_rank",
    "attention.kv_lora_rank": "kv_lora_rank",
    "rope.freq_base": "rope_theta",
    "expert_used_count": "num_experts_per_tok",
    "expert_shared_count": "n_shared_experts",
    "expert_group_count": "n_group",
    "expert_group_used_count": "topk_group",
    "leading_dense_block_count": "first_k_dense_replace",
    "expert_weights_scale": "routed_scaling_factor",
    "attention.indexer.head_count": "index_n_heads",
    "attention.indexer.key_length": "index_head_dim",
    "attention.indexer.top_k": "index_topk",
})
# per architecture, keys whose meaning differs from GENERIC's (Llama-4 names its expert width
# intermediate_size and its dense width intermediate_size_mlp)
ARCH_KEYS = MappingProxyType({
    "llama4": {"feed_forward_length": "intermediate_size_mlp", "expert_feed_forward_length": "intermediate_size",
               "interleave_moe_layer_step": "interleave_moe_layer_step"},
    "ernie4_5-moe": {"interleave_moe_layer_step": "moe_layer_interval",
                     "leading_dense_block_count": "moe_layer_start_index", "expert_shared_count": "moe_num_shared_experts"},
    "hunyuan-moe": {"expert_shared_count": "num_shared_expert"},
    "exaone-moe": {"expert_shared_count": "num_shared_experts"},
    "afmoe": {"expert_shared_count": "num_shared_experts", "leading_dense_block_count": "num_dense_layers",
              "expert_weights_norm": "route_norm", "expert_weights_scale": "route_scale"},
})
# architectures whose llama.cpp graph fixes top-k renormalisation, whatever the file says
NORM_TOPK = MappingProxyType({"qwen3moe": True, "qwen2moe": False, "olmoe": False, "llama": True})
# llama.cpp's sliding-window pattern per architecture: every n-th layer is full attention
SWA_PATTERN = MappingProxyType({"gpt-oss": 2, "afmoe": 4, "exaone-moe": 4})
_GATING = {1: "softmax", 2: "sigmoid"}
_ROPE_SCALING = {"rope.scaling.factor": "factor",
                 "rope.scaling.original_context_length": "original_max_position_embeddings",
                 "rope.scaling.yarn_beta_fast": "beta_fast", "rope.scaling.yarn_beta_slow": "beta_slow"}


def _value(g: GGUFFile, key: str):
    kv = g.kvs.get(key)
    if kv is None:
        return None
    value = kv.value
    if kv.vtype == VType.ARRAY:
        values = kv.value or []
        if key.endswith(".attention.head_count_kv"):   # 0: a layer without attention (Mamba)
            values = [v for v in values if v] or [0]
        if len(set(values)) != 1:
            raise BadInput(g.path, f"metadata {key!r} differs between layers; per-layer values are not supported "
                                   f"when running the model")
        value = values[0]
    if isinstance(value, float):   # float32 in the file: its shortest decimal (1e-06, not 9.99999997e-07)
        value = float(str(np.float32(value)))
    return value


def llama3_rope_scaling(factors: np.ndarray, theta: float, dims: int, where) -> dict | None:
    """Llama-3's RoPE scaling back from the per-frequency factors llama.cpp's converter stores
    (`rope_freqs`): 1 for short wavelengths, `factor` for long ones, and between them
    1 / ((1 - s) / factor + s) with s = a / wavelength - b. Any (low, high, original context)
    with the same a and b gives the same factors: low_freq_factor 1 is chosen. With no factor
    between (Llama-4: low == high), the cut-off wavelength is the original context."""
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    wavelen = 2 * np.pi * theta ** (np.arange(0, dims, 2) / dims)
    factor = float(factors.max())
    if len(factors) != len(wavelen) or factor <= 1.0:
        return None if factor == 1.0 else _bad_rope(where)
    middle = np.flatnonzero(~np.isclose(factors, 1.0) & ~np.isclose(factors, factor))
    if len(middle) == 0:
        cut = np.flatnonzero(np.isclose(factors, factor))[0]
        if cut == 0 or not np.isclose(factors[:cut], 1.0).all():
            return _bad_rope(where)
        old = float(np.sqrt(wavelen[cut - 1] * wavelen[cut]))
        return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                "original_max_position_embeddings": old}
    if len(middle) < 2:
        return _bad_rope(where)
    smooth = (1 / factors[middle] - 1 / factor) / (1 - 1 / factor)
    (a, b), *_ = np.linalg.lstsq(np.stack([1 / wavelen[middle], -np.ones(len(middle))], 1), smooth, rcond=None)
    if b <= 0:
        return _bad_rope(where)
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": float(1 + 1 / b),
            "original_max_position_embeddings": float(a / b)}


def _bad_rope(where):
    raise BadInput(where, "tensor 'rope_freqs.weight' is not a Llama-3 RoPE scaling (1, a smooth ramp, factor)")


def _jamba(g: GGUFFile, cfg: dict, st: MoEStructure, names: dict) -> dict:
    """Jamba's layout as periods: attention where the per-layer KV head count is non-zero, experts
    where the blocks have them; Mamba's sizes from the ssm keys."""
    kv = g.kvs.get("jamba.attention.head_count_kv")
    per_layer = kv.value if kv is not None and kv.vtype == VType.ARRAY else [1] * st.num_layers
    attn = [i for i, n in enumerate(per_layer) if n]
    moe = sorted(st.layer_experts)
    period = lambda ls: ls[1] - ls[0] if len(ls) > 1 else st.num_layers  # noqa: E731
    mamba = next((int(m.group(1)) for n in names if (m := BLOCK_TENSOR.match(n)) and m.group(2).startswith("ssm_")), 0)
    return {"attn_layer_offset": attn[0] if attn else st.num_layers, "attn_layer_period": period(attn),
            "expert_layer_offset": moe[0], "expert_layer_period": period(moe),
            "mamba_d_conv": _value(g, "jamba.ssm.conv_kernel"), "mamba_d_state": _value(g, "jamba.ssm.state_size"),
            "mamba_expand": _value(g, "jamba.ssm.inner_size") // cfg["hidden_size"],
            "mamba_dt_rank": _value(g, "jamba.ssm.time_step_rank"),
            "mamba_proj_bias": f"blk.{mamba}.ssm_in.bias" in names,
            "mamba_conv_bias": f"blk.{mamba}.ssm_conv1d.bias" in names}


def _layer_types(g: GGUFFile, arch: str, cfg: dict, layers: int) -> list[str]:
    """Sliding or full attention per layer, as llama.cpp decides: no window, all full; else the
    file's `sliding_window_pattern` (per-layer flags, or a period) or the architecture's period,
    every n-th layer full."""
    kv = g.kvs.get(f"{arch}.attention.sliding_window_pattern")
    if kv is not None and kv.vtype == VType.ARRAY:
        return ["sliding_attention" if swa else "full_attention" for swa in kv.value[:layers]]
    n = (kv.value if kv is not None else SWA_PATTERN[arch]) if cfg.get("sliding_window") else 1
    return ["full_attention" if i % n == n - 1 else "sliding_attention" for i in range(layers)]


def _rope_parameters(g: GGUFFile, arch: str, cfg: dict) -> dict:
    """transformers' newer single RoPE dict, for the classes that read it (the row's gguf_config
    asks for it): theta and scaling as above, Llama-4's attention temperature as llama.cpp reads
    it (absent: no temperature scaling, beta 0)."""
    temperature = _value(g, f"{arch}.attention.temperature_scale") or 0.0
    length = _value(g, f"{arch}.attention.temperature_length") or cfg.get("max_position_embeddings")
    return {**cfg["rope_parameters"], "rope_type": "default", **(cfg["rope_scaling"] or {}),
            "rope_theta": cfg.get("rope_theta", 10000.0), "llama_4_scaling_beta": temperature,
            "original_max_position_embeddings": length}


def mlx_config(parts: list[GGUFFile], arch: str, fam: Family, st: MoEStructure) -> dict:
    """The config.json mlx_lm would build this model from (a wrapper's: the text model's config
    under text_config, where the row's gguf_config["text_config"] adds to it)."""
    cfg = _text_model_config(parts, arch, fam, st)
    if not fam.text_config:
        return cfg
    text = cfg.pop("text_config", {})
    return {"model_type": fam.model_type, "text_config": {**cfg, **text}}


def _text_model_config(parts: list[GGUFFile], arch: str, fam: Family, st: MoEStructure) -> dict:
    g = parts[0]
    names = {t.name: t for p in parts for t in p.tensors}
    cfg: dict = {"model_type": fam.model_type, **dict(fam.gguf_config)}
    for key, hf in {**GENERIC, **ARCH_KEYS.get(arch, {})}.items():
        v = _value(g, f"{arch}.{key}")
        if v is not None:
            cfg[hf] = v
    cfg["num_hidden_layers"] = st.num_layers
    cfg[fam.experts_key] = max(st.layer_experts.values())
    if "num_experts_per_tok" in cfg:   # top-k under the family's own key too (ernie's moe_k)
        cfg[fam.top_k_key] = cfg["num_experts_per_tok"]
    embed = names.get("token_embd.weight")
    if embed is None:
        raise BadInput(g.path, "tensor 'token_embd.weight' is missing")
    cfg["vocab_size"] = int(embed.ne[-1])
    cfg["tie_word_embeddings"] = "output.weight" not in names
    first_attn = min((int(m.group(1)) for n in names
                      if (m := BLOCK_TENSOR.match(n)) and m.group(2).startswith("attn_")), default=0)
    cfg["attention_bias"] = cfg["use_bias"] = f"blk.{first_attn}.attn_q.bias" in names   # ERNIE: use_bias
    cfg["use_qk_norm"] = f"blk.{first_attn}.attn_q_norm.weight" in names
    if arch == "llama4":   # a weightless L2 norm, which llama.cpp applies unless 128 experts (Maverick)
        cfg["use_qk_norm"] = cfg[fam.experts_key] != 128
    rope_dim = _value(g, f"{arch}.rope.dimension_count")
    mla = _value(g, f"{arch}.attention.key_length_mla")
    if mla is not None:
        cfg.update(qk_rope_head_dim=rope_dim, qk_nope_head_dim=mla - rope_dim,
                   v_head_dim=_value(g, f"{arch}.attention.value_length_mla"),
                   num_key_value_heads=cfg.get("num_attention_heads"))
        cfg.pop("head_dim", None)
    elif rope_dim is not None:
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        cfg["partial_rotary_factor"] = rope_dim / head_dim
        cfg["rotary_dim"] = rope_dim   # MiniMax's spelling of the same
    if "rope_freqs.weight" in names:
        cfg["rope_scaling"] = llama3_rope_scaling(read_tensor(names["rope_freqs.weight"]), cfg.get("rope_theta", 1e4),
                                                  rope_dim or cfg["hidden_size"] // cfg["num_attention_heads"],
                                                  names["rope_freqs.weight"].file)
    elif _value(g, f"{arch}.rope.scaling.type") == "yarn":
        cfg["rope_scaling"] = {"rope_type": "yarn", **{hf: _value(g, f"{arch}.{k}") for k, hf in _ROPE_SCALING.items()
                                                        if _value(g, f"{arch}.{k}") is not None}}
    else:
        cfg.setdefault("rope_scaling", None)
    gating = _GATING.get(_value(g, f"{arch}.expert_gating_func"))
    if gating:
        cfg["scoring_func"] = cfg["score_func"] = gating   # AFMoE's spelling too
    if any(n.endswith(("exp_probs_b.bias", "exp_probs_b")) for n in names):
        cfg["topk_method"] = "noaux_tc"
    cfg["norm_topk_prob"] = NORM_TOPK.get(arch, bool(_value(g, f"{arch}.expert_weights_norm")))
    if arch in SWA_PATTERN:
        cfg["layer_types"] = _layer_types(g, arch, cfg, st.num_layers)
    if "rope_parameters" in cfg:
        cfg["rope_parameters"] = _rope_parameters(g, arch, cfg)
    if "mlp_only_layers" in fam.dense:
        cfg["mlp_only_layers"] = [L for L in range(st.num_layers) if L not in st.layer_experts]
    if arch == "jamba":
        cfg.update(_jamba(g, cfg, st, names))
    if "is_moe_layer" in fam.dense:
        cfg["is_moe_layer"] = [L in st.layer_experts for L in range(st.num_layers)]
    return cfg
