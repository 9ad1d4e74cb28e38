"""README.md and docs/ are read in a clone: every link and path they give stays inside the
repository and exists there (no ``../shared/...``, no machine-local absolute path)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target)
UP_PATH = re.compile(r"(?<![\w.])\.\./[\w./-]*")  # ../x
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/<>-])/(?:work|home|root|tmp|Users|mnt|opt)/[\w./-]*")
MD_NAME = re.compile(r"(?<![\w/.-])([\w./-]*[\w-]\.md)\b")  # a .md file named in the text


def inside(doc: Path, target: str) -> Path | None:
    """Where ``target``, relative to ``doc``, points in the repository; None if outside."""
    path = (doc.parent / target).resolve()
    return path if path == ROOT or ROOT in path.parents else None


def ids(docs: list[Path]) -> list[str]:
    return [str(d.relative_to(ROOT)) for d in docs]


@pytest.mark.parametrize("doc", DOCS, ids=ids(DOCS))
def test_links_stay_in_the_repository_and_exist(doc: Path) -> None:
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        path = inside(doc, target.split("#", 1)[0])
        assert path is not None and path.exists(), f"{doc.name}: link to {target}"


@pytest.mark.parametrize("doc", DOCS, ids=ids(DOCS))
def test_no_path_leaves_the_repository(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    for up in UP_PATH.findall(text):
        path = inside(doc, up)
        assert path is not None and path.exists(), f"{doc.name}: {up}"
    assert not ABSOLUTE_PATH.findall(text), doc.name


@pytest.mark.parametrize("doc", DOCS, ids=ids(DOCS))
def test_every_document_named_exists(doc: Path) -> None:
    """A ``name.md`` mentioned is a file of the repository (``design.md`` is not)."""
    for name in MD_NAME.findall(doc.read_text(encoding="utf-8")):
        candidates = [doc.parent / name, ROOT / name, ROOT / "docs" / name]
        assert any(c.resolve().exists() for c in candidates), f"{doc.name}: {name}"


SOURCES = sorted(
    p for pkg in ("raft", "wire", "ctxstore", "bench") for p in (ROOT / pkg).rglob("*.py")
)


def test_no_docstring_points_outside_the_repository() -> None:
    """The packages' docstrings and comments name documents of the repository too."""
    for source in SOURCES:
        text = source.read_text(encoding="utf-8")
        assert not UP_PATH.findall(text), source.relative_to(ROOT)
        assert "design.md" not in text, source.relative_to(ROOT)


def test_the_checks_catch_what_they_look_for(tmp_path: Path) -> None:
    text = "see `../shared/design.md` and [x](../shared/design.md), /work/main/README.md"
    assert UP_PATH.findall(text) == ["../shared/design.md", "../shared/design.md"]
    assert LINK.findall(text) == ["../shared/design.md"]
    assert ABSOLUTE_PATH.findall(text) == ["/work/main/README.md"]
    assert "design.md" in [n.rsplit("/", 1)[-1] for n in MD_NAME.findall(text)]
    assert inside(ROOT / "README.md", "../shared/design.md") is None
    assert inside(ROOT / "docs" / "raft.md", "../README.md") == ROOT / "README.md"
