#!/usr/bin/env python3
"""Run pruned GGUFs in llama.cpp itself and compare their logits with the masked original's.

For every family row with a GGUF architecture and a tiny fixture (testing/synth builds it from the
row's `tiny` config; a new family needs nothing else), and each GGUF type:
  1. the MLX fixture is converted to GGUF (testing/gguf_convert: gguf-py's names and writer);
  2. the GGUF alone goes through the user's one command,
     `reap-stream full MODEL.gguf --dataset-file licence.jsonl --ratio 0.5 --out pruned.gguf`
     (telemetry collected from the GGUF, REAP plan, recompaction);
  3. llama.cpp (llama-cpp-python, in its own interpreter) evaluates the original and the pruned GGUF
     on fixed tokens; mlx_lm evaluates the MLX fixture, unpruned and with the plan's experts masked
     out of routing (the "masked original").
The pruned GGUF passes when llama.cpp's logits match the masked original's about as well as the two
runtimes agree on the unpruned model (per position, the largest |difference| over the largest
|logit|: median within the type's tolerance, no more than 2 extra outlier positions, and no more
than 2 extra positions with another top-1 where the reference's top-2 gap is beyond the typical
error), while pruning itself moved the logits by far more. The table then lists every MoE
architecture gguf-py knows that was not run, and why.

llama-cpp-python is not a reap-stream dependency (pip builds llama.cpp from source: ~6-8 minutes on
2 cores). Give an interpreter that has it:

    python -m venv /tmp/llama-venv
    /tmp/llama-venv/bin/pip install llama-cpp-python numpy
    python tools/check_gguf_llamacpp.py --llama-python /tmp/llama-venv/bin/python

Exit code 1 when a pruned GGUF disagrees with the masked original beyond the tolerance, or fails
where its unpruned original runs (a file llama.cpp cannot run at all is reported, not failed).
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
# tiny-config changes a llama.cpp loader needs: olmoe's sizes its k_norm by n_embd, i.e. it assumes
# as many KV heads as query heads (as OLMoE itself has); the test fixture has fewer
LLAMA_CPP_CONFIG = {"olmoe": {"num_key_value_heads": 4}}


def child(gguf: str, tokens: str, out: str) -> None:
    """In llama-cpp-python's interpreter: logits of every position, as a .npy file."""
    import numpy as np
    from llama_cpp import Llama

    ids = json.loads(tokens)
    # verbose: llama.cpp's own reason reaches stderr when it refuses a file
    llm = Llama(model_path=gguf, n_ctx=max(64, len(ids)), n_threads=2, logits_all=True, verbose=True)
    llm.eval(ids)
    np.save(out, np.array(llm.scores[: len(ids)], dtype=np.float32))


def _cli(*args) -> str | None:
    """Run a reap-stream command; None when it worked, else its last error line."""
    res = subprocess.run([sys.executable, "-m", "reap_stream.cli", *map(str, args)], capture_output=True, text=True,
                         cwd=REPO)
    return None if res.returncode == 0 else (res.stderr.strip().splitlines() or ["no message"])[-1]


