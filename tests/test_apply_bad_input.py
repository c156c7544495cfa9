"""Bad input to `apply`: exit code 2, one line naming the file and the fault, nothing written,
the source untouched."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest

from cli_helpers import error_line, run
from test_apply import make_plan


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def expect_refusal(tmp_path: Path, src: Path, plan_path: Path, *needles: str, out: Path | None = None,
                   extra: tuple[str, ...] = ()) -> str:
    out = out or tmp_path / "out"
    before = tree_digest(src)
    res = run("apply", src, plan_path, "--out", out, "--quiet", *extra)
    line = error_line(res, *needles)
    assert tree_digest(src) == before
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert leftovers == []
    return line


@pytest.fixture
def model(fixture_model, tmp_path) -> Path:
    """A private copy of a fixture (with a dense layer 0 and expert groups) that tests may corrupt."""
    dst = tmp_path / "model"
    shutil.copytree(fixture_model("deepseek_v3"), dst)
    return dst


def save(plan, tmp_path: Path) -> Path:
    path = tmp_path / "plan.json"
    plan.save(path)
    return path


def test_plan_naming_a_dense_or_missing_layer(model, tmp_path):
    plan = make_plan(model, n_prune=2)
    plan.layers[0] = plan.layers[1]
    expect_refusal(tmp_path, model, save(plan, tmp_path), "plan.json", "layer 0 is not an MoE layer")
    plan.layers.pop(0)
    plan.layers[17] = plan.layers[1]
    expect_refusal(tmp_path, model, save(plan, tmp_path), "layer 17 is not an MoE layer")


def test_plan_naming_a_missing_expert(model, tmp_path):
    plan = make_plan(model, n_prune=2)
    plan.layers[1].pruned.append(8)
    expect_refusal(tmp_path, model, save(plan, tmp_path), "expert 8 does not exist")
    plan.layers[1].pruned.remove(8)
    plan.layers[2].kept.remove(plan.layers[2].kept[0])
    expect_refusal(tmp_path, model, save(plan, tmp_path), "neither kept nor pruned")


def test_plan_made_for_another_model(model, fixture_model, tmp_path):
    expect_refusal(tmp_path, model, save(make_plan(fixture_model("qwen3_moe")), tmp_path), "model_type 'qwen3_moe'")
    other = tmp_path / "other"
    from reap_stream.testing import synth
    synth.make_mlx_fixture("deepseek_v3", other, seed=7)
    expect_refusal(tmp_path, model, save(make_plan(other, n_prune=2), tmp_path), "another model", "--ignore-fingerprint")
    # same structure: accepted when asked to apply by structure
    res = run("apply", model, tmp_path / "plan.json", "--out", tmp_path / "o2", "--quiet", "--ignore-fingerprint")
    assert res.exit_code == 0, res.output


def test_keeping_fewer_than_top_k(fixture_model, tmp_path):
    src = fixture_model("qwen3_moe")
    plan = make_plan(src, n_prune=7)  # 8 experts, top_k 2
    expect_refusal(tmp_path, src, save(plan, tmp_path), "keeps 1 experts, fewer than top_k=2")


def test_group_divisibility(model, tmp_path):
    plan = make_plan(model, n_prune=2)
    lp = plan.layers[1]
    moved = next(e for e in lp.kept if e < 4)
    lp.kept.remove(moved)
    lp.pruned = sorted(lp.pruned + [moved])
    lp.kept.append(next(e for e in lp.pruned if e >= 4))
    lp.pruned.remove(lp.kept[-1])
    lp.kept.sort()
    expect_refusal(tmp_path, model, save(plan, tmp_path), "same number kept in every group")


def _first_shard(model: Path) -> Path:
    return sorted(model.glob("model-*.safetensors"))[0]


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8:8 + n])


def _rewrite_header(path: Path, header: dict) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])


def test_truncated_shard(model, tmp_path):
    plan_path = save(make_plan(model, n_prune=2), tmp_path)
    shard = _first_shard(model)
    shard.write_bytes(shard.read_bytes()[:-100])
    expect_refusal(tmp_path, model, plan_path, shard.name, "past the end of the data")


def test_header_length_over_limit_or_past_file_end(model, tmp_path):
    plan_path = save(make_plan(model, n_prune=2), tmp_path)
    shard = _first_shard(model)
    raw = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", 100_000_001) + raw[8:])
    expect_refusal(tmp_path, model, plan_path, shard.name, "exceeds the 100,000,000-byte limit")
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    expect_refusal(tmp_path, model, plan_path, shard.name, "runs past the end of the file")


def test_overlapping_and_out_of_range_offsets(model, tmp_path):
    plan_path = save(make_plan(model, n_prune=2), tmp_path)
    shard = _first_shard(model)
    original = shard.read_bytes()
    _, header = _header(shard)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    second = header[names[1]]
    second["data_offsets"] = [second["data_offsets"][0] - 4, second["data_offsets"][1] - 4]
    _rewrite_header(shard, header)
    expect_refusal(tmp_path, model, plan_path, shard.name, repr(names[1]), "overlap")

    shard.write_bytes(original)
    _, header = _header(shard)
    last = header[names[-1]]
    size = last["data_offsets"][1] - last["data_offsets"][0]
    last["data_offsets"] = [last["data_offsets"][0] + 10**6, last["data_offsets"][0] + 10**6 + size]
    _rewrite_header(shard, header)
    expect_refusal(tmp_path, model, plan_path, shard.name, repr(names[-1]))


def test_duplicate_keys_in_header(model, tmp_path):
    plan_path = save(make_plan(model, n_prune=2), tmp_path)
    shard = _first_shard(model)
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = raw[8:8 + n].decode()
    first_key = next(k for k in json.loads(text) if k != "__metadata__")
    entry = json.dumps({first_key: json.loads(text)[first_key]})[1:-1]
    body = ("{" + entry + "," + text.strip()[1:]).encode()
    body += b" " * (-len(body) % 8)
    shard.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
    expect_refusal(tmp_path, model, plan_path, shard.name, "duplicate key")


def test_weight_map_escaping_the_model_directory(model, tmp_path):
    plan_path = save(make_plan(model, n_prune=2), tmp_path)
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../" + index["weight_map"][name]
    index_path.write_text(json.dumps(index))
    expect_refusal(tmp_path, model, plan_path, "model.safetensors.index.json", "escapes the model directory")


def test_output_equal_to_inside_or_containing_the_source(model, tmp_path):
    plan_path = save(make_plan(model, n_prune=2), tmp_path)
    expect_refusal(tmp_path, model, plan_path, "is the source or inside it", out=model, extra=("--overwrite",))
    expect_refusal(tmp_path, model, plan_path, "is the source or inside it", out=model / "pruned")
    expect_refusal(tmp_path, model, plan_path, "contains the source", out=tmp_path, extra=("--overwrite",))


def test_existing_output_needs_overwrite(model, tmp_path):
    plan_path = save(make_plan(model, n_prune=2), tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    expect_refusal(tmp_path, model, plan_path, "output exists; pass --overwrite", out=out)
    assert (out / "keep.txt").read_text() == "mine"
    res = run("apply", model, plan_path, "--out", out, "--quiet", "--overwrite")
    assert res.exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "reap_manifest.json").exists()


def test_plan_file_that_is_not_a_plan(model, tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text('{"layers": {}}')
    expect_refusal(tmp_path, model, bad, "plan.json", "not a reap-stream plan")
    bad.write_text("{not json")
    expect_refusal(tmp_path, model, bad, "plan.json", "invalid JSON")


def test_unpruned_weights_in_other_formats_are_not_copied(model, tmp_path):
    plan_path = save(make_plan(model, n_prune=2), tmp_path)
    for name in ("pytorch_model.bin", "model.gguf", "consolidated.pth", "pytorch_model.bin.index.json"):
        (model / name).write_bytes(b"unpruned weights")
    (model / "generation_config.json").write_text("{}")
    res = run("apply", model, plan_path, "--out", tmp_path / "out", "--quiet")
    assert res.exit_code == 0, res.output
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert "generation_config.json" in names and "tokenizer.json" in names
    assert not names & {"pytorch_model.bin", "model.gguf", "consolidated.pth", "pytorch_model.bin.index.json"}


@pytest.mark.parametrize("size", ["inf", "nan", "-1GB", "0", "5 parsecs"])
def test_unreadable_shard_sizes(model, tmp_path, size):
    plan_path = save(make_plan(model, n_prune=2), tmp_path)
    expect_refusal(tmp_path, model, plan_path, "--max-shard-size", "cannot read size", extra=("--max-shard-size", size))


def test_plan_blocks_of_the_wrong_type_and_ambiguous_layer_keys(model, tmp_path):
    data = make_plan(model, n_prune=2).to_json()
    bad = tmp_path / "plan.json"
    bad.write_text(json.dumps({**data, "model": "qwen"}))
    expect_refusal(tmp_path, model, bad, "'model' must be an object")
    layers = dict(data["layers"])
    layers["01"] = layers.pop("1")
    bad.write_text(json.dumps({**data, "layers": layers}))
    expect_refusal(tmp_path, model, bad, "layer key '01' is not a layer index")


@pytest.mark.parametrize("fault", ["no top_k", "top_k not a number", "model_type a list", "config a directory"])
def test_config_faults(model, tmp_path, fault):
    plan_path = save(make_plan(model, n_prune=2), tmp_path)
    config_path = model / "config.json"
    config = json.loads(config_path.read_text())
    if fault == "no top_k":
        del config["num_experts_per_tok"]
    elif fault == "top_k not a number":
        config["num_experts_per_tok"] = "two"
    elif fault == "model_type a list":
        config["model_type"] = ["deepseek_v3"]
    if fault == "config a directory":
        config_path.unlink()
        config_path.mkdir()
    else:
        config_path.write_text(json.dumps(config))
    expect_refusal(tmp_path, model, plan_path, "config.json")
