"""The documentation holds together: a short README, no broken relative links, every page reachable."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 200

# Inline links and images, [text](target) or [text](target "title"), and reference definitions.
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose(text: str) -> str:
    """The text without fenced code blocks and code spans, where bracketed text is not a link.

    Indented lines are kept: in these pages they are mostly list continuations, which hold links.
    """
    return CODE_SPAN.sub("", FENCE.sub("", text))


def relative_links(path: Path) -> list[tuple[str, Path]]:
    """(target as written, resolved file) for every link to a local file, anchors stripped."""
    text = prose(path.read_text(encoding="utf-8"))
    targets = INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)
    links = []
    for target in targets:
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "//")):
            continue  # a URL (http:, mailto:, ...) or an anchor in the same page
        file_part = unquote(target.split("#", 1)[0].split("?", 1)[0])
        if file_part:
            links.append((target, (path.parent / file_part).resolve()))
    return links


def test_readme_is_a_short_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines, at most {MAX_README_LINES} expected: move detail to docs/"
    )


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(path):
    broken = [target for target, resolved in relative_links(path) if not resolved.exists()]
    assert not broken, f"{path.relative_to(ROOT)}: links to missing files: {broken}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {resolved for _, resolved in relative_links(README)}
    pages = sorted(DOCS.glob("*.md"))
    assert pages, "docs/ holds no pages"
    missing = [str(page.relative_to(ROOT)) for page in pages if page.resolve() not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"


def test_the_link_finder_sees_links_and_skips_code(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("x\n", encoding="utf-8")
    page.write_text(
        "See [there](there.md#part), [web](https://example.org), [anchor](#top).\n"
        "[ref]: there.md\n"
        "`[not](a-link.md)`\n\n"
        "```\n[fenced](code.md)\n```\n",
        encoding="utf-8",
    )
    found = [target for target, _ in relative_links(page)]
    assert found == ["there.md#part", "there.md"]
