"""The package's layers: imports point down only (data <- cf, llm <- adapters <- methods <- tasks <- train <- cli),
and no two modules import each other, directly or through others. Read from the source with ``ast``, so an
import inside a function or under ``TYPE_CHECKING`` counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "recadapt"
# lower number = lower layer; a module may import its own package and any package of a lower layer. cf and llm
# share a layer: both rest on data and neither on the other.
LAYERS = {
    "errors": 0, "io": 0, "paths": 0, "progress": 0,
    "data": 1,
    "cf": 2, "llm": 2,
    "adapters": 3,
    "methods": 4,
    "tasks": 5,
    "train": 6,
    "report": 7, "serving": 7, "cli": 8,
}  # fmt: skip


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The recadapt modules ``path`` imports (``from recadapt.x import y`` counts ``recadapt.x.y`` when that is a
    module, else ``recadapt.x``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.startswith("recadapt.") and _exists(name):
                found.add(name)
    return found


def _exists(module: str) -> bool:
    relative = Path(*module.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").exists() or (PACKAGE / relative / "__init__.py").exists()


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _package(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_every_package_has_a_layer() -> None:
    packages = {_package(m) for m in _graph()} - {""}
    assert packages <= set(LAYERS), f"add {sorted(packages - set(LAYERS))} to LAYERS"


def test_imports_point_down_only() -> None:
    upward = []
    for module, imported in _graph().items():
        if not _package(module):
            continue  # the package's own __init__ (the version)
        for target in imported:
            source_package, target_package = _package(module), _package(target)
            if source_package != target_package and LAYERS[target_package] >= LAYERS[source_package]:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that do not point down:\n" + "\n".join(sorted(upward))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_cycles() -> None:
    """No circle between packages, nor between modules; within a package, the edges between a module and the
    package's own ``__init__`` (its re-exports) do not count."""
    graph = _graph()
    packages: dict[str, set[str]] = {}
    for module, imported in graph.items():
        packages.setdefault(_package(module), set()).update(
            _package(t) for t in imported if _package(t) != _package(module)
        )
    modules = {
        module: {t for t in imported if not (module.startswith(t + ".") or t.startswith(module + "."))}
        for module, imported in graph.items()
    }
    cycles = _cycles(packages) + _cycles(modules)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path: Path, monkeypatch) -> None:
    """The rules above can fail: a data module importing train, and two modules importing each other."""
    import shutil

    fake = tmp_path / "recadapt"
    shutil.copytree(PACKAGE, fake)
    (fake / "data" / "upward.py").write_text("from recadapt.train import config\n")
    (fake / "io.py").write_text((fake / "io.py").read_text() + "\nfrom recadapt import paths\n")
    (fake / "paths.py").write_text((fake / "paths.py").read_text() + "\nfrom recadapt import io\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", fake)
    import pytest

    with pytest.raises(AssertionError, match=r"recadapt\.data\.upward -> recadapt\.train\.config"):
        test_imports_point_down_only()
    with pytest.raises(AssertionError, match=r"recadapt\.io -> recadapt\.paths -> recadapt\.io"):
        test_no_import_cycles()
