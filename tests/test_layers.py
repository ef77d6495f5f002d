"""The package's layers (docs/design.md): every import, at the top of a module or inside a function, goes to the same
layer or one below, and no two modules import each other, directly or through others."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: Layers, lowest first: a module may import only from its own layer and the layers below. A module takes the layer
#: of the longest prefix listed here (docs/design.md draws the same picture).
LAYERS: list[tuple[str, ...]] = [
    # 0: foundations (errors, version, safe files, devices, switches, CUDA graphs, statistics)
    (
        "b4m.errors",
        "b4m.version",
        "b4m._quiet",
        "b4m._lazy",
        "b4m.settings",
        "b4m.hub",
        "b4m.files",
        "b4m.nested",
        "b4m.device",
        "b4m.switch",
        "b4m.cuda_graphs",
        "b4m.environment",
        "b4m.metrics.stats",
    ),
    # 1: the adapter (torch only)
    ("b4m.adapter",),
    # 2: what other tools read, images, the base-model interface and its diffusers families, metrics, reports
    (
        "b4m.lora_files",
        "b4m.unet_skeleton",
        "b4m.describe",
        "b4m.data",
        "b4m.images",
        "b4m.progress",
        "b4m.report",
        "b4m.models",
        "b4m.metrics",
    ),
    # 3: the built-in world: catalog, renderer, its base model, oracles, tasks
    ("b4m.world",),
    # 4: loading any base model; the training loop
    ("b4m.loading", "b4m.training"),
    # 5: the method
    ("b4m.method",),
    # 6: what uses the method: the baselines, run folders, several runs at once
    ("b4m.baselines", "b4m.runs", "b4m.sweep"),
    # 7: the applications: the world's demo, its benchmark, retraining its base model; the web app
    ("b4m.world.demo", "b4m.world.bench", "b4m.world.pretrain", "b4m.ui"),
    # 8: the command line
    ("b4m.cli",),
    # 9: the package's facade (b4m/__init__.py: names imported on first use)
    ("b4m",),
]


def layer_of(module: str) -> int:
    best, layer = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, layer = len(p), i
    assert layer is not None, f"{module} is in no layer: add it to LAYERS (and to docs/design.md)"
    return layer


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "b4m").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The b4m modules ``name`` imports anywhere in its file (``from . import x`` resolved to the module ``x`` where
    there is one)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "b4m"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "b4m":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return found - {name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_import_goes_down_or_sideways():
    edges = graph()
    upward = []
    for source, targets in edges.items():
        for target in targets:
            # Importing a.b.c runs a/__init__.py and a/b/__init__.py too (b4m's own facade excepted: it imports
            # nothing but errors and the version until a name is asked for).
            parts = target.split(".")
            chain = [".".join(parts[:i]) for i in range(2, len(parts) + 1)]
            upward += [(source, t) for t in chain if t in edges and layer_of(t) > layer_of(source)]
    assert not upward, "imports that go up a layer: " + "; ".join(f"{s} -> {t}" for s, t in sorted(set(upward)))


def test_the_facade_imports_only_foundations_at_import_time():
    tree = ast.parse((SRC / "b4m" / "__init__.py").read_text())
    top = {f"b4m.{n.module}" for n in tree.body if isinstance(n, ast.ImportFrom) and n.level == 1}
    assert top and all(layer_of(m) == 0 for m in top), top


def test_no_import_cycles():
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("limit", [500])
def test_files_stay_readable_in_one_sitting(limit):
    """docs/design.md: files of about 500 lines at most (a module that grows past it should split by job)."""
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > limit * 1.1}
    assert not long, f"files over {limit} lines: {long}"


def test_no_public_name_of_a_lazy_package_is_also_one_of_its_submodules():
    # `from b4m.runs import generate` must give the function: a submodule of the same name would be set on the
    # package as soon as it is imported, and the import would then give the module.
    import importlib
    import pkgutil

    import b4m

    clashes = []
    for info in pkgutil.walk_packages(b4m.__path__, "b4m."):
        if not info.ispkg:
            continue
        package = importlib.import_module(info.name)
        if getattr(package, "__getattr__", None) is None:  # eager packages bind their names after their imports
            continue
        submodules = {m.name for m in pkgutil.iter_modules(package.__path__)}
        clashes += [f"{info.name}.{name}" for name in package.__all__ if name in submodules]
    assert clashes == []
