"""THREAT_MODEL.md stays true to the code: every file and test it names exists, every threat
row names a defence in `gateway/` and at least one attack test, and every attack test of this
folder is named by some row (so none proves a threat nobody wrote down)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "THREAT_MODEL.md"
_REF = re.compile(r"`((?:tests|gateway)/[A-Za-z0-9_/]+\.py)((?:::[A-Za-z0-9_]+)*)`")


def _rows() -> list[str]:
    return [
        line
        for line in DOC.read_text("utf-8").splitlines()
        if re.match(r"^\| [A-Z][0-9]+ \|", line)
    ]


def _defined(path: Path, chain: list[str]) -> bool:
    body: list[ast.stmt] = ast.parse(path.read_text("utf-8")).body
    for name in chain:
        found = next(
            (
                n
                for n in body
                if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                and n.name == name
            ),
            None,
        )
        if found is None:
            return False
        body = found.body
    return True


def test_every_named_file_and_test_exists() -> None:
    """Every `path` and `path::Class::test` in the threat model exists in the repository."""
    refs = _REF.findall(DOC.read_text("utf-8"))
    assert refs
    missing = [
        f"{path}{chain}"
        for path, chain in refs
        if not (REPO / path).is_file()
        or (chain and not _defined(REPO / path, chain.strip(":").split("::")))
    ]
    assert missing == []


def test_every_threat_has_a_defence_and_a_proof() -> None:
    """Each table row names a defence in `gateway/` and at least one test."""
    rows = _rows()
    assert len(rows) >= 40
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 5, row
        implemented, proved = cells[3], cells[4]
        assert re.search(r"`gateway/[A-Za-z0-9_/]+\.py`", implemented), row
        assert re.search(r"`tests/[A-Za-z0-9_/]+\.py::", proved), row


def test_every_attack_test_is_in_the_threat_model() -> None:
    """Each test of `tests/security/` proves at least one row of the threat model."""
    named = {f"{path}{chain}" for path, chain in _REF.findall(DOC.read_text("utf-8"))}
    unnamed: list[str] = []
    for module in sorted((REPO / "tests" / "security").glob("test_*.py")):
        if module.name == Path(__file__).name:
            continue
        rel = module.relative_to(REPO).as_posix()
        for node in ast.parse(module.read_text("utf-8")).body:
            tests: list[str] = []
            if isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef):
                tests = [node.name]
            elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                tests = [
                    f"{node.name}::{n.name}"
                    for n in node.body
                    if isinstance(n, ast.AsyncFunctionDef | ast.FunctionDef)
                    and n.name.startswith("test_")
                ]
            unnamed += [
                f"{rel}::{t}"
                for t in tests
                if t.split("::")[-1].startswith("test_") and f"{rel}::{t}" not in named
            ]
    assert unnamed == []
