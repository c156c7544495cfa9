"""The project's rule for bad input, as one assertion: exit code 2 and a single line
`reap-stream: error: <where>: <what>`, never a traceback."""
from __future__ import annotations


def error_line(result, *needles: str, where: str | object | None = None) -> str:
    """The one error line of a refused command; it must name `where` first and hold every needle."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith("reap-stream: error: " + ("" if where is None else str(where))), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
