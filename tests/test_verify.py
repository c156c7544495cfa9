"""`verify`: a pruned output passes whole, and every kind of damage is caught and named (exit 1)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from reap_stream.surgery.verify import MANIFEST_NAME, verify_output
from cli_helpers import error_line, run


def prune(model: Path, root: Path, name: str = "out") -> Path:
    """init --like MODEL -> plan -> apply: a real pruned output directory."""
    tele, plan, out = root / f"{name}.zarr", root / f"{name}.json", root / name
    for args in (("init", "--out", tele, "--like", model, "--tokens", 128),
                 ("plan", tele, "--out", plan, "--method", "reap", "--ratio", 0.5, "--model", model),
                 ("apply", model, plan, "--out", out, "--quiet")):
        r = run(*args)
        assert r.exit_code == 0, (args[0], r.output)
    return out


@pytest.fixture(scope="module")
def pruned(fixture_model, tmp_path_factory) -> Path:
    return prune(fixture_model("qwen3_moe", "fp32"), tmp_path_factory.mktemp("verify"))


@pytest.fixture
def copy(pruned, tmp_path) -> Path:
    dst = tmp_path / "out"
    shutil.copytree(pruned, dst)
    return dst


def rehash(out: Path, name: str) -> None:
    """Update one manifest entry, so only the check under test can object."""
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    raw = (out / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def failures(result) -> list[str]:
    assert result.exit_code == 1, result.output
    return [line for line in result.output.splitlines() if line.strip()]


def test_a_fresh_output_verifies(pruned):
    r = run("verify", pruned, "--quiet")
    assert r.exit_code == 0, r.output
    assert "OK" in r.output
    result = json.loads(run("verify", pruned, "--json").output)
    assert result["ok"] and result["findings"] == [] and result["files_checked"] >= 4


@pytest.mark.parametrize("family,variant", [("qwen3_moe", "hf"), ("deepseek_v3", "q4")])
def test_other_layouts_verify(fixture_model, tmp_path, family, variant):
    out = prune(fixture_model(family, variant), tmp_path)
    assert verify_output(out)["ok"]


def flip_a_byte(out: Path) -> None:
    shard = out / "model.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-100] ^= 0x01
    shard.write_bytes(bytes(raw))


def test_a_flipped_byte_is_caught(copy):
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    assert manifest["hash"] == "blake3" and "sha256" not in manifest["files"]["model.safetensors"]   # the default
    flip_a_byte(copy)
    lines = failures(run("verify", copy, "--quiet"))
    assert lines == [f"{copy}/model.safetensors: checksum: blake3 differs from the manifest "
                     f"({manifest['files']['model.safetensors']['blake3'][:12]}…)"]


def test_a_sha256_manifest_is_written_on_request_and_verified(fixture_model, tmp_path):
    model = fixture_model("qwen3_moe", "fp32")
    tele, plan, out = tmp_path / "t.zarr", tmp_path / "p.json", tmp_path / "out"
    assert run("init", "--out", tele, "--like", model, "--tokens", 128).exit_code == 0
    assert run("plan", tele, "--out", plan, "--method", "reap", "--ratio", 0.5, "--model", model).exit_code == 0
    r = run("apply", model, plan, "--out", out, "--quiet", "--manifest-hash", "sha256")
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    entry = manifest["files"]["model.safetensors"]
    assert manifest["hash"] == "sha256" and "blake3" not in entry
    assert entry["sha256"] == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert verify_output(out)["ok"]
    flip_a_byte(out)
    assert failures(run("verify", out, "--quiet")) == [
        f"{out}/model.safetensors: checksum: sha256 differs from the manifest ({entry['sha256'][:12]}…)"]


def test_an_unknown_manifest_hash_is_refused(pruned, fixture_model, tmp_path):
    r = run("apply", fixture_model("qwen3_moe", "fp32"), pruned / "reap_plan.json", "--out", tmp_path / "o",
            "--manifest-hash", "md5")
    assert r.exit_code == 2 and "--manifest-hash" in r.output and not (tmp_path / "o").exists()


def test_a_truncated_file_is_caught_by_size(copy):
    shard = copy / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    lines = failures(run("verify", copy, "--quiet"))
    assert any("model.safetensors: checksum: size" in line for line in lines)
    assert any("shape" in line for line in lines)   # the header no longer covers the data either


def test_missing_and_unlisted_files_are_caught(copy):
    (copy / "tokenizer.json").unlink()
    (copy / "stray.bin").write_bytes(b"x")
    lines = failures(run("verify", copy, "--quiet"))
    assert f"{copy}/tokenizer.json: checksum: listed in the manifest but missing" in lines
    assert f"{copy}/stray.bin: manifest: present but not listed in the manifest" in lines


def test_a_missing_manifest_is_caught(copy):
    (copy / MANIFEST_NAME).unlink()
    assert f"{copy}/{MANIFEST_NAME}: manifest: missing" in failures(run("verify", copy, "--quiet"))


def test_a_manifest_with_wrong_types_is_a_finding_not_a_crash(copy):
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["files"]["config.json"]["size"] = "1234"          # a string, not an integer
    manifest["files"]["tokenizer.json"]["blake3"] = 42         # a number, not a hex string
    manifest["files"]["reap_plan.json"] = ["not", "an", "object"]
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    lines = failures(run("verify", copy, "--quiet"))
    assert sorted(lines) == [f"{copy}/{MANIFEST_NAME}: manifest: entry for {name!r} lacks a blake3 or sha256 string "
                             f"and an integer size"
                             for name in ("config.json", "reap_plan.json", "tokenizer.json")]


def test_a_config_record_with_wrong_types_is_a_finding_not_a_crash(copy):
    config = json.loads((copy / "config.json").read_text())
    config["reap_stream"]["layer_experts"] = {"one": "four"}
    config["reap_stream"]["kept"] = ["not", "a", "map"]
    (copy / "config.json").write_text(json.dumps(config))
    rehash(copy, "config.json")
    lines = failures(run("verify", copy, "--quiet"))
    assert lines == [f"{copy}/config.json: config: reap_stream.layer_experts is not a map of layer -> expert count "
                     "({'one': 'four'})",
                     f"{copy}/config.json: config: reap_stream.kept / layer_experts are not maps keyed by layer"]


def test_shapes_are_checked_against_config(copy):
    config = json.loads((copy / "config.json").read_text())
    config["reap_stream"]["layer_experts"]["1"] = 5
    (copy / "config.json").write_text(json.dumps(config))
    rehash(copy, "config.json")
    lines = failures(run("verify", copy, "--quiet"))
    assert any("model.layers.1.mlp.switch_mlp.gate_proj.weight: 4 experts on axis 0, config says layer 1 has 5" in line
               for line in lines)
    assert any("layer 1: layer_experts 5 but 4 kept" in line for line in lines)


def test_plan_copy_must_match_the_config_record(copy):
    plan = json.loads((copy / "reap_plan.json").read_text())
    layer = plan["layers"]["2"]
    layer["kept"][0], layer["pruned"][0] = layer["pruned"][0], layer["kept"][0]
    (copy / "reap_plan.json").write_text(json.dumps(plan))
    rehash(copy, "reap_plan.json")
    lines = failures(run("verify", copy, "--quiet"))
    assert len(lines) == 1 and lines[0].startswith(f"{copy}/reap_plan.json: plan: layer 2: plan keeps")


def test_not_a_directory_is_bad_input(tmp_path):
    r = run("verify", tmp_path / "nope")
    assert r.exit_code == 2
    assert r.output.strip() == f"reap-stream: error: {tmp_path / 'nope'}: not a directory or GGUF file (verify takes the output of apply)"


def test_apply_refuses_a_plan_from_telemetry_of_another_model(fixture_model, tmp_path):
    fp32, fp16 = fixture_model("qwen3_moe", "fp32"), fixture_model("qwen3_moe", "fp16")
    assert run("init", "--out", tmp_path / "t", "--like", fp32, "--tokens", 64).exit_code == 0
    assert run("plan", tmp_path / "t", "--out", tmp_path / "p.json", "--method", "reap", "--ratio", 0.5).exit_code == 0
    r = run("apply", fp16, tmp_path / "p.json", "--out", tmp_path / "o", "--quiet")
    error_line(r, where=f"{tmp_path / 'p.json'}: plan was made for another model")
    assert not (tmp_path / "o").exists()


def _pruned_gguf(fixture_model, tmp_path, *apply_args) -> Path:
    """qwen3_moe as a GGUF, pruned by half with synthetic telemetry."""
    from reap_stream.testing.gguf_convert import cached_gguf

    mlx = fixture_model("qwen3_moe", "fp32")
    gguf = cached_gguf("qwen3_moe", "f32", tmp_path / "gguf", mlx)[0]
    assert run("init", "--out", tmp_path / "t", "--like", mlx, "--tokens", 64).exit_code == 0
    assert run("plan", tmp_path / "t", "--out", tmp_path / "p.json", "--method", "reap", "--ratio", 0.5).exit_code == 0
    out = tmp_path / "pruned.gguf"
    r = run("apply", gguf, tmp_path / "p.json", "--out", out, *apply_args)
    assert r.exit_code == 0, r.output
    return out


def test_a_recompacted_gguf_verifies_and_a_wrong_expert_count_is_caught(fixture_model, tmp_path):
    out = _pruned_gguf(fixture_model, tmp_path)
    ok = run("verify", out)
    assert ok.exit_code == 0 and "1 GGUF part(s) match the manifest" in ok.output
    raw = bytearray(out.read_bytes())
    key = b"qwen3moe.expert_count"
    at = raw.index(key) + len(key) + 4             # skip the u32 value type
    assert int.from_bytes(raw[at:at + 4], "little") == 4
    raw[at:at + 4] = (8).to_bytes(4, "little")
    out.write_bytes(bytes(raw))
    lines = failures(run("verify", out))
    assert f"{tmp_path}/pruned.gguf: shape: blk.0.ffn_gate_exps.weight: 4 experts, metadata says layer 0 has 8" in lines
    assert any(line.startswith(f"{tmp_path}/pruned.gguf: checksum: blake3 differs") for line in lines)


def test_a_gguf_sidecar_manifest_in_sha256_verifies_and_catches_a_changed_byte(fixture_model, tmp_path):
    from reap_stream.surgery.gguf import manifest_path

    out = _pruned_gguf(fixture_model, tmp_path, "--manifest-hash", "sha256", "--quiet")
    sidecar = json.loads(manifest_path(out).read_text())
    assert sidecar["hash"] == "sha256"
    assert sidecar["files"]["pruned.gguf"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert run("verify", out).exit_code == 0
    raw = bytearray(out.read_bytes())
    raw[-1] ^= 1                                   # the file's last byte
    out.write_bytes(bytes(raw))
    lines = failures(run("verify", out))
    assert any(line.startswith(f"{out}: checksum: sha256 differs from the manifest") for line in lines)
