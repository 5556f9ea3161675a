"""README's stage guides are assembled from docs/*.md: an edit in docs/ must reach the README."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_stage_guides_match_docs():
    r = subprocess.run([sys.executable, str(ROOT / "scripts/compose_readme.py"), "--check"])
    assert r.returncode == 0, "README.md is out of date: run python scripts/compose_readme.py"
