"""REAP telemetry collection: a run over the calibration tokens, resumable, committed layer by layer.

`collect(model, calib, out, run, options)` runs the model over the calibration tokens (layer by
layer, or whole in memory mode: reap_stream.runner) and writes a telemetry store
(telemetry/store.py) to `out`. While running, the store lives in WORK_DIR/telemetry.zarr and each MoE
layer is committed there atomically once its output hidden states are spilled; `out` appears
(by rename) only when every selected layer is in. WORK_DIR/run.json records the options that
change results; a rerun with the same ones resumes, a rerun with others is refused.

Under mlx.launch (runner/distributed.py) every rank runs its share of the calibration chunks in
its own WORK_DIR/rank-NN; after each layer the ranks' sums are added in rank order and rank 0
commits the layer and writes `out`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..blas import mlx_core
from ..errors import BadInput, os_error
from ..families.model import Model
from ..io.files import check_space, write_text_atomic
from ..io.lock import exclusive, test_pause
from ..io.reading import read_json_object
from ..procstats import io_counters, peak_rss_bytes
from ..runner import RunOptions, fit_memory, open_runner
from ..runner.distributed import SHARE_RULE, Group, common_start, join_group, lead_exclusive
from ..runner.spill import HiddenSpill, spill_itemsize
from .accumulate import Accumulator
from .calibration import CalibrationSet
from .store import LayerStats, TelemetryStore
from .tokens import save_tokens

RUN_FILE = "run.json"


@dataclass(frozen=True)
class CollectOptions:
    """What collect records (how the model runs is RunOptions: mode, chunking, work dir)."""
    layers: tuple[int, ...] | None = None   # MoE layers to record (None: every prunable one)
    renorm_topk: bool = True                 # g = top-k-renormalised probability (the reference's default)


def parse_layers(spec: str | None) -> tuple[int, ...] | None:
    """"0-3,8" -> (0, 1, 2, 3, 8)."""
    if spec is None or spec.strip() == "":
        return None
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if b < a:
                    raise ValueError
                out.update(range(a, b + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise BadInput("--layers", f"cannot read {part!r} (use a list like 0-3,8)") from None
    if any(i < 0 for i in out):
        raise BadInput("--layers", "layer numbers must be >= 0")
    return tuple(sorted(out))


# ------------------------------------------------------------------ run record


def _check_run_record(work_dir: Path, record: dict) -> None:
    path = work_dir / RUN_FILE
    if not os.path.lexists(path):
        return
    try:
        old = read_json_object(path, "run record")
    except BadInput as e:
        raise BadInput(path, f"unreadable run record ({e.what}); delete the work dir") from None
    diff = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
    if diff:
        raise BadInput(path, f"work dir belongs to a run with other {', '.join(diff)}; "
                             f"rerun with the same options or use another --work-dir")


def default_work_dir(out: Path) -> Path:
    return out.with_name(out.name + ".work")


# ------------------------------------------------------------------ collect

def collect(model: Model, calib: CalibrationSet, out: str | Path, run: RunOptions = RunOptions(),
            options: CollectOptions = CollectOptions(), progress: bool = True) -> dict:
    """Collect telemetry of `calib` into `out` (work dir: run.work_dir, else OUT.work); returns a summary.

    One run at a time per output and per work dir (io/lock). A file-system error (a full disk)
    is one line; the work dir is kept, so the same command resumes once the cause is gone."""
    out = Path(out)
    work_dir = Path(run.work_dir) if run.work_dir is not None else default_work_dir(out)
    # under mlx.launch rank 0 holds the locks; the other ranks write only once they have joined it
    with lead_exclusive((out, "telemetry store"), (work_dir, "work dir")):
        try:
            return _collect(model, calib, out, work_dir, run, options, progress)
        except OSError as e:
            with contextlib.suppress(OSError):   # a partial layer is recomputed on resume anyway
                for spill in (work_dir, *work_dir.glob("rank-*")):
                    HiddenSpill(spill).drop_temporaries()
            raise os_error(e, needed=work_dir_bytes(model, calib, run, options),
                           doing="cannot write (the work dir is kept: free the cause and rerun to resume)") from None


def work_dir_bytes(model: Model, calib: CalibrationSet, run: RunOptions, options: CollectOptions) -> int:
    """What a collect run keeps in its work dir at its peak: two layers of spilled hidden states
    (stream mode: a layer's input and output), the token ids, the telemetry store."""
    layers = len(options.layers) if options.layers is not None else len(model.structure.prunable_layers)
    e = max(model.structure.layer_experts.values())
    hidden = model.hidden_size
    spill = 2 * calib.num_tokens * hidden * spill_itemsize(model) if run.mode == "stream" else 0
    return spill + 12 * calib.num_tokens + layers * e * (hidden + e + 6) * 8 + (1 << 20)


def _collect(model: Model, calib: CalibrationSet, out: Path, work_dir: Path, run: RunOptions,
             options: CollectOptions, progress: bool) -> dict:
    from tqdm import tqdm

    mlx_core()  # mlx through ensure_blas, before mlx_lm imports it
    import mlx_lm.utils  # noqa: F401  (import time is not collection time)

    from ..families.experts import resolve_kernel

    started = time.perf_counter()
    read_before = io_counters().get("rchar", 0)
    run.validate()
    if not calib.sequences or calib.num_tokens == 0:
        raise BadInput("calibration", "no tokens to collect on")
    run = fit_memory(model, run, calib.sequences)   # tokens and experts per chunk under --max-memory
    structure = model.structure
    selected = list(structure.prunable_layers if options.layers is None else options.layers)
    not_moe = [i for i in selected if i not in structure.layer_experts]
    if not_moe:
        raise BadInput("--layers", f"layer {not_moe[0]} is not an MoE layer (MoE layers: "
                                   f"{', '.join(map(str, structure.moe_layers))})")
    attrs = {
        "model": model.model_block(),
        "calibration": calib.summary(),
        "routing": {"renorm_topk": options.renorm_topk, "routing": model.family.routing.value,
                    "capture": "exact (model's own router and selection)"},
        "options": {"layers": None if options.layers is None else list(options.layers),
                    "renorm_topk": options.renorm_topk, "chunk_tokens": run.chunk_tokens,
                    "sample_batch_size": run.sample_batch_size, "max_memory": run.max_memory,
                    "expert_kernel": resolve_kernel(run.expert_kernel)},
        "tool_version": __version__,
    }
    record = {"model_fingerprint": model.fingerprint, "calibration_fingerprint": calib.fingerprint, **attrs["options"]}
    group = join_group(run.distributed)
    if group.distributed:
        attrs["distributed"] = {"ranks": group.size, "share": SHARE_RULE}
        group.agree({"command": "collect", **record, "mode": run.mode, "tool_version": __version__,
                     "mlx_version": mlx_core().__version__})
        record.update(rank=group.rank, ranks=group.size)
        work_dir = work_dir / f"rank-{group.rank:02d}"
    done = group.together("output", lambda: _already_done(out, attrs) if group.rank == 0 and out.exists() else None)[0]
    if done is not None:
        if group.distributed:
            done["distributed"] = {"ranks": group.size, "rank": group.rank}
            if work_dir.is_dir():
                _clean_work_dir(work_dir, rank_dir=True)   # a rank killed after the output was complete
        group.close()
        return done
    progress = progress and group.rank == 0
    # the runner reads nothing yet, but refuses weights it cannot read before anything is written
    runner = open_runner(model, run, work_dir, progress=progress)
    group.together("work dir", lambda: _prepare_work_dir(work_dir, record, calib, group,
                                                         work_dir_bytes(model, calib, run, options)))

    store_path = work_dir / "telemetry.zarr"
    store = None   # written by rank 0 alone
    if group.rank == 0:
        store = TelemetryStore.open(store_path) if (store_path / "zarr.json").exists() \
            else TelemetryStore.create(store_path, attrs)
    accs: dict[int, Accumulator] = {}

    def on_moe(layer: int, chunk, cap) -> None:
        if layer in selected:
            if layer not in accs:  # expert outputs are hidden-sized, or latent-sized (Nemotron-H)
                accs[layer] = Accumulator(layer, structure.layer_experts[layer], runner.fwd.expert_width(layer),
                                          options.renorm_topk)
            accs[layer].add(cap)

    def commit(layer: int) -> None:
        if layer in selected:
            acc = accs.pop(layer, None)
            stats = acc.stats if acc is not None else \
                LayerStats.zeros(layer, structure.layer_experts[layer], runner.fwd.expert_width(layer))
            stats = _combined(group, stats)
            if store is not None:
                store.commit(stats)
        group.exchange(f"layer {layer} committed")   # nobody records the next layer before this commit

    stop = max(selected) + 1
    all_chunks = runner.chunks(calib.sequences, run.sample_batch_size)
    chunks = group.share(all_chunks)
    start = common_start(group, runner)
    group.together("committed layers", lambda: _check_committed(store, selected, start))
    layers_run = 0
    with tqdm(total=stop, initial=min(start, stop), desc="layers", unit="layer",
              disable=None if progress else True) as bar:
        for _ in runner.run(chunks, on_moe=on_moe, stop=stop, on_layer_done=commit):
            layers_run += 1
            bar.update(1)
    runner.close()
    seconds = time.perf_counter() - started

    if group.rank == 0:
        _publish(store_path, out)
    timings = group.exchange("published", group.timings)
    _clean_work_dir(work_dir, rank_dir=group.distributed)
    group.close()
    if group.distributed:
        shares = {"ranks": group.size, "rank": group.rank, "tokens_per_rank": group.tokens_per_rank(all_chunks),
                  "timings": timings}
        if group.rank > 0:
            return {"out": str(out), "layers_run": layers_run, "seconds": round(seconds, 3), "distributed": shares}
    done = TelemetryStore.open(out)
    return {
        "out": str(out), "mode": run.mode, "layers": done.layers(), "num_tokens": calib.num_tokens,
        "layers_run": layers_run, "seconds": round(seconds, 3), "chunk_tokens": run.chunk_tokens,
        "expert_chunk_bytes": run.expert_chunk_bytes, "max_memory": run.max_memory,
        "tokens_per_s": round(calib.num_tokens * layers_run / max(stop, 1) / seconds, 1) if seconds > 0 else None,
        "peak_rss_mib": round(peak_rss_bytes() / 2**20, 1),
        "bytes_read": io_counters().get("rchar", 0) - read_before,   # page cache included
        "telemetry_fingerprint": done.fingerprint(), "model_fingerprint": model.fingerprint,
        "calibration_fingerprint": calib.fingerprint, "routing": attrs["routing"],
        **({"distributed": shares} if group.distributed else {}),
    }


def _prepare_work_dir(work_dir: Path, record: dict, calib: CalibrationSet, group: Group, peak_bytes: int) -> None:
    """The work dir of this run (or rank): refused when it holds another run's state or when the
    disk lacks room for its peak size."""
    if group.distributed and (work_dir.parent / RUN_FILE).exists():
        raise BadInput(work_dir.parent / RUN_FILE, "work dir belongs to a run in one process; rerun it without "
                                                   "mlx.launch or use another --work-dir")
    if not group.distributed and (work_dir / "rank-00").is_dir():
        raise BadInput(work_dir, "holds a distributed run's state (rank-NN); rerun it under mlx.launch with "
                                 "the same ranks or use another --work-dir")
    present = sum(p.stat().st_size for p in work_dir.rglob("*") if p.is_file()) if work_dir.is_dir() else 0
    check_space(work_dir, max(0, peak_bytes - present), "work dir")
    test_pause("writing")
    work_dir.mkdir(parents=True, exist_ok=True)
    _check_run_record(work_dir, record)
    write_text_atomic(work_dir / RUN_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
    tokens_path = work_dir / "tokens.zarr"
    if not tokens_path.exists():
        save_tokens(calib, tokens_path)


def _check_committed(store: TelemetryStore | None, selected: list[int], start: int) -> None:
    missing = [] if store is None else [i for i in selected if i < start and i not in store.layers()]
    if missing:
        raise BadInput(store.path, f"layer {missing[0]} is not committed but the run is past it; delete the work dir")


def _combined(group: Group, stats: LayerStats) -> LayerStats:
    """One layer's sums over every rank, added in rank order (max for max_activations)."""
    if not group.distributed:
        return stats
    arrays = {name: getattr(stats, name) for name in LayerStats.ARRAYS}
    total = group.reduce({**arrays, "tokens": np.array([float(stats.tokens)])}, maxes={"max_activations"})
    return LayerStats(stats.layer, int(total.pop("tokens")[0]), **total)


def _already_done(out: Path, attrs: dict) -> dict:
    """A rerun after completion: fine when `out` is this very run's result, refused otherwise."""
    store = TelemetryStore.open(out)
    have = store.attrs
    same = all(have.get(k) == v for k, v in attrs.items())
    if not same:
        raise BadInput(out, "already exists and holds another run's telemetry; choose another --out or delete it")
    return {"out": str(out), "layers": store.layers(), "layers_run": 0, "already_complete": True,
            "telemetry_fingerprint": store.fingerprint()}


def _clean_work_dir(work_dir: Path, rank_dir: bool = False) -> None:
    """Remove what collect put in the work dir (and the dir itself when that leaves it empty; for a
    rank's dir, WORK too once the last rank is out)."""
    for p in sorted(work_dir.iterdir()):
        ours = p.name in (RUN_FILE, "progress.json", "tokens.zarr", "telemetry.zarr") or \
            p.name.startswith(("hidden_", ".hidden_", ".progress", ".run.json", ".tokens.zarr"))
        if ours:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    for d in (work_dir, work_dir.parent) if rank_dir else (work_dir,):
        try:
            d.rmdir()
        except OSError:
            pass


def _publish(src: Path, out: Path) -> None:
    """Move the finished store to `out` in one rename (copy + rename across filesystems)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, out)
    except OSError:
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        os.replace(tmp, out)


def merge(paths: list[str | Path], out: str | Path) -> dict:
    """Add telemetry stores of the same model collected on disjoint calibration shards."""
    out = Path(out)
    if len(paths) < 2:
        raise BadInput("merge", "give at least two telemetry stores")
    with exclusive(out, "telemetry store"):
        return _merge(paths, out)


def _merge(paths: list[str | Path], out: Path) -> dict:
    from .store import merge_stores

    if out.exists():
        raise BadInput(out, "already exists; choose another --out or delete it")
    seen: dict[str, Path] = {}
    first = None
    for p in paths:
        attrs = TelemetryStore.open(p).attrs
        first = attrs if first is None else first
        if attrs.get("model") != first.get("model"):
            raise BadInput(p, f"model differs from {paths[0]} (telemetry of another model)")
        calibration = attrs.get("calibration") or {}
        cal = calibration.get("fingerprint") if isinstance(calibration, dict) else None
        if not isinstance(cal, (str, type(None))):
            raise BadInput(p, "calibration.fingerprint is not a string")
        if cal is not None and cal in seen:
            raise BadInput(p, f"was collected on the same calibration tokens as {seen[cal]}; merging would count them twice")
        seen[cal] = Path(p)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merge_stores([Path(p) for p in paths], tmp)
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise os_error(e, out, doing="cannot write") from None
    store = TelemetryStore.open(out)
    return {"out": str(out), "inputs": [str(p) for p in paths], "layers": store.layers(),
            "num_tokens": (store.attrs.get("calibration") or {}).get("num_tokens"),
            "telemetry_fingerprint": store.fingerprint()}
