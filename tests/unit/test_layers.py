"""The package layers of DESIGN.md, enforced: each package of tuneforge imports only the
packages below it (imports inside functions count too), so there is no import circle
between packages and no upward import. A new package must be placed in LAYERS first.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "tuneforge"

# Bottom to top. Packages in one layer are peers: they may not import each other.
# Top-level modules (config.py, plan.py, ...) count as packages of their own.
LAYERS: list[set[str]] = [
    {"io", "allocator"},        # atomic writes; the faster allocator's re-exec
    {"hardware"},               # device, dtype and CPU detection, autocast
    {"config"},                 # plain typed run config: knows no plug-in
    {"models"},                 # base model and tokenizer loading, the embedded zoo
    {"data"},                   # rows -> validated, cleaned, split, rendered tokens
    {"methods", "objectives"},  # plug points: which parameters train, what the loss is
    {"plugins"},                # names in a config -> method and objective plug-ins
    {"plan", "runs"},           # memory/time estimate; opening a run folder
    {"evaluate"},               # scores any model: in memory or from a run folder
    {"train"},                  # the one training loop, its recipes and regimes
    {"registry"},               # versions, aliases, keys; an index of run folders
    {"production"},             # request log, feedback, review, jobs; monitor, drift, improve
    {"deploy"},                 # export, engines, the server (gateway + routers)
    {"cli", "ui"},              # entry points: the command line, the web dashboard
    {"__main__"},               # python -m tuneforge
]


def layer_of(package: str) -> int:
    for i, layer in enumerate(LAYERS):
        if package in layer:
            return i
    raise AssertionError(f"tuneforge/{package} is in no layer of tests/unit/test_layers.py: place it there")


def package_of(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.name != "__init__.py" else ""


def imported_packages(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, tuneforge package) for every tuneforge import in ``path``, wherever it stands."""
    module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
    if path.name == "__init__.py":
        module += ".__init__"  # relative imports resolve against the package itself
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level]
                names = [".".join(base + ([node.module] if node.module else []))]
            elif node.module == "tuneforge":
                names = [f"tuneforge.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        out += [(node.lineno, n.split(".")[1]) for n in names if n.startswith("tuneforge.")]
    return out


def violations(root: Path = ROOT) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        src = package_of(path, root)
        if not src:
            continue
        for line, dst in imported_packages(path, root):
            if dst != src and layer_of(dst) >= layer_of(src):
                kind = "a peer" if layer_of(dst) == layer_of(src) else "a higher layer"
                found.append(f"{path.relative_to(root.parent)}:{line}: {src} imports {dst} ({kind})")
    return found


def test_every_package_has_a_layer():
    for path in ROOT.rglob("*.py"):
        if package_of(path):
            layer_of(package_of(path))


def test_no_package_imports_its_own_layer_or_above():
    found = violations()
    assert not found, "imports that break the layers (tests/unit/test_layers.py):\n" + "\n".join(found)


@pytest.mark.parametrize("code, bad", [
    ("from tuneforge.train.run import train\n", True),        # methods -> train: upward
    ("def f():\n    from tuneforge import deploy\n", True),    # hidden in a function: still counted
    ("from tuneforge.objectives import OBJECTIVES\n", True),  # a peer
    ("from tuneforge.config import RunConfig\n", False),      # downward
    ("from . import lora\n", False),                           # inside the package
])
def test_the_check_sees_upward_peer_and_hidden_imports(tmp_path, code, bad):
    pkg = tmp_path / "tuneforge" / "methods"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text(code)
    assert bool(violations(tmp_path / "tuneforge")) == bad
