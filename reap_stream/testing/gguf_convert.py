"""Tiny GGUF fixtures converted from the project's MLX fixtures (same weights, llama.cpp names).

`convert_mlx_to_gguf` renames an mlx_lm-layout checkpoint's tensors to llama.cpp's with gguf-py's
own TensorNameMap (families/gguf_source.Namer: any family row with a gguf_arch and a fixture is
converted), does what llama.cpp's converter does beyond names (q/k rows permuted for the archs
whose RoPE rotates interleaved pairs; the metadata keys its converter writes, tokenizer included),
optionally quantises, and writes with gguf-py's GGUFWriter (an independent writer, so our reader
is tested against it). numpy shapes are reversed into llama.cpp's ne order by the writer: a
stacked expert tensor [E, out, in] becomes ne = [in, out, E], the expert axis outermost.

`make_ds4_fixture` builds the deepseek4-like file, our own construction (see docs/gguf.md):
the deepseek_v3 fixture with arch "deepseek4", layer 1 turned into a hash-routed layer
(`blk.1.ffn_gate_tid2eid.weight`, I32 ne=[top_k, vocab]; no router), fused
`ffn_gate_up_exps.weight` [in, 2*ff, E], a per-expert `ffn_down_exps.scale` [E], and one MTP
block `mtp.0.*` (a copy of the last layer's MoE plus eh_proj/enorm/hnorm) that must stay untouched.
"""
from __future__ import annotations

import contextlib
from functools import lru_cache
import json
import os
import re
from pathlib import Path

import gguf
import numpy as np
from gguf import quants
from gguf.constants import GGMLQuantizationType as T

from ..io.safetensors import Checkpoint, to_float32
from ..families.gguf_source import ROPE_PERMUTED, Namer, permute_rope_rows
from ..families.table import BY_GGUF_ARCH, FAMILIES
from ..io.gguf import BLOCK_TENSOR
from ..io.files import build_once

QTYPES = ("f32", "f16", "q8_0", "q4_0")

def gguf_name(name: str, arch: str, blocks: int = 64) -> str:
    """llama.cpp tensor name of an mlx_lm parameter, by gguf-py's TensorNameMap (KeyError when
    it has none)."""
    names = _namer(arch, blocks).candidates(name)
    if not names:
        raise KeyError(name)
    return names[0]


@lru_cache(maxsize=None)
def _namer(arch: str, blocks: int) -> Namer:
    return Namer(arch, BY_GGUF_ARCH[arch], blocks)


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

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _qtype(qtype: str, gname: str, arr: np.ndarray):
    """ggml type of one tensor as llama.cpp's converter and llama-quantize choose it: 1-D tensors,
    biases and routers stay F32 (the converter forces ffn_gate_inp to F32, llama-quantize leaves
    it alone), as do rows whose length is not a whole number of blocks."""
    if qtype == "f32" or arr.ndim < 2 or not gname.endswith(".weight") or "ffn_gate_inp" in gname:
        return T.F32
    if qtype == "f16":
        return T.F16
    if arr.shape[-1] % 32:
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
                     "rope.scaling.original_context_length": ("u32", yarn["original_max_position_embeddings"]),
                     "rope.scaling.yarn_beta_fast": ("f32", yarn["beta_fast"]),
                     "rope.scaling.yarn_beta_slow": ("f32", yarn["beta_slow"])})
    return keys


def _glm4_keys(config: dict) -> dict:
    """GLM-4.5 as llama.cpp reads it: partial RoPE as a rotated dimension count, sigmoid gating."""
    return {"rope.dimension_count": ("u32", int(config["head_dim"] * config.get("partial_rotary_factor", 0.5))),
            "expert_gating_func": ("u32", 2)}


# arch -> keys llama.cpp needs beyond the config.json table (they win over it)
_ARCH_KEYS = {"deepseek2": _mla_keys, "gpt-oss": _gpt_oss_keys, "glm4moe": _glm4_keys}


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
    _tokenizer(writer, ckpt.root)


def _tokenizer(writer, root: Path) -> None:
    """The fixture's byte-level BPE as llama.cpp's converter records it: vocabulary, control
    tokens, merges, GPT-2's pre-tokenizer regex (what the tokenizer.json's ByteLevel applies),
    special ids and the chat template."""
    spec = json.loads((root / "tokenizer.json").read_text())
    config = json.loads((root / "tokenizer_config.json").read_text())
    bpe = spec["model"]
    tokens = [t for t, _ in sorted(bpe["vocab"].items(), key=lambda kv: kv[1])]
    control = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", "gpt-2")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.token_type", [3 if i in control else 1 for i in range(len(tokens))])
    # llama.cpp refuses a gpt2 vocabulary without its merges ("a b" per merge, rank order)
    writer.add_array("tokenizer.ggml.merges", [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    ids = bpe["vocab"]
    for key, name in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding")):
        if config.get(key) in ids:
            writer.add_uint32(f"tokenizer.ggml.{name}_token_id", ids[config[key]])
    writer.add_bool("tokenizer.ggml.add_bos_token", bool(config.get("add_bos_token")))
    if config.get("chat_template"):
        writer.add_string("tokenizer.chat_template", config["chat_template"])


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


def _tensors(ckpt: Checkpoint, qtype: str) -> list[tuple[str, np.ndarray, object]]:
    config = ckpt.config
    arch = FAMILIES[config["model_type"]].gguf_arch
    heads = {"attn_q": config.get("num_attention_heads"), "attn_k": config.get("num_key_value_heads")}
    out = []
    for name in sorted(ckpt.tensors, key=_natural):
        gname = gguf_name(name, arch, int(config["num_hidden_layers"]))
        arr = to_float32(ckpt.tensors[name])
        head = gname.split(".")[2] if gname.startswith("blk.") else ""
        if arch in ROPE_PERMUTED and head in heads:   # llama.cpp's RoPE rotates interleaved pairs
            arr = permute_rope_rows(arr, int(heads[head]))
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
    """root/<family>-<qtype>[-split<N>]-from-<mlx fixture>/model.gguf (or its parts), written once via temp dir + rename.
    family "deepseek4" builds the deepseek4-like file from the deepseek_v3 mlx fixture `mlx_dir`."""
    def build(tmp: Path) -> None:
        if family == "deepseek4":
            make_ds4_fixture(mlx_dir, tmp / "model.gguf", qtype=qtype)
        else:
            convert_mlx_to_gguf(mlx_dir, tmp / "model.gguf", qtype=qtype, split_max_tensors=split)
        (tmp / "done").write_text("")

    # named after the MLX fixture it converts (whose name carries its config digest)
    final = Path(root) / (f"{family}-{qtype}" + (f"-split{split}" if split else "") + f"-from-{Path(mlx_dir).name}")
    build_once(final, lambda p: (p / "done").is_file(), build)
    return sorted(final.glob("*.gguf"))
