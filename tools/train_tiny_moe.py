"""Train a small Qwen3-MoE on the Python standard library's source, on CPU, deterministically.

    nice -n 10 python tools/train_tiny_moe.py --out fixtures/trained

The model is mlx_lm's own `qwen3_moe` class (4 layers, hidden 128, 32 experts, top-2), so the
saved checkpoint loads with `mlx_lm.load` and goes through collect / plan / apply like any other.
Text: every `.py` file of this interpreter's stdlib (tests and site-packages excluded), listed
sorted; the sha256 of a file's relative path puts it in the train, calibration or held-out split,
so the splits never share a file. The calibration and held-out texts are written next to the
model (data/calib.txt, data/heldout.txt); the train split is listed in splits.json.

Training runs the experts densely (every expert on every token, weighted by the router's top-k
weights, zero elsewhere): the same function as mlx_lm's sparse forward, but batched matmuls are
far faster than the CPU's per-token gather_mm. A Switch-style load-balancing loss keeps all
experts in use, so that they specialise instead of collapsing onto a few.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import sysconfig
import time
from functools import partial
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from reap_stream.testing import synth  # noqa: E402
from reap_stream.blas import ensure_blas  # noqa: E402

SPLITS = ("train", "calib", "heldout")
# Directories of the stdlib that are not library code (or are huge generated tables).
EXCLUDED_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
MAX_FILE_BYTES = 200_000
# Kept text per evaluation split: enough for stable statistics, small enough to commit.
SPLIT_TEXT_CHARS = {"calib": 400_000, "heldout": 200_000}

# Windows of held-out text for the end-of-training check (mlx_lm's CPU forward is slow).
HELDOUT_CHECK_WINDOWS = 64

MODEL_CONFIG = {
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "vocab_size": synth.VOCAB_SIZE,
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 256,
    "moe_intermediate_size": 32,
    "num_experts": 32,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "attention_bias": False,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "torch_dtype": "float32",
}


# ---------------------------------------------------------------- data

def stdlib_files(root: Path | None = None) -> list[Path]:
    """The stdlib's .py files, sorted by relative path (the same list on every run)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]) or not p.is_file():
            continue
        if p.stat().st_size > MAX_FILE_BYTES:
            continue
        out.append(rel)
    return [root / r for r in sorted(out, key=lambda r: r.as_posix())]


def split_of(rel_path: str) -> str:
    """Split decided by the path alone: 5% held out, 10% calibration, the rest train."""
    h = int.from_bytes(hashlib.sha256(rel_path.encode()).digest()[:8], "little") % 20
    return "heldout" if h == 0 else "calib" if h in (1, 2) else "train"


def build_splits(root: Path | None = None) -> dict[str, list[tuple[str, str]]]:
    """split -> [(relative path, text)] in sorted path order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    splits: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for p in stdlib_files(root):
        rel = p.relative_to(root).as_posix()
        text = p.read_text(encoding="utf-8", errors="replace")
        splits[split_of(rel)].append((rel, text))
    return splits


def joined_text(files: list[tuple[str, str]], limit: int | None = None) -> str:
    """Files separated by blank lines, cut at a file boundary once `limit` characters are reached."""
    parts, n = [], 0
    for _, text in files:
        if limit is not None and n >= limit:
            break
        parts.append(text.rstrip("\n") + "\n")
        n += len(parts[-1]) + 2
    return "\n\n".join(parts)


def train_tokens(tokenizer, files: list[tuple[str, str]], eos_id: int) -> np.ndarray:
    """All train files tokenised, each followed by end-of-text, as one int32 stream."""
    encs = tokenizer.encode_batch([t for _, t in files])
    out = []
    for e in encs:
        out.extend(e.ids)
        out.append(eos_id)
    return np.asarray(out, dtype=np.int32)


# ---------------------------------------------------------------- model

def route(block, x, mx):
    """Router probabilities, top-k mask and the per-expert weights (zero off the top-k)."""
    probs = mx.softmax(block.gate(x).astype(mx.float32), axis=-1)
    k = block.top_k
    inds = mx.stop_gradient(mx.argpartition(probs, kth=-k, axis=-1)[..., -k:])
    mask = (inds[..., None] == mx.arange(probs.shape[-1])).sum(axis=-2).astype(probs.dtype)
    w = probs * mask
    if block.norm_topk_prob:
        w = w / w.sum(axis=-1, keepdims=True)
    return probs, mask, w


def experts_dense(block, x, w, mx, nn):
    """Every expert on every token, weighted: exactly mlx_lm's function (used for checks)."""
    sw = block.switch_mlp
    xf = x.reshape(-1, x.shape[-1])[None]  # [1, N, H]
    g = xf @ sw.gate_proj.weight.swapaxes(1, 2)  # [E, N, I]
    u = xf @ sw.up_proj.weight.swapaxes(1, 2)
    y = (nn.silu(g) * u) @ sw.down_proj.weight.swapaxes(1, 2)  # [E, N, H]
    wf = w.reshape(-1, w.shape[-1]).T[..., None]  # [E, N, 1]
    return (y * wf).sum(axis=0).reshape(x.shape)


