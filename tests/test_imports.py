"""The package's structure: no import cycle (function-level imports included), every module importable
alone, the import direction between the four packages, and an `ablate --help` that loads nothing heavy."""
from __future__ import annotations

import ast
import graphlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGES = ("ablations", "workers", "dashboards", "orchestrator")
# Which packages each may import (shared/STYLE.md, "Which way the imports run").
ALLOWED = {"ablations": set(), "workers": {"ablations"}, "dashboards": {"ablations"},
           "orchestrator": {"ablations", "workers", "dashboards"}}
# Alembic runs these files itself, inside a migration; importing them alone means nothing.
NOT_MODULES = ("orchestrator.state.migrations.env", "orchestrator.state.migrations.versions.")
HEAVY = ("torch", "ray", "mlflow", "optuna", "uvicorn", "fastapi", "scipy", "pandas", "matplotlib")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            if not name.startswith(NOT_MODULES):
                found[name] = path
    return found


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def import_graph() -> dict[str, set[str]]:
    """Module → the project modules it imports anywhere in its body (a function-level import is still
    an edge: it only hides a cycle until the function runs)."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or _type_checking_only(node, parents):
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                           for alias in node.names]
            for target in targets:
                while target and target not in known:  # `import a.b.c` of a name inside a.b
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def test_no_import_cycle():
    try:
        order = list(graphlib.TopologicalSorter(import_graph()).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")
    assert "orchestrator.cli" in order


def test_packages_import_only_downwards():
    wrong = [f"{name} imports {target}" for name, targets in import_graph().items() for target in targets
             if target.split(".")[0] not in ALLOWED[name.split(".")[0]] | {name.split(".")[0]}]
    assert not wrong, wrong


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """Each module is the first of the project's to load in its own process: a cycle among top-level
    imports fails there whatever order the tests or the CLI happen to load modules in."""
    names = [name for name in modules() if name.split(".")[0] == "orchestrator"]
    # Forked children of one interpreter that holds third-party libraries only: fresh for the project's
    # modules, without paying each library's import once per module.
    code = """
import importlib, json, os, sys, traceback
import alembic.command, pydantic, sqlalchemy.orm, yaml
failed = {}
for name in sys.argv[1:]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(name)
            os._exit(0)
        except BaseException:
            os.write(write, traceback.format_exc(limit=4).encode()[-3000:])
            os._exit(1)
    os.close(write)
    error = os.read(read, 4000).decode()
    os.close(read)
    if os.waitpid(pid, 0)[1]:
        failed[name] = error
print(json.dumps(failed))
"""
    out = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    failed = json.loads(out.stdout)
    assert not failed, "\n".join(f"{name}:\n{error}" for name, error in failed.items())


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["tune", "--help"], ["serve", "--help"]])
def test_help_loads_nothing_heavy(args):
    code = f"""
import contextlib, io, json, sys
from orchestrator.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main({args!r})
    except SystemExit:
        pass
print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout) == []
