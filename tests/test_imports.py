"""Imports go only downward: ground floor <- models <- data <- sampling <- train, eval <- pipeline <- cli.

The same order is written out in README's Development section.

Read from the source with `ast` (every `import`, at the top or inside a function), so a lazy
import inside a handler counts as much as one at the top of a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mixsd_jax

PACKAGE = Path(mixsd_jax.__file__).parent
# Floor of each top-level part; a module may import its own floor or a lower one. `train` and
# `eval` share a floor but are siblings: neither imports the other (checked below).
FLOORS = {
    "errors": 0, "files": 0, "storage": 0, "config": 0, "multihost": 0, "answers": 0, "criteria": 0, "compile_cache": 0, "machine": 0,
    "models": 1,
    "data": 2,
    "sampling": 3,
    "train": 4, "eval": 4,
    "pipeline": 5,
    "cli": 6,
    "__main__": 7,
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


def _modules() -> list[tuple[Path, str]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        out.append((path, ".".join(("mixsd_jax",) + rel.parts)))
    return out


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
    """The reader above must find a lazy import inside a function (what every old arrow was)."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from mixsd_jax.sampling.runner import generate\n", encoding="utf-8")
    assert _imports(source) == [(2, "mixsd_jax.sampling.runner")]
