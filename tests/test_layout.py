"""The imports show the design (DESIGN.md): dialects see only the canonical
model, storage never sees a dialect, and the model sees nothing of ours."""

from __future__ import annotations

import ast
import io
import re
import tokenize
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


VENDOR = re.compile(r"cohorly|inslytic|mixpanel|collect_sources|client_keys|tc_s", re.IGNORECASE)


def _code_tokens(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every token but comments and docstrings."""
    source = path.read_text(encoding="utf-8")
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(body[0].lineno)
    found = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT or (token.type == tokenize.STRING and token.start[0] in docstrings):
            continue
        found.append((token.start[0], token.string))
    return found


@pytest.mark.parametrize("package", ["gateway", "storage"])
def test_the_core_names_no_vendor(package: str) -> None:
    # `grep -rniE "cohorly|inslytic|mixpanel|collect_sources|client_keys|tc_s"`
    # over the code, comments and docstrings left out: those may name a
    # vendor to explain a general rule; the code itself knows none.
    hits = [
        f"{path.relative_to(ROOT)}:{line}: {text}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, text in _code_tokens(path)
        if VENDOR.search(text)
    ]
    assert hits == []


def test_the_vendor_check_sees_code() -> None:
    # The check above would catch a vendor named in code, not only in text.
    sample = ROOT / "tests" / "test_layout.py"
    assert any(VENDOR.search(text) for _, text in _code_tokens(sample))
