"""The family conformance check: a tiny seeded model of one family, built with mlx_lm's own class,
through collect (stream mode, with the self-check) -> REAP plan -> apply -> mlx_lm.load, with the
output's logits compared with the original's when the plan's experts are masked out of routing.

`tools/family_matrix.py` runs it for every family (fp32, a 4-bit variant where mlx_lm quantises
the family, a non-uniform plan loaded through `load_pruned`); the test suite runs a small slice.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..families.model import open_model
from ..planning.plan import LayerPlan, Plan
from ..planning.planner import PlanOptions, make_plan
from ..runner.chunks import RunOptions
from ..surgery.safetensors import plan_layout, write_layout
from ..surgery.verify import verify_output
from ..telemetry.calibration import CalibrationSet, token_fingerprint
from ..telemetry.collect import collect
from ..telemetry.store import TelemetryStore
from . import synth

# logits of the pruned output vs the masked original: fp32 on the CPU (observed: 0 or ~1e-7)
TOLERANCE = 1e-5
# the same, the output loaded by transformers (torch) against mlx_lm's masked original
HF_TOLERANCE = 1e-4


@dataclass
class Result:
    family: str
    variant: str                 # "fp32" | "q4" | "non-uniform"
    routing: str
    max_abs_diff: float
    kept: dict[str, int]
    changed: float               # max |masked - unmasked|: the prune changes the output
    seconds: float
    telemetry: str | None = None
    modes: dict = field(default_factory=dict)  # stream / memory telemetry fingerprints, when compared

    unpruned_gap: float | None = None  # transformers vs mlx_lm on the unpruned model (HF checks)
    verify: list[str] = field(default_factory=list)  # what `reap-stream verify` found wrong with the output

    @property
    def ok(self) -> bool:
        same_modes = len(set(self.modes.values())) <= 1
        tolerance = HF_TOLERANCE if self.variant == "transformers" else TOLERANCE
        return self.max_abs_diff <= tolerance and self.changed > 0 and same_modes and not self.verify

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def calibration(num_seqs: int = 2, length: int = 24, seed: int = 0) -> CalibrationSet:
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, synth.VOCAB_SIZE, length).astype(np.int32) for _ in range(num_seqs)]
    return CalibrationSet(sequences=seqs, fingerprint=token_fingerprint(seqs, {}), source={"conformance": True},
                          packed=True, window_tokens=length)


def eval_tokens(n: int = 40) -> np.ndarray:
    return ((np.arange(n) * 37 + 11) % synth.VOCAB_SIZE).astype(np.int32)


def non_uniform(plan: Plan, n_group: int) -> Plan:
    """The plan with one pruned expert per group given back in every other prunable layer: the
    layers then keep different numbers of experts (mlx_lm alone cannot load that)."""
    layers = dict(plan.layers)
    for j, layer in enumerate(sorted(layers)):
        lp = layers[layer]
        if j % 2 or not lp.pruned:
            continue
        n = len(lp.kept) + len(lp.pruned)
        size = n // n_group
        back = [min(e for e in lp.pruned if e // size == g) for g in range(n_group)
                if any(e // size == g for e in lp.pruned)]
        layers[layer] = LayerPlan(sorted(lp.kept + back), sorted(set(lp.pruned) - set(back)))
    return Plan(layers=layers, method=plan.method, ratio=None, model=plan.model, telemetry=plan.telemetry)


def _logits(path: Path, uniform: bool, tokens: np.ndarray) -> np.ndarray:
    import mlx.core as mx

    from ..families.loader import load_pruned_model

    model, _ = load_pruned_model(path) if not uniform else _mlx_lm_load(path)
    return np.array(model(mx.array(tokens[None]))[0].astype(mx.float32))


def _mlx_lm_load(path: Path):
    import mlx_lm

    return mlx_lm.load(str(path))  # model and tokenizer, as a user loads the output


def check_family(family: str, fixtures: Path, *, variant: str = "fp32", compare_memory: bool = False,
                 work: Path | None = None) -> Result:
    """One family through collect -> plan (REAP, 50 %) -> apply -> load; see the module doc."""
    from ..families.masking import masked_logits

    started = time.perf_counter()
    src = synth.cached_fixture(family, "q4" if variant == "q4" else "fp32", fixtures)
    model = open_model(src)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        tmp = Path(tmp)
        calib = calibration()
        run = RunOptions(mode="stream", chunk_tokens=64, work_dir=tmp / "work")
        summary = collect(model, calib, tmp / "telemetry.zarr", run, progress=False)
        modes = {}
        if compare_memory:
            memory = collect(model, calib, tmp / "memory.zarr", RunOptions(mode="memory", chunk_tokens=64,
                                                                           work_dir=tmp / "mwork"), progress=False)
            modes = {"stream": summary["telemetry_fingerprint"], "memory": memory["telemetry_fingerprint"]}
        plan = make_plan(TelemetryStore.open(tmp / "telemetry.zarr"), PlanOptions(method="reap", ratio=0.5),
                         frozen=model.structure.frozen_layers)
        if variant == "non-uniform":
            plan = non_uniform(plan, model.structure.n_group)
        write_layout(plan_layout(model, plan), tmp / "out", progress=False)
        findings = [f"{f['file']}: {f['what']}" for f in verify_output(tmp / "out")["findings"]]
        tokens = eval_tokens()
        got = _logits(tmp / "out", plan.uniform, tokens)
        want = masked_logits(src, plan.pruned_map(), tokens)
        whole = masked_logits(src, {}, tokens)
    return Result(family, variant, model.family.routing.value, float(np.max(np.abs(got - want))),
                  {str(k): len(v.kept) for k, v in sorted(plan.layers.items())},
                  float(np.max(np.abs(want - whole))), round(time.perf_counter() - started, 2),
                  summary["telemetry_fingerprint"], modes, verify=findings)


def check_transformers(family: str, fixtures: Path, *, work: Path | None = None) -> Result:
    """The family's tiny model as transformers writes it (its HF layout) -> a plan pruning half the
    experts -> apply -> transformers.from_pretrained of the output, against mlx_lm's masked
    original of the same checkpoint. `unpruned_gap` says how far the two runtimes are apart before
    any pruning (where they disagree, the comparison cannot be made)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..families.masking import masked_logits

    started = time.perf_counter()
    tokens = eval_tokens()
    try:
        src = synth.cached_fixture(family, "transformers", fixtures)
        whole = masked_logits(src, {}, tokens)
    except Exception as e:  # transformers' own format for the family is not one mlx_lm reads
        raise NotComparable(f"mlx_lm cannot load the checkpoint transformers writes ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120]})") from None
    model = open_model(src)
    plan = random_plan(model)

    def hf_logits(path: Path) -> np.ndarray:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            return hf(torch.tensor(tokens[None].astype(np.int64))).logits[0].numpy()

    with tempfile.TemporaryDirectory(dir=work) as tmp:
        write_layout(plan_layout(model, plan), Path(tmp) / "out", progress=False)
        got = hf_logits(Path(tmp) / "out")
    want = masked_logits(src, plan.pruned_map(), tokens)
    return Result(family, "transformers", model.family.routing.value, float(np.max(np.abs(got - want))),
                  {str(k): len(v.kept) for k, v in sorted(plan.layers.items())},
                  float(np.max(np.abs(want - whole))), round(time.perf_counter() - started, 2),
                  unpruned_gap=float(np.max(np.abs(hf_logits(src) - whole))))


class NotComparable(Exception):
    """The HF check cannot be made for a family (the runtimes cannot share a checkpoint)."""


def random_plan(model, seed: int = 1) -> Plan:
    """Half the experts of every prunable layer, the same number from each expert group."""
    st = model.structure
    rng = np.random.default_rng(seed)
    layers = {}
    for layer in st.prunable_layers:
        n = st.layer_experts[layer]
        size = n // st.n_group
        pruned = sorted(int(e) + g * size for g in range(st.n_group)
                        for e in rng.choice(size, size // 2, replace=False))
        layers[layer] = LayerPlan(sorted(set(range(n)) - set(pruned)), pruned)
    return Plan(layers=layers, method="random", ratio=0.5, model=model.model_block())
