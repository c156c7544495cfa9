"""mask_experts(original) computes exactly what the physically pruned model computes: experts
removed from the stacked tensors, router rows sliced, counts updated."""

from __future__ import annotations

import numpy as np
import pytest

from reap_stream.families import masking; from reap_stream.testing import synth

# Layer -> pruned ids. Sigmoid/group families drop the same count from every group of 4.
PRUNED = {
    "qwen3_moe": {0: [1, 6], 1: [0, 3, 7], 2: [5], 3: [2, 4]},
    "qwen2_moe": {0: [1, 6], 2: [0, 3], 3: [7]},
    "olmoe": {1: [2, 5], 3: [0, 1, 6]},
    "mixtral": {0: [0, 7], 1: [3], 2: [1, 4, 6], 3: [5]},
    "gpt_oss": {0: [2, 3], 1: [6], 3: [0, 4]},
    "deepseek_v3": {1: [1, 6], 2: [0, 5], 3: [3, 4]},
    "glm4_moe": {1: [2, 7], 2: [0, 4], 3: [3, 5]},
}


def _load(path):
    from mlx_lm.utils import load_model

    return load_model(path)


def physically_prune(model, config: dict, pruned: dict[int, list[int]]) -> None:
    """Remove experts in place the way a pruned checkpoint has them; the forward reads
    the expert count from the tensor shapes, so per-layer counts may differ here."""
    import mlx.core as mx
    from mlx.utils import tree_map

    spec = masking.moe_spec(model)
    n = config[spec.experts_key]
    for layer, block in masking.moe_blocks(model).items():
        keep = mx.array([e for e in range(n) if e not in pruned.get(layer, [])])
        for module in (getattr(block, spec.stacked), getattr(block, spec.router)):
            module.update(tree_map(lambda a: a[keep], module.parameters()))
        if hasattr(block, "num_experts"):
            block.num_experts = keep.size
    counts = {len(ids) for ids in pruned.values()}
    if len(counts) == 1 and set(pruned) == set(masking.moe_blocks(model)):
        setattr(model.args, spec.experts_key, n - counts.pop())  # what a uniform checkpoint says


def _compare(path, pruned, ids, configure=None):
    import mlx.core as mx

    masked, config = _load(path)
    reference, _ = _load(path)
    if configure:
        configure(masked), configure(reference)
    masking.mask_experts(masked, pruned)
    physically_prune(reference, config, pruned)
    x = mx.array(ids)[None]
    a = np.array(masked(x)[0].astype(mx.float32))
    b = np.array(reference(x)[0].astype(mx.float32))
    counts = masking.routing_counts(masked, ids)
    for layer, ids_ in pruned.items():
        assert counts[layer][ids_].sum() == 0, f"layer {layer}: a pruned expert was routed"
    return np.abs(a - b).max()


def _ids(path, text, n=128):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(path).encode(text)[:n]


@pytest.mark.parametrize("family", synth.FIRST_FAMILIES)
def test_masked_equals_pruned(family, fixture_model, calib_text):
    path = fixture_model(family)
    pruned = PRUNED[family]
    assert _compare(path, pruned, _ids(path, calib_text())) <= 1e-5


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_masked_equals_pruned_with_and_without_renorm(norm_topk_prob, fixture_model, calib_text):
    def configure(model):
        for block in masking.moe_blocks(model).values():
            block.norm_topk_prob = norm_topk_prob

    path = fixture_model("qwen3_moe")
    assert _compare(path, PRUNED["qwen3_moe"], _ids(path, calib_text()), configure) <= 1e-5


@pytest.mark.parametrize("family", synth.QUANTIZED_FAMILIES)
def test_masked_equals_pruned_quantized(family, fixture_model, calib_text):
    path = fixture_model(family, "q4")
    assert _compare(path, PRUNED[family], _ids(path, calib_text(), 64)) <= 1e-5


def test_masking_changes_the_output(fixture_model, calib_text):
    import mlx.core as mx

    path = fixture_model("deepseek_v3")
    ids = _ids(path, calib_text(), 32)
    model, _ = _load(path)
    before = np.array(model(mx.array(ids)[None]))
    masking.mask_experts(model, PRUNED["deepseek_v3"])
    after = np.array(model(mx.array(ids)[None]))
    assert np.abs(before - after).max() > 1e-3
    np.testing.assert_array_equal(after[0], masking.masked_logits(path, PRUNED["deepseek_v3"], ids))


def test_mask_rejects_bad_plans(fixture_model):
    model, _ = _load(fixture_model("deepseek_v3"))
    with pytest.raises(ValueError, match="no MoE block"):
        masking.mask_experts(model, {0: [1]})  # layer 0 is dense
    with pytest.raises(ValueError, match="expert ids"):
        masking.mask_experts(model, {1: [8]})
    with pytest.raises(ValueError, match="top_k"):
        masking.mask_experts(model, {1: list(range(7))})


def test_masked_logits_of_bf16_checkpoint_upcast(fixture_model, calib_text):
    path = fixture_model("glm4_moe", "bf16")
    ids = _ids(path, calib_text(), 16)
    a = masking.masked_logits(path, PRUNED["glm4_moe"], ids, float32=True)
    b = masking.masked_logits(fixture_model("glm4_moe"), PRUNED["glm4_moe"], ids)
    assert a.dtype == np.float32 and a.shape == b.shape
    assert np.abs(a - b).max() < 0.5  # same weights up to bf16 rounding


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3"])
def test_router_experts_reads_the_expert_count_from_the_router(family, fixture_model):
    model, config = _load(fixture_model(family))
    spec = masking.moe_spec(model)
    want = config[spec.experts_key]
    assert {layer: masking.router_experts(block, spec) for layer, block in masking.moe_blocks(model).items()} \
        == dict.fromkeys(masking.moe_blocks(model), want)
