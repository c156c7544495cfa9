"""tools/check_gguf_llamacpp.py's verdicts: a quantised file's "pass" counts only where llama.cpp and
mlx_lm agree on the family's F32 file (their models may differ: then nothing is compared)."""
from __future__ import annotations

import importlib.util

from conftest import REPO

_spec = importlib.util.spec_from_file_location("check_gguf_llamacpp", REPO / "tools" / "check_gguf_llamacpp.py")
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)


def row(family: str, qtype: str, median: float, pruned_median: float) -> dict:
    def agreement(m: float) -> dict:
        return {"median_rel_err": m, "max_rel_err": m, "per_position": [m] * 8, "margin": [0.0] * 8,
                "same_argmax": [True] * 8}
    r = {"family": family, "qtype": qtype, "original": agreement(median), "pruned": agreement(pruned_median)}
    return {**r, "ok": check.verdict(r)}


def test_quantised_rows_of_a_family_whose_f32_file_the_runtimes_disagree_on_compare_nothing():
    rows = check.anchored([row("apart", "f32", 0.08, 0.03), row("apart", "q8_0", 0.08, 0.03),
                           row("agree", "f32", 2e-4, 2e-4), row("agree", "q8_0", 2e-2, 2e-2)])
    assert [r["ok"] for r in rows] == [None, None, True, True]
    assert rows[1]["note"] == "the runtimes disagree on the F32 file"
    # without the anchor the q8_0 row's wider band would have passed the same disagreement
    assert row("apart", "q8_0", 0.08, 0.03)["ok"] is True
