"""Rebuild README.md's "## Stage guides" section from docs/*.md (the guides are written there).

Everything above the "## Stage guides" heading is kept as is; below it each guide follows
in pipeline order with its headings shifted so its top heading is level 3. Lines inside
code fences (bash comments start with '#') are never touched.

    python scripts/compose_readme.py          # rewrite README.md
    python scripts/compose_readme.py --check  # exit 1 when README.md is out of date (tests use it)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUIDES = ["data", "methods", "objectives", "regimes", "speed", "evaluate", "deploy", "production"]
MARKER = "## Stage guides"
INTRO = "\n\nEach stage in detail (the same text lives in `docs/`).\n\n"


def _headings(lines: list[str]):
    fenced = False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            yield i, len(line) - len(line.lstrip("#"))


def shifted(text: str, top: int = 3) -> str:
    lines = text.rstrip().split("\n")
    found = list(_headings(lines))
    if not found:
        return text.rstrip()
    shift = top - min(level for _, level in found)
    for i, level in found:
        lines[i] = "#" * (level + shift) + lines[i][level:]
    return "\n".join(lines)


def compose() -> str:
    readme = (ROOT / "README.md").read_text()
    head = readme.split(MARKER, 1)[0].rstrip()
    guides = [shifted((ROOT / "docs" / f"{name}.md").read_text()) for name in GUIDES
              if (ROOT / "docs" / f"{name}.md").exists()]
    return head + "\n\n" + MARKER + INTRO + "\n\n".join(guides) + "\n"


if __name__ == "__main__":
    new = compose()
    if "--check" in sys.argv:
        sys.exit(0 if new == (ROOT / "README.md").read_text() else 1)
    (ROOT / "README.md").write_text(new)