def experts_dispatch(block, x, w, mask, capacity, mx, nn):
    """Each expert runs on at most `capacity` of its routed tokens (static shapes, batched
    matmuls): ~E/k times cheaper than dense; overflow tokens of an expert are dropped, as in
    Switch-style training. Rare with the balancing loss; evaluation uses the exact forward."""
    sw = block.switch_mlp
    H = x.shape[-1]
    xf = x.reshape(-1, H)
    E = w.shape[-1]
    mf = mask.reshape(-1, E).T  # [E, N]
    # routed tokens first (stable order), then the first `capacity` of them per expert
    idx = mx.stop_gradient(mx.argsort(-mf, axis=-1)[:, :capacity])  # [E, C]
    xg = xf[idx]  # [E, C, H]
    g = xg @ sw.gate_proj.weight.swapaxes(1, 2)
    u = xg @ sw.up_proj.weight.swapaxes(1, 2)
    y = (nn.silu(g) * u) @ sw.down_proj.weight.swapaxes(1, 2)  # [E, C, H]
    wg = mx.take_along_axis(w.reshape(-1, E).T, idx, axis=-1)[..., None]  # 0 if not routed
    out = mx.zeros_like(xf).at[idx.reshape(-1)].add((y * wg).reshape(-1, H))
    return out.reshape(x.shape)


def forward(model, tokens, mx, nn, capacity_factor: float | None = None):
    """Logits and the mean load-balancing loss over MoE layers; capacity_factor None = exact."""
    from mlx_lm.models.base import create_attention_mask

    inner = model.model
    h = inner.embed_tokens(tokens)
    attn_mask = create_attention_mask(h, None)
    aux = 0.0
    for layer in inner.layers:
        h = h + layer.self_attn(layer.input_layernorm(h), attn_mask, None)
        block = layer.mlp
        x = layer.post_attention_layernorm(h)
        probs, mask, w = route(block, x, mx)
        E = probs.shape[-1]
        if capacity_factor is None:
            h = h + experts_dense(block, x, w, mx, nn)
        else:
            n_tokens = tokens.size
            cap = min(n_tokens, int(math.ceil(capacity_factor * n_tokens * block.top_k / E)))
            h = h + experts_dispatch(block, x, w, mask, cap, mx, nn)
        # Switch-Transformer balance loss: E * sum_e (fraction routed to e) * (mean prob of e)
        frac = mx.stop_gradient(mask.reshape(-1, E).mean(axis=0) / block.top_k)
        aux = aux + E * (frac * probs.reshape(-1, E).mean(axis=0)).sum()
    return model.lm_head(inner.norm(h)), aux / len(inner.layers)


