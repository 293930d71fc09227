"""The package's imports point one way: each module imports only modules of its own layer or the
layers below it, and the import graph has no cycle. Layers, bottom to top:

  base      config.py, constants.py, util.py (and the package root, which imports lazily)
  models    models/
  checkpoints  checkpoints/
  planning  planning/ (plain Python + NumPy: no JAX)
  runtime   runtime/
  profiler  profiler.py (measures the runtime)
  engine    engine.py, generate_io.py, demo.py, engine_profile.py (profiles with the engine)
  app       bench/, cli/

Every `import` counts, also one inside a function (a deferred import is still a dependency).
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "klotski_jax"

LAYERS = ("base", "models", "checkpoints", "planning", "runtime", "profiler", "engine", "app")
# Longest prefix wins.
PREFIXES = {
    "klotski_jax": "base",
    "klotski_jax.config": "base",
    "klotski_jax.constants": "base",
    "klotski_jax.util": "base",
    "klotski_jax.models": "models",
    "klotski_jax.checkpoints": "checkpoints",
    "klotski_jax.planning": "planning",
    "klotski_jax.runtime": "runtime",
    "klotski_jax.profiler": "profiler",
    "klotski_jax.engine": "engine",
    "klotski_jax.generate_io": "engine",
    "klotski_jax.demo": "engine",
    "klotski_jax.engine_profile": "engine",
    "klotski_jax.bench": "app",
    "klotski_jax.cli": "app",
}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer_of(module: str) -> str:
    best = max((p for p in PREFIXES
                if module == p or (p != "klotski_jax" and module.startswith(p + "."))),
               key=len, default=None)
    if best is None:
        raise AssertionError(f"{module} belongs to no layer: add it to PREFIXES in {__file__}")
    return PREFIXES[best]


def resolve(name: str) -> str | None:
    """The package module an imported name refers to (a module, or its nearest parent)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> set[str]:
    """The klotski_jax modules `module` imports (anywhere in the file)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            # `from pkg import sub` imports the submodule sub when there is one.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                     for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "klotski_jax" and (target := resolve(name)) is not None:
                if target != module:
                    out.add(target)
    return out


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    for m in MODULES:
        assert layer_of(m) in LAYERS


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_from_a_higher_layer(module):
    mine = LAYERS.index(layer_of(module))
    for target in sorted(GRAPH[module]):
        theirs = LAYERS.index(layer_of(target))
        assert theirs <= mine, (f"{module} (layer {LAYERS[mine]}) imports {target} (layer "
                                f"{LAYERS[theirs]}, above it)")


def test_import_graph_has_no_cycle():
    # The package root imports nothing eagerly but config/constants; parents of a module are
    # not edges (importing klotski_jax.a.b runs klotski_jax.a/__init__, which imports nothing up).
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(GRAPH[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)} ({m} imports {t})")
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


def test_planning_imports_no_jax():
    planning = sorted(m for m in MODULES if layer_of(m) == "planning")
    assert "klotski_jax.planning.planner" in planning
    code = ("import sys, importlib\n"
            f"for m in {planning!r}:\n"
            "    importlib.import_module(m)\n"
            "    assert 'jax' not in sys.modules, m + ' imports jax'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_checker_sees_violations():
    """The checks above would fail on a back-reference and on a cycle."""
    assert layer_of("klotski_jax.planning.costs") == "planning"
    assert "klotski_jax.runtime.host" in GRAPH["klotski_jax.profiler"]
    assert LAYERS.index(layer_of("klotski_jax.runtime.host")) > LAYERS.index("planning")
