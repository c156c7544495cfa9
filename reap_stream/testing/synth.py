"""Tiny, seeded, random-weight MoE checkpoints in real on-disk formats (test fixtures).

Models are built with mlx_lm's own classes, so the tensor names and shapes are exactly what
mlx_lm saves and loads. Weights come from a numpy RNG (not MLX's), files are written by our own
safetensors writer with sorted headers: the same arguments give byte-identical files.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import io
import json
import struct
from pathlib import Path

import numpy as np

from ..families.table import FAMILIES as FAMILY_TABLE
from ..families.table import FAMILY_ROWS, Family, classify, config_value, family_of, set_config_value
from ..io.files import build_once

QUANTIZED_FAMILIES: tuple[str, ...] = ("qwen3_moe", "deepseek_v3", "gpt_oss")
HF_FAMILIES: tuple[str, ...] = ("qwen3_moe", "mixtral")
VARIANTS: tuple[str, ...] = ("fp32", "fp16", "bf16", "q4", "hf", "transformers")

VOCAB_SIZE = 512
HIDDEN = 64
QUANT_GROUP_SIZE = 32
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_COMMON = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": HIDDEN,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "use_cache": True,
}

# the families with a tiny fixture: every supported row mlx_lm can build (config extras in the row's `tiny`)
FAMILIES: tuple[str, ...] = tuple(f.model_type for f in FAMILY_ROWS if f.mlx and not f.refused)
# the first seven families, which the per-stage tests (brute-force reference, masking, fixtures)
# cover; every family goes through tests/test_family_matrix.py
FIRST_FAMILIES: tuple[str, ...] = FAMILIES[:7]
NUM_EXPERTS = 8

_ST_DTYPES = {  # numpy dtype name -> safetensors dtype
    "float32": "F32", "float16": "F16", "bfloat16": "BF16", "uint32": "U32",
    "int32": "I32", "uint8": "U8", "int8": "I8", "uint16": "U16", "int64": "I64",
}


def tiny_config(family: str) -> dict:
    """The complete config.json dict of a family's tiny fixture: the common keys, 8 routed
    experts, top-2, then the family row's own `tiny` entries (a wrapper's: in its text_config,
    beside its `tiny_outer` keys)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    fam = FAMILY_TABLE[family]
    cfg = dict(_COMMON)
    cfg.update(copy.deepcopy(fam.tiny))
    for key, value in ((fam.experts_key, NUM_EXPERTS), (fam.top_k_key, 2)):
        if config_value(fam.tiny, key) is None:
            set_config_value(cfg, key, value)
    if fam.text_config:
        outer = {"model_type": family, "eos_token_id": _COMMON["eos_token_id"], **copy.deepcopy(fam.tiny_outer)}
        return dict(sorted({**outer, "text_config": dict(sorted(cfg.items()))}.items()))
    cfg["model_type"] = family
    return dict(sorted(cfg.items()))


# ---------------------------------------------------------------- weights

def _build_model(cfg: dict):
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(cfg)  # aliases and architecture remaps as mlx_lm does
    return model_class(args_class.from_dict(cfg))


def _init_value(name: str, shape: tuple, rng: np.random.Generator, hidden: int,
                fam: Family | None = None) -> np.ndarray:
    """Deterministic init by tensor role; routers get large rows so routing is varied, selection
    biases are >= 0 (where mlx_lm zero-fills losing groups, masking is exact for those)."""
    if name.endswith("e_score_correction_bias"):
        return rng.uniform(0.0, 0.5, size=shape)
    if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "mlp.router.weight")):
        return rng.normal(0.0, 2.0 / np.sqrt(hidden), size=shape)
    if name.endswith("mlp.router.bias"):
        return rng.normal(0.0, 0.5, size=shape)
    rel = classify(name, fam) if fam is not None else None
    if rel is not None and rel.kind == "router":  # the other families' routers and selection biases
        return rng.uniform(0.0, 0.5, size=shape) if len(shape) == 1 else rng.normal(0.0, 2.0 / np.sqrt(hidden), size=shape)
    if name.endswith("embed_tokens.weight"):
        return rng.normal(0.0, 1.0, size=shape)
    if name.endswith("sinks"):
        return rng.normal(0.0, 0.5, size=shape)
    if len(shape) == 1 and name.endswith(".weight"):  # norms
        return 1.0 + rng.normal(0.0, 0.1, size=shape)
    if name.endswith(".bias"):
        return rng.normal(0.0, 0.05, size=shape)
    return rng.normal(0.0, 1.0 / np.sqrt(shape[-1]), size=shape)