def _llama_logits(python: str, gguf: Path, ids: list[int], work: Path):
    import numpy as np

    out = work / f"{gguf.stem}-llama.npy"
    res = subprocess.run([python, __file__, "--child", str(gguf), json.dumps(ids), str(out)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        lines = res.stderr.strip().splitlines()
        reason = next((ln.split("error loading model:", 1)[1].strip() for ln in lines if "error loading model:" in ln),
                      (lines or [f"signal {-res.returncode}"])[-1])
        return None, f"llama.cpp failed (exit {res.returncode}): {reason}"
    return np.load(out), None


def _agreement(got, want) -> dict:
    """Per position, the largest |difference| over the largest |logit| of the reference."""
    import numpy as np

    scale = np.abs(want).max()
    per_position = np.abs(got - want).max(axis=-1) / scale
    top2 = np.sort(want, axis=-1)[:, -2:]
    return {"median_rel_err": float(np.median(per_position)), "max_rel_err": float(per_position.max()),
            "per_position": per_position.tolist(), "margin": ((top2[:, 1] - top2[:, 0]) / scale).tolist(),
            "same_argmax": (got.argmax(-1) == want.argmax(-1)).tolist(),
            "argmax_agree": float(np.mean(got.argmax(-1) == want.argmax(-1)))}


def _verdict(original: dict, pruned: dict, qtype: str) -> bool:
    """The pruned file agrees with the masked original about as well as the runtimes agree on the
    unpruned file. Typical positions: the median error within the type's tolerance (or 1.5x the
    unpruned file's). Outliers (5x the typical error: a top-k near-tie resolved the other way by
    the other runtime's rounding, which moves a whole position) at most 2 more than unpruned."""
    typical = max(TOLERANCE[qtype], 1.5 * original["median_rel_err"])
    outliers = [sum(e > 5 * typical for e in r["per_position"]) for r in (original, pruned)]
    # a different top-1 counts where the reference's top-2 gap is beyond the typical error (a tiny
    # random model has many near-ties, which any rounding resolves either way)
    flips = [sum(not same and m > 4 * typical for same, m in zip(r["same_argmax"], r["margin"]))
             for r in (original, pruned)]
    return pruned["median_rel_err"] <= typical and outliers[1] <= outliers[0] + 2 and flips[1] <= flips[0] + 2


def check(family: str, qtype: str, args, work: Path) -> dict:
    import numpy as np

    from reap_stream.families.masking import masked_logits
    from reap_stream.families.table import FAMILIES
    from reap_stream.planning.plan import Plan
    from reap_stream.testing import synth
    from reap_stream.testing.gguf_convert import convert_mlx_to_gguf

    row = {"family": family, "arch": FAMILIES[family].gguf_arch, "qtype": qtype}
    run = work / f"{family}-{qtype}"
    run.mkdir()
    try:
        mlx_dir = args.root / "mlx" / family
        if not (mlx_dir / "config.json").exists():
            synth.make_mlx_fixture(family, mlx_dir, config_overrides=LLAMA_CPP_CONFIG.get(family))
        gguf = convert_mlx_to_gguf(mlx_dir, run / "model.gguf", qtype=qtype)[0]
    except Exception as e:   # a family whose fixture or conversion is missing: report it
        return {**row, "ok": None, "skipped": f"no GGUF fixture: {type(e).__name__}: {e}"}
    error = _cli("full", gguf, "--dataset-file", CALIBRATION, "--max-tokens", "512", "--ratio", "0.5",
                 "--out", run / "pruned.gguf", "--json")
    if error:
        return {**row, "ok": False, "pruned": {"error": f"reap-stream full: {error}"}}
    plan = Plan.load(run / "pruned.gguf.reap-work" / "plan.json")
    ids = [int(t) for t in (np.arange(NUM_TOKENS) * 37 + 11) % synth.VOCAB_SIZE]
    original, masked = masked_logits(mlx_dir, {}, ids), masked_logits(mlx_dir, plan.pruned_map(), ids)
    row["pruning moved the logits by"] = float(np.max(np.abs(original - masked)))
    for name, path, want in (("original", gguf, original), ("pruned", run / "pruned.gguf", masked)):
        got, error = _llama_logits(args.llama_python, path, ids, run)
        row[name] = {"error": error} if error else _agreement(got, want)
    if "error" in row["original"]:
        row["ok"] = None   # llama.cpp cannot run the unpruned file either: nothing to compare
    else:
        row["ok"] = "error" not in row["pruned"] and _verdict(row["original"], row["pruned"], qtype)
    return row


def not_run(families: list[str]) -> list[dict]:
    """Every MoE architecture gguf-py knows that no checked family covers, and why."""
    from reap_stream.families.gguf_arch import moe_archs
    from reap_stream.families.gguf_source import NOT_READABLE
    from reap_stream.families.table import BY_GGUF_ARCH, FAMILIES

    covered = {FAMILIES[f].gguf_arch for f in families}
    rows = []
    for arch in moe_archs():
        if arch in covered:
            continue
        fam = BY_GGUF_ARCH.get(arch)
        if fam is None:
            why = "no family row names it yet (its mlx_lm family row brings it)"
        elif not fam.mlx:
            why = "GGUF-only row: no mlx_lm class to build a tiny model or a masked original from"
        elif arch in NOT_READABLE:
            why = f"collect cannot read it: {NOT_READABLE[arch]}"
        else:
            why = "not in --families"
        rows.append({"arch": arch, "why": why})
    return rows


def render(rows: list[dict], others: list[dict]) -> str:
    fmt = lambda r: r.get("error") or (f"{r['median_rel_err']:.1e} / {r['max_rel_err']:.1e} / "  # noqa: E731
                                       f"{r['argmax_agree']:.0%}")
    out = ["| family | arch | GGUF type | unpruned vs mlx_lm: median / max rel. error / same top-1 | pruned vs masked "
           "original: median / max rel. error / same top-1 | pruning moved the logits by | ok |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            out.append(f"| {r['family']} | {r['arch']} | {r['qtype']} | {r['skipped']} | | | n/a |")
            continue
        verdict = {True: "yes", False: "NO", None: "n/a (unpruned file fails too)"}[r["ok"]]
        moved = r.get("pruning moved the logits by")
        out.append(f"| {r['family']} | {r['arch']} | {r['qtype']} | {fmt(r.get('original', {'error': '-'}))} | "
                   f"{fmt(r['pruned'])} | {'' if moved is None else f'{moved:.2f}'} | {verdict} |")
    out += ["", "| not run | why |", "|---|---|"] + [f"| {r['arch']} | {r['why']} |" for r in others]
    return "\n".join(out)


def main() -> None:
    from reap_stream.families.table import FAMILIES

    default = ",".join(f for f, row in FAMILIES.items() if row.gguf_arch)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-python", help="an interpreter that can import llama_cpp (see above)")
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "reap_stream_llamacpp")
    ap.add_argument("--families", default=default, help="comma-separated (default: every row with a GGUF arch)")
    ap.add_argument("--qtypes", default="f32,f16,q8_0")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--from-json", type=Path, help="print the table of an earlier --json run")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.from_json:
        done = json.loads(args.from_json.read_text())
        print(render(done["checked"], done["not_run"]))
        return
    if not args.llama_python:
        ap.error("--llama-python is required (an interpreter with llama-cpp-python)")
    from reap_stream.blas import ensure_blas

    ensure_blas()
    args.root.mkdir(parents=True, exist_ok=True)
    families = args.families.split(",")
    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        rows = [check(f, q, args, Path(tmp)) for f in families for q in args.qtypes.split(",")]
    others = not_run(families)
    print(json.dumps({"checked": rows, "not_run": others}) if args.json else render(rows, others))
    sys.exit(1 if any(r["ok"] is False for r in rows) else 0)


if __name__ == "__main__":
    main()
