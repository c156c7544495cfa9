"""`parity`: normalised hashes, the first differing row, prune-set diffs and the verdict."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from reap_stream.planning.parity import compare, layer_hashes, normalised_bytes
from reap_stream.planning.planner import PlanOptions, make_plan
from reap_stream.telemetry.synthetic import write_synthetic_telemetry
from reap_stream.telemetry.store import TelemetryStore
from cli_helpers import error_line, run


@pytest.fixture
def pair(tmp_path) -> tuple[TelemetryStore, TelemetryStore]:
    left = write_synthetic_telemetry(tmp_path / "left", layers=4, experts=8, tokens=256, seed=2)
    shutil.copytree(left.path, tmp_path / "right")
    return left, TelemetryStore.open(tmp_path / "right")


def plant(store: TelemetryStore, layer: int, expert: int, factor: float) -> None:
    """Scale one expert's reap numerator in one layer."""
    st = store.read(layer)
    st.weighted_ean_sum[expert] *= factor
    store.commit(st)


def test_identical_stores_are_identical(pair, tmp_path):
    r = run("parity", pair[0].path, pair[1].path, "--method", "reap", "--ratio", 0.5, "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "out" / "parity.json").read_text())
    assert report["verdict"] == "identical" and report["passed"]
    assert report["first_difference"] is None
    assert report["left"]["telemetry_hash"] == report["right"]["telemetry_hash"]
    assert "**identical** (PASS)" in (tmp_path / "out" / "parity.md").read_text()


def test_parity_finds_a_planted_one_expert_difference(pair, tmp_path):
    left, right = pair
    pruned = make_plan(left, PlanOptions(method="reap", ratio=0.5)).layers[2].pruned
    target = pruned[0]
    plant(right, 2, target, 1000.0)                 # a pruned expert becomes the layer's best
    r = run("parity", left.path, right.path, "--method", "reap", "--ratio", 0.5, "--out", tmp_path / "out")
    assert r.exit_code == 1, r.output
    report = json.loads((tmp_path / "out" / "parity.json").read_text())
    assert report["verdict"] == "different" and not report["passed"]
    assert report["first_difference"]["layer"] == 2
    assert report["first_difference"]["array"] == "weighted_ean_sum"
    assert report["first_difference"]["row"] == target
    assert report["layers"]["2"]["only_left"] == [target] and len(report["layers"]["2"]["only_right"]) == 1
    assert all(report["layers"][str(i)]["identical"] for i in (0, 1, 3))
    assert report["layers"]["2"]["arrays"]["frequency"]["equal"]
    assert f"layer 2, `weighted_ean_sum`, expert row {target}" in (tmp_path / "out" / "parity.md").read_text()


def test_a_difference_that_keeps_the_prune_sets_is_equivalent(pair, tmp_path):
    left, right = pair
    kept = make_plan(left, PlanOptions(method="reap", ratio=0.5)).layers[1].kept
    plant(right, 1, kept[-1], 1.0 + 1e-9)           # nudge a kept expert: same decisions
    report = compare(left, right, PlanOptions("reap", ratio=0.5))
    assert report["verdict"] == "equivalent" and report["passed"]
    assert report["first_difference"]["row"] == kept[-1]
    assert 0 < report["layers"]["1"]["arrays"]["weighted_ean_sum"]["max_rel_diff"] < 1e-8
    strict = run("parity", left.path, right.path, "--method", "reap", "--n-prune", 4,
                 "--require-identical-telemetry", "--out", tmp_path / "out")
    assert strict.exit_code == 1
    assert json.loads((tmp_path / "out" / "parity.json").read_text())["verdict"] == "equivalent"


def test_hashes_ignore_representation_but_not_values(pair):
    st = pair[0].read(0)
    assert normalised_bytes(np.array([-0.0])) == normalised_bytes(np.array([0.0]))
    assert normalised_bytes(np.array([1.0])) != normalised_bytes(np.array([np.nextafter(1.0, 2.0)]))
    same = pair[1].read(0)
    assert layer_hashes(st) == layer_hashes(same)
    same.max_activations[0] = np.nextafter(same.max_activations[0], np.inf)
    assert layer_hashes(st)["max_activations"] != layer_hashes(same)["max_activations"]


def test_stores_with_different_layers_are_refused(pair, tmp_path):
    shutil.rmtree(pair[1].path / "layer_003")
    r = run("parity", pair[0].path, pair[1].path, "--method", "reap", "--ratio", 0.5, "--out", tmp_path / "out")
    error_line(r, where=pair[1].path)


def test_parity_needs_exactly_one_count(pair, tmp_path):
    r = run("parity", pair[0].path, pair[1].path, "--method", "reap", "--out", tmp_path / "out")
    assert r.exit_code == 2
    assert r.output.strip() == "reap-stream: error: --ratio/--n-prune/--keep: give exactly one of --ratio, --n-prune, --keep"
    assert not (tmp_path / "out").exists()


def test_parity_report_is_deterministic(pair, tmp_path):
    for name in ("a", "b"):
        assert run("parity", pair[0].path, pair[1].path, "--method", "frequency", "--ratio", 0.25,
                   "--out", tmp_path / name).exit_code == 0
    for f in ("parity.json", "parity.md"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