def _random_model(cfg: dict, seed: int):
    """mlx_lm model of `cfg` with seeded numpy weights (float32)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    model = _build_model(cfg)
    params = tree_flatten(model.parameters())
    names = sorted(k for k, _ in params)
    shapes = {k: tuple(v.shape) for k, v in params}
    rng = np.random.default_rng(seed)
    fam = family_of(cfg)
    new = [(k, mx.array(_init_value(k, shapes[k], rng, HIDDEN, fam).astype(np.float32))) for k in names]
    model.load_weights(new, strict=True)
    mx.eval(model.parameters())
    return model


def _to_numpy(a) -> np.ndarray:
    """mx.array -> numpy; bfloat16 comes back as its raw uint16 bits (the caller tags it BF16)."""
    import mlx.core as mx

    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16))
    return np.array(a)


def _mlx_weights(seed: int, dtype: str, quantize_bits: int | None, config: dict):
    """(name -> (safetensors dtype, bytes, shape)), config after quantisation."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    model = _random_model(config, seed)
    target = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}[dtype]
    keep_fp32 = getattr(model, "cast_predicate", None) or (lambda k: True)
    params = dict(tree_flatten(model.parameters()))
    model.load_weights(
        [(k, v.astype(target) if keep_fp32(k) else v) for k, v in params.items()], strict=True
    )
    if quantize_bits is not None:
        from mlx_lm.utils import quantize_model

        with contextlib.redirect_stdout(io.StringIO()):
            model, config = quantize_model(model, config, QUANT_GROUP_SIZE, quantize_bits)
    mx.eval(model.parameters())
    tensors = {}
    for k, v in tree_flatten(model.parameters()):
        arr = _to_numpy(v)
        st = "BF16" if v.dtype == mx.bfloat16 else _ST_DTYPES[arr.dtype.name]
        tensors[k] = (st, arr)
    return tensors, config


# ---------------------------------------------------------------- writing

def write_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """Write {name: (st_dtype, ndarray)} as safetensors: sorted names, 8-byte aligned header."""
    header = {}
    offset = 0
    blobs = []
    for name in sorted(tensors):
        st, arr = tensors[name]
        data = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": st, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    hjson = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for b in blobs:
            f.write(b)


def _split_shards(tensors: dict, num_shards: int) -> list[list[str]]:
    """Contiguous runs of sorted names, balanced by bytes; never an empty shard."""
    names = sorted(tensors)
    if num_shards < 1 or num_shards > len(names):
        raise ValueError(f"num_shards must be in 1..{len(names)}")
    sizes = [tensors[n][1].nbytes for n in names]
    total = sum(sizes)
    shards: list[list[str]] = [[]]
    acc = 0
    for i, (n, s) in enumerate(zip(names, sizes)):
        remaining_names = len(names) - i
        remaining_shards = num_shards - len(shards)
        boundary = total * len(shards) / num_shards
        if shards[-1] and remaining_shards > 0 and (acc >= boundary or remaining_names <= remaining_shards):
            shards.append([])
        shards[-1].append(n)
        acc += s
    return shards


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _write_checkpoint(out_dir: Path, tensors: dict, config: dict, num_shards: int, fmt: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = _split_shards(tensors, num_shards)
    n = len(shards)
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        write_safetensors(out_dir / fname, {k: tensors[k] for k in names}, {"format": fmt})
        weight_map.update({k: fname for k in names})
    total = sum(t[1].nbytes for t in tensors.values())
    _write_json(out_dir / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(out_dir / "config.json", config)
    write_tokenizer(out_dir)


def _train_text() -> str:
    import collections
    import json.decoder as jd
    import inspect

    return inspect.getsource(collections) + inspect.getsource(jd)


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_train_text()], trainer=trainer)
    return tok.to_str(pretty=True)


