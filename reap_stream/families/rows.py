"""The rows of the families beyond the first seven (families/table.py holds the first rows and the
derived views, FAMILY_ROWS lists these after them; families/schema.py says what a row is). Order:
the order in which users asked for them, then the others, then the refused ones. Routing
parameters are data (`Route`); `at(path)` reads one from the block when it routes."""
from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

from .schema import _SWIGLU, _W123, DEFAULT_ROUTES, Family, Route, Routing, at

_SIGMOID = DEFAULT_ROUTES[Routing.SIGMOID_GROUP]
_SIGMOID_EPS = replace(_SIGMOID, renorm_eps=1e-20)   # the same, renormalised by (sum + 1e-20)
_INF = float("inf")

_MLA = {"q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16}
_DS3 = {"n_shared_experts": 1, "n_group": 2, "topk_group": 1, "norm_topk_prob": True, "topk_method": "noaux_tc",
        "scoring_func": "sigmoid", "first_k_dense_replace": 1, "moe_intermediate_size": 32, "intermediate_size": 128,
        "routed_scaling_factor": 2.5, "moe_layer_freq": 1, "num_key_value_heads": 4, **_MLA}
_DSA = {**_DS3, "index_head_dim": 16, "index_n_heads": 2, "index_topk": 4}
_LINEAR_ATTN = {"linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16,
                "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "full_attention_interval": 2}
_QWEN35_TEXT = {"intermediate_size": 128, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64,
                "norm_topk_prob": True, **_LINEAR_ATTN,
                "rope_parameters": {"type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0,
                                    "partial_rotary_factor": 0.5}}
_BAILING = {"intermediate_size": 128, "moe_intermediate_size": 32, "num_shared_experts": 1, "norm_topk_prob": True,
            "first_k_dense_replace": 1, "moe_router_enable_expert_bias": True, "score_function": "sigmoid",
            "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5}
_GRANITE = {"intermediate_size": 64, "logits_scaling": 2.0, "attention_multiplier": 0.25,
            "embedding_multiplier": 12.0, "residual_multiplier": 0.2, "attention_bias": False}
_GEMMA4 = {"intermediate_size": 128, "global_head_dim": 32, "num_kv_shared_layers": 0,
           "hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 512, "sliding_window": 4,
           "sliding_window_pattern": 2, "enable_moe_block": True, "moe_intermediate_size": 32}
# Bailing's gate.gate_proj Linear (HF: mlp.gate.weight); selection bias gate.expert_bias
_BAILING_ROUTE = Route(f32=True, score=at("gate.score_function"), precise=False, bias="gate.expert_bias",
                       bias_optional=True,
                       groups="top2sum", n_group=at("gate.n_group"), topk_group=at("gate.topk_group"),
                       renorm="sum", renorm_if=at("gate.norm_topk_prob"), renorm_k1=False,
                       scale=at("gate.routed_scaling_factor"))

MORE_ROWS: tuple[Family, ...] = (
    # Qwen3.5 MoE: a multimodal wrapper (language_model.*, keys in text_config), Gated-DeltaNet
    # linear attention in 3 of 4 layers, shared expert behind its own sigmoid gate; the HF
    # checkpoint fuses experts.gate_up_proj [E, 2I, D] and experts.down_proj [E, D, I]
    Family("qwen3_5_moe", "num_experts", Routing.SOFTMAX_TOPK, top_k="high", shared="shared_expert",
           shared_gate="shared_expert_gate", text_config=True, hf_names=_SWIGLU, gguf_arch="qwen35moe",
           tiny_outer={"architectures": ["Qwen3_5MoeForConditionalGeneration"]},
           tiny={"model_type": "qwen3_5_moe_text", **_QWEN35_TEXT}),
    # Qwen3.5 dense-or-MoE: MoE when text_config.num_experts > 0 (0: refused, no experts to prune)
    Family("qwen3_5", "num_experts", Routing.SOFTMAX_TOPK, top_k="high", shared="shared_expert",
           shared_gate="shared_expert_gate", text_config=True, hf_names=_SWIGLU,
           tiny_outer={"architectures": ["Qwen3_5ForConditionalGeneration"]},
           tiny={"model_type": "qwen3_5_text", **_QWEN35_TEXT}),
    Family("qwen3_next", "num_experts", Routing.SOFTMAX_TOPK, top_k="high", shared="shared_expert",
           shared_gate="shared_expert_gate", hf_names=_SWIGLU, dense=("mlp_only_layers",), gguf_arch="qwen3next",
           tiny={"architectures": ["Qwen3NextForCausalLM"], "intermediate_size": 128, "decoder_sparse_step": 1,
                 "mlp_only_layers": [0], "moe_intermediate_size": 32, "norm_topk_prob": True,
                 "shared_expert_intermediate_size": 64, "partial_rotary_factor": 0.25, **_LINEAR_ATTN}),
    # MiniMax-M2: the router reads a float32 copy of x; correction bias on the block; always
    # renormalised by (sum + 1e-20), no scaling; HF experts.{e}.w1/w2/w3
    Family("minimax", "num_local_experts", Routing.SIGMOID_GROUP, block="block_sparse_moe", hf_names=_W123,
           route=Route(logits="router_f32_input", score="sigmoid", bias="e_score_correction_bias",
                       renorm="sum", renorm_eps=1e-20),
           aliases=("minimax_m2",), gguf_arch="minimax-m2",
           tiny={"architectures": ["MiniMaxM2ForCausalLM"], "intermediate_size": 32, "shared_intermediate_size": 0,
                 "rotary_dim": 8, "use_qk_norm": True}),
    # GLM-5: DeepSeek-V3's MoE under DSA (indexer top-k) attention
    Family("glm_moe_dsa", "n_routed_experts", Routing.SIGMOID_GROUP, hf_names=_SWIGLU, shared="shared_experts",
           dense=("first_k_dense_replace",), frozen=("num_nextn_predict_layers",), gguf_arch="glm-dsa",
           tiny={"architectures": ["GlmMoeDsaForCausalLM"], **_DSA, "attention_bias": False,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    # Kimi-K2.5: DeepSeek-V3's text model inside a multimodal wrapper (kimi_k2 is deepseek_v3 itself)
    Family("kimi_k25", "n_routed_experts", Routing.SIGMOID_GROUP, hf_names=_SWIGLU, shared="shared_experts",
           dense=("first_k_dense_replace",), frozen=("num_nextn_predict_layers",), text_config=True,
           tiny_outer={"architectures": ["KimiK25ForConditionalGeneration"]}, tiny={"model_type": "kimi_k2", **_DS3}),
    Family("deepseek_v32", "n_routed_experts", Routing.SIGMOID_GROUP, hf_names=_SWIGLU, shared="shared_experts",
           dense=("first_k_dense_replace",), frozen=("num_nextn_predict_layers",), gguf_arch="deepseek32",
           tiny={"architectures": ["DeepseekV32ForCausalLM"], **_DSA}),
    # Llama-4: top-1 router whose sigmoid scales the expert's input; plain shared expert; HF fuses
    # experts.gate_up_proj [E, D, 2I] and experts.down_proj [E, I, D] (expert axis 0 either way)
    Family("llama4", "num_local_experts", Routing.TOP1_SIGMOID_INPUT, block="feed_forward", stacked="experts",
           router="router", shared="shared_expert", text_config=True, hf_names=_SWIGLU, gguf_arch="llama4",
           tiny_outer={"architectures": ["Llama4ForConditionalGeneration"]},
           tiny={"model_type": "llama4_text", "num_experts_per_tok": 1, "intermediate_size": 32,
                 "intermediate_size_mlp": 128, "interleave_moe_layer_step": 1, "attention_chunk_size": 4,
                 "attention_bias": False, "use_qk_norm": True, "rms_norm_eps": 1e-5}),
    # ERNIE-4.5: softmax (the block's own gate_act) of float32 logits, always renormalised by
    # max(sum, 1e-12); mlx_lm drops the HF checkpoint's moe_statics correction bias
    Family("ernie4_5_moe", "moe_num_experts", Routing.SOFTMAX_TOPK, top_k_key="moe_k", shared="shared_experts",
           route=Route(score=at("gate_act"), f32=True, renorm="max", renorm_eps=1e-12),
           hf_names=_SWIGLU, expert_params=("moe_statics.e_score_correction_bias",), gguf_arch="ernie4_5-moe",
           tiny={"architectures": ["Ernie4_5_MoeForCausalLM"], "intermediate_size": 128, "use_bias": False,
                 "moe_layer_start_index": 1, "moe_intermediate_size": 32, "moe_layer_interval": 1,
                 "moe_num_shared_experts": 1, "moe_gate_act": "softmax"}),
    # LFM2-MoE: sigmoid in the model dtype, optional expert_bias (selection in float32), high top-k,
    # renormalised by (sum + 1e-6) when norm_topk_prob (k = 1 too), times routed_scaling_factor
    Family("lfm2_moe", "num_experts", Routing.SIGMOID_GROUP, block="feed_forward", top_k="high",
           route=Route(score="sigmoid", bias="expert_bias", bias_optional=True, renorm="sum", renorm_eps=1e-6,
                       renorm_if=at("norm_topk_prob"), scale=at("routed_scaling_factor")),
           hf_names=_W123, dense=("num_dense_layers",), gguf_arch="lfm2moe",
           tiny={"architectures": ["Lfm2MoeForCausalLM"], "intermediate_size": 128, "moe_intermediate_size": 32,
                 "norm_topk_prob": True, "use_expert_bias": True, "num_dense_layers": 1, "norm_eps": 1e-5,
                 "conv_bias": False, "conv_L_cache": 3, "layer_types": ["conv", "full_attention"] * 2}),
    # Nemotron-H: Mamba2 / attention / MoE blocks in `mixer`; two-projection experts (fc1, relu²,
    # fc2), optionally in a latent space (fc1_latent_proj before, fc2_latent_proj after the sum)
    Family("nemotron_h", "n_routed_experts", Routing.SIGMOID_GROUP, block="mixer", route=_SIGMOID_EPS,
           shared="shared_experts", latent=("fc1_latent_proj", "fc2_latent_proj"),
           hf_names=MappingProxyType({"up_proj": "fc1", "down_proj": "fc2"}),
           dense=("hybrid_override_pattern",), gguf_arch="nemotron_h_moe",
           tiny={"architectures": ["NemotronHForCausalLM"], "intermediate_size": 128, "attention_bias": False,
                 "mamba_num_heads": 4, "mamba_head_dim": 16, "mamba_proj_bias": False, "ssm_state_size": 16,
                 "conv_kernel": 4, "n_groups": 1, "mlp_bias": False, "layer_norm_epsilon": 1e-5, "use_bias": False,
                 "use_conv_bias": True, "hybrid_override_pattern": ["M", "E", "*", "E"], "moe_intermediate_size": 32,
                 "moe_shared_expert_intermediate_size": 64, "n_group": 1, "n_shared_experts": 1, "topk_group": 1,
                 "norm_topk_prob": True, "routed_scaling_factor": 2.5}),
    # Step-3.5: gate.gate Linear + gate.router_bias; per-layer clamped SwiGLU experts; HF stores the
    # experts already stacked under `moe.`
    Family("step3p5", "moe_num_experts", Routing.SIGMOID_GROUP, router="gate.gate", top_k_key="moe_top_k",
           route=Route(f32=True, score="sigmoid", bias="gate.router_bias", renorm="sum", renorm_eps=1e-20,
                       renorm_if=at("gate.norm_topk_prob"), scale=at("gate.routed_scaling_factor")),
           shared="share_expert", hf_block="moe", hf_router="gate", hf_stacked=("gate_proj", "up_proj", "down_proj"),
           expert_params=("router_bias",), gguf_arch="step35",
           tiny={"architectures": ["Step3p5ForCausalLM"], "num_attention_groups": 2, "intermediate_size": 128,
                 "sliding_window": 4, "layer_types": ["full_attention", "sliding_attention"] * 2,
                 "moe_intermediate_size": 32, "share_expert_dim": 64, "moe_router_scaling_factor": 3.0,
                 "norm_expert_weight": True, "swiglu_limits": [0, 0, 7.0, 7.0],
                 "swiglu_limits_shared": [0, 0, 0, 16.0]}),
    # Ling / Bailing: raw gate.weight and gate.expert_bias, float32 logits, always grouped with
    # -inf fill, always renormalised (+1e-20); KDA linear attention and MLA layers
    Family("bailing_moe_v3", "num_experts", Routing.SIGMOID_GROUP, shared="shared_experts",
           route=Route(logits="weight_f32", f32=True, score="sigmoid", bias="gate.expert_bias", groups="top2sum",
                       n_group=at("gate.n_group"), topk_group=at("gate.topk_group"), group_fill=-_INF,
                       renorm="sum", renorm_eps=1e-20, scale=at("gate.routed_scaling_factor")),
           hf_names=_SWIGLU, dense=("first_k_dense_replace",), aliases=("bailing_hybrid:BailingMoeV3ForCausalLM",),
           gguf_arch="bailingmoe3",
           tiny={"architectures": ["BailingMoeV3ForCausalLM"], "intermediate_size": 128, "moe_intermediate_size": 32,
                 "moe_shared_expert_intermediate_size": 32, "num_shared_experts": 1, "first_k_dense_replace": 1,
                 "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5, "layer_group_size": 2, **_MLA}),
    Family("bailing_moe", "num_experts", Routing.SIGMOID_GROUP, router="gate.gate_proj", hf_router="gate",
           top_k="high", shared="shared_experts", route=replace(_BAILING_ROUTE, renorm_eps=1e-20),
           hf_names=_SWIGLU, dense=("first_k_dense_replace",), gguf_arch="bailingmoe2",
           tiny={"architectures": ["BailingMoeV2ForCausalLM"], **_BAILING, "use_qk_norm": True}),
    Family("bailing_moe_linear", "num_experts", Routing.SIGMOID_GROUP, router="gate.gate_proj", hf_router="gate",
           shared="shared_experts", route=_BAILING_ROUTE, hf_names=_SWIGLU, dense=("first_k_dense_replace",),
           tiny={"architectures": ["BailingMoeLinearForCausalLM"], **_BAILING, "use_qk_norm": True,
                 "layer_group_size": 2, "group_norm_size": 1}),
    Family("bailing_hybrid", "num_experts", Routing.SIGMOID_GROUP, router="gate.gate_proj", hf_router="gate",
           shared="shared_experts", route=replace(_BAILING_ROUTE, group_fill=-_INF, renorm_eps=1e-20),
           hf_names=_SWIGLU, dense=("first_k_dense_replace",),
           tiny={"architectures": ["BailingHybridForCausalLM"], **_BAILING, "layer_group_size": 2,
                 "group_norm_size": 1, **{**_MLA, "q_lora_rank": None}, "partial_rotary_factor": 0.5}),
    # LongCat-Flash: softmax (model dtype) + correction bias over the experts AND zero_expert_num
    # identity experts (router rows past the stack, adding w * x); high top-k; two attentions and
    # two dense MLPs per layer around one MoE block
    Family("longcat_flash", "n_routed_experts", Routing.SIGMOID_GROUP, router="router.classifier", top_k="high",
           top_k_key="moe_topk", identity_experts=("zero_expert_num", "n_routed_experts"),
           route=Route(score="softmax", precise=False, bias="router.e_score_correction_bias", renorm="sum",
                       renorm_eps=1e-20, renorm_if=at("router.norm_topk_prob"),
                       scale=at("router.routed_scaling_factor")),
           hf_names=_SWIGLU,
           tiny={"architectures": ["LongcatFlashForCausalLM"], "attention_method": "MLA",
                 "zero_expert_type": "identity", "ffn_hidden_size": 128, "expert_ffn_hidden_size": 32,
                 "zero_expert_num": 2, "num_layers": 4, **_MLA, "routed_scaling_factor": 6.0,
                 "mla_scale_q_lora": True, "mla_scale_kv_lora": True, "attention_bias": False,
                 "norm_topk_prob": True}),
    Family("mimo_v2_flash", "n_routed_experts", Routing.SIGMOID_GROUP, route=_SIGMOID_EPS, shared="shared_experts",
           hf_names=_SWIGLU, gguf_arch="mimo2",
           tiny={"architectures": ["MiMoV2FlashForCausalLM"], "hybrid_layer_pattern": [0, 1, 0, 1],
                 "moe_layer_freq": [0, 1, 1, 1], "add_swa_attention_sink_bias": True,
                 "add_full_attention_sink_bias": False, "sliding_window_size": 4, "intermediate_size": 128,
                 "moe_intermediate_size": 32, "n_shared_experts": 1, "routed_scaling_factor": None,
                 "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True, "n_group": 2,
                 "topk_group": 1, "layernorm_epsilon": 1e-5, "swa_rope_theta": 10000.0,
                 "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "v_head_dim": 16, "swa_head_dim": 16,
                 "swa_v_head_dim": 16, "partial_rotary_factor": 0.5}),
    # Hunyuan-Large: softmax top-k (gate.wg Linear), plain shared MLP; with cross-layer attention
    # each decoder layer returns (h, K/V) and the next layer may reuse that K/V
    Family("hunyuan", "num_experts", Routing.SOFTMAX_TOPK, router="gate.wg", top_k_key="moe_topk",
           shared="shared_mlp", hf_names=_SWIGLU, layer_outputs=2, gguf_arch="hunyuan-moe",
           tiny={"architectures": ["HunYuanForCausalLM"], "intermediate_size": 32, "attention_bias": False,
                 "num_shared_expert": 1, "use_mixed_mlp_moe": True, "use_qk_norm": True, "use_cla": True,
                 "cla_share_factor": 2, "moe_intermediate_size": 32,
                 "rope_scaling": {"alpha": 1.0, "factor": 1.0, "type": "dynamic"}}),
    # dots.llm1: DeepSeek-V3 routing; the stacked experts are called `experts` (the HF per-expert
    # modules too: an expert id after it tells them apart)
    Family("dots1", "n_routed_experts", Routing.SIGMOID_GROUP, stacked="experts", shared="shared_experts",
           hf_names=_SWIGLU, dense=("first_k_dense_replace",), gguf_arch="dots1",
           tiny={"architectures": ["Dots1ForCausalLM"], "intermediate_size": 128, "first_k_dense_replace": 1,
                 "moe_intermediate_size": 32, "n_shared_experts": 1, "norm_topk_prob": True,
                 "routed_scaling_factor": 2.5, "scoring_func": "noaux_tc", "n_group": 2, "topk_group": 1}),
    # Granite-MoE: router.layer Linear, top-k on logits, softmax over the k in float32 (not
    # precise); HF fuses input_linear [E, 2I, D] and output_linear [E, D, I]
    Family("granitemoe", "num_local_experts", Routing.TOPK_SOFTMAX, block="block_sparse_moe", router="router.layer",
           top_k="high", route=Route(score="logits", f32=True, precise=False),
           hf_stacked=("input_linear", "output_linear"), gguf_arch="granitemoe",
           tiny={"architectures": ["GraniteMoeForCausalLM"], **_GRANITE}),
    # Granite-4 hybrid: Mamba2 layers; the shared MLP sits on the decoder layer, outside the block
    Family("granitemoehybrid", "num_local_experts", Routing.TOPK_SOFTMAX, block="block_sparse_moe",
           router="router.layer", top_k="high", hf_stacked=("input_linear", "output_linear"),
           gguf_arch="granitehybrid",
           tiny={"architectures": ["GraniteMoeHybridForCausalLM"], **_GRANITE,
                 "layer_types": ["mamba", "attention", "mamba", "mamba"], "shared_intermediate_size": 64,
                 "mamba_n_heads": 4, "mamba_d_head": 32, "mamba_proj_bias": False, "mamba_d_state": 16,
                 "mamba_d_conv": 4, "mamba_n_groups": 1, "mamba_conv_bias": True}),
    Family("phimoe", "num_local_experts", Routing.SPARSEMIXER, block="block_sparse_moe", hf_names=_W123,
           gguf_arch="phimoe",
           tiny={"architectures": ["PhimoeForCausalLM"], "intermediate_size": 32, "router_jitter_noise": 0.01,
                 # Phi-3.5-MoE's su-scaled RoPE (mlx-lm before 0.32.2 needs it to build the model)
                 "original_max_position_embeddings": 1024,
                 "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.25] * 8,
                                  "short_mscale": 1.0, "long_mscale": 1.1}}),
    # EXAONE-MoE: DeepSeek-V3 routing (+1e-20); the HF checkpoint keeps the bias on the block
    Family("exaone_moe", "num_experts", Routing.SIGMOID_GROUP, route=_SIGMOID_EPS, shared="shared_experts",
           hf_names=_SWIGLU, expert_params=("e_score_correction_bias",), dense=("is_moe_layer",),
           gguf_arch="exaone-moe",
           tiny={"architectures": ["ExaoneMoeForCausalLM"], "intermediate_size": 128, "moe_intermediate_size": 32,
                 "num_shared_experts": 1, "sliding_window": 4,
                 "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
                 "is_moe_layer": [False, True, True, True], "n_group": 2, "topk_group": 1,
                 "routed_scaling_factor": 2.5}),
    # AFMoE: router.gate Linear, expert_bias on the block, sigmoid or softmax (score_func)
    Family("afmoe", "num_experts", Routing.SIGMOID_GROUP, router="router.gate", stacked="experts",
           shared="shared_experts",
           route=Route(f32=True, score=at("score_func"), precise=False, bias="expert_bias", groups="top2sum",
                       n_group=at("n_group"), topk_group=at("topk_group"), renorm="sum", renorm_if=at("route_norm"),
                       renorm_k1=False, scale=at("route_scale")),
           hf_names=_SWIGLU, dense=("num_dense_layers",), gguf_arch="afmoe",
           tiny={"architectures": ["AfmoeForCausalLM"], "layer_types": ["sliding_attention", "full_attention"] * 2,
                 "intermediate_size": 128, "moe_intermediate_size": 32, "num_shared_experts": 1,
                 "num_dense_layers": 1, "route_norm": True, "route_scale": 2.0, "score_func": "sigmoid",
                 "n_group": 2, "topk_group": 1, "sliding_window": 4, "mup_enabled": True}),
    # Mistral-4 (and Mistral-3 / LLaVA wrappers holding a mistral4 text_config): softmax of float32
    # logits (not precise), optional top-2-sum groups, (sum + 1e-20) renorm also for k = 1, scale
    Family("mistral4", "n_routed_experts", Routing.SOFTMAX_TOPK, shared="shared_experts",
           route=Route(f32=True, precise=False, groups="top2sum", n_group=at("args.n_group"),
                       topk_group=at("args.topk_group"), renorm="sum", renorm_eps=1e-20,
                       renorm_if=at("args.norm_topk_prob"), scale=at("args.routed_scaling_factor")),
           hf_names=_SWIGLU, dense=("first_k_dense_replace",), gguf_arch="mistral4",
           tiny={"architectures": ["Mistral4ForCausalLM"], "intermediate_size": 128, "moe_intermediate_size": 32,
                 "n_shared_experts": 1, "routed_scaling_factor": 1.0, **_MLA, "num_key_value_heads": 4,
                 "norm_topk_prob": True, "topk_group": 1, "first_k_dense_replace": 1, "n_group": 1,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "llama_4_scaling_beta": 0.1,
                                     "original_max_position_embeddings": 512}}),
    # Jamba: Mamba layers; MoE every expert_layer_period layers
    Family("jamba", "num_experts", Routing.TOPK_SOFTMAX, block="feed_forward", router="router", hf_names=_SWIGLU,
           gguf_arch="jamba",
           tiny={"architectures": ["JambaForCausalLM"], "intermediate_size": 32, "attn_layer_offset": 1,
                 "attn_layer_period": 2, "expert_layer_offset": 1, "expert_layer_period": 2, "mamba_d_conv": 4,
                 "mamba_d_state": 8, "mamba_expand": 2}),
    # Kimi-Linear: scores in the model dtype (no float32), correction bias on the block cast to it;
    # the HF checkpoint names the block block_sparse_moe with experts.{e}.w1/w2/w3
    Family("kimi_linear", "num_experts", Routing.SIGMOID_GROUP, top_k_key="num_experts_per_token",
           shared="shared_experts",
           route=Route(score=at("args.moe_router_activation_func"), bias="e_score_correction_bias", bias_cast=True,
                       groups="top2sum", n_group=at("args.num_expert_group"), topk_group=at("args.topk_group"),
                       renorm="sum", renorm_eps=1e-20, renorm_if=at("args.moe_renormalize"), renorm_k1=False,
                       scale=at("args.routed_scaling_factor")),
           hf_block="block_sparse_moe", hf_names=_W123, dense=("first_k_dense_replace",), gguf_arch="kimi-linear",
           tiny={"architectures": ["KimiLinearForCausalLM"], "intermediate_size": 128, "num_key_value_heads": 4,
                 "linear_attn_config": {"kda_layers": [1, 3], "full_attn_layers": [2, 4], "num_heads": 4,
                                        "head_dim": 16, "short_conv_kernel_size": 4},
                 "model_max_length": 512, "moe_intermediate_size": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
                 "qk_rope_head_dim": 8, "v_head_dim": 16, "num_shared_experts": 1, "first_k_dense_replace": 1,
                 "num_expert_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5}),
    Family("glm4_moe_lite", "n_routed_experts", Routing.SIGMOID_GROUP, route=_SIGMOID_EPS, shared="shared_experts",
           hf_names=_SWIGLU, dense=("first_k_dense_replace",), frozen=("num_nextn_predict_layers",),
           tiny={"architectures": ["Glm4MoeLiteForCausalLM"], **_DS3, "routed_scaling_factor": 1.8}),
    # DeepSeek-V2: softmax of a raw gate weight (no bias anywhere), max-per-group limits with
    # topk_method group_limited_greedy, scaled, not renormalised
    Family("deepseek_v2", "n_routed_experts", Routing.SOFTMAX_TOPK, shared="shared_experts",
           route=Route(logits="weight", groups="max", n_group=at("gate.n_group"), topk_group=at("gate.topk_group"),
                       group_if=("gate.topk_method", "group_limited_greedy"), scale=at("gate.routed_scaling_factor")),
           hf_names=_SWIGLU, dense=("first_k_dense_replace",),
           tiny={"architectures": ["DeepseekV2ForCausalLM"], **{k: v for k, v in _DS3.items() if k != "scoring_func"},
                 "topk_method": "group_limited_greedy", "routed_scaling_factor": 1.5,
                 "rope_scaling": {"type": "yarn", "factor": 1.0, "original_max_position_embeddings": 512}}),
    Family("deepseek", "n_routed_experts", Routing.SOFTMAX_TOPK, shared="shared_experts", route=Route(logits="weight"),
           hf_names=_SWIGLU, dense=("first_k_dense_replace",), gguf_arch="deepseek",
           tiny={"architectures": ["DeepseekForCausalLM"], "intermediate_size": 128, "moe_intermediate_size": 32,
                 "n_shared_experts": 1, "moe_layer_freq": 1, "first_k_dense_replace": 1, "num_key_value_heads": 4}),
    # ------------------------------------------------------------ the remaining ones
    Family("solar_open", "n_routed_experts", Routing.SIGMOID_GROUP, hf_names=_SWIGLU, shared="shared_experts",
           dense=("first_k_dense_replace",), frozen=("num_nextn_predict_layers",),
           tiny={"architectures": ["SolarOpenForCausalLM"], **{k: v for k, v in _DS3.items() if k not in _MLA},
                 "partial_rotary_factor": 0.5, "attention_bias": False}),
    Family("mellum", "num_experts", Routing.SOFTMAX_TOPK, top_k="high", hf_names=_SWIGLU, gguf_arch="mellum",
           tiny={"architectures": ["MellumForCausalLM"], "intermediate_size": 128, "moe_intermediate_size": 32,
                 "norm_topk_prob": True, "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"] * 2,
                 "rope_parameters": {"full_attention": {"rope_theta": 10000.0},
                                     "sliding_attention": {"rope_theta": 10000.0}}}),
    # Qwen3-VL-MoE: qwen3_moe's text model in a multimodal wrapper; HF fuses experts.gate_up_proj
    # [E, D, 2I] and experts.down_proj [E, I, D]
    Family("qwen3_vl_moe", "num_experts", Routing.SOFTMAX_TOPK, top_k="high", text_config=True, hf_names=_SWIGLU,
           gguf_arch="qwen3vlmoe", tiny_outer={"architectures": ["Qwen3VLMoeForConditionalGeneration"]},
           tiny={"model_type": "qwen3_vl_moe_text", "intermediate_size": 128, "moe_intermediate_size": 32,
                 "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True}),
    Family("kimi_vl", "n_routed_experts", Routing.SIGMOID_GROUP, hf_names=_SWIGLU, shared="shared_experts",
           dense=("first_k_dense_replace",), text_config=True,
           tiny_outer={"architectures": ["KimiVLForConditionalGeneration"]}, tiny=dict(_DS3)),
    # MiniMax-M3-VL: MiniMax routing times routed_scaling_factor, SwigluOAI experts, plain shared
    Family("minimax_m3_vl", "num_local_experts", Routing.SIGMOID_GROUP, block="block_sparse_moe",
           shared="shared_experts", text_config=True, hf_names=_W123,
           route=Route(f32=True, score="sigmoid", bias="e_score_correction_bias", renorm="sum", renorm_eps=1e-20,
                       scale=at("routed_scaling_factor")), gguf_arch="minimax-m3",
           tiny_outer={"architectures": ["MiniMaxM3SparseForConditionalGeneration"]},
           tiny={"intermediate_size": 32, "dense_intermediate_size": 128, "shared_intermediate_size": 64,
                 "moe_layer_freq": [0, 1, 1, 1], "routed_scaling_factor": 2.0}),
    Family("mistral3", "n_routed_experts", Routing.SOFTMAX_TOPK, shared="shared_experts", text_config=True,
           route=Route(f32=True, precise=False, groups="top2sum", n_group=at("args.n_group"),
                       topk_group=at("args.topk_group"), renorm="sum", renorm_eps=1e-20,
                       renorm_if=at("args.norm_topk_prob"), scale=at("args.routed_scaling_factor")),
           hf_names=_SWIGLU, dense=("first_k_dense_replace",), aliases=("llava",),
           tiny_outer={"architectures": ["Mistral3ForConditionalGeneration"]},
           tiny={"model_type": "mistral4", "intermediate_size": 128, "moe_intermediate_size": 32,
                 "n_shared_experts": 1, "routed_scaling_factor": 1.0, **_MLA, "num_key_value_heads": 4,
                 "norm_topk_prob": True, "topk_group": 1, "first_k_dense_replace": 1, "n_group": 1,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "llama_4_scaling_beta": 0.1,
                                     "original_max_position_embeddings": 512}}),
    Family("longcat_flash_ngram", "n_routed_experts", Routing.SIGMOID_GROUP, router="router.classifier",
           top_k="high", top_k_key="moe_topk", identity_experts=("zero_expert_num", "n_routed_experts"),
           route=Route(score="softmax", precise=False, bias="router.e_score_correction_bias", renorm="sum",
                       renorm_eps=1e-20, renorm_if=at("router.norm_topk_prob"),
                       scale=at("router.routed_scaling_factor")),
           hf_names=_SWIGLU,
           tiny={"attention_method": "MLA", "zero_expert_type": "identity", "ffn_hidden_size": 128,
                 "expert_ffn_hidden_size": 32, "zero_expert_num": 2, "num_layers": 4, **_MLA,
                 "routed_scaling_factor": 6.0, "mla_scale_q_lora": True, "mla_scale_kv_lora": True,
                 "attention_bias": False, "norm_topk_prob": True, "ngram_vocab_size_ratio": 2,
                 "emb_neighbor_num": 3, "emb_split_num": 2}),
    # Laguna: gate.proj Linear, sigmoid or sqrt(softplus) of (soft-capped) float32 logits, always
    # renormalised; the routed scaling multiplies the weighted sum; plain (ungated) shared expert
    Family("laguna", "num_experts", Routing.SIGMOID_GROUP, router="gate.proj", hf_router="gate",
           shared="shared_expert",
           route=Route(f32=True, score=at("gate.score_func"), bias="gate.e_score_correction_bias", renorm="sum",
                       softcap=at("gate.softcap"), scale=at("routed_scaling_factor")),
           hf_names=_SWIGLU, gguf_arch="laguna",
           tiny={"architectures": ["LagunaForCausalLM"], "intermediate_size": 128, "sliding_window": 4,
                 "layer_types": ["full_attention", "sliding_attention"] * 2, "moe_intermediate_size": 32,
                 "shared_expert_intermediate_size": 64, "moe_routed_scaling_factor": 2.0,
                 "moe_router_logit_softcapping": 0.0, "moe_router_score_func": "sigmoid",
                 "rope_parameters": {"full_attention": {"rope_theta": 10000.0},
                                     "sliding_attention": {"rope_theta": 10000.0}}}),
    # Klear: sigmoid + block expert_bias; the routed sum and the shared experts mixed by
    # softmax(coefficient(x))
    Family("Klear", "num_experts", Routing.SIGMOID_GROUP, stacked="experts", shared="shared_experts",
           shared_mix="coefficient", dense=("mlp_only_layers",),
           route=Route(f32=True, score="sigmoid", bias="expert_bias", renorm="sum", renorm_if=at("norm_topk_prob")),
           hf_names=_SWIGLU,
           tiny={"intermediate_size": 128, "attention_bias": False, "mlp_only_layers": [0], "decoder_sparse_step": 1,
                 "n_shared_experts": 1, "moe_intermediate_size": 32, "norm_topk_prob": True}),
    # Kimi-K3: Kimi-Linear routing in float32; experts in a latent space with a norm of the
    # weighted sum on the way out (the attention-residual variant hands state across many layers:
    # refused by the runner)
    Family("kimi_k3", "num_experts", Routing.SIGMOID_GROUP, top_k_key="num_experts_per_token",
           shared="shared_experts", text_config=True, layer_outputs=2,
           state_is_none=True,
           latent=("routed_expert_down_proj", "routed_expert_up_proj", "routed_expert_norm"),
           route=Route(f32=True, score="sigmoid", bias="e_score_correction_bias", bias_cast=True, groups="top2sum",
                       n_group=at("args.num_expert_group"), topk_group=at("args.topk_group"), renorm="sum",
                       renorm_eps=1e-20, renorm_if=at("args.moe_renormalize"), renorm_k1=False,
                       scale=at("args.routed_scaling_factor")),
           hf_block="block_sparse_moe", hf_names=_W123, dense=("first_k_dense_replace",), gguf_arch="kimi-k3",
           tiny={"model_type": "kimi_linear", "intermediate_size": 128, "num_key_value_heads": 4,
                 "linear_attn_config": {"kda_layers": [1, 3], "full_attn_layers": [2, 4], "num_heads": 4,
                                        "head_dim": 16, "short_conv_kernel_size": 4},
                 "moe_intermediate_size": 32, **_MLA, "num_shared_experts": 1, "first_k_dense_replace": 1,
                 "num_expert_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5,
                 "routed_expert_hidden_size": 32, "latent_moe_use_norm": True, "attn_res_block_size": None,
                 "hidden_act": "situ"}),
    # Phixtral: two-projection experts with biases (precise GELU) in a block parallel to attention
    Family("phixtral", "num_local_experts", Routing.TOPK_SOFTMAX, block="moe", aliases=("phi-msft",),
           hf_experts="mlp", hf_names=MappingProxyType({"fc1": "fc1", "fc2": "fc2"}),
           tiny={"num_vocab": 512, "model_dim": 64, "num_heads": 4, "num_layers": 4, "rotary_dim": 8}),
    # Gemma-4: the MoE is two attributes of the decoder layer, beside a dense MLP: router (its own
    # RMSNorm of the residual stream, top-k of the logits, softmax of the k in the model dtype,
    # times router.per_expert_scale) and experts (on a second pre-norm); layers return
    # (h, K/V, offset), handed on only to KV-sharing layers (those are refused by the runner)
    Family("gemma4_text", "num_experts", Routing.LAYER_ROUTER, block="", router="router.proj",
           stacked="experts.switch_glu", top_k="high", top_k_key="top_k_experts", layer_outputs=3,
           route=Route(score="logits", precise=False, post_scale="router.per_expert_scale"), gguf_arch="gemma4",
           tiny=_GEMMA4),
    Family("gemma4", "num_experts", Routing.LAYER_ROUTER, block="", router="router.proj",
           stacked="experts.switch_glu", top_k="high", top_k_key="top_k_experts", layer_outputs=3,
           route=Route(score="logits", precise=False, post_scale="router.per_expert_scale"), text_config=True,
           aliases=("gemma4_unified",), tiny_outer={"architectures": ["Gemma4ForConditionalGeneration"]},
           tiny={"model_type": "gemma4_text", **_GEMMA4}),
    # DBRX: softmax of float32 logits (not precise), L1-renormalised; the experts are a list of
    # modules (w1, v1, w2) in the MLX layout; the count is a nested key. Its HF layout fuses the
    # experts as [E * I, D] rows, which apply refuses (the expert axis is not axis 0)
    Family("dbrx", "ffn_config.moe_num_experts", Routing.SOFTMAX_TOPK, block="ffn", stacked="experts",
           router="router.layer", top_k_key="ffn_config.moe_top_k", route=Route(f32=True, precise=False, renorm="l1"),
           hf_names=MappingProxyType({"w1": "w1", "v1": "v1", "w2": "w2"}), gguf_arch="dbrx",
           tiny={"d_model": 64, "n_layers": 4, "n_heads": 4, "ffn_config": {"ffn_hidden_size": 32},
                 "attn_config": {"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0}}),
    # ------------------------------------------------------------ refused, with the reason
    Family("deepseek_v41", "n_routed_experts", Routing.SIGMOID_GROUP, aliases=("deepseek_v41_text",),
           refused="its decoder layers pass [B, L, hc_mult, D] hyper-connection streams and a shared dict of "
                   "compressed KV / indexer state from layer to layer, which a layer-by-layer run cannot replay"),
    Family("muse_spark", "num_local_experts", Routing.SIGMOID_GROUP, text_config=True,
           refused="routing and the expert combine are Metal-only kernels (no CPU or CUDA path to run or check), "
                   "and its NVFP4 experts carry per-expert global scales"),
    Family("prism_hadamard_qwen35", "num_experts", Routing.SOFTMAX_TOPK, text_config=True,
           refused="a 2-bit Hadamard-rotated pack with a module manifest: pruning would have to rewrite the pack"),
)
