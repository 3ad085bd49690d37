"""The package's import rules, read from the source (ARCHITECTURE.md explains them).

Every import of a mammonode module, at module level or inside a function, is checked
against the allowed dependencies between packages, so that a later change cannot quietly
add an upward import or a cycle. The listener's process must not load PyTorch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mammonode"

# What each room may import besides itself. "root" is the package's top level: cross-cutting
# modules (config, logs, metrics, the version) that import nothing of ours.
ALLOWED: dict[str, set[str]] = {
    "root": set(),
    "exam": {"root"},
    "db": {"root", "exam"},
    "pipeline": {"root", "exam"},
    "reporting": {"root", "exam", "pipeline"},
    "ingest": {"root", "exam", "db"},
    "delivery": {"root"},
    "web": {"root", "exam", "db", "ingest"},
    "service": {"root", "exam", "db", "pipeline", "reporting", "ingest", "delivery", "web"},
    "demo": {"root", "exam", "db", "pipeline", "service"},
    "cli": {"root", "exam", "db", "pipeline", "reporting", "ingest", "delivery", "web", "service", "demo"},
}
ROOT_MODULES = {"__init__", "config", "logs", "metrics"}
# Cross-cutting packages that count as root: every room may use them, they use only root.
ROOT_PACKAGES = {"audit"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or (len(parts) == 2 and not (PACKAGE / parts[1]).is_dir()) or parts[1] in ROOT_PACKAGES:
        return "root"
    return parts[1]


def _resolve(module: str, name: str) -> str:
    """``from module import name``: the module ``module.name`` when it is one, else ``module``."""
    candidate = PACKAGE.parent / f"{module}.{name}".replace(".", "/")
    return f"{module}.{name}" if candidate.with_suffix(".py").exists() or candidate.is_dir() else module


def imported_modules(path: Path, module_level_only: bool = False) -> set[str]:
    """Every mammonode module the file imports, anywhere or (``module_level_only``) only
    where it runs at import time."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "mammonode")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mammonode":
            found.update(_resolve(node.module, alias.name) for alias in node.names)
    return found


def assert_acyclic(edges: dict[str, set[str]]) -> None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == 1:
            raise AssertionError("cycle: " + " -> ".join([*path, node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for target in edges.get(node, ()):
            visit(target, [*path, node])
        state[node] = 2

    for node in list(edges):
        visit(node, [])


def graph() -> dict[str, set[str]]:
    return {module_name(p): imported_modules(p) for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts}


def test_the_package_root_keeps_only_cross_cutting_modules():
    at_root = {p.stem for p in PACKAGE.glob("*.py")}
    assert at_root <= ROOT_MODULES | {"cli"}, f"new module at the package root: {sorted(at_root - ROOT_MODULES)}"
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} <= set(ALLOWED) | ROOT_PACKAGES


def test_every_import_follows_the_allowed_package_dependencies():
    wrong = []
    for module, imports in graph().items():
        source = room(module)
        for target in imports:
            destination = room(target)
            if destination != source and destination not in ALLOWED[source]:
                wrong.append(f"{module} imports {target} ({source} -> {destination})")
    assert not wrong, "imports against ARCHITECTURE.md:\n" + "\n".join(sorted(wrong))


def test_the_allowed_dependencies_have_no_cycle():
    assert_acyclic(ALLOWED)


def test_no_module_level_import_cycle():
    """Imports that run at import time form no cycle between modules."""
    edges = {}
    for path in PACKAGE.rglob("*.py"):
        if "migrations" not in path.parts:
            name = module_name(path)
            edges[name] = imported_modules(path, module_level_only=True) - {name}
    assert_acyclic(edges)


def test_listeners_and_admin_cli_do_not_load_torch():
    code = (
        "import sys\n"
        "import mammonode.cli, mammonode.ingest.dimse, mammonode.ingest.stow, mammonode.web.app\n"
        "loaded = [m for m in ('torch', 'cv2') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_pipeline_and_reporting_never_touch_the_database_or_network():
    for module, imports in graph().items():
        if room(module) in ("pipeline", "reporting"):
            assert not any(room(t) in ("db", "ingest", "delivery", "service", "web") for t in imports), module
