"""Imports go only downward: ground floor <- models <- data <- sampling <- train, eval <- pipeline <- bench
<- cli; and no two files of the package import each other, directly or around a circle.

The same order is written out in README's Development section.

Read from the source with `ast` (every `import`, at the top or inside a function), so a lazy
import inside a handler counts as much as one at the top of a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mixsd_jax

PACKAGE = Path(mixsd_jax.__file__).parent
# Floor of each top-level part; a module may import its own floor or a lower one. `train`, `eval`
# and `edit` share a floor but are siblings: none imports another (checked below).
FLOORS = {
    "errors": 0, "files": 0, "storage": 0, "config": 0, "multihost": 0, "peer_watch": 0, "answers": 0, "compile_cache": 0,
    "cpu": 0, "huge_pages": 0,
    "models": 1,
    "data": 2,
    "sampling": 3,
    "train": 4, "eval": 4, "edit": 4,
    "pipeline": 5,
    "bench": 6,
    "cli": 7,
    "__main__": 8,
    "__init__": 0,  # the version only
}
GROUND = {name for name, floor in FLOORS.items() if floor == 0}


def _part(module: str) -> str:
    """`mixsd_jax.eval.runner` -> `eval`."""
    return module.split(".")[1] if "." in module else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("mixsd_jax.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "mixsd_jax":  # `from mixsd_jax import config`
                found += [(node.lineno, f"mixsd_jax.{alias.name}") for alias in node.names]
            elif node.module.startswith("mixsd_jax."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}:{node.lineno}: relative import (the floors are read from absolute ones)")
    return found


def _modules(package: Path = PACKAGE) -> list[tuple[Path, str]]:
    out = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).with_suffix("")
        out.append((path, ".".join((package.name,) + rel.parts)))
    return out


def _file_imports(path: Path, prefix: str) -> set[str]:
    """Every module of the package `prefix` this file imports; `from a.b import c` counts as a.b.c
    where that is a module (c is then the file imported, not a name in a/b/__init__.py)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == prefix}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] == prefix:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def import_circles(package: Path) -> list[list[str]]:
    """The file-level import circles of a package directory: each as the list of its modules, the
    first repeated at the end. A package's `__init__` stands for the package's own name."""
    files = {name.removesuffix(".__init__"): path for path, name in _modules(package)}
    graph = {name: sorted(target for target in _file_imports(path, package.name) if target in files and target != name)
             for name, path in files.items()}
    circles, state = [], {}  # state: 1 = on the current path, 2 = done

    def visit(name, path):
        state[name] = 1
        for target in graph[name]:
            if state.get(target) == 1:
                circles.append(path[path.index(target):] + [name, target] if target in path else [name, target])
            elif target not in state:
                visit(target, path + [name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    return circles


def test_every_part_has_a_floor():
    parts = {_part(name) for _, name in _modules()}
    assert parts <= set(FLOORS), f"give these a floor: {sorted(parts - set(FLOORS))}"


def test_imports_go_only_downward():
    upward = []
    for path, name in _modules():
        here = _part(name)
        for line, target in _imports(path):
            there = _part(target)
            assert there in FLOORS, f"{path}:{line}: imports {target}, a part without a floor"
            sideways = here != there and FLOORS[here] == FLOORS[there] and here not in GROUND
            if FLOORS[there] > FLOORS[here] or sideways:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {here} -> {target}")
    assert not upward, "imports that go up (or across to a sibling):\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    """The reader above must find a lazy import inside a function (where an upward import hides most easily)."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from mixsd_jax.sampling.engine import generate\n", encoding="utf-8")
    assert _imports(source) == [(2, "mixsd_jax.sampling.engine")]


def test_no_file_imports_itself_through_others():
    circles = import_circles(PACKAGE)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_the_circle_check_sees_a_lazy_circle(tmp_path):
    """A circle closed by an import inside a function (the kind that hides from a module's top)."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    for init in (package / "__init__.py", package / "sub" / "__init__.py"):
        init.write_text("", encoding="utf-8")
    (package / "sub" / "a.py").write_text("from pkg.sub import b\n", encoding="utf-8")
    (package / "sub" / "b.py").write_text("import pkg.c\n", encoding="utf-8")
    (package / "c.py").write_text("def f():\n    from pkg.sub.a import g\n", encoding="utf-8")
    (package / "d.py").write_text("from pkg.sub import a\n", encoding="utf-8")  # into the circle, not on it
    assert import_circles(package) == [["pkg.c", "pkg.sub.a", "pkg.sub.b", "pkg.c"]]
    (package / "c.py").write_text("def f():\n    pass\n", encoding="utf-8")
    assert import_circles(package) == []


def test_only_cli_imports_the_benchmarks():
    """`bench` sits above every product package: nothing but the command line may reach it."""
    reaching = [f"{path.relative_to(PACKAGE.parent)}:{line}: {target}"
                for path, name in _modules() if _part(name) not in ("bench", "cli")
                for line, target in _imports(path) if _part(target) == "bench"]
    assert not reaching, "imports of mixsd_jax.bench outside cli:\n" + "\n".join(reaching)
