"""The package's layering: no import cycles between idiff's modules (deferred imports included) or packages, and
the lower layers import no launcher."""

import ast
import itertools
from pathlib import Path

import idiff

ROOT = Path(idiff.__file__).parent
# Rank primitives, the spec, files and the numerics sit below the jobs; launchers sit above everything.
LOWER = ("idiff.ranks", "idiff.jobspec", "idiff.diffusion", "idiff.models", "idiff.data", "idiff.storage",
         "idiff.run_dir", "idiff.checkpoints", "idiff.shards", "idiff.train", "idiff.sample", "idiff.evaluate")


def unit(module: str) -> str:
    """The package (idiff.train) or top-level module (idiff.sample) that ``module`` belongs to."""
    return ".".join(module.split(".")[:2])


def module_imports(root: Path = ROOT, top: str = "idiff", deferred: bool = False) -> dict[str, set[str]]:
    """Module -> the modules of the package ``top`` (at ``root``) it imports: at module level, or with
    ``deferred`` also inside functions."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = (top, *path.relative_to(root).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    imports = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree) if deferred else tree.body:
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


def module_cycle(imports: dict[str, set[str]]) -> list[str] | None:
    """One cycle of modules importing each other (a package's ``__init__`` re-exporting its modules aside), or None."""
    def edges(module):
        # A package's __init__ imports its own modules to re-export them; that is not a cycle of dependencies.
        return [t for t in imports.get(module, ()) if not t.startswith(module + ".")]

    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module):
        state[module] = 1
        path.append(module)
        for target in edges(module):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        state[module] = 2
        path.pop()
        return None

    for module in sorted(imports):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return None


def test_no_import_cycles_between_modules():
    cycle = module_cycle(module_imports(deferred=True))
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle_that_is_added(tmp_path):
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from .c import g\n")
    (tmp_path / "c.py").write_text("from .a import x\n")
    assert module_cycle(module_imports(tmp_path, "pkg", deferred=True)) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    assert module_cycle(module_imports(tmp_path, "pkg")) is None  # b's import is deferred


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
