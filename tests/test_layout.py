"""The imports show the design (DESIGN.md): dialects see only the canonical
model, storage never sees a dialect, and the model sees nothing of ours."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = ("gateway", "dialects", "storage")


def _imports(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = {n for n in names if n.split(".")[0] in OURS}
    return found


def test_dialects_import_only_the_model_and_each_other() -> None:
    for path, names in _imports("dialects").items():
        assert names <= {"gateway.model", "dialects", "dialects.base"} | {
            n for n in names if n.startswith("dialects.")
        }, path


def test_storage_never_imports_a_dialect_or_the_pipeline() -> None:
    for path, names in _imports("storage").items():
        assert not {n for n in names if n.startswith("dialects")}, path
        assert names <= {"gateway.model"} | {n for n in names if n.startswith("storage")}, path


def test_model_imports_nothing_of_ours() -> None:
    assert _imports("gateway")["gateway/model.py"] == set()


@pytest.mark.parametrize("name", ["pyproject.toml", "alembic.ini", "config.example.toml", "README.md"])
def test_top_level_files(name: str) -> None:
    assert (ROOT / name).is_file()
