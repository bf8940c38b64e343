"""Every relative link in README.md and docs/*.md points at a file or folder that exists."""

import re
from pathlib import Path

import pytest
import yaml

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


def pipeline_outputs(root=ROOT):
    """What `dvc repro` writes (dvc.yaml's outs, metrics and plots): a fresh clone has none of it
    until the pipeline runs, and CI runs the tests first."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    declared = set()
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            declared.update(entry if isinstance(entry, str) else next(iter(entry)) for entry in stage.get(kind, []))
    return {(root / path).resolve() for path in declared}


def broken_links(path, root=ROOT):
    broken, outputs = [], pipeline_outputs(root) if (root / "dvc.yaml").is_file() else set()
    for number, target in relative_links(path.read_text(encoding="utf-8")):
        file_part = target.split("#", 1)[0].split("?", 1)[0]
        resolved = (path.parent / file_part).resolve()
        made_by_pipeline = any(resolved == out or out in resolved.parents for out in outputs)
        if not resolved.exists() and not made_by_pipeline:
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
    (tmp_path / "dvc.yaml").write_text("stages:\n  report:\n    outs:\n      - pics\n", encoding="utf-8")
    assert broken_links(page, tmp_path) == ["page.md:1: missing.md"]  # pics/ is made by `dvc repro`


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = {Path(t.split("#")[0]).as_posix() for _, t in relative_links(readme)}
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert pages - linked == set()
