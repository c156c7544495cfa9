"""Perplexity and logit comparison through the same streaming runner as collect.

    perplexity(model, sequences, run, mask=None)  -> PerplexityResult
    compare_logits(model_a, model_b, sequences, run)  -> LogitDiff

Both go through reap_stream.runner (stream mode: one layer's weights in memory, hidden states
spilled to a temporary work dir; memory mode: the whole model, the parity baseline). A mask
({layer: [expert ids]}) evaluates the "masked original": the experts a plan would prune are never
routed, so a plan's damage is measured before anything is written.

Perplexity is exp(mean NLL) over every next-token prediction inside each sequence (position t
predicts token t+1; a sequence of L tokens gives L-1 predictions). NLLs are summed in float64 from
the model's float32 logits. Under mlx.launch every rank evaluates its share of the chunks and the
per-chunk sums are added in chunk order on every rank: the same bits as one process.
"""
from __future__ import annotations

import math
import shutil
import tempfile
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from . import __version__
from .errors import BadInput
from .families.model import Model
from .planning.plan import Plan, check_plan
from .runner import Chunk, RunOptions, fit_memory, open_runner
from .runner.distributed import Group, join_group, world
from .telemetry.calibration import token_fingerprint


@dataclass(frozen=True)
class PerplexityResult:
    num_sequences: int
    num_predictions: int  # tokens predicted (sum of L-1 over sequences)
    nll_sum: float
    mean_nll: float
    perplexity: float

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LogitDiff:
    num_tokens: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float  # fraction of positions where both models' argmax agree

    def to_json(self) -> dict:
        return asdict(self)


def mask_from_plan(plan_path: str | Path, model: Model, *, ignore_fingerprint: bool = False) -> dict[int, list[int]]:
    """The plan's pruned experts per layer, after checking the plan fits the model."""
    plan = Plan.load(plan_path)
    check_plan(plan, model.structure, str(plan_path),
               model_fingerprint=None if ignore_fingerprint else model.fingerprint)
    return {layer: ids for layer, ids in plan.pruned_map().items() if ids}


# Rows of [*, V] logits handled at once: bounds every temporary to ~16 MB of float32 whatever the
# chunk length (a 4096-token chunk of a 150k vocabulary is 2.4 GB of logits already).
_SLICE_VALUES = 1 << 22


def _row_slices(n_rows: int, width: int) -> Iterator[slice]:
    step = max(1, _SLICE_VALUES // max(width, 1))
    for i in range(0, n_rows, step):
        yield slice(i, min(i + step, n_rows))


def token_nll(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """NLL (float64) of tokens[:, 1:] under logits[:, :-1]; logits [B, L, V], tokens [B, L].

    The log-sum-exp runs in float32 over bounded row slices (no full-size copies); each row's
    result and the picked logit are combined in float64."""
    x = np.asarray(logits)
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    target = np.asarray(tokens)[:, 1:].astype(np.int64)
    out = np.empty(target.shape, dtype=np.float64)
    for b in range(x.shape[0]):
        rows = x[b, :-1]
        for sl in _row_slices(rows.shape[0], rows.shape[-1]):
            r = rows[sl]
            m = r.max(axis=-1, keepdims=True)
            lse = m[:, 0].astype(np.float64) + np.log(np.exp(r - m).sum(axis=-1, dtype=np.float64))
            picked = np.take_along_axis(r, target[b, sl, None], axis=-1)[:, 0]
            out[b, sl] = lse - picked.astype(np.float64)
    return out


def _abs_diff_stats(la: np.ndarray, lb: np.ndarray) -> tuple[float, float]:
    """(max, float64 sum) of |la - lb| over [..., V] float32 logits, slice by slice."""
    a, b = la.reshape(-1, la.shape[-1]), lb.reshape(-1, lb.shape[-1])
    top, total = 0.0, 0.0
    for sl in _row_slices(a.shape[0], a.shape[-1]):
        d = np.abs(a[sl] - b[sl])
        top = max(top, float(d.max()))
        total += float(d.sum(dtype=np.float64))
    return top, total


@contextmanager
def _work_dir(work_dir: str | Path | None, wanted: bool = True) -> Iterator[Path | None]:
    """A fresh spill directory (removed afterwards); inside `work_dir` when given."""
    if not wanted:
        yield None
        return
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="reap-eval-", dir=None if work_dir is None else str(work_dir)))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def logits_per_chunk(model: Model, sequences: list[np.ndarray], run: RunOptions, *,
                     mask: dict[int, list[int]] | None = None, progress: bool = True,
                     group: Group | None = None) -> Iterator[tuple[Chunk, np.ndarray]]:
    """(chunk, float32 logits [B, L, V]) for each chunk of `sequences` (of `group`'s share), in order."""
    run = fit_memory(model, run, sequences, logits=True)
    with _work_dir(run.work_dir if run.mode == "stream" else None, run.mode == "stream") as spill:
        runner = open_runner(model, run, spill, progress=progress)
        try:
            chunks = runner.chunks(sequences, run.sample_batch_size)
            if group is not None:
                chunks = group.share(chunks)
            for _ in runner.run(chunks, mask=mask):
                pass
            for c in chunks:
                yield c, _as_f32(runner.logits(c))
        finally:
            runner.close()


