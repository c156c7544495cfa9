#!/usr/bin/env python3
"""Benchmark `collect` (stream and memory mode) side by side with the CerebrasResearch/reap observer.

Same model, same tokens, same thread count for all three contenders:
  * model: Qwen3-MoE, 4 layers, hidden 256, 32 experts, top-4, HF layout (per-expert tensors),
    random weights with router rows ~ N(0, 0.5), written once under --root;
  * tokens: 8 sequences x 512 ids from np.random.default_rng(0), below the vocabulary size;
  * threads: OPENBLAS_NUM_THREADS / OMP_NUM_THREADS = --threads for everyone, and
    torch.set_num_threads(--threads) in the reference's process.
Each run is a fresh process; the contenders are rotated every repeat and the table gives medians
of tokens/s (calibration tokens / seconds from model open to telemetry written) and peak RSS
(VmHWM). Ratios compare medians of the same invocation, so run everything in one go on a quiet
machine. The reference's telemetry is also compared with ours (frequency, weighted frequency,
EAN and weighted EAN sums per expert): on Qwen3-MoE both route by softmax top-k, so they must agree.

The reference is never installed by reap-stream. To include it, give a checkout and a Python
that can import torch and the transformers version it pins:

    git clone https://github.com/CerebrasResearch/reap /tmp/cr-reap
    python -m venv /tmp/cr-venv --system-site-packages     # reuses the installed torch (CPU)
    /tmp/cr-venv/bin/pip install transformers==4.55.0       # the version the reference pins
    python tools/bench_reference.py --reference-dir /tmp/cr-reap --reference-python /tmp/cr-venv/bin/python

Without --reference-dir (or when the directory has no src/reap/observer.py) only reap-stream's two
modes run and the table says the reference was skipped. The reference is driven as its own
`record_activations` does: MoETransformerObserver with its Qwen3 hook config,
renormalize_router_weights=True (the model has norm_topk_prob), record_pruning_metrics_only=True,
one forward per batch of --ref-batch-size sequences (its default batch_size is 8), then save_state.

    python tools/bench_reference.py --repeats 3 [--reference-dir ... --reference-python ...]
    python tools/bench_reference.py --quick          # 1 repeat (smoke test)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# reap_stream from this checkout, in this interpreter and in the reference's

# the model of the issue (same shape as tools/bench_blas.py)
MODEL_OVERRIDES = {"hidden_size": 256, "num_experts": 32, "num_experts_per_tok": 4, "moe_intermediate_size": 128,
                   "intermediate_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32,
                   "num_hidden_layers": 4, "torch_dtype": "float32"}
ROUTER_STD = 0.5
NUM_SEQS, SEQ_LEN = 8, 512
CONTENDERS = ("stream", "memory", "reference")
# telemetry fields compared with the reference: ours -> its state key
SHARED_FIELDS = {"frequency": "expert_frequency", "weighted_frequency_sum": "weighted_expert_frequency_sum",
                 "ean_sum": "ean_sum", "weighted_ean_sum": "weighted_ean_sum"}


# ---------------------------------------------------------------- inputs (parent process)

def _init(name: str, shape: tuple, rng, np):
    """Seeded init by tensor role; routers get N(0, ROUTER_STD) rows so routing is far from uniform."""
    if name.endswith("mlp.gate.weight"):
        return rng.normal(0.0, ROUTER_STD, size=shape)
    if name.endswith("embed_tokens.weight"):
        return rng.normal(0.0, 1.0, size=shape)
    if len(shape) == 1:  # norms
        return 1.0 + rng.normal(0.0, 0.1, size=shape)
    return rng.normal(0.0, 1.0 / np.sqrt(shape[-1]), size=shape)


def make_model(path: Path, seed: int = 0) -> Path:
    """The benchmark model in HF layout (written to a temp dir, renamed when complete)."""
    if (path / "config.json").exists():
        return path
    import importlib

    import numpy as np
    from mlx.utils import tree_flatten

    from reap_stream.testing import synth

    config = {**synth.tiny_config("qwen3_moe"), **MODEL_OVERRIDES}
    module = importlib.import_module("mlx_lm.models.qwen3_moe")
    model = module.Model(module.ModelArgs.from_dict(config))  # only for names and shapes
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    rng = np.random.default_rng(seed)
    mlx_tensors = {k: ("F32", _init(k, shapes[k], rng, np).astype(np.float32)) for k in sorted(shapes)}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    synth.write_safetensors(tmp / "model.safetensors", synth.mlx_to_hf_names("qwen3_moe", mlx_tensors),
                            {"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n")
    synth.write_tokenizer(tmp, config["vocab_size"])
    os.replace(tmp, path)
    return path


def make_tokens(path: Path, vocab: int) -> Path:
    import numpy as np

    rng = np.random.default_rng(0)
    np.save(path, rng.integers(0, vocab, (NUM_SEQS, SEQ_LEN)).astype(np.int32))
    return path


# ---------------------------------------------------------------- children (one run each)

def child_reap(mode: str, model: str, tokens: str, out: str, chunk_tokens: int) -> dict:
    from reap_stream.blas import ensure_blas

    blas = ensure_blas()
    import numpy as np

    from reap_stream.telemetry.calibration import CalibrationSet, token_fingerprint
    from reap_stream.families.model import open_model
    from reap_stream.runner import RunOptions
    from reap_stream.telemetry.collect import collect
    from reap_stream.procstats import peak_rss_bytes
    from reap_stream.telemetry.store import TelemetryStore

    seqs = list(np.load(tokens))
    calib = CalibrationSet(seqs, token_fingerprint(seqs, {}), {"bench": "reference"}, True, SEQ_LEN)
    summary = collect(open_model(model), calib, out, RunOptions(mode, chunk_tokens),
                      progress=False)
    store = TelemetryStore.open(out)
    stats = {str(layer): {f: getattr(store.read(layer), f).tolist() for f in SHARED_FIELDS}
             for layer in store.layers()}
    return {"tokens_per_s": calib.num_tokens / summary["seconds"], "seconds": summary["seconds"],
            "peak_rss": peak_rss_bytes(), "fingerprint": summary["telemetry_fingerprint"], "stats": stats,
            "blas": f"{blas.get('kind')} ({blas.get('state')}, {blas.get('path')})"}


def child_reference(ref_dir: str, model: str, tokens: str, out: str, threads: int, batch_size: int) -> dict:
    import logging

    import numpy as np
    import torch

    # reap_stream's package and procstats import only the stdlib, so any interpreter can use them;
    # the reference's src goes in front of the repository (below)
    from reap_stream.procstats import peak_rss_bytes

    torch.set_num_threads(threads)
    sys.path.insert(0, str(Path(ref_dir) / "src"))
    logging.disable(logging.INFO)  # the observer logs every hooked module at INFO
    import transformers
    from reap.observer import OBSERVER_CONFIG_REGISTRY, MoETransformerObserver

    ids = torch.from_numpy(np.load(tokens).astype(np.int64))
    started = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32)
    hf.eval()
    config = OBSERVER_CONFIG_REGISTRY[hf.__class__.__name__](
        distance_measure="cosine",
        renormalize_router_weights=bool(getattr(hf.config, "norm_topk_prob", False)),
        record_pruning_metrics_only=True,
    )
    observer = MoETransformerObserver(model=hf, hook_config=config)
    with torch.no_grad():
        for lo in range(0, len(ids), batch_size):
            batch = ids[lo:lo + batch_size]
            with observer.set_attention_mask(torch.ones_like(batch)):
                hf(input_ids=batch, attention_mask=torch.ones_like(batch))
    observer.save_state(out)
    seconds = time.perf_counter() - started
    state = torch.load(out, weights_only=False)
    stats = {str(layer): {ours: state[layer][theirs].double().tolist() for ours, theirs in SHARED_FIELDS.items()}
             for layer in sorted(state)}
    return {"tokens_per_s": ids.numel() / seconds, "seconds": seconds, "peak_rss": peak_rss_bytes(), "stats": stats,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}


# ---------------------------------------------------------------- driver

def run_one(who: str, args, model: Path, tokens: Path) -> dict:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        if who == "reference":
            cmd = [args.reference_python, __file__, "--child-reference", str(args.reference_dir), str(model),
                   str(tokens), str(Path(tmp) / "state.pt"), str(args.threads), str(args.ref_batch_size)]
        else:
            cmd = [sys.executable, __file__, "--child-reap", who, str(model), str(tokens),
                   str(Path(tmp) / "t.zarr"), str(args.chunk_tokens)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if res.returncode != 0:
        sys.exit(f"{who} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def max_rel_diff(a: dict, b: dict) -> float:
    """Largest |a-b| / max(|b|, 1e-12) over layers, fields and experts."""
    worst = 0.0
    for layer, fields in b.items():
        for f, ref in fields.items():
            for x, y in zip(a[layer][f], ref):
                worst = max(worst, abs(x - y) / max(abs(y), 1e-12))
    return worst


def reference_available(args) -> str | None:
    """None when the reference can run, else why it is skipped."""
    if args.reference_dir is None:
        return "no --reference-dir given"
    if not (args.reference_dir / "src" / "reap" / "observer.py").is_file():
        return f"{args.reference_dir} has no src/reap/observer.py"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference-dir", type=Path, help="checkout of CerebrasResearch/reap (see above)")
    ap.add_argument("--reference-python", default=sys.executable,
                    help="interpreter for the reference (torch + the transformers it pins)")
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "reap_stream_bench_ref")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk-tokens", type=int, default=4096, help="reap-stream chunk size (default: collect's)")
    ap.add_argument("--ref-batch-size", type=int, default=8, help="sequences per reference forward (its default)")
    ap.add_argument("--json", action="store_true", help="print the medians as JSON instead of a table")
    ap.add_argument("--quick", action="store_true", help="1 repeat")
    ap.add_argument("--child-reap", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--child-reference", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_reap:
        mode, model, tokens, out, chunk = args.child_reap
        print(json.dumps(child_reap(mode, model, tokens, out, int(chunk))))
        return
    if args.child_reference:
        ref, model, tokens, out, threads, batch = args.child_reference
        print(json.dumps(child_reference(ref, model, tokens, out, int(threads), int(batch))))
        return
    if args.quick:
        args.repeats = 1
    args.root.mkdir(parents=True, exist_ok=True)
    model = make_model(args.root / "qwen3_moe-h256-e32-L4-hf")
    tokens = make_tokens(args.root / "tokens-8x512.npy", json.loads((model / "config.json").read_text())["vocab_size"])
    skipped = reference_available(args)
    who = [c for c in CONTENDERS if c != "reference" or skipped is None]
    runs: dict[str, list[dict]] = {c: [] for c in who}
    for r in range(args.repeats):
        for c in who[r % len(who):] + who[:r % len(who)]:  # rotate the order every repeat
            runs[c].append(run_one(c, args, model, tokens))
            print(f"repeat {r + 1}/{args.repeats} {c}: {runs[c][-1]['tokens_per_s']:.0f} tok/s", file=sys.stderr)
    med = {c: {k: statistics.median(x[k] for x in v) for k in ("tokens_per_s", "peak_rss")} for c, v in runs.items()}
    ours = [x["fingerprint"] for c in ("stream", "memory") for x in runs[c]]
    per_run = {c: [{k: x[k] for k in ("tokens_per_s", "peak_rss", "seconds", "fingerprint") if k in x} for x in v]
               for c, v in runs.items()}
    result = {"runs": per_run, "model": str(model), "tokens": NUM_SEQS * SEQ_LEN, "threads": args.threads,
              "repeats": args.repeats, "chunk_tokens": args.chunk_tokens, "blas": runs["stream"][0]["blas"],
              "medians": med,
              "stream_vs_memory": med["stream"]["tokens_per_s"] / med["memory"]["tokens_per_s"],
              "identical_telemetry_stream_memory": len(set(ours)) == 1, "reference_skipped": skipped}
    if skipped is None:
        result["stream_vs_reference"] = med["stream"]["tokens_per_s"] / med["reference"]["tokens_per_s"]
        result["reference_versions"] = runs["reference"][0]["versions"]
        result["reference_ref_batch_size"] = args.ref_batch_size
        result["max_rel_diff_vs_reference"] = max_rel_diff(runs["stream"][0]["stats"], runs["reference"][0]["stats"])
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return
    mib = lambda b: f"{b / (1 << 20):.0f}"  # noqa: E731
    print(f"Qwen3-MoE 4 layers, hidden 256, 32 experts, top-4 (HF layout); {NUM_SEQS}x{SEQ_LEN} tokens; "
          f"{args.threads} threads; BLAS {result['blas']}; medians of {args.repeats} fresh processes\n")
    print("| contender | tokens/s | peak RSS MiB | vs reference | vs memory mode |")
    print("|---|---|---|---|---|")
    for c in CONTENDERS:
        if c not in med:
            print(f"| {c} | skipped ({skipped}) | | | |")
            continue
        vs_ref = f"{med[c]['tokens_per_s'] / med['reference']['tokens_per_s']:.2f}x" if skipped is None else "-"
        vs_mem = f"{med[c]['tokens_per_s'] / med['memory']['tokens_per_s']:.2f}x"
        print(f"| {c} | {med[c]['tokens_per_s']:.0f} | {mib(med[c]['peak_rss'])} | {vs_ref} | {vs_mem} |")
    same = result["identical_telemetry_stream_memory"]
    print(f"\nstream and memory telemetry identical over all runs: "
          f"{'yes' if same else f'NO ({len(set(ours))} distinct fingerprints; was the code edited mid-run?)'}")
    targets = [("stream >= 0.8x memory mode", result["stream_vs_memory"] >= 0.8)]
    if skipped is None:
        targets.insert(0, ("stream >= 2x reference", result["stream_vs_reference"] >= 2.0))
    print("targets: " + "; ".join(f"{name}: {'met' if ok else 'NOT met'}" for name, ok in targets))
    if skipped is None:
        print(f"largest relative difference from the reference's frequency / weighted frequency / EAN / "
              f"weighted EAN sums: {result['max_rel_diff_vs_reference']:.2e} "
              f"(reference on torch {result['reference_versions']['torch']}, "
              f"transformers {result['reference_versions']['transformers']})")


if __name__ == "__main__":
    main()
