"""`report`: markdown plus three PNG figures, with the plan overlaid, byte-identical on rerun."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from reap_stream.planning.plan import Plan
from reap_stream.planning.report import FIGURES
from cli_helpers import error_line, run


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    assert run("init", "--out", root / "t", "--layers", 4, "--experts", 16, "--tokens", 256, "--seed", 3).exit_code == 0
    assert run("plan", root / "t", "--out", root / "plan.json", "--method", "reap", "--ratio", 0.5).exit_code == 0
    assert run("report", root / "t", "--plan", root / "plan.json", "--out", root / "a").exit_code == 0
    return root


def png_size(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", raw[16:24])


def test_report_writes_markdown_and_every_figure(made):
    out = made / "a"
    for name in FIGURES:
        w, h = png_size(out / name)
        assert w > 300 and h > 200
    md = (out / "report.md").read_text()
    for name in FIGURES:
        assert f"]({name})" in md
    assert "reap, ratio 0.5, 32 experts pruned, uniform" in md


def test_report_table_has_one_row_per_layer_with_the_plan_counts(made):
    md = (made / "a" / "report.md").read_text()
    plan = Plan.load(made / "plan.json")
    rows = [line for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 4
    for row, (layer, lp) in zip(rows, sorted(plan.layers.items())):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert int(cells[0]) == layer and int(cells[7]) == len(lp.pruned)
        assert cells[6] == (", ".join(map(str, lp.extra["super_experts"])) or "—")


def test_report_is_byte_identical_on_rerun(made):
    assert run("report", made / "t", "--plan", made / "plan.json", "--out", made / "b").exit_code == 0
    for name in ("report.md",) + FIGURES:
        assert (made / "a" / name).read_bytes() == (made / "b" / name).read_bytes(), name


def test_report_without_a_plan_shows_the_telemetry_alone(made):
    r = run("report", made / "t", "--method", "frequency", "--out", made / "c")
    assert r.exit_code == 0, r.output
    md = (made / "c" / "report.md").read_text()
    assert "saliency criterion: frequency" in md and "- plan:" not in md
    assert (made / "c" / "heatmap.png").read_bytes() != (made / "a" / "heatmap.png").read_bytes()


def test_a_plan_for_another_shape_is_refused(made, tmp_path):
    assert run("init", "--out", tmp_path / "small", "--layers", 4, "--experts", 8, "--tokens", 64).exit_code == 0
    r = run("report", tmp_path / "small", "--plan", made / "plan.json", "--out", tmp_path / "r")
    error_line(r, where=f"{made / 'plan.json'}: layer 0")
    assert not (tmp_path / "r").exists()


def test_missing_telemetry_is_refused(tmp_path):
    r = run("report", tmp_path / "nope", "--out", tmp_path / "r")
    error_line(r, "nope")
    assert not (tmp_path / "r").exists()
