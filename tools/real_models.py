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

_DEEPSEEK = {"model_type": "deepseek_v3", "num_hidden_layers": 61, "hidden_size": 7168, "intermediate_size": 18432,
             "moe_intermediate_size": 2048, "num_experts_per_tok": 8, "n_shared_experts": 1, "q_lora_rank": 1536,
             "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
             "moe_layer_freq": 1, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True,
             "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 163840,
             "tie_word_embeddings": False, "attention_bias": False, "torch_dtype": "bfloat16"}

REAL_MODELS: dict[str, dict] = {
    "Qwen3-30B-A3B": {**_QWEN3, "num_hidden_layers": 48, "hidden_size": 2048, "intermediate_size": 6144,
                      "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
                      "num_attention_heads": 32, "num_key_value_heads": 4},
    "Qwen3-235B-A22B": {**_QWEN3, "num_hidden_layers": 94, "hidden_size": 4096, "intermediate_size": 12288,
                        "moe_intermediate_size": 1536, "num_experts": 128, "num_experts_per_tok": 8,
                        "num_attention_heads": 64, "num_key_value_heads": 4},
    "GLM-4.5-Air": {"model_type": "glm4_moe", "num_hidden_layers": 46, "hidden_size": 4096, "intermediate_size": 10944,
                    "moe_intermediate_size": 1408, "n_routed_experts": 128, "num_experts_per_tok": 8,
                    "n_shared_experts": 1, "first_k_dense_replace": 1, "num_attention_heads": 96,
                    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151552, "partial_rotary_factor": 0.5,
                    "rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "n_group": 1, "topk_group": 1,
                    "routed_scaling_factor": 1.0, "norm_topk_prob": True, "use_qk_norm": False, "attention_bias": True,
                    "rope_scaling": None,
                    "max_position_embeddings": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    "DeepSeek-V3": {**_DEEPSEEK, "n_routed_experts": 256, "first_k_dense_replace": 3, "num_attention_heads": 128,
                    "num_key_value_heads": 128, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
                    "vocab_size": 129280},
    "Kimi-K2": {**_DEEPSEEK, "model_type": "kimi_k2", "n_routed_experts": 384, "first_k_dense_replace": 1,
                "num_attention_heads": 64, "num_key_value_heads": 64, "n_group": 1, "topk_group": 1,
                "routed_scaling_factor": 2.827, "vocab_size": 163840},
    "gpt-oss-120b": {"model_type": "gpt_oss", "num_hidden_layers": 36, "hidden_size": 2880, "intermediate_size": 2880,
                     "num_local_experts": 128, "num_experts_per_tok": 4, "num_attention_heads": 64,
                     "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 201088, "sliding_window": 128,
                     "layer_types": ["sliding_attention", "full_attention"] * 18, "rope_theta": 150000,
                     "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16"},
    "MiniMax-M2": {"model_type": "minimax_m2", "num_hidden_layers": 62, "hidden_size": 3072, "intermediate_size": 1536,
                   "num_local_experts": 256, "num_experts_per_tok": 8, "shared_intermediate_size": 0,
                   "num_attention_heads": 48, "num_key_value_heads": 8, "head_dim": 128, "rotary_dim": 64,
                   "vocab_size": 200064, "rope_theta": 5000000.0, "rms_norm_eps": 1e-6,
                   "max_position_embeddings": 196608, "scoring_func": "sigmoid", "use_qk_norm": True,
                   "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    "Qwen3-Next-80B-A3B": {"model_type": "qwen3_next", "num_hidden_layers": 48, "hidden_size": 2048,
                           "intermediate_size": 5120, "moe_intermediate_size": 512, "num_experts": 512,
                           "num_experts_per_tok": 10, "shared_expert_intermediate_size": 512,
                           "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
                           "linear_num_value_heads": 32, "linear_num_key_heads": 16, "linear_key_head_dim": 128,
                           "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "full_attention_interval": 4,
                           "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936,
                           "partial_rotary_factor": 0.25, "rope_theta": 10000000.0, "rms_norm_eps": 1e-6,
                           "max_position_embeddings": 262144, "norm_topk_prob": True, "tie_word_embeddings": False,
                           "torch_dtype": "bfloat16"},
}
