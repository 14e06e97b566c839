"""docs/security.md maps every threat to the tests that cover it: each cited test must exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "security.md"
# `tests/x/test_y.py`, `tests/x/test_y.py::name[param]` or, after one of those in the same
# table cell, `::name`.
CITATION = re.compile(r"`(tests/[\w/]+\.py)?(?:::(\w+))?(?:\[[^\]`]*\])?`")


def citations() -> list[tuple[str, str | None]]:
    found: list[tuple[str, str | None]] = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            continue
        for cell in line.split(" | "):
            current: str | None = None
            for match in CITATION.finditer(cell):
                path, name = match.groups()
                if path is None and name is None:
                    continue
                current = path or current
                assert current is not None, f"`::{name}` without a file before it: {cell}"
                found.append((current, name))
    return found


def test_the_doc_cites_tests() -> None:
    assert len(citations()) >= 40


@pytest.mark.parametrize(("path", "name"), citations())
def test_every_cited_test_exists(path: str, name: str | None) -> None:
    file = ROOT / path
    assert file.is_file(), f"docs/security.md cites {path}, which does not exist"
    if name is not None:
        source = file.read_text(encoding="utf-8")
        assert re.search(rf"^\s*(async )?def {name}\(", source, re.MULTILINE), (
            f"docs/security.md cites {path}::{name}, which is not a test in that file"
        )
