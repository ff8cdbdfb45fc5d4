"""The layer rule of ARCHITECTURE.md, checked from the source: no module imports a layer above its own.

Every import of a ``tierec`` module anywhere in a file counts (top-level or inside a function), so a
lazy import cannot hide an upward dependency. A new package or top-level module must be given a layer
here, or this test fails.
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "tierec"

# Bottom to top. Modules in one layer may import each other; a layer imports only layers below it.
LAYERS = [
    {"__init__", "errors", "fsio", "malloc", "masks", "config"},  # leaves: errors, files, memory, masks, typed configs
    {"sparse", "energy"},  # keyed jagged tensors; energy and carbon accounting
    {"data"},  # data sets, readers, converters, generator
    {"sim"},  # offline cache simulators over traces (read data sets)
    {"storage"},  # table storage: base seam, table files, SSD tier, caches, groups, plans
    {"modules"},  # embedding bags, optimizers, DLRM, two-tower
    {"train"},  # the loop, pipeline, checkpoints, run directory
    {"distributed"},  # torchrun: sharded tables, DDP
    {"inference"},  # serving: model store, batcher, HTTP app
    {"cli", "__main__"},  # the command line, on top
]


def _unit(parts: list[str]) -> str:
    """The layer unit of module ``tierec.a.b`` (its package ``a``, or ``a`` itself for a top-level module)."""
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out += [(node.lineno, n) for n in names if n == "tierec" or n.startswith("tierec.")]
    return out


def test_every_package_has_a_layer():
    rank = {u for layer in LAYERS for u in layer}
    units = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
             if (p.is_file() and p.suffix == ".py") or (p.is_dir() and (p / "__init__.py").exists())}
    assert units <= rank, f"give these a layer in tests/test_layers.py: {sorted(units - rank)}"


def test_no_module_imports_a_layer_above_its_own():
    rank = {u: i for i, layer in enumerate(LAYERS) for u in layer}
    upward = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        me = _unit(list(rel.parts))
        for line, target in _imports(path):
            them = _unit(target.split("."))
            if rank[them] > rank[me]:
                upward.append(f"{path.relative_to(SRC.parent)}:{line}: imports {target} ({them} is above {me})")
    assert not upward, "\n".join(upward)
