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


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or (len(parts) == 2 and not (PACKAGE / parts[1]).is_dir()):
        return "root"
    return parts[1]


def imported_modules(path: Path) -> set[str]:
    """Every mammonode module the file imports (``from a import b`` counts ``a.b`` when
    ``b`` is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "mammonode")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mammonode":
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                as_path = PACKAGE.parent / candidate.replace(".", "/")
                found.add(candidate if as_path.with_suffix(".py").exists() or as_path.is_dir() else node.module)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imported_modules(p) for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts}


def test_the_package_root_keeps_only_cross_cutting_modules():
    at_root = {p.stem for p in PACKAGE.glob("*.py")}
    assert at_root <= ROOT_MODULES | {"cli"}, f"new module at the package root: {sorted(at_root - ROOT_MODULES)}"
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} <= set(ALLOWED)


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
    seen: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        if seen.get(node) == 1:
            raise AssertionError("cycle: " + " -> ".join([*path, node]))
        if seen.get(node) == 2:
            return
        seen[node] = 1
        for target in ALLOWED[node]:
            visit(target, [*path, node])
        seen[node] = 2

    for node in ALLOWED:
        visit(node, [])


def test_no_module_level_import_cycle():
    """Module-level imports (those run at import time) form no cycle between modules."""
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if "migrations" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        top = ast.Module(body=[n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)], type_ignores=[])
        names = set()
        for node in top.body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mammonode"):
                names.update(
                    f"{node.module}.{a.name}"
                    if (PACKAGE.parent / f"{node.module}.{a.name}".replace(".", "/")).with_suffix(".py").exists()
                    else node.module
                    for a in node.names
                )
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names if a.name.startswith("mammonode"))
        edges[module_name(path)] = {n for n in names if n != module_name(path)}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*path, node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for target in edges.get(node, ()):
            visit(target, [*path, node])
        state[node] = 2

    for node in edges:
        visit(node, [])


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
