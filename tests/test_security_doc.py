"""docs/security.md names the tests that hold each defence: every one it names must exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "security.md"

#: `test_file.py::test_name` sets the file; a following `::test_name` is in that file.
_REF = re.compile(r"`(test_\w+\.py)?::(test_\w+)`")


def cited_tests() -> list[tuple[str, str]]:
    cited = []
    current = None
    for file, name in _REF.findall(DOC.read_text()):
        current = file or current
        assert current is not None, f"::{name} is cited before any test file"
        cited.append((current, name))
    return cited


def test_every_test_the_security_notes_cite_exists():
    cited = cited_tests()
    assert len(cited) > 50, "the citations were not found: has the format changed?"
    missing = []
    for file, name in cited:
        source = (ROOT / "tests" / file).read_text() if (ROOT / "tests" / file).exists() else ""
        if not re.search(rf"^(async )?def {name}\(", source, re.MULTILINE):
            missing.append(f"{file}::{name}")
    assert missing == [], missing

