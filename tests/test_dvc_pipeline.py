"""A real `dvc repro` of the project's pipeline, in a temporary copy of the repository.

Two data sources: Fashion-MNIST from Debian's package, fetched by the real download stage
(skipped where the package is absent), and generated IDX files recorded as the download
stage's output with `dvc commit`, which any machine can run.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from idx_files import write_dataset
from weightlapse.pipeline.params import load_params
from weightlapse.pipeline.store import TrajectoryError, open_run, read_progress

pytestmark = pytest.mark.slow  # real dvc repro runs

REPO = Path(__file__).resolve().parents[1]
COPIED = ["__init__.py", "pipeline", "dvc.yaml", "params.yaml", ".dvc/config", ".dvc/.gitignore", ".dvc/plots", ".gitignore"]
RUNS = ("mlp-32", "sgd-momentum")
# Most tests shrink the sweep to one dataset, optimizer and lr (one stage of three seeds).
SMALL_SWEEP = {"dataset": ["mnist"], "optimizer": ["adam"], "lr": [0.001], "batch_size": [20], "seed": [0, 1, 2]}
SMALL_POINTS = [f"adam-lr0.001-b20-seed{seed}" for seed in (0, 1, 2)]
STAGES = sorted([*(f"train@{run}" for run in RUNS), "sweep@mnist-adam-20", "summary"])
PLOTS = ("Training loss of every run", "Held-out accuracy of every run",
         "Sweep, final held-out accuracy against learning rate")


def sh(cwd, *args):
    env = {
        **os.environ,
        # The stages run `python`: make it this interpreter, which has the dependencies.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost",
    }
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def stages_run(output):
    return sorted(re.findall(r"Running stage '([^']+)'", output))


def edit_params(root, edit):
    params = yaml.safe_load((root / "params.yaml").read_text())
    edit(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def copy_project(root, edit, *, whole_sweep=False):
    """A fresh git repository holding the project's pipeline, with params edited."""
    if not whole_sweep:
        def edit(params, edit=edit):
            params["sweep"] = dict(SMALL_SWEEP)
            edit(params)
    for name in COPIED:
        source, target = REPO / name, root / name
        if not source.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, target)
    edit_params(root, edit)
    sh(root, "git", "init", "-q")
    sh(root, "dvc", "config", "core.analytics", "false")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "copy")
    return root


@pytest.fixture
def generated_project(tmp_path):
    """The project with generated IDX data in place of the download stage's output."""
    def edit(params):
        params["train"]["eval_every"] = 5
    root = copy_project(tmp_path / "project", edit)
    write_dataset(root / "data" / "mnist")
    sh(root, "dvc", "commit", "-f", "download@mnist")
    return root


def store_times(project, runs):
    """When each run's store was last written (its root zarr.json), to tell a kept store from a retrained one."""
    return {run: (project / "runs" / run / "trajectory.zarr" / "zarr.json").stat().st_mtime_ns for run in runs}


def test_dvc_repro_trains_a_sweep_over_two_datasets_offline(tmp_path, debian_fashion, monkeypatch):
    # Fashion-MNIST built in, and the same files declared as a dataset of one's own.
    from idx_files import declaration

    def edit(params):
        params["data"]["dataset"] = "fashion-mnist"
        params["datasets"] = {"fashion-mnist": {}, "zalando": declaration(debian_fashion, n_train=60_000,
                                                                            n_test=10_000)}
        params["train"].update(max_steps=30, eval_every=15)
        params["sweep"] = {**SMALL_SWEEP, "dataset": ["fashion-mnist", "zalando"], "seed": [0, 1]}
    project = copy_project(tmp_path / "project", edit, whole_sweep=True)
    monkeypatch.setenv("WEIGHTLAPSE_MIRRORS", str(debian_fashion))
    output = sh(project, "dvc", "repro")
    sweep = load_params(project / "params.yaml").sweep_runs
    assert sorted(sweep) == sorted(f"{dataset}-adam-lr0.001-b20-seed{seed}"
                                   for dataset in ("fashion-mnist", "zalando") for seed in (0, 1))
    assert stages_run(output) == sorted(["download@fashion-mnist", "download@zalando", *(f"train@{run}" for run in RUNS),
                                         "sweep@fashion-mnist-adam-20", "sweep@zalando-adam-20", "summary"])
    for run in [*RUNS, *sweep]:
        ds = open_run(project / "runs" / run)
        assert ds.sizes["step"] == 31 and ds.attrs["progress"]["finished"]
    zalando = open_run(project / "runs" / "zalando-adam-lr0.001-b20-seed0")
    assert zalando.attrs["weightlapse"]["dataset"]["name"] == "zalando"
    fashion = open_run(project / "runs" / "fashion-mnist-adam-lr0.001-b20-seed0")
    assert np.array_equal(zalando.weights.values, fashion.weights.values)  # the same files, the same run
    assert "up to date" in sh(project, "dvc", "status")
    sweep_plot = plot_values(project, PLOTS[2])
    assert sorted((row["series"], row["lr"]) for row in sweep_plot) == [("adam on fashion-mnist", "0.001"),
                                                                         ("adam on zalando", "0.001")]
    assert {row["seeds"] for row in sweep_plot} == {"2"}

    # The runs index and the headless API compare across the datasets: seeds group per dataset.
    from weightlapse.viewer.analysis.compare import compare_runs, open_trajectories
    from weightlapse.viewer.analysis.runs import RunCatalog

    catalog = RunCatalog(project / "runs")
    index = catalog.index()
    assert len(index) == len(RUNS) + len(sweep) and (index.state == "finished").all()
    assert set(index.loc[list(sweep)].groupby("group").size()) == {2}
    pair = ["fashion-mnist-adam-lr0.001-b20-seed1", "zalando-adam-lr0.001-b20-seed0"]
    result = compare_runs(open_trajectories(catalog, pair))
    assert result.pca_path.shape == (2, 31, 2)


