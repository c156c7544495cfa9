"""Tiny GGUF fixtures converted from the project's MLX fixtures (same weights, llama.cpp names).

`convert_mlx_to_gguf` renames an mlx_lm-layout checkpoint's tensors to llama.cpp's with gguf-py's
own TensorNameMap (families/gguf_source.Namer: any family row with a gguf_arch and a fixture is
converted), does what llama.cpp's converter does beyond names (q/k rows permuted for the archs
whose RoPE rotates interleaved pairs; Mamba's A as -exp(A_log) and squeezed convolutions; a
wrapper's text_config read at the top level and its language_model. prefix dropped; the metadata
keys its converter writes (testing/gguf_metadata), rope_freqs and the tokenizer included),
optionally quantises and fuses gate and up experts (`ffn_gate_up_exps`, as the converter's
--fuse-gate-up-exps writes them), and writes with gguf-py's GGUFWriter (an independent writer, so our reader
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
from importlib.metadata import version
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
from ..families.gguf_arch import known_arch
from .gguf_metadata import hparams as _hparams, llama3_rope_factors, metadata_keys

QTYPES = ("f32", "f16", "q8_0", "q4_0")

def gguf_name(name: str, arch: str, blocks: int = 64) -> str:
    """llama.cpp tensor name of an mlx_lm parameter, by gguf-py's TensorNameMap (KeyError when
    it has none)."""
    names = _namer(arch, blocks).candidates(name)
    if not name.endswith((".weight", ".bias")) and arch not in _SUFFIXED:   # the converter keeps it bare
        names = [n for n in names if not n.endswith(".weight")] or names
    if not names:
        raise KeyError(name)
    return names[0]


# converters that name a parameter without a suffix "<name>.weight" (gpt-oss's sinks)
_SUFFIXED = frozenset({"gpt-oss"})


@lru_cache(maxsize=None)
def _namer(arch: str, blocks: int) -> Namer:
    return Namer(arch, BY_GGUF_ARCH[arch], blocks)


_FORCED_F32 = ("ffn_gate_inp", "ssm_conv1d", "shortconv", "indexer.proj")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _qtype(qtype: str, gname: str, arr: np.ndarray):
    """ggml type of one tensor as llama.cpp's converter and llama-quantize choose it: 1-D tensors,
    norms, biases and bare names, and what the converter forces to F32 (routers, Mamba's
    convolution, the DSA indexer's head weights; llama-quantize leaves them alone) stay F32, as do
    rows whose length is not a whole number of blocks."""
    if qtype == "f32" or arr.ndim < 2 or not gname.endswith(".weight") or gname.endswith("_norm.weight") \
            or any(forced in gname for forced in _FORCED_F32):
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


def _metadata(writer, arch: str, fam, config: dict, ckpt: Checkpoint) -> None:
    writer.add_string("general.name", f"reap-stream tiny {fam.model_type}")
    for gkey, (vt, v) in metadata_keys(arch, fam, config).items():
        add = {"u32": writer.add_uint32, "f32": writer.add_float32, "bool": writer.add_bool, "str": writer.add_string,
               "bools": writer.add_array, "u32s": writer.add_array}[vt]
        add(f"{arch}.{gkey}", {"u32": int, "f32": float, "bool": bool, "str": str, "bools": list, "u32s": list}[vt](v))
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
    _metadata(writer, arch, FAMILIES[config["model_type"]], _hparams(config), ckpt)
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
    arch = FAMILIES[ckpt.config["model_type"]].gguf_arch
    config = _hparams(ckpt.config)
    heads = {"attn_q": config.get("num_attention_heads"), "attn_k": config.get("num_key_value_heads")}
    out = []
    for name in sorted(ckpt.tensors, key=_natural):
        gname = gguf_name(name, arch, int(config["num_hidden_layers"]))
        arr = to_float32(ckpt.tensors[name])
        head = gname.split(".")[2] if gname.startswith("blk.") else ""
        if arch in ROPE_PERMUTED and head in heads:   # llama.cpp's RoPE rotates interleaved pairs
            arr = permute_rope_rows(arr, int(heads[head]))
        if head == "ssm_a" and name.endswith("A_log"):   # Mamba's converter stores A itself
            arr = -np.exp(arr)
        if head == "ssm_conv1d" and gname.endswith(".weight"):   # and the convolution squeezed
            arr = arr.squeeze()
        t = _qtype(qtype, gname, arr)
        out.append((gname, _encode(arr, t), t))
    rope = config.get("rope_scaling") or {}
    if rope.get("rope_type") == "llama3":   # the converter stores the scaled frequencies, not the config
        dims = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        out.append(("rope_freqs.weight", llama3_rope_factors(config.get("rope_theta", 1e4), dims, rope), T.F32))
    return out


def _natural(name: str):
    """Layer-major order (blk.2 before blk.10), as llama.cpp's converter writes tensors."""
    m = _LAYER.match(name)
    return (1, int(m.group(1)), m.group(2)) if m else (0 if "embed" in name else 2, 0, name)


def fuse_gate_up(tensors: list[tuple[str, np.ndarray, object]]) -> list[tuple[str, np.ndarray, object]]:
    """Each layer's ffn_gate_exps and ffn_up_exps as one ffn_gate_up_exps (gate rows first), as
    llama.cpp's converter writes them with --fuse-gate-up-exps."""
    byname = {g: a for g, a, _ in tensors}
    out = []
    for gname, arr, t in tensors:
        if gname.endswith("ffn_up_exps.weight"):
            continue
        if gname.endswith("ffn_gate_exps.weight"):
            # numpy [E, ff, in] (or its quantised byte form): concatenate along ff
            gname, arr = gname.replace("gate_exps", "gate_up_exps"), \
                np.concatenate([arr, byname[gname.replace("gate_exps", "up_exps")]], axis=1)
        out.append((gname, arr, t))
    return out


def convert_mlx_to_gguf(src: Path, out: Path, *, qtype: str = "f32", split_max_tensors: int = 0,
                        fused: bool = False) -> list[Path]:
    """Write the GGUF form of an mlx_lm fixture (float weights); returns the file(s) written.
    `fused`: gate and up experts in one tensor (fuse_gate_up)."""
    if qtype not in QTYPES:
        raise ValueError(f"qtype must be one of {QTYPES}")
    ckpt = Checkpoint.open(src)
    arch = FAMILIES[ckpt.config["model_type"]].gguf_arch
    if not known_arch(arch):
        raise ValueError(f"the installed gguf-py ({version('gguf')}) does not know architecture {arch!r}: "
                         f"no tensor names to convert to")
    tensors = _tensors(ckpt, qtype)
    return _write(Path(out), arch, ckpt.config, ckpt, fuse_gate_up(tensors) if fused else tensors, split_max_tensors)


HASH_LAYER = 1   # the deepseek4-like fixture's hash-routed layer


def make_ds4_fixture(src: Path, out: Path, *, qtype: str = "f32", seed: int = 0) -> list[Path]:
    """The deepseek4-like GGUF (our construction) from the deepseek_v3 mlx fixture."""
    ckpt = Checkpoint.open(src)
    cfg = dict(ckpt.config)
    if cfg["model_type"] != "deepseek_v3":
        raise ValueError("make_ds4_fixture converts the deepseek_v3 fixture")
    rng = np.random.default_rng(seed)
    base = {g: (a, t) for g, a, t in fuse_gate_up(_tensors(ckpt, qtype))}
    vocab, top_k, E = cfg["vocab_size"], cfg["num_experts_per_tok"], cfg["n_routed_experts"]
    last = cfg["num_hidden_layers"] - 1
    tensors = []
    for gname, (arr, t) in base.items():
        m = BLOCK_TENSOR.match(gname)
        layer, leaf = (int(m.group(1)), m.group(2)) if m else (None, gname)
        if layer == HASH_LAYER and leaf in ("ffn_gate_inp.weight", "exp_probs_b.bias"):
            continue   # a hash layer routes by table, it has no router
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


def cached_gguf(family: str, qtype: str, root: Path, mlx_dir: Path, *, split: int = 0, fused: bool = False) -> list[Path]:
    """root/<family>-<qtype>[-split<N>][-fused]-from-<mlx fixture>/model.gguf (or its parts), written once via temp
    dir + rename. family "deepseek4" builds the deepseek4-like file from the deepseek_v3 mlx fixture `mlx_dir`."""
    def build(tmp: Path) -> None:
        if family == "deepseek4":
            make_ds4_fixture(mlx_dir, tmp / "model.gguf", qtype=qtype)
        else:
            convert_mlx_to_gguf(mlx_dir, tmp / "model.gguf", qtype=qtype, split_max_tensors=split, fused=fused)
        (tmp / "done").write_text("")

    # named after the MLX fixture it converts (whose name carries its config digest)
    final = Path(root) / (f"{family}-{qtype}" + (f"-split{split}" if split else "") + ("-fused" if fused else "")
                          + f"-from-{Path(mlx_dir).name}")
    build_once(final, lambda p: (p / "done").is_file(), build)
    return sorted(final.glob("*.gguf"))