def write_tokenizer(out_dir: Path, vocab_size: int = VOCAB_SIZE) -> None:
    """Byte-level BPE trained (deterministically) on stdlib source, with a chat template;
    loads offline with mlx_lm.load and transformers.AutoTokenizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(_tokenizer_json(vocab_size))
    _write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[2],
        "pad_token": SPECIAL_TOKENS[0],
        "unk_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "chat_template": CHAT_TEMPLATE,
    })


# ---------------------------------------------------------------- public makers

def _mlx_config(family: str, dtype: str, config_overrides: dict | None) -> dict:
    cfg = tiny_config(family)
    if config_overrides:
        cfg.update(copy.deepcopy(config_overrides))
    cfg["torch_dtype"] = dtype
    return cfg


def make_mlx_fixture(
    family: str,
    out_dir: Path,
    *,
    seed: int = 0,
    dtype: str = "float32",
    quantize_bits: int | None = None,
    num_shards: int = 2,
    config_overrides: dict | None = None,
) -> Path:
    """Write an mlx_lm-layout checkpoint (stacked experts) to out_dir; returns out_dir."""
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"unsupported dtype {dtype!r}")
    out_dir = Path(out_dir)
    config = _mlx_config(family, dtype, config_overrides)
    tensors, config = _mlx_weights(seed, dtype, quantize_bits, config)
    _write_checkpoint(out_dir, tensors, dict(sorted(config.items())), num_shards, "mlx")
    return out_dir


def mlx_to_hf_names(family: str, tensors: dict) -> dict:
    """Unstack mlx_lm's switch_mlp tensors into HF per-expert names (pure dict -> dict)."""
    fam = FAMILY_TABLE[family]   # the tensor-name knowledge lives in the family table alone
    mlx_block, hf_block = f"{fam.block}.{fam.stacked}", f"{fam.block}.{fam.hf_experts}"
    proj = {mlx: hf for hf, mlx in fam.hf_names.items()}
    out = {}
    for name, (st, arr) in tensors.items():
        head, sep, tail = name.partition(f".{mlx_block}.")
        if not sep:
            out[name] = (st, arr)
            continue
        p, leaf = tail.split(".", 1)
        for e in range(arr.shape[0]):
            out[f"{head}.{hf_block}.{e}.{proj[p]}.{leaf}"] = (st, arr[e])
    return out


def make_hf_fixture(family: str, out_dir: Path, *, seed: int = 0, dtype: str = "float32") -> Path:
    """Same weights as make_mlx_fixture(family, seed=seed), HF per-expert names, transformers-loadable."""
    if family not in HF_FAMILIES:
        raise ValueError(f"no HF fixture for {family!r}; have: {', '.join(HF_FAMILIES)}")
    out_dir = Path(out_dir)
    config = _mlx_config(family, dtype, None)
    tensors, config = _mlx_weights(seed, dtype, None, config)
    _write_checkpoint(out_dir, mlx_to_hf_names(family, tensors), config, 2, "pt")
    return out_dir


# ---------------------------------------------------------------- cache

_VARIANT_ARGS = {
    "fp32": {"dtype": "float32"},
    "fp16": {"dtype": "float16"},
    "bf16": {"dtype": "bfloat16"},
    "q4": {"dtype": "float32", "quantize_bits": 4},
}


def fixture_complete(path: Path) -> bool:
    """True when config, tokenizer, index and every indexed shard are present."""
    path = Path(path)
    try:
        index = json.loads((path / "model.safetensors.index.json").read_text())
        json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    files = set(index.get("weight_map", {}).values())
    need = [path / "tokenizer.json", path / "tokenizer_config.json"] + [path / f for f in files]
    return bool(files) and all(p.is_file() and p.stat().st_size > 0 for p in need)


def cached_fixture(family: str, variant: str, root: Path) -> Path:
    """root/<family>-<variant>-<config digest>, generated once (storage.build_once: temp dir + rename; incomplete
    dirs are rebuilt; safe against concurrent processes)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    if variant == "q4" and not FAMILY_TABLE[family].quantizable:
        raise ValueError(f"no q4 fixture for {family!r} (mlx_lm does not quantise its experts)")

    def build(tmp: Path) -> None:
        if variant == "hf":
            make_hf_fixture(family, tmp)
        elif variant == "transformers":
            from .hf_fixture import make_transformers_fixture
            make_transformers_fixture(family, tmp)
        else:
            make_mlx_fixture(family, tmp, **_VARIANT_ARGS[variant])

    # the config's digest in the name: a changed family row never reuses a stale cached fixture
    digest = hashlib.sha256(json.dumps([tiny_config(family), _VARIANT_ARGS.get(variant)], sort_keys=True)
                            .encode()).hexdigest()[:8]
    return build_once(Path(root) / f"{family}-{variant}-{digest}", fixture_complete, build)
