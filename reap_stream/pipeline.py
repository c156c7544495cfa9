"""The whole pipeline in one resumable call: collect -> plan -> apply (`reap-stream full`, `demo`), for a
safetensors model directory or a GGUF."""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from .errors import BadInput
from .families.model import Model
from .io.files import write_text_atomic
from .io.reading import read_bytes, read_json_object
from .planning.planner import PlanOptions, make_plan
from .runner import RunOptions, fit_memory
from .runner.distributed import lead_exclusive
from .surgery.gguf import apply_gguf, out_paths
from .surgery.safetensors import DEFAULT_MAX_SHARD, PLAN_COPY_NAME, check_output_path, plan_layout, write_layout
from .telemetry.calibration import CalibrationOptions, CalibrationSet
from .telemetry.collect import CollectOptions, collect
from .telemetry.store import TelemetryStore
from .telemetry.tokenizer import tokenise


def run_full(model: Model, calibration: CalibrationOptions, out: Path, plan_options: PlanOptions,
             run: RunOptions = RunOptions(), *, renorm_topk: bool = True, max_shard_bytes: int = DEFAULT_MAX_SHARD,
             overwrite: bool = False, progress: bool = True, manifest_hash: str = "blake3") -> dict:
    """Collect, plan and apply. Each step's result lands in the work dir (run.work_dir, default
    OUT.reap-work beside OUT) before the next starts, so a rerun of the same command picks up where
    it stopped: collect resumes at its last committed layer, a finished telemetry store is reused,
    and an output already written from the same plan is left as it is. A GGUF model is pruned into
    a GGUF (`out`, or its split parts)."""
    out = Path(out)
    work = Path(run.work_dir) if run.work_dir else out.with_name(out.name + ".reap-work")
    model.require_runnable("full")
    seconds: dict[str, float] = {}   # wall time per stage
    clock = time.perf_counter()
    calib = tokenise(model, calibration)
    fit_memory(model, run, calib.sequences)   # a --max-memory nothing fits: refused before anything is written
    clock = _lap(seconds, "tokenise", clock)
    with lead_exclusive((out, "output"), (work, "work dir")):  # one run per output and per work dir
        return _run_full(model, calib, out, work, plan_options, run, renorm_topk, max_shard_bytes,
                         overwrite, progress, manifest_hash, seconds, clock)


def _lap(seconds: dict[str, float], stage: str, since: float) -> float:
    now = time.perf_counter()
    seconds[stage] = round(now - since, 3)
    return now


def _run_full(model: Model, calib: CalibrationSet, out: Path, work: Path, plan_options: PlanOptions,
              run: RunOptions, renorm_topk: bool, max_shard_bytes: int, overwrite: bool, progress: bool,
              manifest_hash: str, seconds: dict[str, float], clock: float) -> dict:
    previous = _previous_output(model, out, work, overwrite)

    telemetry = work / "telemetry.zarr"
    collected = collect(model, calib, telemetry, replace(run, work_dir=work / "collect"),
                        CollectOptions(renorm_topk=renorm_topk), progress=progress)
    if collected.get("distributed", {}).get("rank", 0) > 0:
        return {"out": str(out), "work_dir": str(work), "collect": collected}   # rank 0 plans and applies
    clock = _lap(seconds, "collect", clock)
    plan = make_plan(TelemetryStore.open(telemetry), plan_options, frozen=model.structure.frozen_layers)
    plan_path = work / "plan.json"
    plan.save(plan_path)
    clock = _lap(seconds, "plan", clock)

    summary = {"out": str(out), "work_dir": str(work), "telemetry": str(telemetry), "plan": str(plan_path),
               "collect": collected, "kept_per_layer": {str(k): len(v.kept) for k, v in sorted(plan.layers.items())},
               "seconds": seconds}
    if previous is not None:
        if previous == plan.dumps():
            summary["apply"] = "already complete"
            return summary
        if not overwrite:
            raise BadInput(out, f"holds a prune made from another plan; pass --overwrite to replace it "
                                f"(this run's plan: {plan_path})")
    if model.is_gguf:
        summary["apply"] = apply_gguf(model, plan, out, overwrite=True, dry_run=False, plan_where=plan_path,
                                      progress=progress, manifest_hash=manifest_hash)
        write_text_atomic(work / GGUF_RECORD, json.dumps(
            {"plan": plan.dumps(), "files": {p: Path(p).stat().st_size for p in summary["apply"]["out"]}}))
        _lap(seconds, "apply", clock)
        return summary
    layout = plan_layout(model, plan, max_shard_bytes=max_shard_bytes, plan_where=str(plan_path))
    write_layout(layout, out, overwrite=True, progress=progress, manifest_hash=manifest_hash)
    _lap(seconds, "apply", clock)
    summary["apply"] = layout.summary()
    return summary


# what full records beside a GGUF output (which carries no plan copy): the plan and the files
GGUF_RECORD = "applied_gguf.json"


def _previous_output(model: Model, out: Path, work: Path, overwrite: bool) -> str | None:
    """The plan (as text) of this run's earlier output at `out`, None when there is none; refuses an
    output that is not one before anything runs."""
    if model.is_gguf:
        outs = out_paths(out, len(model.gguf_parts))
        try:
            record = read_json_object(work / GGUF_RECORD, "run record")
            ours = all(Path(p).is_file() and Path(p).stat().st_size == n for p, n in record["files"].items()) \
                and sorted(record["files"]) == sorted(map(str, outs))
        except (BadInput, OSError, ValueError, KeyError, TypeError, AttributeError):
            record, ours = None, False
        existing = [p for p in outs if p.exists()]
        if existing and not ours and not overwrite:
            raise BadInput(existing[0], "output exists and is not this run's output; pass --overwrite to replace it")
        return record["plan"] if ours else None
    previous = out / PLAN_COPY_NAME
    if out.exists() and not previous.is_file() and not overwrite:
        raise BadInput(out, "output exists and is not a reap-stream output; pass --overwrite to replace it")
    check_output_path(model.path, out, overwrite=True)
    return read_bytes(previous, "plan copy").decode("utf-8", "replace") if previous.is_file() else None
