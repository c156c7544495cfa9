"""The package's layout: stages in data-flow order, each importing only itself and earlier stages;
modules of a readable size."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "reap_stream"

# data flow: files -> what a model is -> running it -> telemetry -> plans -> written outputs -> CLI
STAGES = ["errors", "blas", "procstats", "io", "families", "runner", "telemetry", "planning", "surgery",
          "eval", "pipeline", "estimate", "testing", "cli"]


def _stage(module: str) -> str:
    """reap_stream.io.gguf -> io;  reap_stream.eval -> eval;  reap_stream -> (the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> set[str]:
    """reap_stream modules imported anywhere in the file (function bodies included)."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                if not node.module:  # "from . import x": x is a module of that package
                    found.update(f"{target}.{a.name}" for a in node.names if a.name != "__version__")
                    continue
            else:
                target = node.module or ""
            if target.startswith("reap_stream"):
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("reap_stream"))
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def test_a_stage_imports_only_itself_and_earlier_stages():
    wrong = []
    for path in MODULES:
        own = _stage(".".join(p for p in path.relative_to(PACKAGE.parent).with_suffix("").parts if p != "__init__"))
        if not own:
            continue  # the package's own __init__
        assert own in STAGES, f"{path.relative_to(PACKAGE)}: not in a known stage"
        for target in _imports(path):
            stage = _stage(target)
            if stage and STAGES.index(stage) > STAGES.index(own):
                wrong.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert wrong == []


def test_commands_do_not_import_each_other():
    cli = PACKAGE / "cli"
    commands = {p.stem for p in cli.glob("*.py")} - {"__init__", "__main__", "options"}
    for path in cli.glob("*.py"):
        for target in _imports(path):
            parts = target.split(".")
            if parts[:2] == ["reap_stream", "cli"] and len(parts) > 2 and parts[2] in commands:
                assert path.stem == "__main__" or parts[2] == path.stem, f"cli/{path.name} imports {target}"


def test_modules_stay_readable():
    long = {str(p.relative_to(PACKAGE)): n for p in MODULES if (n := len(p.read_text().splitlines())) > 420}
    assert long == {}  # split them by what they hold


def test_tools_import_the_installed_package():
    """tools/ run against the installed reap_stream: none puts the checkout on sys.path itself
    (bench_reference adds the reference implementation's checkout, not ours)."""
    repo = PACKAGE.parent
    for tool in sorted((repo / "tools").glob("*.py")):
        for node in ast.walk(ast.parse(tool.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("sys.path.insert", "sys.path.append"):
                where = ast.unparse(node.args[-1])
                assert "ref_dir" in where, f"{tool.name} edits sys.path with {where}"


def test_the_readmes_layout_table_names_every_module():
    """The README's "Layout of the code" table lists each stage's modules: a newcomer finds every
    file from it (cli/ is "one module per command")."""
    readme = (PACKAGE.parent / "README.md").read_text()
    table = readme[readme.index("## Layout of the code"):]
    rows = {line.split("|")[1].strip(" `"): line.split("|")[2] for line in table.splitlines()
            if line.startswith("| `") and line.count("|") >= 4}
    for stage, listed in rows.items():
        folder = PACKAGE / stage.rstrip("/")
        if stage == "cli/" or not folder.is_dir():
            continue
        modules = {p.name for p in folder.glob("*.py") if p.name != "__init__.py"}
        missing = sorted(m for m in modules if f"`{m}`" not in listed)
        assert not missing, f"README's layout table lacks {stage}{missing}"
    top = {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    assert all(f"`{m}`" in table for m in top)
