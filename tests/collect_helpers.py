"""Shared by the collect tests: calibration sets from token ids, and a brute-force numpy reference
that computes REAP telemetry straight from the checkpoint's weights (every expert, float64)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from reap_stream.families.model import open_model
from reap_stream.families.table import Routing, family_of
from reap_stream.io.safetensors import Checkpoint, to_float32
from reap_stream.runner import RunOptions
from reap_stream.telemetry.calibration import CalibrationSet, token_fingerprint
from reap_stream.telemetry.collect import CollectOptions, collect
from reap_stream.telemetry.store import LayerStats


def token_set(num_seqs: int, length: int, seed: int = 0, vocab: int = 512) -> CalibrationSet:
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, vocab, length).astype(np.int32) for _ in range(num_seqs)]
    return calib_of(seqs)


def calib_of(seqs: list[np.ndarray]) -> CalibrationSet:
    return CalibrationSet(sequences=seqs, fingerprint=token_fingerprint(seqs, {}), source={"test": True},
                          packed=True, window_tokens=len(seqs[0]))


def moe_inputs(model_dir: Path, calib: CalibrationSet) -> dict[int, np.ndarray]:
    """Each MoE block's input [T, D] under mlx_lm's own, unmodified forward pass."""
    import mlx.core as mx
    from mlx_lm.utils import load_model

    from reap_stream.families.masking import moe_blocks, moe_spec

    model, _ = load_model(Path(model_dir))
    spec = moe_spec(model)
    seen: dict[int, list] = {}
    blocks = moe_blocks(model)

    class Recorder:
        def __init__(self, layer, block):
            self.layer, self.block = layer, block

        def __call__(self, x):
            seen.setdefault(self.layer, []).append(np.array(x.astype(mx.float32)).reshape(-1, x.shape[-1]))
            return self.block(x)

    for i, b in blocks.items():
        model.layers[i][spec.block] = Recorder(i, b)
    for seq in calib.sequences:
        mx.eval(model(mx.array(seq[None])))
    return {i: np.concatenate(v).astype(np.float64) for i, v in seen.items()}


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _swiglu(gate, up):
    return _silu(gate) * up


def _swiglu_oai(gate, up, alpha=1.702, limit=7.0):
    gate = np.minimum(gate, limit)
    up = np.clip(up, -limit, limit)
    return gate / (1.0 + np.exp(-alpha * gate)) * (up + 1.0)


ACTIVATION = {"gpt_oss": _swiglu_oai}


def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def route(routing: Routing, logits: np.ndarray, cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """Selected experts [T, k] and full router probabilities [T, E], by the rules in docs/routing.md."""
    k = int(cfg["num_experts_per_tok"])
    if routing == Routing.SIGMOID_GROUP:
        probs = 1.0 / (1.0 + np.exp(-logits))
        select = probs + cfg["_bias"]
        n_group, topk_group = int(cfg.get("n_group") or 1), int(cfg.get("topk_group") or 1)
        if n_group > 1:
            grouped = select.reshape(len(select), n_group, -1)
            group_score = np.sort(grouped, axis=-1)[..., -2:].sum(-1)
            losers = np.argsort(group_score, axis=-1, kind="stable")[:, : n_group - topk_group]
            for t in range(len(select)):
                grouped[t, losers[t]] = 0.0
            select = grouped.reshape(len(select), -1)
        inds = np.argsort(-select, axis=-1, kind="stable")[:, :k]
        return inds, probs
    probs = _softmax(logits)
    inds = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    return inds, probs


def reference_stats(model_dir: Path, calib: CalibrationSet, renorm_topk: bool = True) -> dict[int, LayerStats]:
    """REAP telemetry of every MoE layer, computed from the weights by definition."""
    ckpt = Checkpoint.open(model_dir)
    fam = family_of(ckpt.config)
    cfg = dict(ckpt.config)
    w = lambda name: to_float32(ckpt.tensors[name]).astype(np.float64)  # noqa: E731
    act = ACTIVATION.get(fam.model_type, _swiglu)
    out = {}
    for layer, x in moe_inputs(model_dir, calib).items():
        pre = f"model.layers.{layer}.{fam.block}."
        logits = x @ w(pre + f"{fam.router}.weight").T
        if pre + f"{fam.router}.bias" in ckpt.tensors:
            logits = logits + w(pre + f"{fam.router}.bias")
        if fam.routing == Routing.SIGMOID_GROUP:
            cfg["_bias"] = w(pre + f"{fam.router}.e_score_correction_bias")
        inds, probs = route(fam.routing, logits, cfg)
        e_count, hidden = probs.shape[1], x.shape[1]
        st = LayerStats.zeros(layer, e_count, hidden)
        st.tokens = len(x)
        sw = pre + fam.stacked + "."
        bias = lambda p, e: w(sw + p + ".bias")[e] if sw + p + ".bias" in ckpt.tensors else 0.0  # noqa: E731
        for e in range(e_count):  # every expert on every token, then keep the routed ones
            f = act(x @ w(sw + "gate_proj.weight")[e].T + bias("gate_proj", e),
                    x @ w(sw + "up_proj.weight")[e].T + bias("up_proj", e))
            f = f @ w(sw + "down_proj.weight")[e].T + bias("down_proj", e)
            rows, slots = np.nonzero(inds == e)
            g = probs[rows, e]
            if renorm_topk:
                g = g / np.take_along_axis(probs, inds, axis=1)[rows].sum(axis=1)
            n = np.linalg.norm(f[rows], axis=1)
            st.frequency[e] = len(rows)
            st.weighted_frequency_sum[e] = g.sum()
            st.ean_sum[e] = n.sum()
            st.weighted_ean_sum[e] = (g * n).sum()
            st.expert_output_sum[e] = f[rows].sum(axis=0)
            st.max_activations[e] = f[rows].max() if len(rows) else -np.inf
        for row in inds:
            for a in row:
                for b in row:
                    st.coactivation[a, b] += 1
        out[layer] = st
    return out


def assert_stats_close(a: LayerStats, b: LayerStats, rtol: float, atol: float = 0.0) -> None:
    assert a.tokens == b.tokens
    for name in LayerStats.ARRAYS:
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=rtol, atol=atol,
                                   err_msg=f"layer {a.layer} {name}")


def run_collect(model_dir: Path, calib: CalibrationSet, out: Path, work_dir: Path | None = None, *,
                mode: str = "stream", chunk_tokens: int = 4096, sample_batch_size: int | None = None,
                layers: tuple[int, ...] | None = None, renorm_topk: bool = True, **run) -> dict:
    """collect() on a model path, as the CLI runs it (quiet); `run`: further RunOptions fields."""
    return collect(open_model(model_dir), calib, out, RunOptions(mode, chunk_tokens, sample_batch_size, work_dir, **run),
                   CollectOptions(layers, renorm_topk), progress=False)


def stream_runner(model_dir: Path, work_dir: Path, chunk_tokens: int = 4096, **kwargs):
    """A StreamRunner of a model path."""
    from reap_stream.runner.stream import StreamRunner

    return StreamRunner(open_model(model_dir), work_dir, chunk_tokens=chunk_tokens, progress=False, **kwargs)
