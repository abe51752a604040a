"""The shape of the project's imports, read from the source with ast (module-level AND function-level imports, relative
and absolute): no import cycles, no private (underscore) name of one project module used by another, kontext_data
independent of kontext_trainer, and `kontext-data` starting without the heavy libraries."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kontext_data", "kontext_trainer")

HEAVY = ("torch", "diffusers", "transformers", "pyarrow", "numpy", "cv2", "PIL")
"""Libraries `kontext-data` must not import to start (they take seconds to import, and the data tools run without
them)."""


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    imports: set[str] = field(default_factory=set)
    """Project modules this one imports, anywhere in its code."""
    private_uses: list[str] = field(default_factory=list)
    """`line: what` for each private name of another project module it imports or reads as a module attribute."""


def _module_name(path: Path, root: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _project_modules(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, Module]:
    """Every module of `packages` under `root`, its imports scanned."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            name, is_package = _module_name(path, root)
            modules[name] = Module(name, path, is_package)
    for module in modules.values():
        _scan(module, modules)
    return modules


def _resolve(module: Module, node: ast.ImportFrom) -> str:
    """The absolute module name an ImportFrom reads from (relative imports resolved against `module`'s package)."""
    if not node.level:
        return node.module or ""
    package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _deepest_known(name: str, modules: dict[str, Module]) -> str | None:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in modules:
            return candidate
    return None


def _scan(module: Module, modules: dict[str, Module]) -> None:
    """Fill module.imports and module.private_uses from its source."""
    tree = ast.parse(module.path.read_text(encoding="utf-8"), filename=str(module.path))
    aliases: dict[str, str] = {}  # local name -> the project module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _deepest_known(alias.name, modules)
                if target is None:
                    continue
                module.imports.add(target)
                if alias.asname:
                    aliases[alias.asname] = target
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in modules:  # `from package import module`
                    module.imports.add(submodule)
                    aliases[alias.asname or alias.name] = submodule
                    continue
                target = _deepest_known(base, modules)
                if target is None:
                    continue
                module.imports.add(target)
                if _is_private(alias.name) and target != module.name:
                    module.private_uses.append(f"line {node.lineno}: from {target} import {alias.name}")
    for node in ast.walk(tree):  # module attributes: `speed._SDPA` where speed is a project module
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and _is_private(node.attr) and aliases[node.value.id] != module.name):
            module.private_uses.append(f"line {node.lineno}: {aliases[node.value.id]}.{node.attr}")
    module.imports.discard(module.name)


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    return _project_modules()


def _cycles(modules: dict[str, Module]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative): every import cycle
    lies inside one of them."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for root in sorted(modules):
        if root in index:
            continue
        work = [(root, iter(sorted(modules[root].imports)))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            name, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(modules[child].imports))))
                elif child in on_stack:
                    low[name] = min(low[name], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[name])
            if low[name] == index[name]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == name:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def test_the_scan_sees_function_level_and_relative_imports(modules, tmp_path):
    """The checks below are only as good as the scan: on a small package it finds the imports inside functions,
    relative ones, `from package import module`, a cycle through a lazy import, and private names taken either way."""
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": "from . import b\nfrom .c import _hidden, shown\n",
        "pkg/b.py": "def f():\n    from pkg.a import thing\n    return thing\n",
        "pkg/c.py": "_hidden = shown = 1\n",
        "pkg/sub/__init__.py": "from .d import x\n",
        "pkg/sub/d.py": "import pkg.c as c\nfrom ..c import shown\nx = c._hidden\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    found = _project_modules(tmp_path, ("pkg",))
    assert found["pkg.a"].imports == {"pkg.b", "pkg.c"} and found["pkg.b"].imports == {"pkg.a"}
    assert found["pkg.sub"].imports == {"pkg.sub.d"} and found["pkg.sub.d"].imports == {"pkg.c"}
    assert _cycles(found) == [frozenset({"pkg.a", "pkg.b"})]
    assert found["pkg.a"].private_uses == ["line 2: from pkg.c import _hidden"]
    assert found["pkg.sub.d"].private_uses == ["line 3: pkg.c._hidden"]
    # and on the project itself
    assert "kontext_trainer.recipe" in modules["kontext_trainer.cli"].imports  # imported inside a function
    assert "kontext_trainer.fa4" in modules["kontext_trainer.attention"].imports
    assert len(modules) > 40


def test_no_import_cycles(modules):
    unexpected = [sorted(c) for c in _cycles(modules)]
    assert not unexpected, ("import cycles (lazy imports inside functions count): "
                            + "; ".join(" <-> ".join(c) for c in unexpected)
                            + ". Move what both sides need into one module, or the shared part into a third.")


def test_no_private_names_across_modules(modules):
    uses = [f"{m.name} ({u})" for m in modules.values() for u in m.private_uses]
    assert not uses, ("private (underscore) names used across modules; make them public under a good name, with a "
                      "docstring: " + "; ".join(uses))


def test_kontext_data_never_imports_kontext_trainer(modules):
    bad = [f"{m.name} -> {i}" for m in modules.values() if m.name.startswith("kontext_data")
           for i in sorted(m.imports) if i.split(".")[0] == "kontext_trainer"]
    assert not bad, f"kontext_data imports kontext_trainer: {bad}"


def test_kontext_data_cli_starts_without_the_heavy_libraries():
    code = ("import json, sys\nimport kontext_data.cli\n"
            f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
