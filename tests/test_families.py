"""The family table: one row per family says everything the code needs, and every view of it is
derived. Each row is checked against the mlx_lm model class it describes."""
from __future__ import annotations

import importlib
import json
import shutil

import pytest

from cli_helpers import error_line, run
from reap_stream.errors import BadInput
from reap_stream.families.model import open_model
from reap_stream.families.table import (BY_GGUF_ARCH, FAMILIES, FAMILY_ROWS, LAYER_RULES, Routing, classify,
                                        dense_layers, frozen_layers)
from reap_stream.testing import synth
from test_apply import make_plan


def test_views_are_derived_from_the_rows():
    assert set(FAMILIES) == {f.model_type for f in FAMILY_ROWS if f.mlx}
    assert len({f.model_type for f in FAMILY_ROWS}) == len(FAMILY_ROWS)
    archs = [f.gguf_arch for f in FAMILY_ROWS if f.gguf_arch]
    assert len(set(archs)) == len(archs) and set(BY_GGUF_ARCH) == set(archs)
    assert all(BY_GGUF_ARCH[f.gguf_arch] is f for f in FAMILY_ROWS if f.gguf_arch)
    assert synth.FAMILIES == tuple(FAMILIES)


def test_every_rule_a_row_names_exists():
    for f in FAMILY_ROWS:
        assert set(f.dense) | set(f.frozen) <= set(LAYER_RULES), f.model_type
        assert f.top_k in ("low", "high") and isinstance(f.routing, Routing)


def test_the_mask_rule_follows_the_routing_kind():
    assert {r: r.mask_rule for r in Routing} == {Routing.SOFTMAX_TOPK: "logits", Routing.TOPK_SOFTMAX: "logits",
                                                  Routing.SIGMOID_GROUP: "selection_bias"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_row_names_the_modules_of_its_mlx_lm_class(family):
    """Block, router and expert stack exist in every MoE layer of the tiny model; dense layers
    (by the row's rules) have none, and the shared expert (and its gate) are where the row says."""
    import mlx.core as mx  # noqa: F401  (conftest loaded the BLAS first)

    fam = FAMILIES[family]
    cfg = synth.tiny_config(family)
    module = importlib.import_module(f"mlx_lm.models.{family}")
    model = module.Model(module.ModelArgs.from_dict(cfg))
    dense = dense_layers(cfg, fam)
    for i, layer in enumerate(model.layers):
        block = getattr(layer, fam.block, None)
        is_moe = block is not None and hasattr(block, fam.router) and hasattr(block, fam.stacked)
        assert is_moe == (i not in dense), (family, i)
        if is_moe and fam.shared:
            assert hasattr(block, fam.shared) and (fam.shared_gate is None or hasattr(block, fam.shared_gate))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_rows_tensor_names_find_every_router_and_expert_stack(family, fixture_model):
    model = open_model(fixture_model(family))
    relations = [classify(n, model.family) for n in model.checkpoint.tensors]
    routers = {r.layer for r in relations if r and r.kind == "router"}
    stacks = {r.layer for r in relations if r and r.kind == "stacked"}
    assert routers == stacks == set(model.structure.moe_layers) and routers


def test_layer_rules_read_the_config():
    ds3 = FAMILIES["deepseek_v3"]
    assert dense_layers({"first_k_dense_replace": 2}, ds3) == [0, 1]
    assert frozen_layers({"num_hidden_layers": 3, "num_nextn_predict_layers": 1}, ds3) == [3]
    ds4 = next(f for f in FAMILY_ROWS if f.model_type == "deepseek_v4")
    config = {"num_hidden_layers": 3, "num_nextn_predict_layers": 1, "mlp_layer_types": ["hash_moe", "moe", "moe"]}
    assert frozen_layers(config, ds4) == [0, 3]
    assert dense_layers({"mlp_only_layers": [5]}, FAMILIES["qwen3_moe"]) == [5]
    with pytest.raises(BadInput, match="first_k_dense_replace 'x' does not name layers"):
        dense_layers({"first_k_dense_replace": "x"}, ds3)


def test_a_config_calling_a_layer_with_a_router_dense_is_refused(fixture_model, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(fixture_model("deepseek_v3"), model)
    cfg = json.loads((model / "config.json").read_text())
    make_plan(model, n_prune=2).save(tmp_path / "plan.json")
    (model / "config.json").write_text(json.dumps({**cfg, "first_k_dense_replace": 2}))
    result = run("apply", model, tmp_path / "plan.json", "--out", tmp_path / "out")
    error_line(result, "first_k_dense_replace makes layer 1 dense, but the checkpoint holds a router for it",
               where=str(model / "config.json"))


def test_an_unknown_model_type_names_the_supported_ones(fixture_model, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(fixture_model("qwen3_moe"), model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen9_moe"}))
    with pytest.raises(BadInput, match="unsupported model_type 'qwen9_moe'; supported: deepseek_v3, glm4_moe"):
        open_model(model)
