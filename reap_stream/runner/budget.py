"""How much memory a run takes, from the model's shapes alone, and the chunking that keeps it under
`--max-memory`.

`Shapes` is what the model is to the memory model: per layer the bytes of its tensors outside the
routed experts and the bytes of one routed expert, the activation sizes (hidden, heads, vocabulary,
top-k, expert width). It comes from a checkpoint's headers (`shapes_of`) or from a bare config.json
through mlx_lm's model class, never evaluated (`config_shapes`).

`phase_peaks` predicts the process's peak RSS in each phase of a stream run (embedding, one layer,
the head's logits) for a chunking: tokens per chunk, bytes of experts per chunk. `fit` chooses the
chunking for a budget, or says how much is needed at the least (one sequence, one expert). The
coefficients are what was measured here (docs/memory.md): the interpreter with mlx, mlx_lm and the
tokenizer's libraries, and per phase the arrays alive at the peak.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import BadInput
from ..families.expert_source import MX_DTYPES
from ..families.table import Family, classify
from ..io.safetensors import DTYPE_BITS

MIB = 1 << 20
GGML_F32 = 0   # ggml's type id of float32
# MLX dtype -> the safetensors name the memory model sizes it by
_ST_DTYPES = {mx: st for st, mx in MX_DTYPES.items()}
# RSS of the process once mlx, mlx_lm and the tokenizer are loaded, the calibration tokenised and
# MLX's buffer cache warm (Linux, measured: collect on the 4-layer test fixture peaks at 290 MiB, of
# which ~6 MiB are the model's layer and activations)
BASE_RSS = 284 * MIB
# a chunk of experts never holds more than this unless a layer's single expert does
MAX_EXPERT_CHUNK = 256 * MIB
# --max-memory plans for this fraction of the limit: what the model does not count (allocator
# slack, thread stacks, timing of frees) measured up to ~5 % of the peak here
HEADROOM = 0.9


@dataclass
class Shapes:
    """A model as the memory model sees it (bytes as stored)."""

    hidden: int
    vocab: int
    top_k: int
    heads: int
    kv_heads: int
    head_dim: int
    act_bytes: int                      # bytes per hidden-state value (the model's dtype)
    layer_bytes: dict[int, int]         # tensors of the layer outside the routed experts
    expert_bytes: dict[int, int]        # one routed expert (all its projections), MoE layers
    experts: dict[int, int]             # routed experts per MoE layer
    expert_width: int                   # an expert's intermediate size
    outside_bytes: int                  # embedding, final norm, head
    embed_row_bytes: int                # one row of the token embedding
    head_bytes: int                     # the output head (the embedding when tied)
    largest_matrix: int = 0             # elements of the largest matrix outside the experts
    expert_params: int = 0              # matrix elements of one routed expert
    dense_params: dict[int, int] = field(default_factory=dict)  # matrix elements every token meets, per layer
    # a GGUF's tensors are dequantised on read: float32 projections of the experts being read, and
    # embedding tables, alive beyond the copies every read makes (decoding temporaries, a fused
    # gate_up's other half)
    expert_read_extra: float = 0.0
    embed_read_extra: float = 0.0
    embed_by_rows: bool = True          # the embedding reads the calibration's rows only (not a GGUF's)
    file_bytes: int = 0                 # a GGUF: its tensors' bytes as stored (0: as held)
    file_expert_bytes: dict[int, int] = field(default_factory=dict)  # a GGUF: one expert as stored
    file_layer_bytes: dict[int, int] = field(default_factory=dict)   # a GGUF: a layer's other tensors as stored

    def stored(self) -> tuple[dict[int, int], dict[int, int]]:
        """({layer: bytes outside the routed experts}, {MoE layer: bytes of one expert}) as stored on disk."""
        return ({i: self.file_layer_bytes.get(i, b) for i, b in self.layer_bytes.items()},
                {i: self.file_expert_bytes.get(i, b) for i, b in self.expert_bytes.items()})

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)


def _dtype_bytes(name: str) -> int:
    return max(DTYPE_BITS.get(name, 32) // 8, 1)


def _layer_of(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def shapes_from_table(config: dict, tensors: dict[str, tuple[str, tuple]], routed: set[str],
                      prefix: str, top_k: int) -> Shapes:
    """Shapes from a tensor table {name: (safetensors dtype, shape)}; `routed`: the names of
    routed-expert tensors; `prefix`: the decoder layers' name prefix ("model.layers.")."""
    text = config.get("text_config") or config
    hidden = int(text["hidden_size"])
    heads = int(text.get("num_attention_heads") or 1)
    layers = int(text.get("num_hidden_layers") or 0)
    layer_bytes = {i: 0 for i in range(layers)}
    dense = {i: 0 for i in range(layers)}
    routed_bytes: dict[int, int] = {}
    routed_params: dict[int, int] = {}
    experts: dict[int, int] = {}
    outside = embed_row = head = largest = 0
    width = 0
    act = 2
    bits = int((config.get("quantization") or {}).get("bits") or 32)

    def cols(dtype: str, shape: tuple) -> int:   # unpacked input width of a (quantised) matrix
        return shape[-1] * 32 // bits if dtype == "U32" else shape[-1]

    for name, (dtype, shape) in tensors.items():
        nbytes = math.prod(shape) * DTYPE_BITS[dtype] // 8
        layer = _layer_of(name, prefix)
        if layer is None:
            outside += nbytes
            if "embed" in name and name.endswith("weight") and shape:
                embed_row = max(embed_row, nbytes // shape[0])
            if name.startswith("lm_head."):
                head += nbytes
            continue
        layer_bytes[layer] = layer_bytes.get(layer, 0) + nbytes
        if name in routed:
            routed_bytes[layer] = routed_bytes.get(layer, 0) + nbytes
            if name.endswith(".weight") and len(shape) >= 2:
                routed_params[layer] = routed_params.get(layer, 0) + math.prod(shape[:-1]) * cols(dtype, shape)
            if name.endswith(".weight") and len(shape) == 3:
                experts[layer] = shape[0]
                width = max(width, min(shape[1], cols(dtype, shape)))
            elif name.endswith(".weight") and len(shape) == 2:  # a per-expert (HF) tensor
                width = max(width, min(shape[0], cols(dtype, shape)))
        elif len(shape) == 2 and name.endswith(".weight"):
            largest = max(largest, shape[0] * cols(dtype, shape))
            dense[layer] += shape[0] * cols(dtype, shape)
        if dtype in ("F32", "F16", "BF16") and name.endswith("norm.weight"):
            act = _dtype_bytes(dtype)
    for layer in routed_bytes:
        if layer not in experts:   # per-expert tensors: count the distinct experts
            ids = {n.split(".experts.")[1].split(".")[0] for n in routed if _layer_of(n, prefix) == layer}
            experts[layer] = len(ids) or 1
    per_expert = {i: routed_bytes[i] // experts[i] for i in routed_bytes}
    if not head:   # tied: the embedding serves as the head
        head = embed_row * int(text.get("vocab_size") or 0)
    kv = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or hidden // max(heads, 1))
    return Shapes(
        hidden=hidden, vocab=int(text.get("vocab_size") or 0), top_k=top_k, heads=heads, kv_heads=kv,
        head_dim=head_dim, act_bytes=act, layer_bytes={i: layer_bytes[i] - routed_bytes.get(i, 0) for i in layer_bytes},
        expert_bytes=per_expert, experts=experts, expert_width=width, outside_bytes=outside,
        embed_row_bytes=embed_row, head_bytes=head, largest_matrix=largest,
        expert_params=max((routed_params[i] // experts[i] for i in routed_params), default=0), dense_params=dense)


def checkpoint_shapes(ckpt, fam: Family, top_k: int) -> Shapes:
    """Shapes from a safetensors checkpoint's headers."""
    return _family_shapes(ckpt.config, {n: (r.dtype, tuple(r.shape)) for n, r in ckpt.tensors.items()}, fam, top_k)


def gguf_shapes(model) -> Shapes:
    """Shapes of a GGUF model (families/model.Model) as the streaming runner holds it: every
    parameter dequantised to float32 (mlx_lm's model of its config, never evaluated), so one
    expert is its float32 bytes once read, whatever the GGUF stores; a quantised (or half) tensor
    needs more while it is decoded, a fused gate_up is read once for each half (measured:
    docs/memory.md)."""
    from .gguf_weights import GGUFWeights, gguf_skeleton

    weights = GGUFWeights(model, gguf_skeleton(model), model.where)   # every parameter matched to its tensor
    tensors = {n: (_ST_DTYPES[str(dtype).split(".")[-1]], shape) for n, (shape, dtype) in weights.params.items()}
    s = _family_shapes(model.config, tensors, model.family, model.structure.top_k)
    sources, prefix = weights.source.sources, _prefix(tensors)
    experts = [n for n in tensors if (rel := classify(n, model.family)) is not None and rel.kind == "stacked"]
    embedding = [n for n in tensors if _layer_of(n, prefix) is None and "embed" in n and n.endswith("weight")]
    s.expert_read_extra = float(any(sources[n].tensor.ggml_type != GGML_F32 for n in experts)) + \
        float(any(sources[n].rows is not None for n in experts))
    s.embed_read_extra = 0.5 if any(sources[n].tensor.ggml_type != GGML_F32 for n in embedding) else 0.0
    s.embed_by_rows = False
    s.file_bytes = sum(t.nbytes for part in model.gguf_parts for t in part.tensors)
    stored: dict[int, dict[str, int]] = {}   # layer -> GGUF tensor -> bytes of one expert (a fused one once)
    for n in experts:
        t = sources[n].tensor
        stored.setdefault(_layer_of(n, prefix), {})[t.name] = t.outer_stride
    s.file_expert_bytes = {layer: sum(by_tensor.values()) for layer, by_tensor in stored.items()}
    blocks: dict[int, int] = {}   # the GGUF's blk.N tensors
    for part in model.gguf_parts:
        for t in part.tensors:
            kind, _, rest = t.name.partition(".")
            block = rest.partition(".")[0]
            if kind == "blk" and block.isdigit():
                blocks[int(block)] = blocks.get(int(block), 0) + t.nbytes
    s.file_layer_bytes = {i: blocks.get(i, 0) - s.experts.get(i, 0) * s.file_expert_bytes.get(i, 0) for i in s.layer_bytes}
    return s


def _family_shapes(config: dict, tensors: dict[str, tuple[str, tuple]], fam: Family, top_k: int) -> Shapes:
    routed = set()
    for n in tensors:
        rel = classify(n, fam)
        if rel is not None and rel.kind in ("stacked", "per_expert"):
            routed.add(n)
    return shapes_from_table(config, tensors, routed, _prefix(tensors), top_k)


def config_shapes(config: dict, bits: int | None = None, group_size: int = 64,
                  where: str = "config.json") -> tuple[Shapes, dict]:
    """(shapes, config as quantised) of a model not at hand: mlx_lm's class of `config`
    instantiated, never evaluated (quantised to `bits` as `mlx_lm convert -q` would, when given).
    Routed experts are the parameters of its expert-stack modules (mlx_lm's SwitchGLU / SwitchMLP)."""
    tensors, config, stacks = config_tensors(config, bits, group_size, where)
    routed = {n for n in tensors if any(n.startswith(p + ".") for p in stacks)}
    text = config.get("text_config") or config
    top_k = int(text.get("num_experts_per_tok") or text.get("moe_k") or text.get("moe_topk") or 1)
    return shapes_from_table(config, tensors, routed, _prefix(tensors), top_k), config


def config_tensors(config: dict, bits: int | None = None, group_size: int = 64, where: str = "config.json"):
    """({name: (safetensors dtype, shape)}, config as quantised, expert-stack module paths) of
    mlx_lm's model of `config`, in the config's dtype, quantised to `bits` when given; nothing
    is evaluated."""
    import contextlib
    import io

    from ..blas import mlx_core

    mx = mlx_core()
    from mlx.utils import tree_flatten
    from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP
    from mlx_lm.utils import _get_classes, quantize_model

    try:
        model_class, args_class = _get_classes(dict(config))
        model = model_class(args_class.from_dict(config))
    except (ValueError, KeyError, TypeError) as e:
        raise BadInput(where, f"mlx_lm cannot build this model: {e}") from None
    dtype = {"bfloat16": mx.bfloat16, "float16": mx.float16}.get(config.get("torch_dtype"), mx.float32)
    keep = getattr(model, "cast_predicate", None) or (lambda k: True)
    model.load_weights([(k, v.astype(dtype) if keep(k) else v) for k, v in tree_flatten(model.parameters())],
                       strict=True)
    if bits is not None:
        with contextlib.redirect_stdout(io.StringIO()):
            model, config = quantize_model(model, dict(config), group_size, bits)
    tensors = {k: (_ST_DTYPES[str(v.dtype).split(".")[-1]], tuple(v.shape)) for k, v in tree_flatten(model.parameters())}
    stacks = [p for p, m in model.named_modules() if isinstance(m, (SwitchGLU, SwitchMLP))]
    return tensors, config, stacks


def _prefix(names) -> str:
    for n in sorted(names):
        head, sep, _ = n.partition("layers.")
        if sep:
            return head + sep
    return "model.layers."


# ------------------------------------------------------------------ peaks


@dataclass(frozen=True)
class Chunking:
    tokens: int          # tokens per chunk (whole sequences)
    seq_len: int         # the longest sequence
    expert_bytes: int | None  # bytes of experts per chunk (None: the whole layer at once)
    upcast_stack: bool = False   # a whole layer's stack upcast to float32 too (the whole-stack self-check)


def _activations(s: Shapes, tokens: int, seq_len: int) -> float:
    """Arrays alive at a layer's peak for one chunk of tokens."""
    t, d = tokens, s.hidden
    batch = max(tokens // max(seq_len, 1), 1)
    hidden = t * d * (2 * s.act_bytes + 16)               # spilled in, residual, norms, out (float32 on the way)
    qkv = t * s.head_dim * (s.heads + 2 * s.kv_heads) * (s.act_bytes + 4)
    # the CPU attention's score matrices: all of them in float32 models (MLX's own attention),
    # one (sequence, key head) group's at a time on each lane in half precision (runner/cpu.py)
    groups = batch * s.heads if s.act_bytes == 4 else min(batch, 2) * s.heads // max(s.kv_heads, 1)
    scores = 1.5 * groups * seq_len * seq_len * 4
    routing = t * max(s.experts.values(), default=1) * 12
    outputs = t * s.top_k * d * 4 + t * d * 8 + t * s.top_k * 32
    hot_rows = min(t, 4 * t * s.top_k / max(min(s.experts.values(), default=1), 1))
    per_expert = 2 * hot_rows * (d + 3 * s.expert_width) * 4    # two lanes' working rows
    return hidden + max(qkv + scores, routing + outputs + per_expert)


def _experts(s: Shapes, layer: int, chunk: int | None, upcast_stack: bool = False) -> float:
    one = s.expert_bytes[layer]
    held = s.experts[layer] * one if chunk is None else max(one, min(chunk, s.experts[layer] * one))
    reading = 2 * held if chunk is not None and held < s.experts[layer] * one else held  # one slab read ahead
    upcast = 2 * 3 * s.hidden * s.expert_width * 4                      # one expert in float32 per lane
    stack = 2 * held if chunk is None and upcast_stack else 0           # a half-precision stack in float32
    return reading + held / 3 * (1 + s.expert_read_extra) + upcast + stack


def phase_peaks(s: Shapes, c: Chunking, *, unique_tokens: int | None = None, logits: bool = False) -> dict:
    """Predicted peak RSS (bytes) per phase of a stream run with chunking `c`."""
    t = c.tokens
    upcast = 2 * s.largest_matrix * 4
    layers = {}
    for i, fixed in s.layer_bytes.items():
        peak = BASE_RSS + fixed + upcast + _activations(s, t, c.seq_len)
        if i in s.expert_bytes:
            peak += _experts(s, i, c.expert_bytes, c.upcast_stack)
        layers[i] = peak
    rows = s.vocab if unique_tokens is None or not s.embed_by_rows else min(unique_tokens, s.vocab or unique_tokens)
    out = {"embed": BASE_RSS + (2 + s.embed_read_extra) * rows * s.embed_row_bytes + 2 * t * s.hidden * (s.act_bytes + 4),
           "layer": max(layers.values(), default=BASE_RSS)}
    if logits:
        out["logits"] = BASE_RSS + s.head_bytes + 3 * t * s.vocab * 4 + 2 * t * s.hidden * 4
    out["peak"] = max(out.values())
    return {k: int(v) for k, v in out.items()}


def whole_model_peak(s: Shapes, tokens: int, seq_len: int) -> int:
    """Memory mode: every tensor at once plus one chunk's activations."""
    total = s.outside_bytes + sum(s.layer_bytes.values()) + sum(s.experts[i] * b for i, b in s.expert_bytes.items())
    return int(BASE_RSS + total + _activations(s, tokens, seq_len))


def fit(s: Shapes, budget: int, tokens: int, seq_len: int, *, unique_tokens: int | None = None,
        logits: bool = False, where: str = "--max-memory", whole_layers: bool = False) -> Chunking:
    """The chunking with the most tokens (up to `tokens`, whole sequences of `seq_len`) and the
    largest chunk of experts (up to MAX_EXPERT_CHUNK) whose predicted peak stays under HEADROOM
    of `budget`; BadInput naming the least limit that fits one sequence and one expert. With
    `whole_layers` (a model whose experts are not read by range: families/expert_source.read_by_range)
    only the tokens are chosen: a layer's experts are whole, and upcast whole by the self-check."""
    limit = budget
    budget = int(budget * HEADROOM)
    one_expert = 0 if whole_layers else max(s.expert_bytes.values(), default=0)
    least = Chunking(seq_len, seq_len, one_expert or None, whole_layers)
    need = phase_peaks(s, least, unique_tokens=unique_tokens, logits=logits)["peak"]
    if need > budget:
        unit = "a whole layer's experts (this model's are not read by range)" if whole_layers else "one expert at a time"
        raise BadInput(where, f"{_size(limit)} is too small for this model: one sequence of {seq_len} tokens "
                              f"and {unit} need at least {_size(need / HEADROOM)}")
    best = least
    for n_seq in range(1, max(tokens // seq_len, 1) + 1):   # tokens first: fewer chunks, fewer passes
        c = Chunking(n_seq * seq_len, seq_len, one_expert or None, whole_layers)
        if phase_peaks(s, c, unique_tokens=unique_tokens, logits=logits)["peak"] > budget:
            break
        best = c
    if not one_expert:
        return best
    lo, hi = one_expert, max(one_expert, MAX_EXPERT_CHUNK)
    while lo < hi:   # the largest chunk of experts that still fits
        mid = (lo + hi + 1) // 2
        if phase_peaks(s, Chunking(best.tokens, seq_len, mid), unique_tokens=unique_tokens, logits=logits)["peak"] <= budget:
            lo = mid
        else:
            hi = mid - 1
    return Chunking(best.tokens, seq_len, lo)


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"
