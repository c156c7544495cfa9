"""`reap-stream full` (collect -> plan -> apply in one resumable run) and `reap-stream demo`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from reap_stream.planning.plan import Plan
from cli_helpers import error_line, run, tree_bytes

CALIB = Path(__file__).resolve().parents[1] / "fixtures" / "calibration" / "licence.txt"


def full(src: Path, out: Path, *extra: str):
    return run("full", src, "--dataset-file", CALIB, "--pack-samples", "--window-tokens", "128",
               "--max-tokens", "2048", "--method", "reap", "--ratio", "0.5", "--out", out, "--json", *extra)


def test_full_prunes_by_reap_and_the_output_equals_the_masked_original(fixture_model, tmp_path):
    from test_apply import tokens

    from reap_stream.families.masking import masked_logits

    src = fixture_model("deepseek_v3")
    res = full(src, tmp_path / "out")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    plan = Plan.load(summary["plan"])
    assert plan.method == "reap" and plan.telemetry["fingerprint"].startswith("sha256:")
    assert set(summary["kept_per_layer"].values()) == {4}  # 8 experts, 2 groups: 2 dropped per group
    toks = tokens()
    diff = masked_logits(tmp_path / "out", {}, toks) - masked_logits(src, plan.pruned_map(), toks)
    assert np.max(np.abs(diff)) <= 1e-5


def test_rerun_reuses_every_finished_step_and_changes_nothing(fixture_model, tmp_path):
    src = fixture_model("qwen3_moe")
    assert full(src, tmp_path / "out").exit_code == 0
    before = tree_bytes(tmp_path / "out")
    again = json.loads(full(src, tmp_path / "out").output)
    assert again["collect"]["layers_run"] == 0 and again["apply"] == "already complete"
    assert tree_bytes(tmp_path / "out") == before


def test_a_run_stopped_before_apply_finishes_from_the_saved_telemetry(fixture_model, tmp_path):
    src = fixture_model("qwen3_moe")
    assert full(src, tmp_path / "out").exit_code == 0
    reference = tree_bytes(tmp_path / "out")
    shutil.rmtree(tmp_path / "out")  # as if killed after collect and plan
    summary = json.loads(full(src, tmp_path / "out").output)
    assert summary["collect"]["layers_run"] == 0
    assert tree_bytes(tmp_path / "out") == reference


def test_refuses_to_replace_a_directory_it_did_not_write(fixture_model, tmp_path):
    src = fixture_model("qwen3_moe")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    res = full(src, tmp_path / "out")
    error_line(res, "pass --overwrite")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_demo_runs_the_whole_pipeline_on_a_generated_model(tmp_path):
    res = run("demo", "--out", tmp_path / "demo", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["verify"] == "ok"
    assert summary["max_abs_logit_diff_vs_masked_original"] <= 1e-5
    assert (tmp_path / "demo" / "pruned" / "reap_manifest.json").exists()


def test_a_different_plan_does_not_silently_replace_an_earlier_prune(fixture_model, tmp_path):
    src = fixture_model("qwen3_moe")
    assert full(src, tmp_path / "out").exit_code == 0
    before = tree_bytes(tmp_path / "out")
    error_line(full(src, tmp_path / "out", "--ratio", "0.25"), "another plan")
    assert tree_bytes(tmp_path / "out") == before
    res = full(src, tmp_path / "out", "--ratio", "0.25", "--overwrite")
    assert res.exit_code == 0, res.output
    assert set(json.loads(res.output)["kept_per_layer"].values()) == {6}
