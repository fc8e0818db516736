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

import pytest
import yaml

from idx_files import write_dataset
from weightlapse.pipeline.params import load_params
from weightlapse.pipeline.store import TrajectoryError, open_run, read_progress

pytestmark = pytest.mark.slow  # real dvc repro runs

REPO = Path(__file__).resolve().parents[1]
COPIED = ["pipeline", "dvc.yaml", "params.yaml", ".dvc/config", ".dvc/.gitignore", ".gitignore"]
RUNS = ("original", "seed-1", "sgd")
# Most tests shrink the sweep to one grid point (one more stage); the offline test trains it whole.
ONE_POINT_SWEEP = {"optimizer": ["adam"], "lr": [0.001], "batch_size": [20], "seed": [0]}
STAGES = sorted([*(f"train@{run}" for run in RUNS), "sweep@adam-0.001-20-0"])


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
            params["sweep"] = dict(ONE_POINT_SWEEP)
            edit(params)
    for name in COPIED:
        source, target = REPO / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, target)
    edit_params(root, edit)
    sh(root, "git", "init", "-q")
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
    sh(root, "dvc", "commit", "-f", "download")
    return root


def test_dvc_repro_downloads_and_trains_offline(tmp_path, debian_fashion, monkeypatch):
    def edit(params):
        params["data"]["dataset"] = "fashion-mnist"
        params["train"]["max_steps"] = 50
        params["train"]["eval_every"] = 25
    project = copy_project(tmp_path / "project", edit, whole_sweep=True)
    monkeypatch.setenv("WEIGHTLAPSE_MIRRORS", str(debian_fashion))
    output = sh(project, "dvc", "repro")
    sweep = load_params(project / "params.yaml").sweep_runs
    assert len(sweep) >= 12
    assert stages_run(output) == sorted(["download", *(f"train@{run}" for run in RUNS),
                                         *(f"sweep@{'-'.join(map(str, (c.optimizer, c.lr, c.batch_size, c.seed)))}"
                                           for c in sweep.values())])
    for run in [*RUNS, *sweep]:
        ds = open_run(project / "runs" / run)
        assert ds.sizes["step"] == 51 and ds.attrs["progress"]["finished"]
        assert ds.attrs["weightlapse"]["dataset"]["name"] == "fashion-mnist"
        assert ds.attrs["weightlapse"]["dataset"]["n_train"] == 60000
    assert "up to date" in sh(project, "dvc", "status")

    # The sweep, compared through the runs index and the headless API: seeds group together.
    from weightlapse.viewer.analysis.compare import compare_runs, open_trajectories
    from weightlapse.viewer.analysis.runs import RunCatalog

    catalog = RunCatalog(project / "runs")
    index = catalog.index()
    assert len(index) == len(RUNS) + len(sweep) and (index.state == "finished").all()
    seeds = index.loc[list(sweep)].groupby("group").size()
    assert len(seeds) == len(sweep) // 3 and set(seeds) == {3}  # every grid point's three seeds
    group = list(index.index[index.group == index.group["adam-lr0.001-b20-seed0"]])
    # "original" and "seed-1" are that grid point's setup too (seeds 0 and 1)
    assert group == ["adam-lr0.001-b20-seed0", "adam-lr0.001-b20-seed1", "adam-lr0.001-b20-seed2", "original", "seed-1"]
    result = compare_runs(open_trajectories(catalog, group))
    assert result.pca_path.shape == (5, 51, 2)
    final = result.distance_to_reference.isel(step=-1)
    assert float(final.sel(other_run="original")) == 0 and float(final.sel(other_run="adam-lr0.001-b20-seed2")) > 0


def test_every_run_is_trained_then_only_what_is_new(generated_project):
    project = generated_project
    assert stages_run(sh(project, "dvc", "repro")) == STAGES
    original, seed_1 = open_run(project / "runs" / "original"), open_run(project / "runs" / "seed-1")
    assert original.sizes["step"] == 11  # 200 generated samples, batch 20
    assert not original.weights.equals(seed_1.weights)

    metrics = json.loads(sh(project, "dvc", "metrics", "show", "--json"))
    shown = next(iter(metrics.values()))["data"]
    assert set(shown) == {f"runs/{run}/metrics.json" for run in [*RUNS, "adam-lr0.001-b20-seed0"]}
    assert 0 <= shown["runs/sgd/metrics.json"]["data"]["heldout_accuracy"] <= 1
    plots = json.loads(sh(project, "dvc", "plots", "show", "--json"))["data"]
    assert {"runs/original/loss.csv", "runs/sgd/accuracy.csv"} <= set(plots)
    assert len(plots["runs/original/loss.csv"][0]["content"]["data"]["values"]) == 10  # one point per step

    edit_params(project, lambda params: params["runs"].update(rmsprop={"optimizer": "rmsprop", "lr": 5e-4}))
    assert stages_run(sh(project, "dvc", "repro")) == ["train@rmsprop"]
    assert open_run(project / "runs" / "rmsprop").attrs["weightlapse"]["params"]["optimizer"] == "rmsprop"
    assert "up to date" in sh(project, "dvc", "status")

    # A new seed in the sweep grid: only its grid point is trained.
    edit_params(project, lambda params: params["sweep"]["seed"].append(1))
    assert stages_run(sh(project, "dvc", "repro")) == ["sweep@adam-0.001-20-1"]
    seed_1 = open_run(project / "runs" / "adam-lr0.001-b20-seed1")
    assert seed_1.attrs["weightlapse"]["params"]["seed"] == 1 and seed_1.attrs["progress"]["finished"]


def test_dvc_exp_run_changes_or_adds_a_run_and_trains_only_it(generated_project):
    project = generated_project
    sh(project, "dvc", "repro")
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "baseline")
    assert stages_run(sh(project, "dvc", "exp", "run", "-S", "runs.sgd.lr=0.05")) == ["train@sgd"]
    assert open_run(project / "runs" / "sgd").attrs["weightlapse"]["params"]["lr"] == 0.05
    experiments = json.loads(sh(project, "dvc", "exp", "show", "--json"))
    assert any("0.05" in json.dumps(entry) for entry in experiments)
    # A new run, declared on the command line alone.
    assert stages_run(sh(project, "dvc", "exp", "run", "-S", "+runs.fast.lr=0.01")) == ["train@fast"]
    assert open_run(project / "runs" / "fast").attrs["weightlapse"]["params"]["lr"] == 0.01


def test_a_dvc_repro_killed_mid_run_resumes_to_the_clean_dvc_lock(tmp_path):
    def edit(params):
        params["train"].update(epochs=20, eval_every=100)
        params["runs"] = {"original": {"seed": 0}}
    project = copy_project(tmp_path / "project", edit)
    write_dataset(project / "data" / "mnist", n_train=4_000, n_test=100)  # 200 steps an epoch, 4,000 in all
    sh(project, "dvc", "commit", "-f", "download")
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
