"""A real `dvc repro` of the project's pipeline, in a temporary copy of the repository."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.trajectory import open_run

REPO = Path(__file__).resolve().parents[1]
COPIED = ["pipeline", "dvc.yaml", "params.yaml", ".dvc/config", ".dvc/.gitignore", ".gitignore"]


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


@pytest.fixture
def project(tmp_path, debian_fashion, monkeypatch):
    """A fresh copy of the repository set to train briefly on Fashion-MNIST from Debian's package."""
    root = tmp_path / "project"
    for name in COPIED:
        source, target = REPO / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, target)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["dataset"] = "fashion-mnist"
    params["train"]["max_steps"] = 50
    params["train"]["eval_every"] = 25
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.setenv("WEIGHTLAPSE_MIRRORS", str(debian_fashion))
    sh(root, "git", "init", "-q")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "copy")
    return root


def test_dvc_repro_trains_every_run_then_only_what_is_new(project):
    output = sh(project, "dvc", "repro")
    assert stages_run(output) == ["download", "train@original", "train@seed-1", "train@sgd"]
    for run in ("original", "seed-1", "sgd"):
        ds = open_run(project / "runs" / run)
        assert ds.sizes["step"] == 51 and ds.attrs["progress"]["finished"]
        assert ds.attrs["weightlapse"]["dataset"]["name"] == "fashion-mnist"
    assert not open_run(project / "runs" / "original").weights.equals(open_run(project / "runs" / "seed-1").weights)

    metrics = json.loads(sh(project, "dvc", "metrics", "show", "--json"))
    shown = next(iter(metrics.values()))["data"]
    assert set(shown) == {f"runs/{r}/metrics.json" for r in ("original", "seed-1", "sgd")}
    assert 0 < shown["runs/sgd/metrics.json"]["data"]["heldout_accuracy"] <= 1
    assert "up to date" in sh(project, "dvc", "status")
    plots = json.loads(sh(project, "dvc", "plots", "show", "--json"))
    assert {"runs/original/loss.csv", "runs/sgd/accuracy.csv"} <= set(plots["data"])
    points = plots["data"]["runs/original/loss.csv"][0]["content"]["data"]["values"]
    assert len(points) == 50  # one point per step

    # Add a run: only it is trained.
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["runs"]["rmsprop"] = {"optimizer": "rmsprop", "lr": 0.0005}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stages_run(sh(project, "dvc", "repro")) == ["train@rmsprop"]
    assert open_run(project / "runs" / "rmsprop").attrs["weightlapse"]["params"]["optimizer"] == "rmsprop"


def test_dvc_exp_run_with_a_changed_param_retrains_only_that_run(project):
    sh(project, "dvc", "repro")
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "baseline")
    output = sh(project, "dvc", "exp", "run", "-S", "runs.sgd.lr=0.05")
    assert stages_run(output) == ["train@sgd"]
    assert open_run(project / "runs" / "sgd").attrs["weightlapse"]["params"]["lr"] == 0.05
    shown = json.loads(sh(project, "dvc", "exp", "show", "--json"))
    assert len(shown) >= 1
