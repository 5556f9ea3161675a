"""README.md is a guide that links to docs/: every link must lead somewhere, every guide
must be reachable from the README, and every sub-command the README shows must exist."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _prose(path: Path) -> str:
    """The file without its fenced code blocks (links are only links outside them)."""
    out, fenced = [], False
    for line in path.read_text().split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            out.append(line)
    return "\n".join(out)


def _code(path: Path) -> list[str]:
    """Fenced code lines and inline code spans: where the README shows commands."""
    out, fenced = [], False
    for line in path.read_text().split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced:
            out.append(line.strip())
        else:
            out += re.findall(r"`([^`]+)`", line)
    return out


def _relative_links(path: Path) -> list[str]:
    links = LINK.findall(_prose(path))
    return [t for t in links if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_there_is_something_to_check():
    assert len(DOCS) >= 8
    assert len(_relative_links(ROOT / "README.md")) >= 8


def test_every_relative_link_points_at_a_file():
    broken = []
    for path in [ROOT / "README.md", *DOCS]:
        for target in _relative_links(path):
            if not (path.parent / target.split("#")[0]).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)


def test_readme_links_every_guide_and_results():
    linked = {(ROOT / t.split("#")[0]).resolve() for t in _relative_links(ROOT / "README.md")}
    missing = [str(p.relative_to(ROOT)) for p in DOCS if p.resolve() not in linked]
    assert not missing, f"docs not linked from README.md: {missing}"
    assert (ROOT / "benchmarks" / "RESULTS.md").resolve() in linked


def test_readme_commands_exist():
    r = subprocess.run([sys.executable, "-m", "tuneforge", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    choices = re.search(r"\{([a-z,-]+)\}", r.stdout)
    assert choices, r.stdout
    commands = set(choices.group(1).split(","))
    used = {m.group(1) for code in _code(ROOT / "README.md")
            for m in re.finditer(r"(?:^|[;&|]\s*)tuneforge ([a-z][a-z-]*)", code)}
    assert used, "README.md shows no tuneforge command"
    assert used <= commands, f"README.md shows sub-commands that do not exist: {sorted(used - commands)}"
