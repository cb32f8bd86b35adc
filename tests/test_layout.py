"""The package's layering: no import cycles between idiff's packages, and the lower layers import no launcher."""

import ast
import itertools
from pathlib import Path

import idiff

ROOT = Path(idiff.__file__).parent
# Rank primitives, the spec, files and the numerics sit below the jobs; launchers sit above everything.
LOWER = ("idiff.dist", "idiff.spec", "idiff.diffusion", "idiff.models", "idiff.data", "idiff.storage",
         "idiff.run_dir", "idiff.checkpoints", "idiff.shards", "idiff.train", "idiff.sample", "idiff.evaluate")


def unit(module: str) -> str:
    """The package (idiff.train) or top-level module (idiff.sample) that ``module`` belongs to."""
    return ".".join(module.split(".")[:2])


def module_imports() -> dict[str, set[str]]:
    """Module -> the idiff modules it imports at module level (imports inside functions are deferred on purpose)."""
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = ("idiff", *path.relative_to(ROOT).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    imports = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join(base + [node.module] if node.module else base)
                targets = [f"{target}.{alias.name}" for alias in node.names]
                found.update(t for t in targets if t in modules)
                if not all(t in modules for t in targets) and target in modules:
                    found.add(target)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name in modules)
        imports[name] = found - {name}
    return imports


def test_no_import_cycles_between_packages():
    edges = {}
    for module, targets in module_imports().items():
        for target in targets:
            if unit(module) != unit(target) and unit(module) != "idiff":
                edges.setdefault(unit(module), set()).add(unit(target))
    for a, b in itertools.permutations(edges, 2):
        reachable, todo = set(), [b]
        while todo:
            node = todo.pop()
            if node not in reachable:
                reachable.add(node)
                todo.extend(edges.get(node, ()))
        assert not (b in edges[a] and a in reachable), f"import cycle between {a} and {b}"


def test_the_lower_layers_import_no_launcher():
    for module, targets in module_imports().items():
        if unit(module) in LOWER:
            upward = sorted(t for t in targets if unit(t) in ("idiff.launch", "idiff.cli", "idiff.status"))
            assert not upward, f"{module} imports {upward}"
