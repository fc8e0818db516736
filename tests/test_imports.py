"""The package's modules import each other without cycles, and each imports on its own."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"weightlapse": REPO, "weightlapse.pipeline": REPO / "pipeline", "weightlapse.viewer": REPO / "viewer",
            "weightlapse.viewer.analysis": REPO / "viewer" / "analysis"}


def package_modules() -> dict[str, Path]:
    """Every module of the distribution by its dotted name."""
    modules = {}
    for package, directory in PACKAGES.items():
        for path in sorted(directory.glob("*.py")):
            modules[package if path.name == "__init__.py" else f"{package}.{path.stem}"] = path
    return modules


def imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source (in functions too:
    an import deferred to a call still ties the two modules together)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            # `from package import module` imports the module; `from module import name`, the module
            targets.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names)
    return {target for target in targets if target in modules and target != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, str] = {}  # module -> "open" while on the search's path, "done" after

    def visit(module: str, path: list[str]) -> list[str] | None:  # path: from the search's root to module
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target, path + [target])):
                return found
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module, [module])):
            return found
    return None


def test_no_module_imports_itself_through_others():
    modules = package_modules()
    assert "weightlapse.pipeline.engines" in modules and "weightlapse.viewer.analysis.runs" in modules
    graph = {name: imported(name, path, modules) for name, path in modules.items()}
    assert "weightlapse.pipeline.graph_engine" in graph["weightlapse.pipeline.engines"]  # the walk sees imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_every_pipeline_module_imports_in_a_fresh_interpreter():
    # graph_engine included: it must import on a machine without CUDA
    names = [name for name in package_modules() if name.startswith("weightlapse.pipeline")]
    probe = "import importlib, sys; [importlib.import_module(name) for name in sys.argv[1:]]; print('ok')"
    result = subprocess.run([sys.executable, "-c", probe, *names], capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr


def test_validating_params_does_not_load_torch():
    probe = "import sys, weightlapse.pipeline.params; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
