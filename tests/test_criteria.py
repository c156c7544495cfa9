"""Each saliency criterion against values worked out by hand on a three-expert layer."""
from __future__ import annotations

import math

import numpy as np
import pytest

from reap_stream.planning.criteria import METHODS, NEEDS, lacks, scores
from reap_stream.telemetry.store import LayerStats, TelemetryStore


def hand_layer() -> LayerStats:
    """Expert 0: routed twice, gates 0.5 and 0.25, outputs [3, 4] and [0, 2].
    Expert 1: routed once, gate 1.0, output [-1, 0].  Expert 2: never routed."""
    st = LayerStats.zeros(layer=0, num_experts=3, hidden=2)
    st.tokens = 3
    st.frequency[:] = [2, 1, 0]
    st.weighted_frequency_sum[:] = [0.5 + 0.25, 1.0, 0]
    st.ean_sum[:] = [5.0 + 2.0, 1.0, 0]                 # ||[3,4]|| = 5, ||[0,2]|| = 2
    st.weighted_ean_sum[:] = [0.5 * 5 + 0.25 * 2, 1.0 * 1.0, 0]
    st.expert_output_sum[:] = [[3 + 0, 4 + 2], [-1, 0], [0, 0]]
    st.max_activations[:] = [4.0, 0.0, -np.inf]
    st.coactivation[:] = [[2, 1, 0], [1, 1, 0], [0, 0, 0]]
    return st


EXPECTED = {
    "frequency": [2, 1, 0],
    "weighted_frequency_sum": [0.75, 1.0, 0],
    "ean_sum": [7.0, 1.0, 0],
    "ean_mean": [3.5, 1.0, 0],                 # never routed: 0, not 0/0
    "weighted_ean_sum": [3.0, 1.0, 0],
    "reap": [1.5, 1.0, 0],                     # mean of g*n over routed tokens
    "ean_ca": [math.hypot(1.5, 3.0), 1.0, 0],  # || mean output ||: ||[1.5, 3]||, ||[-1, 0]||
    "max_activations": [4.0, 0.0, -np.inf],
}


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_criterion_matches_hand_computed_values(method):
    got = scores(method, hand_layer())
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, EXPECTED[method], rtol=1e-12)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "max_activations"])
def test_never_routed_expert_scores_finite_zero_or_random(method):
    got = scores(method, hand_layer())
    assert np.isfinite(got).all()
    if method != "random":
        assert got[2] == 0.0


def test_random_baseline_is_seeded_per_layer():
    st = hand_layer()
    a, b = scores("random", st, seed=7), scores("random", st, seed=7)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, scores("random", st, seed=8))
    other_layer = hand_layer()
    other_layer.layer = 1
    assert not np.array_equal(a, scores("random", other_layer, seed=7))


def test_every_method_declares_the_arrays_it_reads():
    assert set(NEEDS) == set(METHODS)
    for arrays in NEEDS.values():
        assert set(arrays) <= set(LayerStats.ARRAYS)


def test_ean_ca_is_refused_without_output_sums():
    st = hand_layer()
    st.expert_output_sum = np.zeros((3, 0))
    assert "expert_output_sum" in lacks("ean_ca", st)
    assert lacks("reap", st) is None


def test_max_activations_is_refused_when_never_recorded():
    st = hand_layer()
    st.max_activations[:] = -np.inf
    assert "max_activations" in lacks("max_activations", st)
    assert lacks("frequency", st) is None


def test_scores_survive_a_store_round_trip(tmp_path):
    store = TelemetryStore.create(tmp_path / "t.zarr", {"model": {}})
    store.commit(hand_layer())
    read = store.read(0)
    for method, want in EXPECTED.items():
        np.testing.assert_allclose(scores(method, read), want, rtol=1e-12)