def _as_f32(a) -> np.ndarray:
    import mlx.core as mx

    return np.array(a.astype(mx.float32))


def _predictions(sequences: list[np.ndarray], where: str) -> int:
    n = sum(max(len(s) - 1, 0) for s in sequences)
    if n == 0:
        raise BadInput(where, "no sequence has 2 tokens or more: nothing to predict")
    return n


def perplexity(model: Model, sequences: list[np.ndarray], run: RunOptions = RunOptions(), *,
               mask: dict[int, list[int]] | None = None, progress: bool = True,
               where: str = "--prompt/--dataset-file") -> PerplexityResult:
    """Perplexity of `model` on `sequences` (optionally with experts masked)."""
    n_expected = _predictions(sequences, where)
    group = join_group(run.distributed)
    if group.distributed:
        group.agree({"command": "eval", "model_fingerprint": model.fingerprint, "mask": mask,
                     "calibration": token_fingerprint(sequences, {}),
                     "options": [run.mode, run.chunk_tokens, run.sample_batch_size], "tool_version": __version__})
    sums = []   # (chunk start, NLL sum, predictions)
    for chunk, logits in logits_per_chunk(model, sequences, run, mask=mask, progress=progress and group.rank == 0,
                                          group=group):
        nll = token_nll(logits, chunk.tokens)
        sums.append((chunk.start, float(nll.sum()).hex(), nll.size))
    sums = sorted(tuple(s) for part in group.exchange("nll", sums) for s in part)
    group.close()
    total = 0.0
    count = 0
    for _, nll_sum, n in sums:   # in chunk order on every rank, as one process adds them
        total += float.fromhex(nll_sum)
        count += n
    assert count == n_expected, (count, n_expected)
    mean = total / count
    return PerplexityResult(num_sequences=len(sequences), num_predictions=count, nll_sum=total,
                            mean_nll=mean, perplexity=math.exp(mean))


def _vocab_size(model: Model) -> int | None:
    cfg = model.config
    return cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))


def compare_logits(model_a: Model, model_b: Model, sequences: list[np.ndarray], run: RunOptions = RunOptions(), *,
                   mask_a: dict[int, list[int]] | None = None, progress: bool = True) -> LogitDiff:
    """Max and mean |logit_a - logit_b| over every position and vocabulary entry."""
    if run.distributed or world().size > 1:
        raise BadInput("--distributed", "compare runs in one process; start it without mlx.launch")
    va, vb = _vocab_size(model_a), _vocab_size(model_b)
    if va != vb:
        raise BadInput(model_b.where, f"vocab_size {vb} differs from {model_a.path}'s {va}")
    if not sum(len(s) for s in sequences):
        raise BadInput("--prompt/--dataset-file", "no tokens to compare on")
    # chunk by chunk: neither model's logits are ever held whole
    max_diff = 0.0
    abs_sum = 0.0
    n_values = n_pos = agree = 0
    with closing(logits_per_chunk(model_a, sequences, run, mask=mask_a, progress=progress)) as a_iter, \
            closing(logits_per_chunk(model_b, sequences, run, progress=progress)) as b_iter:
        for (_, la), (_, lb) in zip(a_iter, b_iter):
            if la.shape[-1] != lb.shape[-1]:
                raise BadInput(model_b.where, f"logit width {lb.shape[-1]} differs from {la.shape[-1]}")
            top, total = _abs_diff_stats(la, lb)
            max_diff = max(max_diff, top)
            abs_sum += total
            n_values += la.size
            n_pos += la.shape[0] * la.shape[1]
            agree += int((la.argmax(axis=-1) == lb.argmax(axis=-1)).sum())
    return LogitDiff(num_tokens=n_pos, max_abs_diff=max_diff, mean_abs_diff=abs_sum / n_values,
                     top1_agreement=agree / n_pos)
