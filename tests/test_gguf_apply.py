"""GGUF recompaction: a plan applied to a GGUF file keeps exactly the planned experts.

The GGUF fixtures are converted from the MLX fixtures of the same family, so the plan made from the
MLX checkpoint (its structure and fingerprint) is the one applied to the GGUF. gguf-py's reader is
the independent oracle for every check on the output.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import blake3
import gguf
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T

from reap_stream.testing import synth
from reap_stream.families.model import open_model
from reap_stream.io.files import sha256_file
from reap_stream.io.gguf import is_gguf
from reap_stream.io.safetensors import Checkpoint, to_float32
from reap_stream.errors import BadInput
from reap_stream.surgery.gguf import POLICY_HASH_PRESERVED, POLICY_NONE, POLICY_ROUTER_MASK_PRUNED, apply_gguf
from reap_stream.testing.gguf_convert import HASH_LAYER, gguf_name
from reap_stream.io.gguf_write import verify
from reap_stream.planning.plan import LayerPlan, Plan

from conftest import FIXTURE_ROOT

# what the spec says must be sliced along the expert axis, per GGUF architecture
_SWIGLU = {"ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight"}
EXPERT_AXIS = {
    "qwen3moe": {"ffn_gate_inp.weight"} | _SWIGLU,
    "qwen2moe": {"ffn_gate_inp.weight"} | _SWIGLU,
    "llama": {"ffn_gate_inp.weight"} | _SWIGLU,
    "deepseek2": {"ffn_gate_inp.weight", "exp_probs_b.bias"} | _SWIGLU,
    "gpt-oss": {"ffn_gate_inp.weight", "ffn_gate_inp.bias"} | _SWIGLU
               | {"ffn_gate_exps.bias", "ffn_up_exps.bias", "ffn_down_exps.bias"},
    "deepseek4": {"ffn_gate_inp.weight", "exp_probs_b.bias", "ffn_gate_up_exps.weight",
                  "ffn_down_exps.weight", "ffn_down_exps.scale"},
}
GGUF_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "gpt_oss")
QTYPES = ("f32", "f16", "q8_0", "q4_0")


def mlx_dir(family: str) -> Path:
    return synth.cached_fixture(family, "fp32", FIXTURE_ROOT)


def pruned_ids(layer: int, n: int, n_group: int) -> list[int]:
    """Two experts per layer, different in every layer (one per group when grouped)."""
    if n_group > 1:
        size = n // n_group
        return [g * size + (layer + g) % size for g in range(n_group)]
    return sorted({(3 * layer) % n, (3 * layer + 5) % n})


def mlx_plan(family: str) -> Plan:
    """A uniform plan made from the MLX checkpoint, with its structure and fingerprint."""
    model = open_model(mlx_dir(family))
    st = model.structure
    layers = {}
    for L, n in st.layer_experts.items():
        pruned = pruned_ids(L, n, st.n_group)
        layers[L] = LayerPlan([e for e in range(n) if e not in pruned], pruned)
    return Plan(layers, method="manual", ratio=0.25, model=model.model_block())


def apply(src: Path, plan: Plan, out: Path, **options) -> dict:
    """apply_gguf on a GGUF path (resolved as the CLI resolves it)."""
    return apply_gguf(open_model(src), plan, out, **options)


def manual_plan(kept: dict[int, list[int]], n: int = 8, **model) -> Plan:
    return Plan({L: LayerPlan(sorted(k), sorted(set(range(n)) - set(k))) for L, k in kept.items()},
                model=model)


def tensors_of(path: Path) -> dict[str, object]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def fields_of(path: Path) -> dict[str, object]:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def dequant(t) -> np.ndarray:
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)


def check_recompacted(src: Path, out: Path, arch: str, kept: dict[int, list[int]]) -> int:
    """Every expert-axis tensor of a pruned layer holds exactly the kept experts (dequantised and
    as bytes); every other tensor is byte-identical. Returns how many tensors were sliced."""
    a, b = tensors_of(src), tensors_of(out)
    assert list(a) == list(b)
    sliced = 0
    for name, ts in a.items():
        to = b[name]
        assert to.tensor_type == ts.tensor_type, name
        parts = name.split(".", 2)
        layer = int(parts[1]) if parts[0] == "blk" else None
        if layer in kept and parts[2] in EXPERT_AXIS[arch] and len(kept[layer]) < ts.shape[-1]:
            k = kept[layer]
            assert list(to.shape) == list(ts.shape[:-1]) + [len(k)], name
            np.testing.assert_array_equal(dequant(to), dequant(ts)[k], err_msg=name)
            assert np.asarray(to.data).tobytes() == np.asarray(ts.data)[k].tobytes(), name
            sliced += 1
        else:
            assert list(to.shape) == list(ts.shape), name
            assert np.asarray(to.data).tobytes() == np.asarray(ts.data).tobytes(), name
    return sliced


# ---------------------------------------------------------------- uniform plans

@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_uniform_plan_from_the_mlx_form_recompacts_the_gguf(family, qtype, gguf_model, tmp_path):
    src = gguf_model(family, qtype)
    arch = open_model(src).gguf_arch
    plan = mlx_plan(family)
    out = tmp_path / "pruned.gguf"
    before = sha256_file(src)

    summary = apply(src, plan, out, overwrite=False, dry_run=False)

    kept = plan.kept_map()
    n_kept = len(next(iter(kept.values())))
    sliced = check_recompacted(src, out, arch, kept)
    assert sliced == summary["tensors_sliced"] == len(kept) * len(EXPERT_AXIS[arch])
    assert summary["layout"] == "uniform" and summary["experts_after"] == n_kept
    assert sha256_file(src) == before
    assert verify(out).ok, verify(out).problems
    fa, fb = fields_of(src), fields_of(out)
    assert list(fa) == list(fb)
    assert fb[f"{arch}.expert_count"] == n_kept
    assert {k: v for k, v in fa.items() if k != f"{arch}.expert_count"} == \
           {k: v for k, v in fb.items() if k != f"{arch}.expert_count"}
    assert gguf.GGUFReader(out).alignment == gguf.GGUFReader(src).alignment


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_kept_experts_equal_the_mlx_checkpoint_experts(family, gguf_model, tmp_path):
    """The two forms agree after pruning: GGUF expert tensors equal the MLX stacks at the kept ids."""
    plan = mlx_plan(family)
    out = tmp_path / "pruned.gguf"
    apply(gguf_model(family, "f32"), plan, out, overwrite=False, dry_run=False)
    ckpt = Checkpoint.open(mlx_dir(family))
    pruned_tensors = tensors_of(out)
    compared = 0
    for name, ref in ckpt.tensors.items():
        g = gguf_name(name, open_model(out).gguf_arch)
        layer = int(g.split(".")[1]) if g.startswith("blk.") else None
        if layer in plan.layers and g.split(".", 2)[2] in EXPERT_AXIS[open_model(out).gguf_arch]:
            np.testing.assert_array_equal(dequant(pruned_tensors[g]), to_float32(ref)[plan.layers[layer].kept])
            compared += 1
    assert compared == len(plan.layers) * len(EXPERT_AXIS[open_model(out).gguf_arch])


def test_output_is_deterministic_and_independent_of_the_buffer_size(gguf_model, tmp_path):
    src, plan = gguf_model("qwen3_moe", "q8_0"), mlx_plan("qwen3_moe")
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    apply(src, plan, a, overwrite=False, dry_run=False)
    apply(src, plan, b, overwrite=False, dry_run=False)
    apply(src, plan, c, overwrite=False, dry_run=False, buffer_bytes=4096)
    assert a.read_bytes() == b.read_bytes() == c.read_bytes()


def test_dry_run_plans_everything_and_writes_nothing(gguf_model, tmp_path):
    src, out = gguf_model("mixtral", "q4_0"), tmp_path / "pruned.gguf"
    dry = apply(src, mlx_plan("mixtral"), out, overwrite=False, dry_run=True)
    assert list(tmp_path.iterdir()) == []
    real = apply(src, mlx_plan("mixtral"), out, overwrite=False, dry_run=False)
    assert dry["bytes_out"] == real["bytes_out"] == out.stat().st_size
    written = {k: real.pop(k) for k in ("dry_run", "files")}
    # the sidecar manifest's hash: BLAKE3 by default, sha256 on request
    assert written["files"] == {"pruned.gguf": {"blake3": blake3.blake3(out.read_bytes()).hexdigest(),
                                                "size": out.stat().st_size}}
    assert {k: v for k, v in dry.items() if k != "dry_run"} == real
    again = apply(src, mlx_plan("mixtral"), out, overwrite=True, dry_run=False, manifest_hash="sha256")
    assert again["files"] == {"pruned.gguf": {"sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
                                              "size": out.stat().st_size}}


def test_a_layer_the_plan_does_not_list_keeps_all_experts(gguf_model, tmp_path):
    """Uniform means uniform over every MoE layer: pruning every layer by the same count works,
    and the count written is the kept count."""
    src = gguf_model("qwen3_moe", "f16")
    kept = {L: [0, 2, 3, 4, 6, 7] for L in range(4)}
    out = tmp_path / "o.gguf"
    apply(src, manual_plan(kept), out, overwrite=False, dry_run=False)
    assert fields_of(out)["qwen3moe.expert_count"] == 6
    assert check_recompacted(src, out, "qwen3moe", kept) == 16


def test_split_gguf_is_recompacted_part_by_part(gguf_model, tmp_path):
    src = gguf_model("qwen3_moe", "q8_0", split=20)
    assert src.name == "model-00001-of-00003.gguf"
    plan = mlx_plan("qwen3_moe")
    summary = apply(src, plan, tmp_path / "pruned.gguf", overwrite=False, dry_run=False)
    outs = [tmp_path / f"pruned-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert summary["out"] == [str(p) for p in outs]
    assert sorted(tmp_path.iterdir()) == sorted(outs + [tmp_path / "pruned-00001-of-00003.gguf.reap.json"])
    sliced = 0
    for i, out in enumerate(outs):
        part = src.with_name(f"model-0000{i + 1}-of-00003.gguf")
        assert verify(out).ok
        sliced += check_recompacted(part, out, "qwen3moe", plan.kept_map())
        fa, fb = fields_of(part), fields_of(out)
        assert fb["split.no"] == i and fb["split.count"] == 3 and fb["split.tensors.count"] == fa["split.tensors.count"]
    assert sliced == 16
    assert fields_of(outs[0])["qwen3moe.expert_count"] == 6


@pytest.mark.parametrize("qtype", [T.BF16, T.Q5_1, T.Q4_K, T.Q6_K, T.IQ4_XS, T.MXFP4], ids=lambda t: t.name)
def test_every_ggml_type_slices_as_whole_experts(qtype, tmp_path):
    """Experts are contiguous byte ranges for any block type (256-element K-quant blocks included)."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    src = tmp_path / "src.gguf"
    w = gguf.GGUFWriter(src, "qwen3moe")
    for key, v in (("block_count", 1), ("expert_count", 4), ("expert_used_count", 2)):
        w.add_uint32(f"qwen3moe.{key}", v)
    w.add_tensor("token_embd.weight", rng.standard_normal((8, 256)).astype(np.float32))
    w.add_tensor("blk.0.ffn_gate_inp.weight", rng.standard_normal((4, 256)).astype(np.float32))
    for proj, rows in (("gate", 3), ("up", 3), ("down", 2)):
        raw = rng.integers(0, 256, size=(4, rows, 256 // block * type_size), dtype=np.uint8)
        w.add_tensor(f"blk.0.ffn_{proj}_exps.weight", raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "out.gguf"
    apply(src, manual_plan({0: [0, 2, 3]}, n=4), out, overwrite=False, dry_run=False)
    a, b = tensors_of(src), tensors_of(out)
    for name in ("blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight", "blk.0.ffn_down_exps.weight"):
        with np.errstate(all="ignore"):  # random blocks decode to some inf/nan; equal positions still
            np.testing.assert_array_equal(dequant(b[name]), dequant(a[name])[[0, 2, 3]])
    assert verify(out).ok


# ---------------------------------------------------------------- deepseek4 / ds4-compact-v1

def test_deepseek4_non_uniform_plan_writes_ds4_compact_v1(gguf_model, tmp_path):
    src = gguf_model("deepseek4", "q8_0")
    kept = {2: [0, 1, 2, 4, 5, 7], 3: [1, 3, 4, 6]}   # groups of 4: 3+3 and 2+2 kept
    out = tmp_path / "ds4.gguf"
    summary = apply(src, manual_plan(kept, model_type="deepseek_v4"), out, overwrite=False, dry_run=False)

    assert summary["layout"] == "ds4-compact-v1"
    assert check_recompacted(src, out, "deepseek4", kept) == 2 * len(EXPERT_AXIS["deepseek4"])
    fb = fields_of(out)
    assert fb["deepseek4.expert_count"] == 8
    assert fb["reap.enabled"] is True and fb["reap.layout"] == "ds4-compact-v1"
    assert fb["reap.layer.policy"] == [POLICY_NONE, POLICY_HASH_PRESERVED, POLICY_ROUTER_MASK_PRUNED,
                                       POLICY_ROUTER_MASK_PRUNED]
    assert fb["reap.layer.expert_count"] == [0, 8, 8, 8]
    assert fb["reap.layer.keep_count"] == [0, 8, 6, 4]
    fa = fields_of(src)
    assert list(fb)[: len(fa)] == list(fa) and all(fb[k] == fa[k] for k in fa)
    a, b = tensors_of(src), tensors_of(out)
    untouched = [n for n in a if n.startswith(("mtp.", f"blk.{HASH_LAYER}."))]
    assert f"blk.{HASH_LAYER}.ffn_gate_tid2eid.weight" in untouched and any(n.startswith("mtp.0.ffn_") for n in untouched)
    for n in untouched:
        assert np.asarray(b[n].data).tobytes() == np.asarray(a[n].data).tobytes()
    assert verify(out).ok


def test_deepseek4_hash_layer_and_recompacted_input_are_refused(gguf_model, tmp_path):
    src = gguf_model("deepseek4", "f32")
    with pytest.raises(BadInput, match=f"layer {HASH_LAYER} routes by a fixed table"):
        apply(src, manual_plan({HASH_LAYER: [0, 1, 2, 3, 4, 5]}), tmp_path / "x.gguf",
                   overwrite=False, dry_run=False)
    out = tmp_path / "ds4.gguf"
    apply(src, manual_plan({2: [0, 1, 2, 4, 5, 7]}), out, overwrite=False, dry_run=False)
    with pytest.raises(BadInput, match="already recompacted") as e:
        apply(out, manual_plan({3: [0, 1, 2, 4, 5, 7]}), tmp_path / "again.gguf", overwrite=False, dry_run=False)
    assert e.value.where == str(out)


# ---------------------------------------------------------------- safety

def test_a_failed_write_leaves_no_output_and_no_partial_file(gguf_model, tmp_path, monkeypatch):
    src = gguf_model("qwen3_moe", "f32", split=20)
    import reap_stream.surgery.gguf as ga

    calls = []

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(ga.os, "fsync", failing_fsync)
    with pytest.raises(BadInput, match="cannot write the output: no space left on device"):
        apply(src, mlx_plan("qwen3_moe"), tmp_path / "o.gguf", overwrite=False, dry_run=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(gguf_model, tmp_path):
    src, out = gguf_model("qwen3_moe", "f32"), tmp_path / "o.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(BadInput, match="pass --overwrite") as e:
        apply(src, mlx_plan("qwen3_moe"), out, overwrite=False, dry_run=False)
    assert e.value.where == str(out) and out.read_bytes() == b"keep me"
    apply(src, mlx_plan("qwen3_moe"), out, overwrite=True, dry_run=False)
    assert verify(out).ok
    with pytest.raises(BadInput, match="overwrite the source"):
        apply(out, manual_plan({0: list(range(6))}, n=6), out, overwrite=True, dry_run=False)


def test_verify_flags_a_gap_between_tensors(gguf_model, tmp_path):
    """The llama.cpp rule our reader alone does not enforce: offsets consecutive in info order."""
    import struct

    bad = tmp_path / "gap.gguf"
    raw = bytearray(gguf_model("mixtral", "f32").read_bytes())
    last = tensors_of(gguf_model("mixtral", "f32"))["output_norm.weight"]
    name = struct.pack("<Q", len(last.name)) + last.name.encode()
    at = raw.index(name) + len(name) + 4 + 8 * len(last.shape) + 4
    struct.pack_into("<Q", raw, at, struct.unpack_from("<Q", raw, at)[0] + 32)
    bad.write_bytes(bytes(raw) + bytes(32))
    problems = verify(bad).problems
    assert len(problems) == 1 and "'output_norm.weight'" in problems[0] and "llama.cpp expects" in problems[0]


def test_is_gguf_reads_the_magic(gguf_model, tmp_path):
    assert is_gguf(gguf_model("qwen3_moe"))
    (tmp_path / "x.gguf").write_bytes(b"GGML0000")
    assert not is_gguf(tmp_path / "x.gguf")
    assert not is_gguf(tmp_path)
    assert not is_gguf(tmp_path / "missing.gguf")


def test_plan_errors_name_the_plan_file(gguf_model, tmp_path):
    plan = mlx_plan("qwen3_moe")
    plan.model["num_layers"] = 6
    with pytest.raises(BadInput) as e:
        apply(gguf_model("qwen3_moe"), plan, tmp_path / "o.gguf", overwrite=False, dry_run=False,
                   plan_where=tmp_path / "plan.json")
    assert e.value.where == str(tmp_path / "plan.json")
    assert "plan is for 6 layers; model.gguf has qwen3moe.block_count=4" in e.value.what


@pytest.mark.parametrize("progress", [True, False])
def test_the_byte_bar_shows_only_when_progress_is_on(gguf_model, tmp_path, capsys, monkeypatch, progress):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)   # a terminal, where bars are drawn
    apply(gguf_model("qwen3_moe"), mlx_plan("qwen3_moe"), tmp_path / "o.gguf", overwrite=False,
               dry_run=False, progress=progress)
    assert ("apply " in capsys.readouterr().err) is progress


def test_parameters_without_a_suffix_get_llama_cpps_names():
    """A suffixless mlx_lm parameter is stored as ".weight" (gpt-oss's sinks), except a selection
    bias, which llama.cpp loads as "exp_probs_b.bias" (AFMoE's expert_bias)."""
    assert gguf_name("model.layers.1.mlp.expert_bias", "afmoe") == "blk.1.exp_probs_b.bias"
    assert gguf_name("model.layers.0.self_attn.sinks", "gpt-oss") == "blk.0.attn_sinks.weight"
