#!/usr/bin/env python3
"""Telemetry collected from GGUF forms of a model against telemetry from its MLX form.

    python tools/check_gguf_collect.py [--model fixtures/trained] [--qtypes f32,f16,q8_0] [--tokens 4096] [--json]

The model (default: the small trained Qwen3-MoE of fixtures/trained) is converted to each GGUF type
(testing/gguf_convert), its calibration split tokenised by each form's own tokenizer (the GGUF's
from its metadata; the ids must be the same), and `collect` run on every form. For each criterion:
the largest relative difference of a layer's scores from the MLX form's, and the layers whose
25 % / 50 % prune sets differ. The test suite asserts the F32 row (every criterion within 1e-4, no
prune set differs) and the REAP prune sets of F16 and Q8_0; this prints the figures.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "fixtures" / "trained")
    ap.add_argument("--text", type=Path, default=REPO / "fixtures" / "trained" / "data" / "calib.txt")
    ap.add_argument("--qtypes", default="f32,f16,q8_0")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from reap_stream.blas import ensure_blas

    ensure_blas()
    from reap_stream.families.model import open_model
    from reap_stream.planning.criteria import CRITERIA, scores
    from reap_stream.runner import RunOptions
    from reap_stream.telemetry.calibration import CalibrationOptions
    from reap_stream.telemetry.collect import collect
    from reap_stream.telemetry.store import TelemetryStore
    from reap_stream.telemetry.tokenizer import tokenise
    from reap_stream.testing.gguf_convert import convert_mlx_to_gguf

    options = CalibrationOptions(dataset_file=args.text, max_tokens=args.tokens)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib = tokenise(open_model(args.model), options)
        collect(open_model(args.model), calib, tmp / "mlx.zarr", RunOptions("stream", 4096), progress=False)
        ref = TelemetryStore.open(tmp / "mlx.zarr")
        for qtype in args.qtypes.split(","):
            path = convert_mlx_to_gguf(args.model, tmp / f"{qtype}.gguf", qtype=qtype)[0]
            gm = open_model(path)
            own = tokenise(gm, options)
            if own.fingerprint != calib.fingerprint:
                sys.exit(f"{qtype}: the GGUF's tokenizer gives other ids than the model's")
            collect(gm, own, tmp / f"{qtype}.zarr", RunOptions("stream", 4096), progress=False)
            got = TelemetryStore.open(tmp / f"{qtype}.zarr")
            for c in (c for c in CRITERIA if c != "random"):
                worst, differ = 0.0, []
                for layer in ref.layers():
                    a, b = scores(c, ref.read(layer)), scores(c, got.read(layer))
                    ok = np.isfinite(a)
                    worst = max(worst, float((np.abs(a[ok] - b[ok]) / np.maximum(np.abs(a[ok]), 1e-30)).max()))
                    for r in (0.25, 0.5):
                        k = int(len(a) * r)
                        if set(np.argsort(a, kind="stable")[:k]) != set(np.argsort(b, kind="stable")[:k]):
                            differ.append(f"{layer}@{r:.0%}")
                rows.append({"qtype": qtype, "criterion": c, "max_rel_diff": worst, "prune_sets_differ": differ})
            shutil.rmtree(tmp / f"{qtype}.zarr")
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{args.model.name}, {calib.num_tokens} calibration tokens\n")
    print("| GGUF type | criterion | largest relative difference | prune sets that differ (layer@ratio) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['qtype']} | {r['criterion']} | {r['max_rel_diff']:.1e} | {', '.join(r['prune_sets_differ']) or 'none'} |")


if __name__ == "__main__":
    main()
