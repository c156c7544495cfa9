#!/usr/bin/env python3
"""Load pruned GGUF outputs with llama.cpp itself and compare their logits with mlx_lm's.

For each family and GGUF type: the project's MLX fixture and its GGUF conversion (same weights);
telemetry collected on the MLX fixture (`collect`, the licence calibration text), a plan
(`plan --method reap --ratio 0.25`), and that one plan applied to both the MLX directory and the
GGUF file. llama.cpp (through llama-cpp-python, in its own interpreter) evaluates the original and
the pruned GGUF on fixed tokens; mlx_lm evaluates the original and the pruned MLX outputs. The pruned
GGUF passes when llama.cpp's logits match mlx_lm's pruned logits about as well as the two runtimes
agree on the unpruned model, while pruning itself moved the logits by far more.

llama-cpp-python is not a reap-stream dependency (pip builds llama.cpp from source: ~8 minutes on
2 cores). Give an interpreter that has it:

    python -m venv /tmp/llama-venv
    /tmp/llama-venv/bin/pip install llama-cpp-python numpy
    python tools/check_gguf_llamacpp.py --llama-python /tmp/llama-venv/bin/python

Exit code 1 when a pruned GGUF disagrees with mlx_lm beyond the tolerance, or fails where its
unpruned original runs (a pair llama.cpp cannot run at all is reported, not failed).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CALIBRATION = REPO / "fixtures" / "calibration" / "licence.jsonl"
NUM_TOKENS = 40
# largest |llama.cpp - mlx_lm| / max|mlx_lm logit| accepted, per GGUF type
TOLERANCE = {"f32": 2e-3, "f16": 5e-3, "q8_0": 2e-2, "q4_0": 1e-1}


def child(gguf: str, tokens: str, out: str) -> None:
    """In llama-cpp-python's interpreter: logits of every position, as a .npy file."""
    import numpy as np
    from llama_cpp import Llama

    ids = json.loads(tokens)
    llm = Llama(model_path=gguf, n_ctx=max(64, len(ids)), n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    np.save(out, np.array(llm.scores[: len(ids)], dtype=np.float32))


def _cli(*args) -> None:
    res = subprocess.run([sys.executable, "-m", "reap_stream.cli", *map(str, args)], capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"reap-stream {args[0]} failed:\n{res.stderr[-3000:]}")


def _llama_logits(python: str, gguf: Path, ids: list[int], work: Path):
    import numpy as np

    out = work / f"{gguf.stem}-llama.npy"
    res = subprocess.run([python, __file__, "--child", str(gguf), json.dumps(ids), str(out)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no message"])[-1]
        return None, f"llama.cpp failed (exit {res.returncode}): {last}"
    return np.load(out), None


def prepare(family: str, args, work: Path) -> dict:
    """The per-family part, the same for every GGUF type: collect, plan and apply on the MLX
    fixture, and mlx_lm's logits of the original and the pruned MLX outputs."""
    import numpy as np

    from reap_stream.testing import synth
    from reap_stream.families.masking import masked_logits

    mlx_dir = synth.cached_fixture(family, "fp32", args.root / "mlx")
    run = work / family
    run.mkdir()
    _cli("collect", mlx_dir, "--dataset-file", CALIBRATION, "--max-tokens", "512", "--out", run / "t.zarr")
    _cli("plan", run / "t.zarr", "--method", "reap", "--ratio", "0.25", "--out", run / "plan.json")
    _cli("apply", mlx_dir, run / "plan.json", "--out", run / "pruned-mlx", "--quiet")
    ids = [int(t) for t in (np.arange(NUM_TOKENS) * 37 + 11) % synth.VOCAB_SIZE]
    # an empty prune map masks nothing: these are mlx_lm's plain logits
    mlx = {"original": masked_logits(mlx_dir, {}, ids), "pruned": masked_logits(run / "pruned-mlx", {}, ids)}
    return {"family": family, "mlx_dir": mlx_dir, "run": run, "ids": ids, "mlx": mlx}


def check(prepared: dict, qtype: str, args) -> dict:
    import numpy as np

    from reap_stream.testing.gguf_convert import cached_gguf

    family, ids, mlx = prepared["family"], prepared["ids"], prepared["mlx"]
    gguf = cached_gguf(family, qtype, args.root / "gguf", prepared["mlx_dir"])[0]
    run = prepared["run"] / qtype
    run.mkdir()
    _cli("apply", gguf, prepared["run"] / "plan.json", "--out", run / "pruned.gguf", "--quiet")
    row = {"family": family, "qtype": qtype,
           "pruning moved mlx_lm logits by": float(np.max(np.abs(mlx["original"] - mlx["pruned"])))}
    for name, path in (("original", gguf), ("pruned", run / "pruned.gguf")):
        got, error = _llama_logits(args.llama_python, path, ids, run)
        if error:
            row[name] = {"error": error}
            continue
        want = mlx[name]
        row[name] = {"max_rel_err": float(np.max(np.abs(got - want)) / np.max(np.abs(want))),
                     "argmax_agree": float(np.mean(got.argmax(-1) == want.argmax(-1)))}
    pruned = row["pruned"]
    if "error" in row["original"]:
        row["ok"] = None  # llama.cpp cannot run the unpruned file either: nothing to compare
    else:
        row["ok"] = "error" not in pruned and pruned["max_rel_err"] <= TOLERANCE[qtype] and pruned["argmax_agree"] == 1.0
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-python", help="an interpreter that can import llama_cpp (see above)")
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "reap_stream_llamacpp")
    ap.add_argument("--families", default="qwen3_moe,qwen2_moe,mixtral,deepseek_v3,gpt_oss")
    ap.add_argument("--qtypes", default="f32,f16")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    if not args.llama_python:
        ap.error("--llama-python is required (an interpreter with llama-cpp-python)")
    from reap_stream.blas import ensure_blas

    ensure_blas()
    args.root.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        for family in args.families.split(","):
            prepared = prepare(family, args, Path(tmp))
            for qtype in args.qtypes.split(","):
                rows.append(check(prepared, qtype, args))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        fmt = lambda r: r.get("error") or f"{r['max_rel_err']:.2e} / {r['argmax_agree']:.0%}"  # noqa: E731
        print("| family | GGUF type | original: rel. error / argmax agree | pruned: rel. error / argmax agree "
              "| pruning moved the logits by | ok |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            verdict = {True: "yes", False: "NO", None: "n/a (unpruned file fails too)"}[r["ok"]]
            print(f"| {r['family']} | {r['qtype']} | {fmt(r['original'])} | {fmt(r['pruned'])} | "
                  f"{r['pruning moved mlx_lm logits by']:.2f} | {verdict} |")
    sys.exit(1 if any(r["ok"] is False for r in rows) else 0)


if __name__ == "__main__":
    main()
