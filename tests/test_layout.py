"""The library under adapters/clip runs without the platform and without the app: no module of it
imports dtlpy, `adapters.clip_adapter` or `adapters.demo` (read from the source, lazy imports included),
and its modules import each other without a cycle."""
import ast
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_library_modules_never_import_dtlpy():
    import adapters.clip
    names = sorted(m.name for m in pkgutil.iter_modules(adapters.clip.__path__) if m.name != "__main__")
    assert {"models", "embed", "train", "store", "search", "pairs", "cli"} <= set(names)
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module('adapters.clip.' + name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'dtlpy'))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ---- the import graph, read from the source ---------------------------------------------------
LIBRARY = ROOT / "adapters" / "clip"


def library_imports(path: Path) -> set[str]:
    """Absolute names of every module `path` imports, at any depth (function-level imports included)."""
    package = "adapters.clip"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from .x import y` or `from . import x`
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)  # importlib.import_module("dtlpy") is an import too
    return names


def library_graph() -> dict[str, set[str]]:
    """adapters.clip module -> the adapters.clip modules it imports."""
    modules = {f"adapters.clip.{p.stem}": p for p in LIBRARY.glob("*.py") if p.stem != "__init__"}
    return {name: {dep for dep in library_imports(path) if dep in modules and dep != name}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a path [a, b, ..., a], or [] when the graph has none (depth-first search)."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str]:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return []
        path.append(node)
        for dep in sorted(graph[node]):
            cycle = visit(dep)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return []

    for node in sorted(graph):
        cycle = visit(node)
        if cycle:
            return cycle
    return []


def test_find_cycle_sees_a_cycle_through_several_modules():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_library_imports_reads_relative_and_function_level_imports(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("from .store import Store\n\ndef f():\n    from . import search\n    import dtlpy\n")
    assert {"adapters.clip.store", "adapters.clip.search", "dtlpy"} <= library_imports(source)


def test_library_has_no_import_cycle():
    """Lazy and TYPE_CHECKING imports count too: a cycle hidden inside a function is still a cycle."""
    assert find_cycle(library_graph()) == []


APP_MODULES = ("dtlpy", "adapters.clip_adapter", "adapters.demo")


def app_imports(names: set[str]) -> list[str]:
    return sorted(n for n in names if any(n == app or n.startswith(app + ".") for app in APP_MODULES))


def test_app_imports_are_seen_at_any_depth(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("def cmd():\n    if True:\n        from ..demo import run_demo\n"
                      "class A:\n    def f(self):\n        import adapters.clip_adapter as app\n"
                      "from dtlpy.entities import Item\nimport adapters.clip.store\n"
                      "importlib.import_module('adapters.demo')\n")
    found = set(app_imports(library_imports(source)))
    assert {"adapters.demo", "adapters.demo.run_demo", "adapters.clip_adapter", "dtlpy.entities"} <= found
    assert not any(name.startswith("adapters.clip.") for name in found)


def test_no_library_module_imports_the_app_or_dtlpy_even_lazily():
    offenders = {path.relative_to(ROOT).as_posix(): app_imports(library_imports(path))
                 for path in sorted(LIBRARY.glob("*.py"))}
    assert {path: names for path, names in offenders.items() if names} == {}
