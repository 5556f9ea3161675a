"""The package layers of DESIGN.md, enforced: each package of tuneforge imports only the
packages below it (imports inside functions count too), so there is no import circle
between packages and no upward import; and no module imports itself through others.
A new package must be placed in LAYERS first.
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
    {"registry"},               # versions, aliases, keys, the registry DB tables; an index of run folders
    {"production"},             # request log, feedback, review, jobs; monitor, drift, improve
    {"deploy"},                 # export, engines, the server (gateway + routers)
    {"ui"},                     # the web dashboard: pages on the server's app (create_app + /ui)
    {"api"},                    # the Python API: the stages as functions (import tuneforge; the CLI calls it)
    {"cli"},                    # entry points: the command line (`tuneforge ui`, `serve --ui`)
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


def module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """tuneforge module -> the tuneforge modules it imports (anywhere in the file)."""
    mods = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def known(name: str) -> str | None:  # `from pkg import module` names the module itself
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[mod] |= {t for t in map(known, targets) if t and t != mod}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_between_modules():
    """Within a package too: a registry's families import its base module, not the package
    that imports them."""
    found = circles(module_graph())
    assert not found, "modules that import each other, directly or through others:\n" + "\n".join(
        " <-> ".join(g) for g in found)


def test_the_circle_check_finds_a_circle(tmp_path):
    pkg = tmp_path / "tuneforge" / "methods"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from tuneforge.methods import lora\n")
    (pkg / "lora.py").write_text("from tuneforge.methods import Method\n")
    (pkg / "base.py").write_text("X = 1\n")
    assert circles(module_graph(tmp_path / "tuneforge")) == [["tuneforge.methods", "tuneforge.methods.lora"]]
    (pkg / "lora.py").write_text("from tuneforge.methods.base import X\n")
    assert circles(module_graph(tmp_path / "tuneforge")) == []


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
