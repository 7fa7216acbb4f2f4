"""The README and everything under docs/: every relative link points at a file of this
repository (a user has nothing else), and every #anchor at a heading that exists."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_HTML_ANCHOR = re.compile(r"<a\s+[^>]*(?:id|name)\s*=\s*\"([^\"]+)\"", re.IGNORECASE)
_EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def doc_files(repo: Path = REPO) -> list[Path]:
    return [repo / "README.md", *sorted((repo / "docs").rglob("*.md"))]


def _prose_lines(text: str, code_spans: bool = False) -> list[str]:
    """The lines outside fenced code blocks, inline code spans blanked unless ``code_spans``."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line if code_spans else _CODE_SPAN.sub("", line))
    return lines


def links(text: str) -> list[str]:
    found: list[str] = []
    for line in _prose_lines(text):
        found += _INLINE_LINK.findall(line)
        ref = _REFERENCE_DEF.match(line)
        if ref:
            found.append(ref.group(1))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to
    hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    found: set[str] = set()
    for line in _prose_lines(text, code_spans=True):  # a heading's code text is in its slug
        found.update(_HTML_ANCHOR.findall(line))
        heading = _HEADING.match(line)
        if heading:
            base = slug(heading.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(files: list[Path], repo: Path = REPO) -> list[str]:
    """Every relative link among ``files`` that does not resolve inside ``repo``, with why."""
    problems: list[str] = []
    for source in files:
        for target in links(source.read_text(encoding="utf-8")):
            if _EXTERNAL.match(target):
                continue
            where = f"{source.relative_to(repo)}: {target}"
            path_part, _, fragment = target.partition("#")
            dest = (source.parent / path_part).resolve() if path_part else source
            if not dest.is_relative_to(repo):
                problems.append(f"{where} leaves the repository")
            elif not dest.exists():
                problems.append(f"{where} does not exist")
            elif fragment and dest.suffix == ".md" and \
                    fragment not in anchors(dest.read_text(encoding="utf-8")):
                problems.append(f"{where}: no heading #{fragment} in {dest.name}")
    return problems


def test_every_link_in_the_readme_and_docs_resolves() -> None:
    files = doc_files()
    assert REPO / "docs" / "design.md" in files
    assert broken_links(files) == []


def test_the_design_is_linked_from_the_readme_and_nothing_points_outside() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "docs/design.md" in links(readme)
    # The README is the package's long description too: nothing there may name files a user
    # of the package or of a clone does not have.
    for source in doc_files():
        assert "../shared" not in source.read_text(encoding="utf-8"), source


def test_the_link_check_finds_what_is_broken(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# Title\n## The `wire`, in short\n## Notes\n## Notes\n<a id=\"here\"></a>\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/a.md#the-wire-in-short) [ok](docs/a.md#notes-1) [ok](docs/a.md#here)\n"
        "[ok](#readme) [web](https://example.org/x) `[code](nowhere.md)`\n"
        "```\n[fenced](nowhere.md)\n```\n"
        "[gone](docs/b.md) [anchor](docs/a.md#nope) [out](../shared/DESIGN.md)\n"
        "[ref]: docs/missing.md\n# README\n")
    problems = broken_links(doc_files(tmp_path), tmp_path)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "docs/b.md does not exist", "docs/a.md#nope: no heading #nope in a.md",
        "../shared/DESIGN.md leaves the repository", "docs/missing.md does not exist"]


@pytest.mark.parametrize(("heading", "expected"), [
    ("Connect, inject, attach", "connect-inject-attach"),
    ("The `jupyter_job_follow` tool", "the-jupyter_job_follow-tool"),
    ("Measured facts that shaped it", "measured-facts-that-shaped-it"),
    ("Security model", "security-model"),
])
def test_slug_matches_githubs(heading: str, expected: str) -> None:
    assert slug(heading) == expected
