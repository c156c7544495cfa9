"""The mlx_lm parameters of a GGUF model as arrays: which GGUF tensor holds each parameter, read
by byte range and dequantised, with what llama.cpp's converter did to it undone.

Names go forward, from mlx_lm's parameter to the GGUF tensor, through gguf-py's own TensorNameMap
(it maps Hugging Face names to llama.cpp's; the reverse is many-to-one). mlx_lm's own spellings
are first put back into Hugging Face's (`switch_mlp` -> `experts` and the family's per-expert
projection names, `e_score_correction_bias` -> `e_score_correction.bias`, MLA's `embed_q` /
`unembed_out` -> `k_b_proj` / `v_b_proj`, which are the converter's split of kv_b exactly as
mlx_lm splits it; a wrapper's `language_model.` prefix dropped, as the converter drops it). What
the converter changed beyond names is undone:
- q/k rows permuted for llama.cpp's interleaved RoPE (`LlamaModel.permute`, ROPE_PERMUTED archs);
- `ffn_gate_up_exps` fused gate and up: the first half of its rows is gate, the second up;
- Mamba's `A_log` stored as `ssm_a` = -exp(A_log);
- shapes that differ only by size-1 dimensions (squeezed convolutions, 1-D shared-expert gates).
Architectures with a converter transform not undone here are refused (NOT_READABLE).

A parameter with an expert axis can be read a run of experts at a time (`experts`), one byte
range of the GGUF tensor, through the same undoing as the whole parameter; `GGUFExperts` serves a
layer's expert stack that way to the chunked expert loop (families/expert_source).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from gguf.tensor_mapping import TensorNameMap

from ..errors import BadInput
from ..io.gguf import TensorInfo
from ..io.gguf_read import check_readable, read_slices, read_tensor
from .expert_source import PARAMS, ReadExperts
from .gguf_arch import arch_enum, known_arch
from .table import Family

# architectures whose converter permutes q/k rows for llama.cpp's RoPE (its LlamaModel.permute)
ROPE_PERMUTED = frozenset({"llama", "deci", "arctic", "deepseek", "minicpm", "granitemoe", "granitehybrid",
                           "nemotron_h_moe", "mistral3", "llama-embed", "bailingmoe"})
# architectures whose converter reorders weights in ways not undone here
NOT_READABLE = MappingProxyType({
    "qwen35moe": "its converter reorders the linear-attention value heads (grouped to tiled)",
    "qwen3next": "its converter splits and reorders the fused linear-attention projections",
})
# mlx_lm's spellings -> Hugging Face's (what TensorNameMap knows)
_MLX_SPELLINGS = ((".switch_mlp.", ".experts."), (".switch_glu.", ".experts."),
                  (".e_score_correction_bias", ".e_score_correction.bias"),
                  (".embed_q.", ".k_b_proj."), (".unembed_out.", ".v_b_proj."),
                  ("language_model.", ""))   # the converter drops a wrapper's prefix


def name_map(arch: str, blocks: int) -> TensorNameMap:
    """gguf-py's map for an architecture. Building one updates a class-level table for some
    architectures (arctic), so the table is restored afterwards."""
    saved = {k: list(v) for k, v in TensorNameMap.block_mappings_cfg.items()}
    try:
        return TensorNameMap(arch_enum(arch), blocks)
    finally:
        TensorNameMap.block_mappings_cfg.clear()
        TensorNameMap.block_mappings_cfg.update({k: tuple(v) for k, v in saved.items()})


class Namer:
    """GGUF tensor names an mlx_lm parameter may have, in order: through gguf-py's TensorNameMap,
    as spelled by mlx_lm and then as spelled by Hugging Face."""

    def __init__(self, arch: str, fam: Family, blocks: int):
        self._map = name_map(arch, blocks)
        hf = {v: k for k, v in (fam.hf_names or {}).items()}
        self._spellings = _MLX_SPELLINGS + tuple((f".experts.{mlx}.", f".experts.{h}.") for mlx, h in hf.items())

    def candidates(self, name: str) -> list[str]:
        spelled = name
        for a, b in self._spellings:
            spelled = spelled.replace(a, b)
        out = []
        for candidate in dict.fromkeys((name, spelled)):
            g = self._map.get_name(candidate, try_suffixes=(".weight", ".bias"))
            if g is not None:   # a name without a suffix (gpt-oss's sinks) is stored as ".weight",
                # but llama.cpp loads a selection bias (AFMoE's expert_bias) as "exp_probs_b.bias"
                out += [g] if g.endswith((".weight", ".bias")) else \
                    [g + ".bias", g + ".weight"] if g.endswith(".exp_probs_b") else [g + ".weight", g]
        return list(dict.fromkeys(out))


@dataclass(frozen=True)
class Source:
    """Where one mlx_lm parameter comes from."""
    tensor: TensorInfo
    rows: slice | None = None          # part of the GGUF rows (axis -2) it is: fused gate/up
    unpermute_heads: int | None = None  # undo the RoPE row permutation with this many heads
    a_log: bool = False                 # stored as -exp(A_log)


def permute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (axis 0): per head, rotate-half order to the
    interleaved pairs its RoPE rotates."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of permute_rope_rows."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
    """Arrays by mlx_lm parameter name, read from a GGUF model's byte ranges."""

    def __init__(self, arch: str, fam: Family, config: dict, tensors: dict[str, TensorInfo],
                 params: dict[str, tuple[int, ...]], blocks: int, where: str):
        if arch in NOT_READABLE or not known_arch(arch):
            why = NOT_READABLE.get(arch, "gguf-py has no tensor name table for it")
            raise BadInput(where, f"{arch}: cannot read its weights into mlx_lm's model: {why}; collect from "
                                  f"the MLX or Hugging Face form and apply the plan to this GGUF")
        self.arch, self.where, self.tensors = arch, where, tensors
        self.params = dict(params)
        self._namer = Namer(arch, fam, blocks)
        self._heads = {"attn_q": config.get("num_attention_heads"), "attn_k": config.get("num_key_value_heads")}
        self.sources: dict[str, Source] = {}
        for name, shape in self.params.items():
            src = self._find(name)
            check_readable(src.tensor)
            if self._shape(src) != tuple(shape) and not self._squeezable(src, shape):
                raise BadInput(src.tensor.file, f"tensor {src.tensor.name!r} has shape {list(self._shape(src))}; "
                                                f"mlx_lm's {name!r} is {list(shape)}")
            self.sources[name] = src

    # ---------------------------------------------------------------- names

    def _find(self, name: str) -> Source:
        names = self._namer.candidates(name)
        for g in names:
            if g in self.tensors:
                t = self.tensors[g]
                head = g.split(".")[2] if g.startswith("blk.") else ""
                heads = self._heads.get(head) if self.arch in ROPE_PERMUTED else None
                return Source(t, unpermute_heads=heads, a_log=head == "ssm_a" and name.endswith("A_log"))
            fused = g.replace("ffn_gate_exps", "ffn_gate_up_exps").replace("ffn_up_exps", "ffn_gate_up_exps")
            if fused != g and fused in self.tensors:
                t = self.tensors[fused]
                half = t.ne[1] // 2
                return Source(t, rows=slice(0, half) if "ffn_gate_exps" in g else slice(half, 2 * half))
        tried = f" (looked for {', '.join(names)})" if names else ""
        raise BadInput(self.where, f"{self.arch}: no GGUF tensor holds mlx_lm's parameter {name!r}{tried}")

    def _shape(self, src: Source) -> tuple[int, ...]:
        shape = list(reversed(src.tensor.ne))
        if src.rows is not None:
            shape[-2] = src.rows.stop - src.rows.start
        return tuple(shape)

    def _squeezable(self, src: Source, shape) -> bool:
        return [d for d in self._shape(src) if d != 1] == [d for d in shape if d != 1]

    # ---------------------------------------------------------------- arrays

    def _finish(self, name: str, src: Source, arr: np.ndarray, whole: bool) -> np.ndarray:
        if src.rows is not None:
            arr = arr[..., src.rows, :]
        if src.unpermute_heads:
            arr = _unpermute(arr, int(src.unpermute_heads))
        if src.a_log:
            arr = np.log(-arr)
        shape = self.params[name]
        return np.ascontiguousarray(arr.reshape(shape if whole else (arr.shape[0], *shape[1:])))

    def array(self, name: str) -> np.ndarray:
        """The whole parameter, in mlx_lm's shape (float32, or the stored integers)."""
        src = self.sources[name]
        return self._finish(name, src, read_tensor(src.tensor), True)

    def experts(self, name: str, first: int, count: int) -> np.ndarray:
        """Experts [first, first + count) of a parameter whose axis 0 is the expert: one byte range."""
        src = self.sources[name]
        return self._finish(name, src, read_slices(src.tensor, first, count), False)

    def stack(self, prefix: str) -> GGUFExperts | None:
        """The parameters under `prefix` (an expert stack: "<layer>.mlp.switch_mlp.") as a source
        read a run of experts at a time, or None where one is not a stacked tensor whose outermost
        axis is the expert (then the layer loads whole)."""
        names: dict[str, dict[str, str]] = {}
        counts = set()
        for name, shape in self.params.items():
            if not name.startswith(prefix):
                continue
            proj, _, param = name[len(prefix):].partition(".")
            src = self.sources[name]
            if param not in PARAMS or len(shape) < 2 or self._shape(src) != tuple(shape) \
                    or src.unpermute_heads or src.a_log:
                return None
            names.setdefault(proj, {})[param] = name
            counts.add(shape[0])
        if not names or len(counts) != 1 or any("weight" not in p for p in names.values()):
            return None
        return GGUFExperts(self, names, counts.pop())


class GGUFExperts(ReadExperts):
    """A layer's routed experts read from a GGUF a run at a time (one byte range per tensor; a fused
    gate_up tensor is read for each half), dequantised to float32 as the whole-layer path loads them."""

    def __init__(self, source: GGUFSource, names: dict[str, dict[str, str]], num_experts: int):
        self.source, self.names, self.num_experts = source, names, num_experts

    @property
    def params(self) -> set[str]:
        return {n for p in self.names.values() for n in p.values()}

    @property
    def expert_bytes(self) -> int:
        return sum(4 * int(np.prod(self.source.params[n][1:])) for n in self.params)

    def layout(self) -> tuple:
        return tuple((proj, param, "float32", tuple(self.source.params[name][1:]), "float32")
                     for proj, params in self.names.items() for param, name in params.items())

    def _fill(self, lo: int, hi: int, views: dict[str, dict[str, np.ndarray]]) -> None:
        for proj, params in self.names.items():
            for param, name in params.items():
                views[proj][param][...] = self.source.experts(name, lo, hi - lo)
