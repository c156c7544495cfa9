"""Models in the Hugging Face cache: a snapshot directory is a set of links into ../../blobs/, which
collect, apply, eval and verify follow (the rule is on the names in the index, not on where links
point); a hub id org/name given as MODEL is found in the local cache by huggingface_hub itself,
never downloaded. The cache here is laid out exactly as huggingface_hub lays it out."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import error_line, run, tree_bytes
from reap_stream.families.model import open_model
from reap_stream.planning.planner import PlanOptions, make_plan
from reap_stream.telemetry.synthetic import write_synthetic_telemetry

REPO = Path(__file__).resolve().parents[1]
REVISION = "0123456789abcdef0123456789abcdef01234567"
PROMPT = ("--prompt", "Licensed under the Apache License, Version 2.0 " * 8)


def cache_snapshot(cache: Path, repo_id: str, files: Path) -> Path:
    """`files` stored as huggingface_hub stores a download: each file's bytes once in blobs/
    (named by their hash), snapshots/<revision>/<name> a relative link to it, refs/main naming
    the revision. Returns the snapshot directory."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    for src in sorted(p for p in files.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(src.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(src.read_bytes())
        link = snapshot / src.relative_to(files)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture(scope="module")
def cache(fixture_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    src = fixture_model("qwen3_moe")
    hub = root / "home" / "hub"
    snapshot = cache_snapshot(hub, "tiny-org/tiny-moe", src)
    store = write_synthetic_telemetry(root / "t.zarr", tokens=64, hidden=8, model=open_model(src).model_block())
    make_plan(store, PlanOptions("reap", ratio=0.5)).save(root / "plan.json")
    return {"src": src, "hub": hub, "home": root / "home", "snapshot": snapshot, "plan": root / "plan.json"}


def test_the_snapshot_is_links_into_blobs(cache):
    snap = cache["snapshot"]
    assert all(p.is_symlink() and "blobs" in os.readlink(p) for p in snap.iterdir())


def test_apply_from_a_snapshot_equals_apply_from_the_plain_directory(cache, tmp_path):
    assert run("apply", cache["snapshot"], cache["plan"], "--out", tmp_path / "a", "--quiet").exit_code == 0
    assert run("apply", cache["src"], cache["plan"], "--out", tmp_path / "b", "--quiet").exit_code == 0
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    assert not any(p.is_symlink() for p in (tmp_path / "a").iterdir())  # files copied, not links


def test_collect_and_eval_from_a_snapshot(cache, tmp_path):
    a = run("collect", cache["snapshot"], *PROMPT, "--out", tmp_path / "a.zarr", "--json")
    b = run("collect", cache["src"], *PROMPT, "--out", tmp_path / "b.zarr", "--json")
    assert a.exit_code == 0 and b.exit_code == 0, a.output
    assert json.loads(a.output)["telemetry_fingerprint"] == json.loads(b.output)["telemetry_fingerprint"]
    e = run("eval", cache["snapshot"], *PROMPT, "--json", "--mode", "memory")
    assert e.exit_code == 0, e.output
    assert json.loads(e.output)["perplexity"] > 1


def test_verify_a_pruned_output_stored_in_the_cache(cache, tmp_path):
    assert run("apply", cache["src"], cache["plan"], "--out", tmp_path / "pruned", "--quiet").exit_code == 0
    snapshot = cache_snapshot(tmp_path / "hub", "tiny-org/tiny-moe-pruned", tmp_path / "pruned")
    assert run("verify", snapshot).exit_code == 0


def test_an_index_name_still_may_not_leave_the_directory(cache, tmp_path):
    snapshot = cache_snapshot(tmp_path / "hub", "tiny-org/escape", cache["src"])
    index = snapshot / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"]["lm_head.weight"] = "../../blobs/" + os.readlink(snapshot / "config.json").split("/")[-1]
    index.unlink()
    index.write_text(json.dumps(doc))
    error_line(run("apply", snapshot, cache["plan"], "--out", tmp_path / "o"), "escapes the model directory")


def test_a_hub_id_resolves_to_its_cached_snapshot(cache, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache["hub"]))
    assert run("apply", "tiny-org/tiny-moe", cache["plan"], "--out", tmp_path / "o", "--quiet").exit_code == 0
    assert run("verify", tmp_path / "o").exit_code == 0
    r = run("apply", "tiny-org/not-downloaded", cache["plan"], "--out", tmp_path / "o2")
    error_line(r, "not a local path, and not usable as a Hugging Face hub id from the local cache",
               str(cache["hub"]), "hf download tiny-org/not-downloaded", where="tiny-org/not-downloaded")


def test_a_hub_id_from_hf_home_offline_in_a_fresh_process(cache, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(cache["home"]), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    r = subprocess.run([sys.executable, "-m", "reap_stream.cli", "apply", "tiny-org/tiny-moe", str(cache["plan"]),
                        "--out", str(tmp_path / "o"), "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["source"] == str(cache["snapshot"])
