"""What the CLI tests share: the in-process runner, a directory snapshot, and the project's rule for
bad input as one assertion: exit code 2 and a single line `reap-stream: error: <where>: <what>`,
never a traceback."""
from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from reap_stream.cli import cli


def run(*args, **kw):
    """`reap-stream ARGS` in process; arguments may be paths or numbers. kw go to CliRunner.invoke."""
    return CliRunner().invoke(cli, [str(a) for a in args], **kw)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under root: equal snapshots mean nothing changed."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def error_line(result, *needles: str, where: str | object | None = None) -> str:
    """The one error line of a refused command; it must name `where` first and hold every needle."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith("reap-stream: error: " + ("" if where is None else str(where))), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
