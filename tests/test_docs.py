"""The documentation's references hold: every repository path that README.md and docs/*.md name in code
spans (a test file, a source file, a results folder) exists, and every test they cite by name
(``file.py::test_name``) is defined there. A renamed or moved file otherwise leaves the docs pointing at
nothing (docs/security.md named four test and source files that had moved)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = ("tests/", "src/", "lab/", "scripts/", "docs/", "examples/", "benchmarks/", "lordba/", "lordba_lab/")
PACKAGES = ("_util/", "cli/", "convert/", "core/", "format/", "kernels/", "nn/", "quant/", "serve/", "train/")
ILLUSTRATIVE = {"src/lordba/pkg/x.py", "tests/pkg/test_x.py"}  # README's "pkg/x.py -> tests/pkg/test_x.py" rule
SPAN = re.compile(r"`([^`\s]+)`")


def _candidates(ref: str) -> list[Path]:
    """Where a reference may point: from the root, a package path under src/ or lab/, a subpackage's
    path under src/lordba/ or tests/."""
    return [ROOT / ref, ROOT / "src" / ref, ROOT / "lab" / ref, ROOT / "src" / "lordba" / ref, ROOT / "tests" / ref]


def _references() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for ref in SPAN.findall(doc.read_text(encoding="utf-8")):
            path = ref.split("::", 1)[0].rstrip("/")
            if path.startswith(TOP + PACKAGES) and not re.search(r"[*{}<>]", path) and path not in ILLUSTRATIVE:
                found.append((doc.name, ref))
    return sorted(set(found))


REFERENCES = _references()


def test_the_docs_name_repository_paths():
    assert len(REFERENCES) > 50  # the pattern still finds what it checks


@pytest.mark.parametrize("doc, ref", REFERENCES)
def test_a_referenced_path_exists(doc, ref):
    path, _, test = ref.partition("::")
    where = next((p for p in _candidates(path.rstrip("/")) if p.exists()), None)
    assert where is not None, f"{doc} names {path}, which does not exist"
    if test:
        assert re.search(rf"^\s*def {re.escape(test)}\b", where.read_text(encoding="utf-8"), re.M), (
            f"{doc} cites {ref}: no such test"
        )


def test_tests_cited_by_name_in_the_parity_table_exist():
    """docs/peft-parity.md cites tests as ``dir/test_x.py::name`` (paths under tests/), continued as ``::name``."""
    text = (ROOT / "docs" / "peft-parity.md").read_text(encoding="utf-8")
    missing = []
    for row in text.splitlines():
        current = None
        for ref in SPAN.findall(row):
            if re.fullmatch(r"[\w/]+\.py(::\w+)?", ref):
                current, _, name = ref.partition("::")
            elif re.fullmatch(r"::\w+", ref) and current is not None:
                name = ref[2:]
            else:
                continue
            file = ROOT / "tests" / current
            if not file.is_file():
                missing.append(current)
            elif name and not re.search(rf"^\s*def {name}\b", file.read_text(encoding="utf-8"), re.M):
                missing.append(f"{current}::{name}")
    assert not missing, missing
