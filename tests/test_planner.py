"""`plan` / `init` specification: budgets, every constraint, the super-expert guard, reasons,
provenance, determinism, and the one-line refusals of bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from reap_stream.errors import BadInput
from reap_stream.planning.plan import Plan
from reap_stream.planning.planner import (PlanOptions, make_plan, parse_layer_spec,
                                 super_expert_threshold)
from reap_stream.telemetry.store import LayerStats, TelemetryStore
from cli_helpers import error_line, run


def make_store(path: Path, rows: dict[int, list[float]], *, top_k: int = 2, n_group: int = 1, topk_group: int = 1,
               max_acts: dict[int, list[float]] | None = None, hidden: int = 4, **model_extra) -> TelemetryStore:
    """A store whose `frequency` per layer is `rows[layer]` (so method=frequency scores = rows)."""
    e = len(next(iter(rows.values())))
    model = {"model_type": "synthetic", "num_layers": max(rows) + 1, "moe_layers": sorted(rows),
             "num_experts": e, "top_k": top_k, "n_group": n_group, "topk_group": topk_group,
             "fingerprint": "sha256:test-model", **model_extra}
    store = TelemetryStore.create(path, {"model": model, "calibration": {"fingerprint": "sha256:calib", "num_tokens": 100},
                                         "routing": {"renorm_topk": True}})
    for layer, freq in rows.items():
        st = LayerStats.zeros(layer, e, hidden)
        st.tokens = 100
        st.frequency[:] = freq
        st.weighted_frequency_sum[:] = np.asarray(freq) / 2
        st.ean_sum[:] = freq
        st.weighted_ean_sum[:] = np.asarray(freq) / 2
        if hidden:
            st.expert_output_sum[:, 0] = freq
        st.max_activations[:] = (max_acts or {}).get(layer, [1.0] * e)
        st.coactivation[np.diag_indices(e)] = freq
        store.commit(st)
    return store


E8 = [5, 3, 8, 1, 7, 2, 6, 4]   # ascending order of scores: 3, 5, 1, 7, 0, 6, 4, 2


# ---- budgets and ranking ------------------------------------------------------------------------

def test_uniform_prunes_the_lowest_scores_of_every_layer(tmp_path):
    store = make_store(tmp_path / "t", {0: E8, 1: E8[::-1]})
    plan = make_plan(store, PlanOptions(method="frequency", ratio=0.5))
    assert plan.layers[0].pruned == [1, 3, 5, 7]
    assert plan.layers[1].pruned == [0, 2, 4, 6]   # reversed scores, mirrored ids
    assert plan.uniform and all(len(lp.kept) == 4 for lp in plan.layers.values())


def test_ratio_is_the_floor_of_experts_times_ratio(tmp_path):
    store = make_store(tmp_path / "t", {0: E8})
    assert len(make_plan(store, PlanOptions(method="frequency", ratio=0.3)).layers[0].pruned) == 2   # floor(2.4)
    assert len(make_plan(store, PlanOptions(method="frequency", ratio=0.0)).layers[0].pruned) == 0


def test_ratio_n_prune_and_keep_say_the_same_thing(tmp_path):
    store = make_store(tmp_path / "t", {0: E8, 1: E8})
    a = make_plan(store, PlanOptions(method="frequency", ratio=0.25))
    b = make_plan(store, PlanOptions(method="frequency", n_prune=2))
    c = make_plan(store, PlanOptions(method="frequency", keep=6))
    assert a.pruned_map() == b.pruned_map() == c.pruned_map() == {0: [3, 5], 1: [3, 5]}


def test_ties_break_by_expert_id_lowest_pruned_first(tmp_path):
    store = make_store(tmp_path / "t", {0: [2, 1, 1, 1, 2, 2, 9, 9]})
    assert make_plan(store, PlanOptions(method="frequency", n_prune=2)).layers[0].pruned == [1, 2]
    assert make_plan(store, PlanOptions(method="frequency", n_prune=4)).layers[0].pruned == [0, 1, 2, 3]


def test_global_budget_spends_the_same_total_on_the_lowest_normalised_scores(tmp_path):
    # layer 0 is flat (every expert at its layer mean); layer 1 has three near-useless experts
    store = make_store(tmp_path / "t", {0: [1, 1, 1, 1], 1: [0.1, 0.1, 0.1, 3.7]}, top_k=1)
    uniform = make_plan(store, PlanOptions(method="frequency", ratio=0.5))
    glob = make_plan(store, PlanOptions(method="frequency", ratio=0.5, budget="global"))
    assert sum(len(v) for v in glob.pruned_map().values()) == sum(len(v) for v in uniform.pruned_map().values()) == 4
    assert glob.pruned_map() == {0: [0], 1: [0, 1, 2]}
    assert not glob.uniform


def test_global_budget_stops_each_layer_at_its_minimum(tmp_path):
    store = make_store(tmp_path / "t", {0: [1, 1, 1, 1], 1: [0.1, 0.1, 0.1, 3.7]}, top_k=2)
    glob = make_plan(store, PlanOptions(method="frequency", ratio=0.5, budget="global"))
    assert glob.pruned_map() == {0: [0, 1], 1: [0, 1]}   # layer 1 may not go below top_k=2


def test_global_budget_that_no_layer_can_absorb_is_refused(tmp_path):
    store = make_store(tmp_path / "t", {0: E8, 1: E8}, top_k=2)
    assert sum(map(len, make_plan(store, PlanOptions(method="frequency", n_prune=6, budget="global")).pruned_map().values())) == 12
    with pytest.raises(BadInput, match="global budget of 14 experts cannot be met"):
        make_plan(store, PlanOptions(method="frequency", n_prune=7, budget="global"))


def test_random_baseline_depends_only_on_the_seed(tmp_path):
    store = make_store(tmp_path / "t", {0: E8, 1: E8})
    a = make_plan(store, PlanOptions(method="random", ratio=0.5, seed=3))
    assert a.dumps() == make_plan(store, PlanOptions(method="random", ratio=0.5, seed=3)).dumps()
    assert any(make_plan(store, PlanOptions(method="random", ratio=0.5, seed=s)).pruned_map() != a.pruned_map() for s in range(4, 8))


# ---- constraints ---------------------------------------------------------------------------------

def test_top_k_is_a_floor(tmp_path):
    store = make_store(tmp_path / "t", {0: E8}, top_k=3)
    assert len(make_plan(store, PlanOptions(method="frequency", n_prune=5)).layers[0].kept) == 3
    with pytest.raises(BadInput, match="leaves 2 experts, fewer than the 3 needed"):
        make_plan(store, PlanOptions(method="frequency", n_prune=6))


def test_pruning_more_experts_than_a_layer_has_names_the_prune_count(tmp_path):
    store = make_store(tmp_path / "t", {0: E8})
    with pytest.raises(BadInput, match="--n-prune 9 asks to prune 9 experts, more than the layer's 8"):
        make_plan(store, PlanOptions(method="frequency", n_prune=9))


def test_min_experts_is_a_floor(tmp_path):
    store = make_store(tmp_path / "t", {0: E8})
    with pytest.raises(BadInput, match="--min-experts=6"):
        make_plan(store, PlanOptions(method="frequency", ratio=0.5, min_experts=6))
    assert len(make_plan(store, PlanOptions(method="frequency", n_prune=2, min_experts=6)).layers[0].kept) == 6


GROUPED = [9, 1, 8, 2,  7, 3, 6, 4,  10, 11, 0, 12,  5, 13, 14, 15]   # 4 groups of 4


def test_groups_drop_the_same_number_from_every_group(tmp_path):
    store = make_store(tmp_path / "t", {0: GROUPED}, top_k=4, n_group=4, topk_group=2)
    plan = make_plan(store, PlanOptions(method="frequency", ratio=0.5))
    assert plan.layers[0].pruned == [1, 3, 5, 7, 8, 10, 12, 13]   # the two lowest of each group
    per_group = [sum(1 for e in plan.layers[0].kept if e // 4 == g) for g in range(4)]
    assert per_group == [2, 2, 2, 2]


def test_groups_round_a_ratio_down_to_a_multiple_of_n_group(tmp_path):
    store = make_store(tmp_path / "t", {0: GROUPED}, top_k=4, n_group=4, topk_group=2)
    assert len(make_plan(store, PlanOptions(method="frequency", ratio=0.4)).layers[0].pruned) == 4   # floor(6.4)=6 -> 4


def test_groups_refuse_an_explicit_count_they_cannot_split_evenly(tmp_path):
    store = make_store(tmp_path / "t", {0: GROUPED}, top_k=4, n_group=4, topk_group=2)
    with pytest.raises(BadInput, match="not a multiple of n_group=4"):
        make_plan(store, PlanOptions(method="frequency", n_prune=6))


def test_groups_keep_at_least_two_per_group(tmp_path):
    store = make_store(tmp_path / "t", {0: GROUPED}, top_k=2, n_group=4, topk_group=2)
    with pytest.raises(BadInput, match="fewer than the 8 needed"):
        make_plan(store, PlanOptions(method="frequency", n_prune=12))


def test_groups_keep_topk_group_times_kept_per_group_at_least_top_k(tmp_path):
    store = make_store(tmp_path / "t", {0: GROUPED}, top_k=6, n_group=4, topk_group=2)
    with pytest.raises(BadInput, match="topk_group=2"):
        make_plan(store, PlanOptions(method="frequency", n_prune=8))   # 2 per group x 2 groups = 4 < 6
    assert len(make_plan(store, PlanOptions(method="frequency", n_prune=4)).layers[0].kept) == 12


def test_global_budget_with_groups_moves_whole_rows_of_groups(tmp_path):
    store = make_store(tmp_path / "t", {0: GROUPED, 1: list(range(16, 32))}, top_k=4, n_group=4, topk_group=2)
    plan = make_plan(store, PlanOptions(method="frequency", ratio=0.25, budget="global"))
    for lp in plan.layers.values():
        assert len({sum(1 for e in lp.kept if e // 4 == g) for g in range(4)}) == 1


def test_hash_and_mtp_layers_of_the_model_are_left_untouched(tmp_path):
    store = make_store(tmp_path / "t", {0: E8, 1: E8, 2: E8, 3: E8})
    plan = make_plan(store, PlanOptions(method="frequency", ratio=0.5), frozen=[0, 3])
    assert sorted(plan.layers) == [1, 2]
    assert plan.extra["provenance"]["untouched_layers"] == [0, 3]


def test_frozen_layers_recorded_in_the_model_block_are_left_untouched(tmp_path):
    store = make_store(tmp_path / "t", {0: E8, 1: E8}, frozen_layers=[0])
    assert sorted(make_plan(store, PlanOptions(method="frequency", ratio=0.5)).layers) == [1]


def test_telemetry_for_a_layer_the_model_block_does_not_list_is_refused(tmp_path):
    store = make_store(tmp_path / "t", {0: E8, 1: E8}, moe_layers=[1], num_experts={"1": 8})
    with pytest.raises(BadInput, match="layer 0, which is not an MoE layer"):
        make_plan(store, PlanOptions(method="frequency", ratio=0.5))


def test_skipped_layers_keep_every_expert_and_say_why(tmp_path):
    assert parse_layer_spec("0,2-4") == (0, 2, 3, 4)
    store = make_store(tmp_path / "t", {0: E8, 1: E8})
    plan = make_plan(store, PlanOptions(method="frequency", ratio=0.5, skip_layers=parse_layer_spec("1")))
    assert plan.layers[1].pruned == [] and plan.layers[0].pruned == [1, 3, 5, 7]
    assert set(plan.layers[1].extra["reasons"]) == {"kept: layer skipped (--skip-layers)"}


# ---- super-expert guard -------------------------------------------------------------------------

def test_super_expert_threshold_is_the_larger_of_percentile_and_max_over_ten():
    # percentiles interpolate linearly between sorted values at rank q * (n - 1)
    acts = [np.arange(1.0, 101.0), np.arange(101.0, 201.0)]
    # 1..200: rank 0.995 * 199 = 198.005 -> 199 + 0.005 * (200 - 199); max / 10 = 20 is smaller
    assert super_expert_threshold(acts) == pytest.approx(199.005)
    spiky = [np.ones(100), np.r_[np.ones(99), 1000.0]]
    # 199 ones and 1000: the percentile is 1 + 0.005 * 999 = 5.995, below max / 10 = 100
    assert super_expert_threshold(spiky) == pytest.approx(100.0)
    # -inf (never routed) is ignored: [2, 4] at rank 0.995 -> 2 + 0.995 * 2 = 3.99
    assert super_expert_threshold([np.array([-np.inf, 2.0, 4.0])]) == pytest.approx(3.99)


def test_super_experts_are_never_pruned_in_the_first_75_percent_of_layers(tmp_path):
    # 8 layers x 64 experts: the 99.5th percentile sits below the top three activations
    row = [10.0 + i for i in range(64)]
    row[3] = 0.0                                   # expert 3: the lowest score everywhere
    spikes = {i: [1.0] * 64 for i in range(8)}
    for layer in (0, 5, 7):
        spikes[layer][3] = 500.0                   # ... and a huge activation in layers 0, 5 and 7
    store = make_store(tmp_path / "t", {i: row for i in range(8)}, max_acts=spikes)
    plan = make_plan(store, PlanOptions(method="frequency", ratio=0.5))
    assert plan.extra["provenance"]["super_expert_layers"] == [0, 1, 2, 3, 4, 5]   # int(8 * 0.75) = 6
    for layer in (0, 5):
        lp = plan.layers[layer]
        assert 3 in lp.kept and lp.extra["super_experts"] == [3]
        assert lp.pruned == [0, 1, 2] + list(range(4, 33))   # the next-lowest expert drops instead
        assert lp.extra["reasons"][3].startswith("kept: super expert (max activation 500")
    assert 3 in plan.layers[7].pruned                        # last quarter: not guarded
    assert 3 in plan.layers[1].pruned                        # no spike: nothing to guard
    unguarded = make_plan(store, PlanOptions(method="frequency", ratio=0.5, preserve_super_experts=False))
    assert 3 in unguarded.layers[0].pruned


def test_too_many_super_experts_for_the_requested_cut_is_refused(tmp_path):
    spikes = {i: [1.0] * 64 for i in range(8)}
    spikes[0][3:6] = [500.0] * 3                   # three super experts in layer 0
    store = make_store(tmp_path / "t", {i: [float(e) for e in range(64)] for i in range(8)}, max_acts=spikes)
    assert len(make_plan(store, PlanOptions(method="frequency", n_prune=61)).layers[0].kept) == 3
    with pytest.raises(BadInput, match="only 61 of 64 experts can be pruned, not 62.*--no-preserve-super-experts"):
        make_plan(store, PlanOptions(method="frequency", n_prune=62))


# ---- plan content ---------------------------------------------------------------------------------

def test_plan_carries_scores_reasons_and_provenance(tmp_path):
    store = make_store(tmp_path / "t", {0: E8})
    plan = make_plan(store, PlanOptions(method="ean_sum", ratio=0.5))
    lp = plan.layers[0]
    assert lp.extra["scores"] == [float(x) for x in E8]
    assert lp.extra["reasons"][3] == "pruned: ean_sum score rank 1 of 8 (1 = lowest)"
    assert lp.extra["reasons"][2] == "kept: ean_sum score rank 8 of 8 (1 = lowest)"
    assert plan.model["fingerprint"] == "sha256:test-model"
    assert plan.telemetry == {"fingerprint": store.fingerprint(), "calibration": "sha256:calib"}
    prov = plan.extra["provenance"]
    assert prov["options"]["method"] == "ean_sum" and prov["options"]["ratio"] == 0.5
    assert prov["pruned_experts"] == 4 and prov["routed_experts"] == 8


def test_never_routed_max_activation_is_written_as_null(tmp_path):
    store = make_store(tmp_path / "t", {0: E8}, max_acts={0: [-np.inf] + [1.0 + i for i in range(7)]})
    plan = make_plan(store, PlanOptions(method="max_activations", n_prune=1))
    assert plan.layers[0].pruned == [0]
    assert plan.layers[0].extra["scores"][0] is None
    json.loads(plan.dumps())   # strict JSON, no -Infinity


def test_same_inputs_give_byte_identical_plans(tmp_path):
    runner_args = ["init", "--out", tmp_path / "t", "--layers", 4, "--experts", 8, "--tokens", 256, "--seed", 5]
    assert run(*runner_args).exit_code == 0
    for name in ("a.json", "b.json"):
        r = run("plan", tmp_path / "t", "--out", tmp_path / name, "--method", "reap", "--ratio", 0.5, "--budget", "global")
        assert r.exit_code == 0, r.output
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_plan_bytes_do_not_depend_on_how_the_store_path_is_written(tmp_path, monkeypatch):
    assert run("init", "--out", tmp_path / "t", "--layers", 2, "--experts", 8, "--tokens", 64).exit_code == 0
    monkeypatch.chdir(tmp_path)
    absolute = run("plan", tmp_path / "t", "--out", tmp_path / "a.json", "--method", "reap", "--ratio", 0.5, "--json")
    relative = run("plan", "t", "--out", tmp_path / "r.json", "--method", "reap", "--ratio", 0.5, "--json")
    assert absolute.exit_code == relative.exit_code == 0, absolute.output + relative.output
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "r.json").read_bytes()
    assert json.loads(relative.output)["telemetry"] == "t"   # the path as given lives in the summary only


# ---- init ---------------------------------------------------------------------------------------

def test_init_writes_realistic_telemetry_that_plans(tmp_path):
    r = run("init", "--out", tmp_path / "t", "--layers", 4, "--experts", 16, "--tokens", 512, "--seed", 1)
    assert r.exit_code == 0, r.output
    store = TelemetryStore.open(tmp_path / "t")
    assert store.layers() == [0, 1, 2, 3]
    attrs = store.attrs
    assert attrs["model"]["fingerprint"].startswith("sha256:synthetic-1")
    assert {"calibration", "routing", "tool_version"} <= set(attrs)
    later = store.read(2)
    assert (later.frequency == 0).sum() >= 1 and later.frequency.sum() == 512 * 2
    assert np.array_equal(np.diag(later.coactivation), later.frequency)
    plan = make_plan(store, PlanOptions(method="reap", ratio=0.5))
    assert sum(len(lp.extra["super_experts"]) for lp in plan.layers.values()) >= 1
    r2 = run("init", "--out", tmp_path / "u", "--layers", 4, "--experts", 16, "--tokens", 512, "--seed", 1)
    assert r2.exit_code == 0 and TelemetryStore.open(tmp_path / "u").fingerprint() == store.fingerprint()


def test_init_refuses_to_replace_an_existing_path(tmp_path):
    (tmp_path / "t").mkdir()
    error_line(run("init", "--out", tmp_path / "t"), "t")
    error_line(run("init", "--out", tmp_path / "t", "--overwrite"), "t")   # not a store: never deleted
    assert (tmp_path / "t").is_dir()


# ---- bad input: exit 2, one line naming the file ----------------------------------------------------

@pytest.fixture
def synthetic(tmp_path) -> Path:
    assert run("init", "--out", tmp_path / "t", "--layers", 3, "--experts", 8, "--tokens", 256).exit_code == 0
    return tmp_path / "t"


@pytest.mark.parametrize("ratio", ["1.0", "-0.1", "1.5"])
def test_ratio_outside_zero_one_is_refused(synthetic, tmp_path, ratio):
    line = error_line(run("plan", synthetic, "--out", tmp_path / "p.json", "--method", "reap", "--ratio", ratio), "--ratio")
    assert "outside [0, 1)" in line
    assert not (tmp_path / "p.json").exists()


def test_n_prune_leaving_fewer_than_top_k_is_refused(synthetic, tmp_path):
    line = error_line(run("plan", synthetic, "--out", tmp_path / "p.json", "--method", "reap", "--n-prune", 7), str(synthetic))
    assert "fewer than the 2 needed (top_k=2)" in line


def test_two_counts_at_once_are_refused(synthetic, tmp_path):
    line = error_line(run("plan", synthetic, "--out", tmp_path / "p.json", "--method", "reap", "--ratio", 0.5, "--keep", 4),
                      "--ratio/--n-prune/--keep")
    assert "give exactly one of --ratio, --n-prune, --keep (got --ratio, --keep)" in line


def test_criterion_needing_an_array_the_store_lacks_is_refused(synthetic, tmp_path):
    shutil.rmtree(synthetic / "layer_001" / "expert_output_sum")
    line = error_line(run("plan", synthetic, "--out", tmp_path / "p.json", "--method", "ean_ca", "--ratio", 0.5), str(synthetic))
    assert "needs telemetry array 'expert_output_sum'" in line


def test_ean_ca_on_a_store_without_output_sums_is_refused(tmp_path):
    store = make_store(tmp_path / "t", {0: E8}, hidden=0)
    line = error_line(run("plan", store.path, "--out", tmp_path / "p.json", "--method", "ean_ca", "--ratio", 0.5), str(store.path))
    assert "ean_ca needs per-expert output sums" in line
    assert run("plan", store.path, "--out", tmp_path / "p.json", "--method", "reap", "--ratio", 0.5).exit_code == 0


def test_incomplete_telemetry_is_refused(synthetic, tmp_path):
    shutil.rmtree(synthetic / "layer_002")
    line = error_line(run("plan", synthetic, "--out", tmp_path / "p.json", "--method", "reap", "--ratio", 0.5), str(synthetic))
    assert "layer 2 has no committed telemetry" in line


def test_not_a_telemetry_store_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    error_line(run("plan", tmp_path / "x", "--out", tmp_path / "p.json", "--method", "reap", "--ratio", 0.5), "x")


def test_bad_skip_layer_spec_is_refused(synthetic, tmp_path):
    error_line(run("plan", synthetic, "--out", tmp_path / "p.json", "--method", "reap", "--ratio", 0.5,
                              "--skip-layers", "3-1"), "--skip-layers")
    error_line(run("plan", synthetic, "--out", tmp_path / "p.json", "--method", "reap", "--ratio", 0.5,
                              "--skip-layers", "9"), str(synthetic))


def test_telemetry_of_another_model_is_refused_by_plan_model(fixture_model, tmp_path):
    fp32, fp16 = fixture_model("qwen3_moe", "fp32"), fixture_model("qwen3_moe", "fp16")
    assert run("init", "--out", tmp_path / "t", "--like", fp32, "--tokens", 128).exit_code == 0
    ok = run("plan", tmp_path / "t", "--out", tmp_path / "p.json", "--method", "reap", "--ratio", 0.5, "--model", fp32)
    assert ok.exit_code == 0, ok.output
    line = error_line(run("plan", tmp_path / "t", "--out", tmp_path / "q.json", "--method", "reap",
                                     "--ratio", 0.5, "--model", fp16), str(tmp_path / "t"))
    assert "collected on another model" in line
    assert Plan.load(tmp_path / "p.json").model["num_experts"] == 8