def plot_values(project, plot):
    shown = json.loads(sh(project, "dvc", "plots", "show", "--json"))["data"]
    assert set(PLOTS) <= set(shown), sorted(shown)
    return shown[plot][0]["content"]["data"]["values"]


def test_dvc_plots_overlay_every_run_and_the_sweep(generated_project):
    project = generated_project
    sh(project, "dvc", "repro")
    loss, accuracy = plot_values(project, PLOTS[0]), plot_values(project, PLOTS[1])
    assert {row["run"] for row in loss} == {row["run"] for row in accuracy} == {*RUNS, *SMALL_POINTS}
    assert len([row for row in loss if row["run"] == "sgd-momentum"]) == 10  # one point per step, 10 steps
    assert len([row for row in accuracy if row["run"] == "sgd-momentum"]) == 3  # steps 0, 5 and 10
    (sweep_row,) = plot_values(project, PLOTS[2])
    assert (sweep_row["series"], sweep_row["lr"], sweep_row["seeds"]) == ("adam on mnist", "0.001", "3")
    # The templates colour by run (and by optimizer and dataset): one line each, in one panel.
    shown = json.loads(sh(project, "dvc", "plots", "show", "--json"))["data"]
    assert shown[PLOTS[0]][0]["content"]["encoding"]["color"]["field"] == "run"
    assert shown[PLOTS[2]][0]["content"]["encoding"]["color"]["field"] == "series"
    sh(project, "dvc", "plots", "show", "--out", "plots-html")
    assert (project / "plots-html" / "index.html").is_file()


