"""apply on every MoE architecture gguf-py knows, with tensor roles derived from gguf-py's tables.

A synthetic GGUF per architecture holds the expert-axis tensors gguf-py lists for it (Q8_0 expert
stacks), its shared-expert and look-alike tensors, and an attention norm. A uniform plan is
applied; gguf-py's reader is the oracle: every tensor with an expert axis holds exactly the kept
experts' bytes, every other tensor is byte-identical, and the expert count is rewritten.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

import reap_stream.families.structure as structure
from reap_stream.errors import BadInput
from reap_stream.families.gguf_arch import Role, Roles, arch_expert_tensors, moe_archs
from reap_stream.families.model import open_model
from reap_stream.families.table import BY_GGUF_ARCH, Family, Routing
from reap_stream.io.gguf_write import verify
from reap_stream.surgery.verify import verify_output
from reap_stream.planning.plan import LayerPlan, Plan
from reap_stream.surgery.gguf import apply_gguf
from reap_stream.testing.gguf_synth import write_moe_gguf

# llama.cpp architectures gguf-py lists with expert tensors whose loader builds none (not MoE in
# llama.cpp): they have no family row
NOT_MOE_IN_LLAMA_CPP = {"deci", "llama-embed", "mistral3"}


@pytest.fixture
def rows(monkeypatch):
    """Every architecture resolvable: a stand-in row where the family table has none yet."""
    table = dict(BY_GGUF_ARCH)
    for arch in moe_archs():
        table.setdefault(arch, Family(f"stand-in {arch}", "num_experts", Routing.SOFTMAX_TOPK, gguf_arch=arch,
                                      mlx=False))
    monkeypatch.setattr(structure, "BY_GGUF_ARCH", table)


def plan_for(model, kept_ids: list[int]) -> Plan:
    st = model.structure
    layers = {L: LayerPlan(kept_ids, [e for e in range(n) if e not in kept_ids])
              for L, n in st.layer_experts.items() if L in st.prunable_layers}
    return Plan(layers, method="manual", ratio=0.25, model=model.model_block())


def tensors_of(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def raw(t) -> np.ndarray:
    return np.asarray(t.data)


def check_sliced(src: Path, out: Path, arch: str, kept: dict[int, list[int]]) -> int:
    roles = Roles(arch)
    a, b = tensors_of(src), tensors_of(out)
    assert list(a) == list(b)
    sliced = 0
    for name, ta in a.items():
        tb = b[name]
        parts = name.split(".", 2)
        layer = int(parts[1]) if parts[0] == "blk" else None
        role = roles.of(parts[2]) if layer in kept else None
        if role is None:
            assert raw(tb).tobytes() == raw(ta).tobytes(), name
            continue
        ids = sorted({e // 2 for e in kept[layer]}) if role is Role.CHUNK_EXPERTS else kept[layer]
        assert list(tb.shape) == list(ta.shape[:-1]) + [len(ids)], name
        assert raw(tb).tobytes() == raw(ta)[ids].tobytes(), name
        sliced += 1
    return sliced


def test_gguf_py_knows_45_moe_architectures_and_every_one_has_a_router_and_stacks():
    archs = moe_archs()
    assert len(archs) == 45 and {"qwen35moe", "minimax-m2", "glm-dsa", "llama4", "grovemoe"} <= set(archs)
    for arch in archs:
        roles = set(arch_expert_tensors(arch).values())
        assert Role.ROUTER in roles and Role.EXPERTS in roles, arch


def test_look_alikes_and_leaves_without_an_expert_axis_are_not_sliced():
    roles = Roles("arctic")
    assert roles.of("ffn_norm_exps.weight") is None          # Arctic's norm, named like a stack
    assert roles.of("ffn_gate_inp.scale") is None            # Gemma-4's router input scale
    assert roles.of("ffn_gate_inp_shexp.weight") is None     # the shared expert's gate
    assert roles.of("ffn_up_exps.input_scale") is Role.EXPERTS
    assert roles.of("exp_probs_b") is Role.SELECTION_BIAS    # spelled without ".bias" by some converters
    with pytest.raises(BadInput, match="refusing to guess"):
        roles.of("ffn_mystery_exps.weight")
    with pytest.raises(BadInput, match="refusing to guess"):
        roles.of("ffn_up_exps.zeros")


@pytest.mark.parametrize("arch", moe_archs())
def test_a_uniform_plan_recompacts_every_moe_architecture(arch, rows, tmp_path):
    src = write_moe_gguf(tmp_path / "src.gguf", arch)
    model = open_model(src)
    kept = [0, 1, 2, 3, 4, 5]                      # whole groups of two for grovemoe's chunk experts
    out = tmp_path / "out.gguf"
    summary = apply_gguf(model, plan_for(model, kept), out, overwrite=False, dry_run=False, progress=False)

    sliced = check_sliced(src, out, arch, {0: kept, 1: kept})
    per_layer = len(arch_expert_tensors(arch)) + 1   # + the generic per-expert .scale
    assert sliced == summary["tensors_sliced"] == 2 * per_layer
    fields = gguf.GGUFReader(out).fields
    assert fields[f"{arch}.expert_count"].contents() == 6
    assert summary["metadata_changed"] == [f"{arch}.expert_count"]
    assert verify(out).ok, verify(out).problems
    checked = verify_output(out)   # with the sidecar manifest's checksums
    assert checked["ok"] and checked["checksums"], checked["findings"]


def test_every_moe_architecture_has_a_row_or_is_not_moe_in_llama_cpp():
    """GGUF-only rows name the architectures no mlx_lm family covers; the families' own rows name
    the others."""
    missing = set(moe_archs()) - set(BY_GGUF_ARCH) - NOT_MOE_IN_LLAMA_CPP
    assert missing == set()
    assert not any(BY_GGUF_ARCH[a].mlx for a in NOT_MOE_IN_LLAMA_CPP & set(BY_GGUF_ARCH))


def test_nextn_blocks_are_cut_to_the_kept_count_with_the_last_layers_experts(rows, tmp_path):
    src = write_moe_gguf(tmp_path / "src.gguf", "glm4moe", layers=3, nextn=1)
    model = open_model(src)
    st = model.structure
    assert st.num_layers == 2 and st.frozen_layers == [2] and st.prunable_layers == [0, 1]
    plan = Plan({0: LayerPlan([0, 1, 2, 3, 4, 5], [6, 7]), 1: LayerPlan([1, 2, 3, 5, 6, 7], [0, 4])},
                method="manual", ratio=0.25, model=model.model_block())
    out = tmp_path / "out.gguf"
    summary = apply_gguf(model, plan, out, overwrite=False, dry_run=False, progress=False)
    assert summary["mtp_layers"] == {"2": "kept the experts of the last pruned layer"}
    assert check_sliced(src, out, "glm4moe", {0: [0, 1, 2, 3, 4, 5], 1: [1, 2, 3, 5, 6, 7],
                                               2: [1, 2, 3, 5, 6, 7]}) == 3 * 6
    assert gguf.GGUFReader(out).fields["glm4moe.expert_count"].contents() == 6
    # a plan from a form without the NextN block (mlx_lm drops it) matches the GGUF too
    plan.model = {**plan.model, **model.structure.decoder_only().to_json()}
    apply_gguf(model, plan, tmp_path / "again.gguf", overwrite=False, dry_run=False, progress=False)


def test_refusals_name_the_architecture_and_the_reason(rows, tmp_path):
    maverick = open_model(write_moe_gguf(tmp_path / "llama4.gguf", "llama4", experts=128))
    with pytest.raises(BadInput, match=r"llama4: cannot prune a 128-expert model: llama.cpp turns Llama-4's QK-norm"):
        apply_gguf(maverick, plan_for(maverick, list(range(64))), tmp_path / "o.gguf", overwrite=False,
                   dry_run=True)
    scout = open_model(write_moe_gguf(tmp_path / "scout.gguf", "llama4", experts=16))
    apply_gguf(scout, plan_for(scout, list(range(8))), tmp_path / "o.gguf", overwrite=False, dry_run=True)

    grove = open_model(write_moe_gguf(tmp_path / "grove.gguf", "grovemoe"))
    with pytest.raises(BadInput, match=r"grovemoe: layer 0 keeps part of expert group 2 \(experts 4..5\).*"
                                       r"only whole groups"):
        apply_gguf(grove, plan_for(grove, [0, 1, 2, 3, 4, 6]), tmp_path / "o.gguf", overwrite=False, dry_run=True)

    qwen = open_model(write_moe_gguf(tmp_path / "q.gguf", "qwen35moe"))
    plan = plan_for(qwen, [0, 1, 2, 3, 4, 5])
    plan.layers[1] = LayerPlan([0, 1, 2, 3], [4, 5, 6, 7])
    with pytest.raises(BadInput, match=r"plan keeps 4..6 experts in different layers; llama.cpp's 'qwen35moe' "
                                       r"loader reads one qwen35moe.expert_count"):
        apply_gguf(qwen, plan, tmp_path / "o.gguf", overwrite=False, dry_run=True)


def test_an_architecture_without_its_expert_tensors_is_refused(rows, tmp_path):
    path = write_moe_gguf(tmp_path / "no-experts.gguf", "minimax-m2", roles={})
    with pytest.raises(BadInput, match=r"no MoE expert tensors found for architecture 'minimax-m2' \(gguf-py "
                                       r"lists blk.N.ffn_gate_exps, blk.N.ffn_down_exps, blk.N.ffn_up_exps\)"):
        open_model(path)
