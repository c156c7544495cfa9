"""The family table: one row per family says everything the code needs, and every view of it is
derived. Each row is checked against the mlx_lm model class it describes."""
from __future__ import annotations

import json
import shutil

import pytest

from cli_helpers import error_line, run
from reap_stream.errors import BadInput
from reap_stream.families.model import open_model
from reap_stream.families.table import (BY_GGUF_ARCH, FAMILIES, FAMILY_ROWS, LAYER_RULES, MODEL_TYPES, Routing, attr,
                                        classify, dense_layers, family_of, frozen_layers)
from reap_stream.testing import synth
from test_apply import make_plan


def test_views_are_derived_from_the_rows():
    assert set(FAMILIES) == {f.model_type for f in FAMILY_ROWS if f.mlx and not f.refused}
    assert len({f.model_type for f in FAMILY_ROWS}) == len(FAMILY_ROWS)
    names = [n for f in FAMILY_ROWS if f.mlx for n in (f.model_type, *f.aliases) if ":" not in n]
    assert len(names) == len(set(names)) and set(MODEL_TYPES) == set(names)
    archs = [f.gguf_arch for f in FAMILY_ROWS if f.gguf_arch]
    assert len(set(archs)) == len(archs) and set(BY_GGUF_ARCH) == set(archs)
    assert all(BY_GGUF_ARCH[f.gguf_arch] is f for f in FAMILY_ROWS if f.gguf_arch)
    assert synth.FAMILIES == tuple(FAMILIES)


def test_every_rule_a_row_names_exists():
    for f in FAMILY_ROWS:
        assert set(f.dense) | set(f.frozen) <= set(LAYER_RULES), f.model_type
        assert f.top_k in ("low", "high") and isinstance(f.routing, Routing)


def test_the_mask_rule_follows_the_route():
    """-inf selection bias where the route selects with a bias (and -inf logits too when the scores
    are a softmax), -inf logits on a router Linear, an extra input column on a raw gate weight."""
    from reap_stream.families.masking import mask_rules, moe_blocks

    want = {"qwen3_moe": ("logits",), "mixtral": ("logits",), "deepseek_v3": ("selection_bias",),
            "minimax": ("selection_bias",), "longcat_flash": ("selection_bias", "logits"),
            "deepseek": ("input_column",), "llama4": ("logits",)}
    for family, rules in want.items():
        model = _tiny_model(family)
        fam = FAMILIES[family]
        assert {mask_rules(b, fam) for b in moe_blocks(model, fam).values()} == {rules}, family
    assert {r: r.mask_rule for r in Routing if r in (Routing.SOFTMAX_TOPK, Routing.TOPK_SOFTMAX, Routing.SIGMOID_GROUP)} \
        == {Routing.SOFTMAX_TOPK: "logits", Routing.TOPK_SOFTMAX: "logits", Routing.SIGMOID_GROUP: "selection_bias"}


def _tiny_model(family: str):
    import mlx.core as mx  # noqa: F401  (conftest loaded the BLAS first)
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(synth.tiny_config(family))
    return model_class(args_class.from_dict(synth.tiny_config(family)))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_row_names_the_modules_of_its_mlx_lm_class(family):
    """Block, router, expert stack and every routing parameter the row reads exist in every MoE
    layer of the tiny model; dense layers (by the row's rules, where it has some) have none, and
    the shared expert (and its gate) are where the row says."""
    from reap_stream.families.routing import param

    fam = FAMILIES[family]
    cfg = synth.tiny_config(family)
    model = _tiny_model(family)
    dense = dense_layers(cfg, fam)
    moe = 0
    for i, layer in enumerate(model.layers):
        block = getattr(layer, fam.block, None) if fam.block else layer  # "": the decoder layer itself
        is_moe = block is not None and attr(block, fam.router, None) is not None \
            and attr(block, fam.stacked, None) is not None
        moe += is_moe
        if fam.dense:
            assert is_moe == (i not in dense), (family, i)
        if is_moe and fam.shared:
            assert hasattr(block, fam.shared) and (fam.shared_gate is None or hasattr(block, fam.shared_gate))
        if is_moe:
            for name in ("score", "n_group", "topk_group", "renorm_if", "scale"):
                param(block, getattr(fam.route, name))  # raises naming the attribute when it is absent
    assert moe >= 2


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_rows_tensor_names_find_every_router_and_expert_stack(family, fixture_model):
    model = open_model(fixture_model(family))
    relations = [classify(n, model.family) for n in model.checkpoint.tensors]
    routers = {r.layer for r in relations if r and r.kind == "router"}
    stacks = {r.layer for r in relations if r and r.kind in ("stacked", "per_expert")}  # DBRX: a list
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
    with pytest.raises(BadInput, match="unsupported model_type 'qwen9_moe'; supported: afmoe, bailing_hybrid"):
        open_model(model)


def test_aliases_resolve_to_the_row_mlx_lm_loads_them_as():
    """mlx_lm.utils.MODEL_REMAPPING / MODEL_ARCHITECTURE_REMAPPING, as rows: every alias whose
    target is a family is that family's row, and every alias a row lists is one mlx_lm makes."""
    from mlx_lm.utils import MODEL_ARCHITECTURE_REMAPPING, MODEL_REMAPPING

    for alias, target in MODEL_REMAPPING.items():
        if target in MODEL_TYPES:
            assert MODEL_TYPES.get(alias) is MODEL_TYPES[target], alias
    for (model_type, arch), target in MODEL_ARCHITECTURE_REMAPPING.items():
        assert family_of({"model_type": model_type, "architectures": [arch]}) is FAMILIES[target]
    for f in FAMILY_ROWS:
        for alias in f.aliases:
            if ":" in alias:
                assert MODEL_ARCHITECTURE_REMAPPING[tuple(alias.split(":"))] == f.model_type
            else:
                assert MODEL_REMAPPING[alias] == f.model_type
    assert family_of({"model_type": "bailing_hybrid", "architectures": ["BailingHybridForCausalLM"]}) \
        is FAMILIES["bailing_hybrid"]


@pytest.mark.parametrize("model_type", ["deepseek_v41", "deepseek_v41_text", "muse_spark", "prism_hadamard_qwen35"])
def test_a_family_that_cannot_be_pruned_exactly_is_refused_with_its_reason(model_type):
    with pytest.raises(BadInput, match=f"model_type '{model_type}' .* cannot be pruned exactly: .+") as e:
        family_of({"model_type": model_type})
    assert "\n" not in str(e.value)