def test_every_run_is_trained_then_only_what_is_new(generated_project):
    project = generated_project
    assert stages_run(sh(project, "dvc", "repro")) == STAGES
    first, second = open_run(project / "runs" / SMALL_POINTS[0]), open_run(project / "runs" / SMALL_POINTS[1])
    assert first.sizes["step"] == 11  # 200 generated samples, batch 20
    assert not first.weights.equals(second.weights)
    mlp = open_run(project / "runs" / "mlp-32")  # the shipped run with a hidden layer: a network store
    assert mlp["hidden1.weight"].shape == (11, 32, 784) and mlp["output.weight"].shape == (11, 10, 32)
    assert mlp.attrs["progress"]["finished"] and mlp.eval_step.values.tolist() == [0, 5, 10]
    manifest = json.loads((project / "manifests" / "sweep-mnist-adam-b20.json").read_text())
    assert sorted(manifest) == SMALL_POINTS and manifest[SMALL_POINTS[2]]["seed"] == 2
    assert manifest[SMALL_POINTS[0]]["heldout_accuracy"] == json.loads(
        (project / "runs" / SMALL_POINTS[0] / "metrics.json").read_text())["heldout_accuracy"]
    untracked = sh(project, "git", "status", "--porcelain", "--untracked-files=all")
    assert "runs/adam-" not in untracked and "runs/sgd-momentum/metrics.json" in untracked  # stores stay out of git

    metrics = json.loads(sh(project, "dvc", "metrics", "show", "--json"))
    shown = next(iter(metrics.values()))["data"]
    assert {f"runs/{run}/metrics.json" for run in RUNS} <= set(shown)
    assert 0 <= shown["runs/sgd-momentum/metrics.json"]["data"]["heldout_accuracy"] <= 1

    edit_params(project, lambda params: params["runs"].update(rmsprop={"optimizer": "rmsprop", "lr": 5e-4}))
    assert stages_run(sh(project, "dvc", "repro")) == ["summary", "train@rmsprop"]
    assert open_run(project / "runs" / "rmsprop").attrs["weightlapse"]["params"]["optimizer"] == "rmsprop"
    assert "up to date" in sh(project, "dvc", "status")

    # A new seed and a new lr in the grid: the stage reruns and trains only the new points.
    before = store_times(project, SMALL_POINTS)
    listed_before = store_times(project, ["rmsprop"])

    def grow(params):
        params["sweep"]["seed"].append(3)
        params["sweep"]["lr"].append(0.01)
    edit_params(project, grow)
    assert stages_run(sh(project, "dvc", "repro")) == ["summary", "sweep@mnist-adam-20"]
    assert store_times(project, SMALL_POINTS) == before and store_times(project, ["rmsprop"]) == listed_before
    new = ["adam-lr0.001-b20-seed3", *(f"adam-lr0.01-b20-seed{seed}" for seed in (0, 1, 2, 3))]
    for run in new:
        ds = open_run(project / "runs" / run)
        assert ds.attrs["progress"]["finished"] and ds.attrs["weightlapse"]["params"]["seed"] == int(run[-1])
    assert sorted(json.loads((project / "manifests" / "sweep-mnist-adam-b20.json").read_text())) == sorted(
        [*SMALL_POINTS, *new])
    assert "up to date" in sh(project, "dvc", "status")


def test_dvc_exp_run_changes_or_adds_a_run_and_trains_only_it(generated_project):
    project = generated_project
    sh(project, "dvc", "repro")
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "baseline")
    assert stages_run(sh(project, "dvc", "exp", "run", "-S", "runs.sgd-momentum.lr=0.05")) == [
        "summary", "train@sgd-momentum"]
    assert open_run(project / "runs" / "sgd-momentum").attrs["weightlapse"]["params"]["lr"] == 0.05
    experiments = json.loads(sh(project, "dvc", "exp", "show", "--json"))
    assert any("0.05" in json.dumps(entry) for entry in experiments)
    # A new run, declared on the command line alone.
    assert stages_run(sh(project, "dvc", "exp", "run", "-S", "+runs.fast.lr=0.01")) == ["summary", "train@fast"]
    assert open_run(project / "runs" / "fast").attrs["weightlapse"]["params"]["lr"] == 0.01


def test_a_dvc_repro_killed_mid_run_resumes_to_the_clean_dvc_lock(tmp_path):
    def edit(params):
        params["train"].update(epochs=20, eval_every=100)
        params["runs"] = {"original": {"seed": 7}}
    project = copy_project(tmp_path / "project", edit)
    write_dataset(project / "data" / "mnist", n_train=4_000, n_test=100)  # 200 steps an epoch, 4,000 in all
    sh(project, "dvc", "commit", "-f", "download@mnist")
    sh(project, "dvc", "repro")
    clean_lock = yaml.safe_load((project / "dvc.lock").read_text())
    clean_files = {p.relative_to(project): p.read_bytes() for p in (project / "runs").rglob("*")
                   if p.is_file() and p.name != ".writer.lock"}

    shutil.rmtree(project / "runs" / "original")
    store = project / "runs" / "original" / "trajectory.zarr"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}
    dvc = subprocess.Popen(["dvc", "repro"], cwd=project, env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while dvc.poll() is None and time.monotonic() < deadline:
        try:
            if read_progress(store)["steps_done"] >= 1_000:
                break
        except (TrajectoryError, KeyError, OSError):
            pass
        time.sleep(0.01)
    assert dvc.poll() is None, "dvc repro finished before it could be killed"
    os.killpg(dvc.pid, signal.SIGKILL)  # dvc and its stage die together, as in a crash
    dvc.wait()
    assert not read_progress(store)["finished"]

    output = sh(project, "dvc", "repro")
    assert stages_run(output) == ["train@original"] and "resuming after step" in output
    assert yaml.safe_load((project / "dvc.lock").read_text()) == clean_lock
    assert {p.relative_to(project): p.read_bytes() for p in (project / "runs").rglob("*")
            if p.is_file() and p.name != ".writer.lock"} == clean_files
