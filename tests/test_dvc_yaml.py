"""dvc.yaml's code dependencies are complete: a change to any module a stage runs reruns it.

DVC only knows the files listed in a stage's ``deps``. A module the train stage imports
but dvc.yaml leaves out would change trajectories without `dvc repro` retraining them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# Run by the stages but left out of their deps, and why.
NOT_DEPS = {
    # the version (recorded in each run's metadata as the one that trained it) and the lazy
    # public API: neither changes what a stage computes, and upgrading should not retrain
    "__init__.py",
}


def module_file(module: str) -> Path | None:
    """The repository file of a ``weightlapse.`` module (the root is the package)."""
    path = ROOT.joinpath(*module.split(".")[1:])
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def imported_closure(module: str) -> set[str]:
    """Repository files of ``module`` and everything it imports from weightlapse, at any
    depth, function-level imports included (a lazy import runs too), with their packages."""
    seen: set[str] = set()
    files: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:end]) for end in range(1, len(parts)))  # its packages run first
        path = module_file(name)
        if path is None:
            continue
        files.add(path.relative_to(ROOT).as_posix())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("weightlapse"):
                todo.append(node.module)
                todo.extend(f"{node.module}.{alias.name}" for alias in node.names
                            if module_file(f"{node.module}.{alias.name}") is not None)
            elif isinstance(node, ast.Import):
                todo.extend(alias.name for alias in node.names if alias.name.startswith("weightlapse"))
    return files


def stage_code_deps(stage: dict) -> set[str]:
    body = stage.get("do", stage)
    return {dep for dep in body["deps"] if dep.endswith(".py")}


def test_every_module_a_stage_runs_is_in_its_deps():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage, module in (("download", "weightlapse.pipeline.download"), ("train", "weightlapse.pipeline.train"),
                          ("sweep", "weightlapse.pipeline.sweep"), ("summary", "weightlapse.pipeline.summary")):
        needed = imported_closure(module) - NOT_DEPS
        listed = stage_code_deps(stages[stage])
        assert needed - listed == set(), f"dvc.yaml's {stage} stage leaves out modules it runs"
        assert listed - needed == set(), f"dvc.yaml's {stage} stage lists modules it does not run"


def test_the_closure_follows_imports_at_any_depth_and_stays_in_the_pipeline():
    # train -> engines -> graph_engine: the cuda-graph engine's code is a dependency on any machine
    assert "pipeline/graph_engine.py" in imported_closure("weightlapse.pipeline.train")
    assert "viewer/app.py" not in imported_closure("weightlapse.pipeline.train")
