"""Every relative link in README.md and docs/*.md points at a file or folder that exists."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# [label](target) and ![alt](target); a target ends at whitespace or ')', an optional "title" after it
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def markdown_files():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def relative_links(text):
    """(line number, target) of each relative link outside fenced code blocks and inline code."""
    in_fence = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        for match in LINK.finditer(re.sub(r"`[^`]*`", "", line)):
            target = match.group(1)
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL (http:, mailto:, ...) or an anchor in the same page
            yield number, target


def broken_links(path, root=ROOT):
    broken = []
    for number, target in relative_links(path.read_text(encoding="utf-8")):
        file_part = target.split("#", 1)[0].split("?", 1)[0]
        if not (path.parent / file_part).exists():
            broken.append(f"{path.relative_to(root)}:{number}: {target}")
    return broken


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_the_check_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](page.md) [gone](missing.md) ![img](pics/none.png) [web](https://example.com)\n"
        "`[code](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n[anchor](#top) [dir](./)\n",
        encoding="utf-8",
    )
    targets = [target for _, target in relative_links(page.read_text(encoding="utf-8"))]
    assert targets == ["page.md", "missing.md", "pics/none.png", "./"]
    assert broken_links(page, tmp_path) == ["page.md:1: missing.md", "page.md:1: pics/none.png"]


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = {Path(t.split("#")[0]).as_posix() for _, t in relative_links(readme)}
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert pages - linked == set()
