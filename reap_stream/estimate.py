"""What pruning a model will take, before anything runs: `reap-stream estimate`.

From config.json and the safetensors headers only (or a bare config.json, for a model not yet
downloaded, built as mlx_lm's class without evaluating it; or a GGUF's header, its tensors sized as
the runner holds them, dequantised to float32): per-layer expert bytes, the peak memory
of collect with whole layers and with experts in chunks (runner.budget), the chunking that fits
`--max-memory` (or the least that is needed), the spill and telemetry disk, the output's size at
`--ratio`, and a time bound from a short measurement of this machine (runner.timing).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInput
from .planning.planner import experts_dropped
from .runner.budget import MAX_EXPERT_CHUNK, Chunking, Shapes, checkpoint_shapes, config_shapes, fit, phase_peaks
from .runner.timing import bound_seconds, measure
from .telemetry.store import layer_store_bytes


@dataclass(frozen=True)
class Tokens:
    count: int        # calibration tokens
    seq_len: int      # the longest sequence
    unique: int       # distinct token ids (rows of the embedding read)
    exact: bool       # tokenised (True) or from --max-tokens / --window-tokens


def load_shapes(path: Path, bits: int | None = None) -> tuple[Shapes, dict, list[Path], str, bool]:
    """(shapes, config, weight files, what the figures come from, whether collect reads its experts
    by range) of a model directory, or of a bare config.json (a file, or a directory holding only it)."""
    from .families.expert_source import read_by_range
    from .families.model import open_model
    from .io.gguf import is_gguf

    path = Path(path)
    if path.is_file() and is_gguf(path):
        if bits is not None:
            raise BadInput("--quantize", "estimates a model from its config.json; a GGUF is estimated as it is")
        from .runner.budget import gguf_shapes

        model = open_model(path)
        return gguf_shapes(model), model.config, [p.path for p in model.gguf_parts], \
            "GGUF header; in memory as float32", read_by_range(model)
    config_path = path if path.is_file() else path / "config.json"
    has_weights = path.is_dir() and (any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists())
    if has_weights and bits is None:
        model = open_model(path)
        ckpt = model.require_checkpoint("estimate")
        shapes = checkpoint_shapes(ckpt, model.family, model.structure.top_k)
        return (shapes, ckpt.config, sorted({r.file for r in ckpt.tensors.values()}), "config.json + safetensors headers",
                read_by_range(model))
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise BadInput(config_path, "missing (estimate takes a model directory or its config.json)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(config_path, f"cannot read: {getattr(e, 'strerror', None) or e}") from None
    except ValueError as e:
        raise BadInput(config_path, f"invalid JSON: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise BadInput(config_path, "no model_type string")
    shapes, config = config_shapes(config, bits, where=str(config_path))
    if not shapes.experts:
        raise BadInput(config_path, f"model_type {config['model_type']!r} builds no routed experts (not an MoE?)")
    what = "config.json" + (f", quantised to {bits} bits as mlx_lm convert -q would" if bits else "")
    return shapes, config, [], what, _by_range(config)


def estimate(path: Path, tokens: Tokens, *, ratio: float | None = None, max_memory: int | None = None,
             bits: int | None = None, calibrate: bool = True) -> dict:
    """The estimate of `path` for `tokens` calibration tokens (JSON-ready)."""
    s, config, files, source, ranged = load_shapes(path, bits)
    moe = sorted(s.experts)
    layer_bytes, stored = s.stored()   # as on disk (a GGUF's tensors as stored, not as held)
    routed = {i: s.experts[i] * stored[i] for i in moe}
    total = s.file_bytes or s.outside_bytes + sum(layer_bytes.values()) + sum(routed.values())
    chunk = min(tokens.count, 4096)
    whole = Chunking(max(chunk, tokens.seq_len), tokens.seq_len, None, not ranged)
    chunked = Chunking(whole.tokens, tokens.seq_len, MAX_EXPERT_CHUNK) if ranged else whole
    out = {
        "model": {"path": str(path), "model_type": config.get("model_type"), "from": source,
                  "layers": s.num_layers, "moe_layers": len(moe), "experts": max(s.experts.values()),
                  "top_k": s.top_k, "hidden": s.hidden, "expert_width": s.expert_width,
                  "quantization": config.get("quantization"), "total_bytes": total,
                  "expert_bytes_per_layer": max(routed.values()), "other_bytes_per_layer": max(layer_bytes.values())},
        "calibration": {"tokens": tokens.count, "seq_len": tokens.seq_len, "exact": tokens.exact},
        "memory": {"whole_layer_peak_bytes": phase_peaks(s, whole, unique_tokens=tokens.unique)["peak"],
                   "chunked_peak_bytes": phase_peaks(s, chunked, unique_tokens=tokens.unique)["peak"],
                   "chunk_tokens": whole.tokens, "expert_chunk_bytes": MAX_EXPERT_CHUNK if ranged else None,
                   "experts_by_range": ranged},
        "disk": {"spill_bytes": 2 * tokens.count * s.hidden * s.act_bytes + 4 * tokens.count,
                 "telemetry_bytes": sum(layer_store_bytes(s.experts[i], s.hidden) for i in moe)},
    }
    if max_memory is not None:
        try:
            c = fit(s, max_memory, max(chunk, tokens.seq_len), tokens.seq_len, unique_tokens=tokens.unique,
                    whole_layers=not ranged)
            out["memory"]["max_memory"] = {"limit_bytes": max_memory, "fits": True, "chunk_tokens": c.tokens,
                                           "expert_chunk_bytes": c.expert_bytes,
                                           "peak_bytes": phase_peaks(s, c, unique_tokens=tokens.unique)["peak"]}
        except BadInput as e:
            out["memory"]["max_memory"] = {"limit_bytes": max_memory, "fits": False, "why": e.what}
    if ratio is not None:
        gone = sum(experts_dropped(ratio, s.experts[i], int(config.get("n_group") or 1)) * stored[i] for i in moe)
        out["disk"].update(ratio=ratio, output_bytes=total - gone)
    if calibrate:
        rates = measure(files)
        bound = bound_seconds(s, tokens.count, tokens.seq_len, rates)
        out["time"] = {"read_bytes_per_s": round(rates.read_bytes_per_s), "read_measured_on": rates.read_source,
                       "gemm_flops_per_s": round(rates.gemm_flops_per_s), "bound_s": round(bound["total_s"], 3),
                       "slowest_layer_bound_s": round(max(bound["per_layer_s"].values()), 3)}
    return out


def _by_range(config: dict) -> bool:
    """Whether collect reads the experts of a model not at hand by range, assuming mlx_lm's layout
    (else whole layers; a model_type the family table does not know is refused by collect, and
    estimated as if it were)."""
    from .families.expert_source import by_range
    from .families.table import family_of

    try:
        return by_range(family_of(config))
    except BadInput:
        return True


def calibration_tokens(path: Path, calibration) -> Tokens:
    """The calibration's token count and shape: tokenised with the model's own tokenizer when a
    source is given, else the --max-tokens of --window-tokens windows the user states."""
    import numpy as np

    if any(v is not None for v in (calibration.prompt, calibration.dataset, calibration.dataset_file)):
        from .telemetry.calibration import build_calibration
        from .telemetry.tokenizer import load_tokenizer

        calibration.validate()
        from .io.gguf import is_gguf

        if Path(path).is_file() and is_gguf(path):
            from .families.model import open_model
            from .telemetry.tokenizer import tokenise

            calib = tokenise(open_model(path), calibration)   # the GGUF's own tokenizer
        else:
            calib = build_calibration(calibration, load_tokenizer(path if Path(path).is_dir() else Path(path).parent))
        ids = np.concatenate([np.asarray(s).reshape(-1) for s in calib.sequences])
        return Tokens(int(ids.size), max(len(s) for s in calib.sequences), int(np.unique(ids).size), True)
    if calibration.max_tokens is None or calibration.max_tokens < 1:
        raise BadInput("--max-tokens", "give the number of calibration tokens (or a calibration source to tokenise)")
    n = int(calibration.max_tokens)
    return Tokens(n, min(int(calibration.window_tokens), n), n, False)
