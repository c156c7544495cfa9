"""tools/fuzz.py classifies what an input does: stand-ins that refuse, accept, crash, segfault,
hang and blow up memory must each come out as such (CI runs the real round: .ci/run)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_outcome_is_classified_as_what_it_is(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "tools" / "fuzz.py"), "--selftest", "--inputs", "2",
                        "--case-timeout", "3", "--max-case-mib", "256", "--findings-dir", str(tmp_path / "found"),
                        "--json", str(tmp_path / "summary.json")],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 1, r.stdout + r.stderr  # findings: exit 1
    counts = json.loads((tmp_path / "summary.json").read_text())["parsers"]
    expected = {"selftest_refused": "refused", "selftest_accepted": "accepted", "selftest_crash": "crash",
                "selftest_segfault": "crash", "selftest_hang": "hang", "selftest_memory_error": "memory",
                "selftest_memory_growth": "memory"}
    for name, outcome in expected.items():
        assert counts[name][outcome] == 2, (name, counts[name])
    kept = sorted(p.name for p in (tmp_path / "found").iterdir())
    assert "selftest_segfault-0-0.bin" in kept and "selftest_segfault-0-0.txt" in kept  # each finding reproducible
