"""The command table: `reap-stream --help` lists every command without importing any of them."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

from reap_stream.cli import COMMANDS


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_the_listed_summary_is_the_commands_own(name):
    target, summary = COMMANDS[name]
    module, attr = target.split(":")
    command = getattr(importlib.import_module(module), attr)
    assert command.name == name
    assert command.get_short_help_str(limit=1000) == summary


def test_top_level_help_imports_no_command_module():
    code = ("import json, sys; from click.testing import CliRunner; from reap_stream.cli import COMMANDS, cli; "
            "r = CliRunner().invoke(cli, ['--help']); "
            "print(json.dumps([r.exit_code, r.output, sorted({t.split(':')[0] for t, _ in COMMANDS.values()} & set(sys.modules))]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    exit_code, output, imported = json.loads(res.stdout.strip().splitlines()[-1])
    assert exit_code == 0 and imported == []
    assert all(name in output for name in COMMANDS)
