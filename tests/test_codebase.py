"""Limits that keep the code readable (issue 11 item 8): short functions, a job file that reads at once,
no private name imported from another module, and the library never importing the pipeline."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("earlycrop", "pipeline", "launch")


def sources(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (REPO / package).rglob("*.py"))


@pytest.mark.parametrize("path", sources("earlycrop", "pipeline"), ids=lambda p: str(p.relative_to(REPO)))
def test_no_function_is_longer_than_80_lines(path):
    tree = ast.parse(path.read_text())
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80]
    assert not long, f"{path.name}: {', '.join(long)}"


def test_the_job_reads_at_once():
    assert len((REPO / "pipeline" / "run.py").read_text().splitlines()) <= 350


@pytest.mark.parametrize("path", sources(*PACKAGES), ids=lambda p: str(p.relative_to(REPO)))
def test_no_private_name_is_imported_from_another_module(path):
    tree = ast.parse(path.read_text())
    private = [f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               for alias in node.names if alias.name.startswith("_") and alias.name != "__version__"]
    assert not private, f"{path.name} imports {', '.join(private)}"


@pytest.mark.parametrize("path", sources("earlycrop"), ids=lambda p: str(p.relative_to(REPO)))
def test_the_library_never_imports_the_pipeline_or_the_cli(path):
    tree = ast.parse(path.read_text())
    modules = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    modules += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [m for m in modules if m.split(".")[0] in ("pipeline", "launch")]
