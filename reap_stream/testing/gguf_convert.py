"""Tiny GGUF fixtures converted from the project's MLX fixtures (same weights, llama.cpp names).

`convert_mlx_to_gguf` is a pure renaming + (optional) quantisation of an mlx_lm-layout
checkpoint, written with gguf-py's GGUFWriter (an independent writer, so our reader is tested
against it). numpy shapes are reversed into llama.cpp's ne order by the writer: a stacked expert
tensor [E, out, in] becomes ne = [in, out, E], the expert axis outermost.

`make_ds4_fixture` builds the deepseek4-like file, our own construction (see docs/gguf.md):
the deepseek_v3 fixture with arch "deepseek4", layer 1 turned into a hash-routed layer
(`blk.1.ffn_gate_tid2eid.weight`, I32 ne=[top_k, vocab]; no router), fused
`ffn_gate_up_exps.weight` [in, 2*ff, E], a per-expert `ffn_down_exps.scale` [E], and one MTP
block `mtp.0.*` (a copy of the last layer's MoE plus eh_proj/enorm/hnorm) that must stay untouched.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import gguf
import numpy as np
from gguf import quants
from gguf.constants import GGMLQuantizationType as T

from ..io.safetensors import Checkpoint, to_float32
from ..families.table import FAMILIES
from ..io.gguf import BLOCK_TENSOR
from ..io.files import build_once

QTYPES = ("f32", "f16", "q8_0", "q4_0")

# mlx_lm name (after "model.layers.N.") -> llama.cpp name (after "blk.N.")
_LAYER_NAMES: dict[str, str] = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.sinks": "attn_sinks.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.embed_q.weight": "attn_k_b.weight",
    "self_attn.unembed_out.weight": "attn_v_b.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
    "mlp.router.weight": "ffn_gate_inp.weight",
    "mlp.router.bias": "ffn_gate_inp.bias",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
}
for _p, _g in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output")):
    for _leaf in ("weight", "bias"):
        _LAYER_NAMES[f"self_attn.{_p}_proj.{_leaf}"] = f"attn_{_g}.{_leaf}"
for _p in ("gate", "up", "down"):
    _LAYER_NAMES[f"mlp.{_p}_proj.weight"] = f"ffn_{_p}.weight"
    _LAYER_NAMES[f"mlp.shared_expert.{_p}_proj.weight"] = f"ffn_{_p}_shexp.weight"
    _LAYER_NAMES[f"mlp.shared_experts.{_p}_proj.weight"] = f"ffn_{_p}_shexp.weight"
    for _block in ("mlp.switch_mlp", "block_sparse_moe.switch_mlp", "mlp.experts"):
        for _leaf in ("weight", "bias"):
            _LAYER_NAMES[f"{_block}.{_p}_proj.{_leaf}"] = f"ffn_{_p}_exps.{_leaf}"

_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

# config.json key -> (GGUF key under "{arch}.", value type)
_CONFIG_KEYS = {
    "num_hidden_layers": ("block_count", "u32"),
    "max_position_embeddings": ("context_length", "u32"),
    "hidden_size": ("embedding_length", "u32"),
    "intermediate_size": ("feed_forward_length", "u32"),
    "moe_intermediate_size": ("expert_feed_forward_length", "u32"),
    "shared_expert_intermediate_size": ("expert_shared_feed_forward_length", "u32"),
    "num_attention_heads": ("attention.head_count", "u32"),
    "num_key_value_heads": ("attention.head_count_kv", "u32"),
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

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_name(name: str) -> str:
    """llama.cpp tensor name of an mlx_lm tensor name (KeyError when unknown)."""
    m = _LAYER.match(name)
    if m:
        return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return _GLOBAL_NAMES[name]


def _qtype(qtype: str, gname: str, arr: np.ndarray):
    """ggml type of one tensor: 1-D tensors and biases stay F32 (as llama.cpp writes them),
    routers stay F32 under block quantisation (llama-quantize leaves ffn_gate_inp alone)."""
    if qtype == "f32" or arr.ndim < 2 or not gname.endswith(".weight"):
        return T.F32
    if qtype == "f16":
        return T.F16
    if "ffn_gate_inp" in gname or arr.shape[-1] % 32:
        return T.F32
    return {"q8_0": T.Q8_0, "q4_0": T.Q4_0}[qtype]


def _encode(arr: np.ndarray, t) -> np.ndarray:
    if t == T.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    return quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), t)


def _mla_keys(config: dict) -> dict:
    """deepseek2's attention as llama.cpp reads it: MLA stored as one wide KV head (its converter's
    convention), sigmoid gating (2)."""
    kv, rope = int(config["kv_lora_rank"]), int(config["qk_rope_head_dim"])
    return {"attention.q_lora_rank": ("u32", config["q_lora_rank"]), "attention.kv_lora_rank": ("u32", kv),
            "attention.key_length": ("u32", kv + rope), "attention.value_length": ("u32", kv),
            "attention.key_length_mla": ("u32", int(config["qk_nope_head_dim"]) + rope),
            "attention.value_length_mla": ("u32", config["v_head_dim"]), "attention.head_count_kv": ("u32", 1),
            "rope.dimension_count": ("u32", rope), "expert_gating_func": ("u32", 2)}


def _gpt_oss_keys(config: dict) -> dict:
    """gpt-oss as llama.cpp reads it: expert width, sliding window, YaRN RoPE scaling."""
    keys = {"expert_feed_forward_length": ("u32", config["intermediate_size"]),
            "attention.sliding_window": ("u32", config["sliding_window"]),
            "attention.key_length": ("u32", config["head_dim"]), "attention.value_length": ("u32", config["head_dim"])}
    yarn = config.get("rope_scaling") or {}
    if yarn.get("rope_type") == "yarn":
        keys.update({"rope.scaling.type": ("str", "yarn"), "rope.scaling.factor": ("f32", yarn["factor"]),
                     "rope.scaling.original_context_length": ("u32", yarn["original_max_position_embeddings"])})
    return keys


# arch -> keys llama.cpp needs beyond the config.json table (they win over it)
_ARCH_KEYS = {"deepseek2": _mla_keys, "gpt-oss": _gpt_oss_keys}


def _metadata(writer, arch: str, config: dict, ckpt: Checkpoint) -> None:
    fam = FAMILIES[config["model_type"]]
    writer.add_string("general.name", f"reap-stream tiny {config['model_type']}")
    keys = {"expert_count": ("u32", config[fam.experts_key])}
    for ckey, (gkey, vt) in _CONFIG_KEYS.items():
        v = config.get(ckey)
        if v is not None and not isinstance(v, (list, dict)):
            keys[gkey] = (vt, v)
    keys.update(_ARCH_KEYS.get(arch, lambda c: {})(config))
    for gkey, (vt, v) in keys.items():
        add = {"u32": writer.add_uint32, "f32": writer.add_float32, "bool": writer.add_bool, "str": writer.add_string}[vt]
        add(f"{arch}.{gkey}", {"u32": int, "f32": float, "bool": bool, "str": str}[vt](v))
    bpe = json.loads((ckpt.root / "tokenizer.json").read_text())["model"]
    tokens = [t for t, _ in sorted(bpe["vocab"].items(), key=lambda kv: kv[1])]
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.token_type", [1] * len(tokens))
    # llama.cpp refuses a gpt2 vocabulary without its merges ("a b" per merge, rank order)
    writer.add_array("tokenizer.ggml.merges", [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])


def _write(out: Path, arch: str, config: dict, ckpt: Checkpoint, tensors: list[tuple[str, np.ndarray, object]],
           split_max_tensors: int) -> list[Path]:
    writer = gguf.GGUFWriter(out, arch, split_max_tensors=split_max_tensors)
    _metadata(writer, arch, config, ckpt)
    for gname, arr, t in tensors:
        writer.add_tensor(gname, arr, raw_dtype=t)
    # gguf-py prints progress on stdout; closed with the block
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    writer.close()
    if split_max_tensors:
        return sorted(out.parent.glob(out.stem + "-*-of-*.gguf"))
    return [out]


def _rope_halves_to_pairs(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q/k projection reordered per head from mlx_lm's rotate-half RoPE layout to the
    interleaved pairs llama.cpp's "llama" arch rotates (its converter does the same)."""
    per_head = w.shape[0] // heads
    return w.reshape(heads, 2, per_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# arch -> {llama.cpp tensor suffix: config key of its head count}: q/k rows llama.cpp expects
# permuted for its RoPE
_ROPE_PERMUTED = {"llama": {"attn_q.weight": "num_attention_heads", "attn_k.weight": "num_key_value_heads"}}


# arch -> {generic llama.cpp tensor suffix: the arch's own}
_ARCH_NAMES = {"gpt-oss": {"ffn_norm.weight": "post_attention_norm.weight"}}


def _tensors(ckpt: Checkpoint, qtype: str) -> list[tuple[str, np.ndarray, object]]:
    arch = FAMILIES[ckpt.config["model_type"]].gguf_arch
    permuted, renamed = _ROPE_PERMUTED.get(arch, {}), _ARCH_NAMES.get(arch, {})
    out = []
    for name in sorted(ckpt.tensors, key=_natural):
        gname = gguf_name(name)
        for generic, own in renamed.items():
            if gname.endswith("." + generic):
                gname = gname[: -len(generic)] + own
        arr = to_float32(ckpt.tensors[name])
        heads_key = next((k for suffix, k in permuted.items() if gname.endswith(suffix)), None)
        if heads_key is not None:
            arr = _rope_halves_to_pairs(arr, int(ckpt.config[heads_key]))
        t = _qtype(qtype, gname, arr)
        out.append((gname, _encode(arr, t), t))
    return out


def _natural(name: str):
    """Layer-major order (blk.2 before blk.10), as llama.cpp's converter writes tensors."""
    m = _LAYER.match(name)
    return (1, int(m.group(1)), m.group(2)) if m else (0 if "embed" in name else 2, 0, name)


def convert_mlx_to_gguf(src: Path, out: Path, *, qtype: str = "f32", split_max_tensors: int = 0) -> list[Path]:
    """Write the GGUF form of an mlx_lm fixture (float weights); returns the file(s) written."""
    if qtype not in QTYPES:
        raise ValueError(f"qtype must be one of {QTYPES}")
    ckpt = Checkpoint.open(src)
    arch = FAMILIES[ckpt.config["model_type"]].gguf_arch
    return _write(Path(out), arch, ckpt.config, ckpt, _tensors(ckpt, qtype), split_max_tensors)


HASH_LAYER = 1   # the deepseek4-like fixture's hash-routed layer


def make_ds4_fixture(src: Path, out: Path, *, qtype: str = "f32", seed: int = 0) -> list[Path]:
    """The deepseek4-like GGUF (our construction) from the deepseek_v3 mlx fixture."""
    ckpt = Checkpoint.open(src)
    cfg = dict(ckpt.config)
    if cfg["model_type"] != "deepseek_v3":
        raise ValueError("make_ds4_fixture converts the deepseek_v3 fixture")
    rng = np.random.default_rng(seed)
    base = {g: (a, t) for g, a, t in _tensors(ckpt, qtype)}
    vocab, top_k, E = cfg["vocab_size"], cfg["num_experts_per_tok"], cfg["n_routed_experts"]
    last = cfg["num_hidden_layers"] - 1
    tensors = []
    for gname, (arr, t) in base.items():
        m = BLOCK_TENSOR.match(gname)
        layer, leaf = (int(m.group(1)), m.group(2)) if m else (None, gname)
        if layer == HASH_LAYER and leaf in ("ffn_gate_inp.weight", "exp_probs_b.bias"):
            continue   # a hash layer routes by table, it has no router
        if leaf == "ffn_up_exps.weight":
            continue   # fused into gate_up below
        if leaf == "ffn_gate_exps.weight":
            up, _ = base[gname.replace("gate_exps", "up_exps")]
            # numpy [E, ff, in] (or its quantised byte form): concatenate along ff
            tensors.append((gname.replace("gate_exps", "gate_up_exps"), np.concatenate([arr, up], axis=1), t))
            continue
        tensors.append((gname, arr, t))
        if leaf == "ffn_down_exps.weight":
            scale = (1.0 + 0.1 * rng.standard_normal(E)).astype(np.float32)
            tensors.append((f"blk.{layer}.ffn_down_exps.scale", scale, T.F32))
        if layer == HASH_LAYER and leaf == "ffn_norm.weight":
            table = (np.arange(vocab)[:, None] * 7 + np.arange(top_k)[None, :] * 3) % E
            tensors.append((f"blk.{layer}.ffn_gate_tid2eid.weight", table.astype(np.int32), T.I32))
    H = cfg["hidden_size"]
    mtp = [("mtp.0.eh_proj.weight", rng.standard_normal((H, 2 * H)).astype(np.float32) / 8, T.F32),
           ("mtp.0.enorm.weight", np.ones(H, np.float32), T.F32),
           ("mtp.0.hnorm.weight", np.ones(H, np.float32), T.F32)]
    for gname, arr, t in tensors:
        if gname.startswith(f"blk.{last}.ffn_") or gname.startswith(f"blk.{last}.exp_probs_b"):
            mtp.append((gname.replace(f"blk.{last}.", "mtp.0."), arr.copy(), t))
    cfg["model_type"] = "deepseek_v3"   # metadata keys come from the v3 config table
    return _write(Path(out), "deepseek4", cfg, ckpt, tensors + mtp, 0)


def cached_gguf(family: str, qtype: str, root: Path, mlx_dir: Path, *, split: int = 0) -> list[Path]:
    """root/<family>-<qtype>[-split<N>]/model.gguf (or its parts), written once via temp dir + rename.
    family "deepseek4" builds the deepseek4-like file from the deepseek_v3 mlx fixture `mlx_dir`."""
    def build(tmp: Path) -> None:
        if family == "deepseek4":
            make_ds4_fixture(mlx_dir, tmp / "model.gguf", qtype=qtype)
        else:
            convert_mlx_to_gguf(mlx_dir, tmp / "model.gguf", qtype=qtype, split_max_tensors=split)
        (tmp / "done").write_text("")

    final = Path(root) / (f"{family}-{qtype}" + (f"-split{split}" if split else ""))
    build_once(final, lambda p: (p / "done").is_file(), build)
    return sorted(final.glob("*.gguf"))
