"""Published shapes of real MoE models, as config.json dicts mlx_lm can build (no weights).

Used by tools/bench_scale.py (a synthetic checkpoint of Qwen3-30B-A3B's per-layer shapes) and
tools/estimate_table.py (the README's table of `reap-stream estimate` figures). Values are the
models' published configurations: layers / hidden / routed experts / top-k / expert width /
shared experts / leading dense layers, attention heads, vocabulary.
"""
from __future__ import annotations

_QWEN3 = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "head_dim": 128,
          "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None, "max_position_embeddings": 40960,
          "tie_word_embeddings": False, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
          "attention_bias": False, "use_sliding_window": False, "sliding_window": None, "vocab_size": 151936,
          "hidden_act": "silu", "torch_dtype": "bfloat16"}

REAL_MODELS: dict[str, dict] = {
    "Qwen3-30B-A3B": {**_QWEN3, "num_hidden_layers": 48, "hidden_size": 2048, "intermediate_size": 6144,
                      "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
                      "num_attention_heads": 32, "num_key_value_heads": 4},
    "Qwen3-235B-A22B": {**_QWEN3, "num_hidden_layers": 94, "hidden_size": 4096, "intermediate_size": 12288,
                        "moe_intermediate_size": 1536, "num_experts": 128, "num_experts_per_tok": 8,
                        "num_attention_heads": 64, "num_key_value_heads": 4},
}
