"""docs/architecture.md's module map and the package's layout agree: every module has its one-line
row, and every row names a module that exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).parents[1]
PACKAGE = REPO / "src" / "drywall_qa"


def map_entries(text: str) -> set[str]:
    """Module paths (relative to the package) the map's table rows name. A folder row (`sources/`)
    names its files in backticks in its description."""
    section = text.split("## The module map", 1)[1].split("\n## ", 1)[0]
    entries = set()
    for row in re.findall(r"^\| `([^`]+)` \|(.*)\|$", section, flags=re.MULTILINE):
        name, description = row
        if name.endswith("/"):
            entries |= {name + file for file in re.findall(r"`([\w]+\.py)`", description)}
        elif name.endswith(".py"):
            entries.add(name)
    return entries


def package_modules() -> set[str]:
    return {
        path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py" or path.parent.name == "sources"  # sources/__init__.py does work of its own
    }


def test_every_module_has_a_row_and_every_row_is_a_module():
    entries = map_entries((REPO / "docs" / "architecture.md").read_text(encoding="utf-8"))
    modules = package_modules()
    assert sorted(modules - entries) == [], "modules without a row in docs/architecture.md's module map"
    assert sorted(entries - modules) == [], "rows of docs/architecture.md's module map naming no module"


def test_the_map_reader_sees_plain_and_folder_rows():
    text = (
        "## The module map\n| `a.py` | one |\n| `pkg/` | `b.py` and `c.py` |\n| stage | `x` |\n## Next\n| `d.py` | no |"
    )
    assert map_entries(text) == {"a.py", "pkg/b.py", "pkg/c.py"}