def save_checkpoint(model, out_dir: Path, config: dict) -> None:
    """mlx_lm layout in two shards + index, by synth's writer (sorted headers and JSON, so the same
    weights give the same bytes); it also writes the tokenizer files, the same bytes main wrote."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    tensors = {k: ("F32", np.array(v.astype(mx.float32))) for k, v in tree_flatten(model.parameters())}
    synth._write_checkpoint(out_dir, tensors, config, 2, "mlx")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "fixtures" / "trained")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--capacity", type=float, default=2.0, help="expert capacity factor in training")
    args = ap.parse_args(argv)

    info = ensure_blas()  # before the first `import mlx`: the wheel's reference BLAS is ~30x slower
    blas = f"{info['kind']} ({info['state']}, {info.get('path')})"
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm.models.qwen3_moe import Model, ModelArgs
    from tokenizers import Tokenizer

    out: Path = args.out
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)

    # tokenizer (byte-level BPE, deterministic) and splits
    synth.write_tokenizer(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    eos_id = tok.token_to_id(synth.SPECIAL_TOKENS[0])
    splits = build_splits()
    for name, limit in SPLIT_TEXT_CHARS.items():
        (data_dir / f"{name}.txt").write_text(joined_text(splits[name], limit))
    stream = train_tokens(tok, splits["train"], eos_id)
    heldout_ids = np.asarray(tok.encode((data_dir / "heldout.txt").read_text()).ids, dtype=np.int32)
    manifest = {
        "python": platform.python_version(),
        "rule": "sha256(relative path) % 20: 0 heldout, 1-2 calib, else train",
        "excluded_dirs": sorted(EXCLUDED_DIRS),
        "max_file_bytes": MAX_FILE_BYTES,
        "split_text_chars": SPLIT_TEXT_CHARS,
        "files": {s: [rel for rel, _ in splits[s]] for s in SPLITS},
        "train_tokens": int(stream.size),
    }
    (out / "splits.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"blas: {blas}; files: " + ", ".join(f"{s} {len(splits[s])}" for s in SPLITS)
          + f"; train tokens: {stream.size:,}", flush=True)

    # model
    mx.random.seed(args.seed)
    model = Model(ModelArgs.from_dict(MODEL_CONFIG))
    mx.eval(model.parameters())
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    schedule = optim.join_schedules(
        [optim.linear_schedule(1e-5, args.lr, 30),
         optim.cosine_decay(args.lr, max(1, args.steps - 30), args.lr * 0.05)], [30])
    opt = optim.AdamW(learning_rate=schedule, weight_decay=0.01)

    def loss_fn(model, x, y):
        logits, aux = forward(model, x, mx, nn, args.capacity)
        ce = nn.losses.cross_entropy(logits.astype(mx.float32), y, reduction="mean")
        return ce + args.aux_coef * aux, (ce, aux)

    grad_fn = nn.value_and_grad(model, lambda m, x, y: loss_fn(m, x, y)[0])
    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y):
        loss, grads = grad_fn(model, x, y)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(args.seed)
    L = args.seq_len
    log = []
    t0 = time.perf_counter()
    for it in range(1, args.steps + 1):
        starts = rng.integers(0, stream.size - L - 1, size=args.batch)
        batch = np.stack([stream[s:s + L + 1] for s in starts])
        loss = step(mx.array(batch[:, :-1]), mx.array(batch[:, 1:]))
        mx.eval(loss, state)
        if it % 25 == 0 or it == 1:
            el = time.perf_counter() - t0
            print(f"step {it}/{args.steps} loss {loss.item():.4f} ({el:.0f}s, {el / it:.2f}s/step)", flush=True)
            log.append({"step": it, "loss": round(float(loss.item()), 5)})

    # held-out check: the dense training forward and mlx_lm's own sparse forward must agree
    n = min((heldout_ids.size - 1) // L, HELDOUT_CHECK_WINDOWS) * L
    x = mx.array(heldout_ids[:n].reshape(-1, L))
    y = mx.array(heldout_ids[1:n + 1].reshape(-1, L))
    dense_logits, _ = forward(model, x, mx, nn)
    ce_dense = nn.losses.cross_entropy(dense_logits, y, reduction="mean").item()
    ce_sparse = nn.losses.cross_entropy(model(x).astype(mx.float32), y, reduction="mean").item()
    print(f"held-out CE: dense {ce_dense:.5f}, mlx_lm {ce_sparse:.5f} "
          f"(ppl {math.exp(ce_sparse):.3f}); {time.perf_counter() - t0:.0f}s", flush=True)

    save_checkpoint(model, out, MODEL_CONFIG)
    train_log = {
        "seed": args.seed, "steps": args.steps, "batch": args.batch, "seq_len": L, "lr": args.lr,
        "aux_coef": args.aux_coef, "params": int(n_params), "loss_curve": log,
        "heldout_windows": int(n // L), "heldout_ce_mlx_lm": round(ce_sparse, 5),
        "heldout_ce_dense": round(ce_dense, 5),
    }
    (out / "train_log.json").write_text(json.dumps(train_log, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
