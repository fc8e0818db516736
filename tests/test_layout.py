"""The codebase keeps the shape the next engineer relies on: small modules, small classes, and
each module's tests in its own file (or a named reason where they live elsewhere)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "viewer")
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 250

# Packages tested through their public namespace, in one file: their modules are private.
TESTED_AS_A_PACKAGE = {"pipeline/store": "test_store.py"}

# The viewer's state, data store and components are tested together through the app's view
# state, as a page uses them: without a browser in test_viewer_app.py, in Chromium against a
# real `panel serve` in test_viewer_browser.py.
VIEWER_COMPONENT = "test_viewer_app.py and test_viewer_browser.py: through the view state, as a page uses it"

# Modules whose behaviour is tested through another file, and why.
TESTED_ELSEWHERE = {
    "viewer/analysis/run.py": "test_runs.py: a run opened through the catalog, as every reader opens it",
    "viewer/analysis/stored_run.py": "test_runs.py and test_network.py: runs refreshed as they are written and retrained",
    "viewer/analysis/geometry.py": "test_compare.py and test_network_compare.py: the PCA and similarities of both comparisons",
    "viewer/analysis/classifiers.py": "test_function_space.py: predictions of softmax and network runs against the train stage's scores",
    "viewer/analysis/stats_command.py": "test_stats.py: the command on softmax and network runs, against numpy",
    "viewer/analysis/renderers.py": "test_export.py: the frames and files the exports write, decoded",
    "viewer/analysis/layouts.py": "test_network_plots.py: each shape's layout, with the picture drawn from it",
    "viewer/layer_picture.py": "test_network_view.py: the single picture and Side by side's, as the browser receives them",
    "viewer/app.py": VIEWER_COMPONENT,
    "viewer/comparison.py": VIEWER_COMPONENT,
    "viewer/curves.py": VIEWER_COMPONENT,
    "viewer/data.py": VIEWER_COMPONENT,
    "viewer/picker.py": VIEWER_COMPONENT,
    "viewer/player.py": VIEWER_COMPONENT,
    "viewer/plots.py": VIEWER_COMPONENT,
    "viewer/state.py": VIEWER_COMPONENT,
    "viewer/tasks.py": VIEWER_COMPONENT,
    "viewer/predictions.py": VIEWER_COMPONENT,
    "viewer/tiles.py": VIEWER_COMPONENT,

    "pipeline/train.py": "test_train_stage.py: the train stage, run as DVC runs it",
    "pipeline/recording.py": "test_train_stage.py and test_resume.py: what a run records is checked on real runs",
    "pipeline/torch_engine.py": "test_engines.py and test_trainer.py: the autograd engine against the others",
    "pipeline/numpy_optimizers.py": "test_optimizers.py: each against torch's optimizer, step by step",
    "pipeline/writer_messages.py": "test_store_writer.py: the messages as the store writer carries them out",
    "pipeline/handoff.py": "test_store_writer.py and test_crash_safety.py: the transport under a killed trainer",
    "pipeline/network_writer.py": "test_recorder.py: the network store written through the Recorder, killed too",
    "pipeline/network_recording.py": "test_train_stage.py and test_resume.py: hidden-layer runs, trained and resumed",
    "pipeline/checkpoints.py": "test_resume.py: held-out scores and checkpoints of runs killed and resumed",
    "pipeline/layers.py": "test_params.py and test_mlp.py: train.hidden as params.yaml gives it, and the model it makes",
    "pipeline/chunkwriter.py": "test_store_writer.py and test_faults.py: atomic chunks, full disks, bad files",
    "pipeline/params_values.py": "test_params.py: each check through the params.yaml a user writes",
    "pipeline/safe_yaml.py": "test_params.py: the YAML guard through the params a user writes",
    "pipeline/sweep.py": "test_distributed.py: sweeps on a real Dask cluster",
    "pipeline/cluster.py": "test_distributed.py: a real Dask cluster with an S3 server",
    "viewer/main.py": "test_viewer_browser.py: what `panel serve viewer/` runs, in a real browser",
    "viewer/app_hooks.py": "test_viewer_security.py: the Host check on a real server",
    "viewer/access.py": "test_viewer_security.py: privacy on a real server",
}


def modules() -> list[Path]:
    found = [ROOT / "__init__.py", ROOT / "cli.py"]
    for package in PACKAGES:
        found += sorted(path for path in (ROOT / package).rglob("*.py") if "__pycache__" not in path.parts)
    return found


def test_no_module_is_over_the_size_a_reader_takes_in():
    sizes = {path.relative_to(ROOT).as_posix(): len(path.read_text().splitlines()) for path in modules()}
    assert {name: lines for name, lines in sizes.items() if lines > MAX_MODULE_LINES} == {}


def test_no_class_is_over_the_size_a_reader_takes_in():
    large = {}
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                large[f"{path.relative_to(ROOT).as_posix()}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert large == {}


def test_each_module_has_its_test_file_or_a_named_reason():
    missing = []
    for path in modules():
        name = path.relative_to(ROOT).as_posix()
        package = path.parent.relative_to(ROOT).as_posix()
        if package in TESTED_AS_A_PACKAGE:
            test_file = TESTED_AS_A_PACKAGE[package]
        elif path.name == "__init__.py" or name in TESTED_ELSEWHERE:
            continue
        else:
            test_file = f"test_{path.stem}.py"
        if not (ROOT / "tests" / test_file).is_file():
            missing.append(name)
    assert missing == [], "add tests/test_<module>.py, or say in TESTED_ELSEWHERE where its tests are"


def test_every_named_reason_is_about_a_module_that_exists():
    names = {path.relative_to(ROOT).as_posix() for path in modules()}
    assert set(TESTED_ELSEWHERE) - names == set()
