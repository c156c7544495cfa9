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
- partial RoPE (`rope.dimension_count` below the head dim), YaRN scaling (`rope.scaling.*`),
  sigmoid gating (`expert_gating_func` 2) and the selection bias (`exp_probs_b`) of the router;
- whether the top-k weights are renormalised: llama.cpp fixes it for some architectures whatever
  the file says (NORM_TOPK), and reads `expert_weights_norm` (default false) for the others;
- sliding-window layer types from llama.cpp's per-architecture pattern (SWA_PATTERN);
- dense layers listed by the family's `mlp_only_layers` rule from the blocks without experts;
- the family row's `gguf_config`: config entries a GGUF does not carry.
"""
from __future__ import annotations

from types import MappingProxyType

import numpy as np

from ..errors import BadInput
from ..io.gguf import BLOCK_TENSOR, GGUFFile, VType
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
})
# architectures whose llama.cpp graph fixes top-k renormalisation, whatever the file says
NORM_TOPK = MappingProxyType({"qwen3moe": True, "qwen2moe": False, "olmoe": False, "llama": True})
# llama.cpp's sliding-window pattern per architecture: every n-th layer is full attention
SWA_PATTERN = MappingProxyType({"gpt-oss": 2})
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
        if len(set(values)) != 1:
            raise BadInput(g.path, f"metadata {key!r} differs between layers; per-layer values are not supported "
                                   f"when running the model")
        value = values[0]
    if isinstance(value, float):   # float32 in the file: its shortest decimal (1e-06, not 9.99999997e-07)
        value = float(str(np.float32(value)))
    return value


def mlx_config(parts: list[GGUFFile], arch: str, fam: Family, st: MoEStructure) -> dict:
    """The config.json mlx_lm would build this model from."""
    g = parts[0]
    names = {t.name: t for p in parts for t in p.tensors}
    cfg: dict = {"model_type": fam.model_type, **dict(fam.gguf_config)}
    for key, hf in GENERIC.items():
        v = _value(g, f"{arch}.{key}")
        if v is not None:
            cfg[hf] = v
    cfg["num_hidden_layers"] = st.num_layers
    cfg[fam.experts_key] = max(st.layer_experts.values())
    embed = names.get("token_embd.weight")
    if embed is None:
        raise BadInput(g.path, "tensor 'token_embd.weight' is missing")
    cfg["vocab_size"] = int(embed.ne[-1])
    cfg["tie_word_embeddings"] = "output.weight" not in names
    first_attn = min((int(m.group(1)) for n in names
                      if (m := BLOCK_TENSOR.match(n)) and m.group(2).startswith("attn_")), default=0)
    cfg["attention_bias"] = f"blk.{first_attn}.attn_q.bias" in names
    cfg["use_qk_norm"] = f"blk.{first_attn}.attn_q_norm.weight" in names
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
    if _value(g, f"{arch}.rope.scaling.type") == "yarn":
        cfg["rope_scaling"] = {"rope_type": "yarn", **{hf: _value(g, f"{arch}.{k}") for k, hf in _ROPE_SCALING.items()
                                                        if _value(g, f"{arch}.{k}") is not None}}
    else:
        cfg.setdefault("rope_scaling", None)
    gating = _GATING.get(_value(g, f"{arch}.expert_gating_func"))
    if gating:
        cfg["scoring_func"] = gating
    if any(n.endswith(("exp_probs_b.bias", "exp_probs_b")) for n in names):
        cfg["topk_method"] = "noaux_tc"
    cfg["norm_topk_prob"] = NORM_TOPK.get(arch, bool(_value(g, f"{arch}.expert_weights_norm")))
    if arch in SWA_PATTERN:
        n = SWA_PATTERN[arch]
        cfg["layer_types"] = ["full_attention" if i % n == n - 1 else "sliding_attention" for i in range(st.num_layers)]
    if "mlp_only_layers" in fam.dense:
        cfg["mlp_only_layers"] = [L for L in range(st.num_layers) if L not in st.layer_experts]
    return cfg
