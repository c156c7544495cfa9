"""The family conformance matrix: every MoE family of the installed mlx_lm, pruned and checked.

For each supported row of the family table a tiny seeded model is built with mlx_lm's own class and
run through collect (stream mode, self-check on) -> REAP plan at 50 % -> apply -> mlx_lm.load, and the
output's logits are compared with the original's when the pruned experts are masked out of routing
(fp32; stream and memory telemetry compared too). Then, where they apply: the same with mlx_lm's
4-bit quantisation, a non-uniform plan loaded through `load_pruned`, and the HF layout transformers
writes, loaded back by transformers. Refused rows are listed with their reason.

    python tools/family_matrix.py                       # every family, table on stdout
    python tools/family_matrix.py --markdown README-table.md --json matrix.json
    python tools/family_matrix.py --families qwen3_next,minimax --no-transformers

Exit status 1 when a supported family fails a check.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


from reap_stream.blas import ensure_blas

ensure_blas()

from reap_stream.errors import BadInput
from reap_stream.families.table import FAMILY_ROWS, At, Family, Routing
from reap_stream.testing import conformance
from reap_stream.testing.hf_fixture import transformers_model_type


def describe(fam: Family) -> str:
    """The routing of a row in a few words (its kind, then the route's parameters)."""
    if fam.routing in (Routing.TOP1_SIGMOID_INPUT, Routing.SPARSEMIXER):
        return fam.routing.value
    r = fam.route
    score = r.score.path.rpartition(".")[2] if isinstance(r.score, At) else r.score
    parts = ["top-k of logits, softmax of k" if score == "logits" else f"{score}{' f32' if r.f32 else ''}"]
    if r.bias:
        parts.append("selection bias")
    if r.groups:
        parts.append(f"groups ({r.groups}{', -inf fill' if r.group_fill != 0.0 else ''})")
    if r.renorm:
        form = {"sum": "", "max": " max", "l1": " L1"}[r.renorm]
        parts.append(f"renorm{form}{f' {r.renorm_eps:g}' if r.renorm_eps else ''}")
    if r.scale is not None:
        parts.append("scaled")
    if fam.identity_experts:
        parts.append("identity experts")
    return f"{fam.routing.value}: " + ", ".join(parts)


def run_family(fam: Family, fixtures: Path, work: Path, transformers: bool) -> dict:
    row = {"family": fam.model_type, "aliases": list(fam.aliases), "routing": "—" if fam.refused else describe(fam),
           "checks": {}}
    if fam.refused:
        row["status"] = "refused"
        row["reason"] = fam.refused
        return row
    variants = ["fp32", "non-uniform"] + (["q4"] if fam.quantizable else [])
    for variant in variants:
        row["checks"][variant] = _check(lambda v=variant: conformance.check_family(
            fam.model_type, fixtures, variant=v, compare_memory=v == "fp32", work=work))
    if transformers and transformers_model_type(fam.model_type):
        row["checks"]["transformers"] = _check(lambda: conformance.check_transformers(
            fam.model_type, fixtures, work=work))
    failed = [v for v, c in row["checks"].items()
              if not c["ok"] and not any(c.get(k) for k in ("runtimes_disagree", "not_comparable", "refused"))]
    row["status"] = "fail" if failed else "pass"
    return row


def _check(fn) -> dict:
    try:
        result = fn().to_json()
    except conformance.NotComparable as e:
        return {"ok": False, "not_comparable": str(e)}
    except BadInput as e:  # apply refused the input with its one line: safe, but not done
        return {"ok": False, "refused": str(e)}
    except Exception as e:  # a check that cannot run is a failure to report, not a crash of the matrix
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
    gap = result.get("unpruned_gap")
    if result["variant"] == "transformers" and gap is not None and gap > conformance.HF_TOLERANCE:
        result["runtimes_disagree"] = True  # mlx_lm and transformers differ before any pruning
    return result


def markdown(rows: list[dict]) -> str:
    head = ("| family (aliases) | routing | status | max abs diff: fp32 / 4-bit / non-uniform | "
            "HF layout in transformers |\n|---|---|---|---|---|\n")
    lines = []
    for row in rows:
        name = row["family"] + (f" ({', '.join(a.replace(':', ' + ') for a in row['aliases'])})" if row["aliases"] else "")
        if row["status"] == "refused":
            lines.append(f"| {name} | {row['routing']} | refused: {row['reason']} | — | — |")
            continue
        c = row["checks"]
        diffs = " / ".join(_diff(c.get(v)) for v in ("fp32", "q4", "non-uniform"))
        hf = c.get("transformers")
        hf_cell = "—" if hf is None else _hf_cell(hf)
        lines.append(f"| {name} | {row['routing']} | {row['status']} | {diffs} | {hf_cell} |")
    return head + "\n".join(lines) + "\n"


def _hf_cell(check: dict) -> str:
    if check.get("runtimes_disagree"):
        return f"not comparable: mlx_lm and transformers differ unpruned ({check['unpruned_gap']:.2g})"
    if check.get("not_comparable"):
        return "not comparable: mlx_lm cannot load what transformers writes"
    if check.get("refused"):
        return "refused: " + check["refused"].split(": ", 1)[-1][:90]
    return _diff(check)


def _diff(check: dict | None) -> str:
    if check is None:
        return "—"
    if "error" in check:
        return f"error ({check['error'][:60]})"
    return f"{check['max_abs_diff']:.2g}" + ("" if check["ok"] else " FAIL")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", help="comma-separated model types (default: every mlx row)")
    ap.add_argument("--fixtures", type=Path, help="fixture cache dir (default: a temporary dir)")
    ap.add_argument("--no-transformers", action="store_true", help="skip the HF-layout checks")
    ap.add_argument("--json", type=Path, help="write the results as JSON here")
    ap.add_argument("--markdown", type=Path, help="write the README table here")
    ap.add_argument("--render", type=Path, help="only render the table of an earlier --json run")
    args = ap.parse_args(argv)
    if args.render:
        rows = {f.model_type: f for f in FAMILY_ROWS}
        results = json.loads(args.render.read_text())["rows"]
        for r in results:
            r["routing"] = "—" if rows[r["family"]].refused else describe(rows[r["family"]])
        print(markdown(results))
        return 0
    from tqdm import tqdm

    rows = [f for f in FAMILY_ROWS if f.mlx]
    if args.families:
        wanted = args.families.split(",")
        rows = [f for f in rows if f.model_type in wanted]
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        fixtures = args.fixtures or Path(tmp) / "fixtures"
        results = [run_family(f, fixtures, Path(tmp), not args.no_transformers)
                   for f in tqdm(rows, desc="families", unit="family")]
    table = markdown(results)
    print(table)
    failed = [r["family"] for r in results if r["status"] == "fail"]
    summary = {"families": len(results), "pass": sum(r["status"] == "pass" for r in results),
               "refused": sum(r["status"] == "refused" for r in results), "fail": failed,
               "seconds": round(time.time() - started, 1)}
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": results}, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
