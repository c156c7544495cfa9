"""The whole pipeline in one resumable call: collect -> plan -> apply (`reap-stream full`, `demo`)."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from .errors import BadInput
from .families.model import Model
from .planning.planner import PlanOptions, make_plan
from .runner.chunks import RunOptions
from .surgery.safetensors import DEFAULT_MAX_SHARD, PLAN_COPY_NAME, check_output_path, plan_layout, write_layout
from .telemetry.calibration import CalibrationOptions
from .telemetry.collect import CollectOptions, collect
from .telemetry.store import TelemetryStore
from .telemetry.tokenizer import tokenise


def run_full(model: Model, calibration: CalibrationOptions, out: Path, plan_options: PlanOptions,
             run: RunOptions = RunOptions(), *, renorm_topk: bool = True, max_shard_bytes: int = DEFAULT_MAX_SHARD,
             overwrite: bool = False, progress: bool = True, manifest_hash: str = "blake3") -> dict:
    """Collect, plan and apply. Each step's result lands in the work dir (run.work_dir, default
    OUT.reap-work beside OUT) before the next starts, so a rerun of the same command picks up where
    it stopped: collect resumes at its last committed layer, a finished telemetry store is reused,
    and an output already written from the same plan is left as it is."""
    out = Path(out)
    work = Path(run.work_dir) if run.work_dir else out.with_name(out.name + ".reap-work")
    model.require_checkpoint("full")
    previous = out / PLAN_COPY_NAME
    if out.exists() and not previous.is_file() and not overwrite:
        raise BadInput(out, "output exists and is not a reap-stream output; pass --overwrite to replace it")
    check_output_path(model.path, out, overwrite=True)

    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    calib = tokenise(model, calibration)
    seconds["tokenise"] = time.perf_counter() - clock
    telemetry = work / "telemetry.zarr"
    collect_run = dataclasses.replace(run, work_dir=work / "collect")
    collected = collect(model, calib, telemetry, collect_run, CollectOptions(renorm_topk=renorm_topk),
                        progress=progress)
    seconds["collect"] = time.perf_counter() - clock - seconds["tokenise"]
    plan = make_plan(TelemetryStore.open(telemetry), plan_options, frozen=model.structure.frozen_layers)
    plan_path = work / "plan.json"
    plan.save(plan_path)
    seconds["plan"] = time.perf_counter() - clock - sum(seconds.values())

    summary = {"out": str(out), "work_dir": str(work), "telemetry": str(telemetry), "plan": str(plan_path),
               "collect": collected, "kept_per_layer": {str(k): len(v.kept) for k, v in sorted(plan.layers.items())},
               "seconds": seconds}
    if previous.is_file():
        if previous.read_text() == plan.dumps():
            summary["apply"] = "already complete"
            return summary
        if not overwrite:
            raise BadInput(out, f"holds a prune made from another plan; pass --overwrite to replace it "
                                f"(this run's plan: {plan_path})")
    layout = plan_layout(model, plan, max_shard_bytes=max_shard_bytes, plan_where=str(plan_path))
    write_layout(layout, out, overwrite=True, progress=progress, manifest_hash=manifest_hash)
    seconds["apply"] = time.perf_counter() - clock - sum(seconds.values())
    summary["apply"] = layout.summary()
    summary["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    return summary
