"""Faults end clearly (the train stage, its store writer and chunk writer together): a full
or read-only disk and a diverging run stop with one line naming the cause, keep every
committed row, mark the run, and resume once the cause is fixed."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from idx_files import write_dataset

from weightlapse.pipeline.store import STORE_NAME, open_run, read_progress
from weightlapse.viewer.analysis.runs import RunCatalog

pytestmark = pytest.mark.slow  # full and read-only disks under real train stages

REPO = Path(__file__).resolve().parents[1]
# 2,000 steps: four blocks of 512 rows (16 MiB of weights each, ~12 MB on disk).
PARAMS = ("data: {dataset: mnist}\ntrain: {batch_size: 10, max_steps: 2000, device: cpu, eval_every: 500}\n"
          "runs: {r: {}}\n")


def train(tmp_path, out, *extra, params=PARAMS):
    (tmp_path / "params.yaml").write_text(params)
    return subprocess.run([sys.executable, "-m", "weightlapse.pipeline.train",
                           "--params", str(tmp_path / "params.yaml"),
                           "--run", "r", "--data", str(tmp_path / "data"), "--out", str(out), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "ERROR" in line or "WARNING" in line or "Traceback" in line]


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MB tmpfs: room for the first block of the run, not for all of it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def data(tmp_path):
    write_dataset(tmp_path / "data", n_train=20_000, n_test=100)


def test_a_full_disk_stops_with_one_line_keeps_committed_rows_and_resumes(tmp_path, data, small_disk):
    reference = tmp_path / "reference"
    assert train(tmp_path, reference).returncode == 0
    expected = zarr.open_array(reference / STORE_NAME / "weights", mode="r")[:]

    out = small_disk / "r"
    result = train(tmp_path, out, "--resume")
    assert result.returncode == 1
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "No space left on device" in lines[0] and "Traceback" not in result.stderr, lines
    progress = read_progress(out)
    assert not progress["finished"] and "No space left on device" in progress["error"]
    assert progress["steps_done"] >= 511
    committed = open_run(out).weights.values
    assert np.array_equal(committed.view(np.int32), expected[:progress["steps_done"] + 1].view(np.int32))
    info = RunCatalog(small_disk).describe("r")
    assert info.state == "failed" and "No space left" in info.message
    assert not list((out / STORE_NAME).rglob("*.partial"))  # a failed chunk write gives its space back

    subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True)
    result = train(tmp_path, out, "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = zarr.open_array(out / STORE_NAME / "weights", mode="r")[:]
    assert np.array_equal(resumed.view(np.int32), expected.view(np.int32))
    assert read_progress(out)["finished"]


def test_a_read_only_directory_stops_with_one_line_and_works_once_writable(tmp_path, data, small_disk):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    result = train(tmp_path, small_disk / "r", "--resume")
    assert result.returncode == 1
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "Read-only file system" in lines[0] and "Traceback" not in result.stderr, lines
    subprocess.run(["mount", "-o", "remount,rw,size=200m", str(small_disk)], check=True)
    assert train(tmp_path, small_disk / "r", "--resume").returncode == 0
    assert read_progress(small_disk / "r")["finished"]


def test_a_diverging_run_stops_at_the_step_with_a_clear_error(tmp_path, data):
    params = PARAMS.replace("runs: {r: {}}", "runs: {r: {optimizer: sgd, lr: 3.0e+38}}")
    out = tmp_path / "runs" / "r"
    result = train(tmp_path, out, params=params)
    assert result.returncode == 1
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "training diverged at step" in lines[0] and "Lower the learning rate" in lines[0]
    step = int(lines[0].split("training diverged at step ")[1].split(":")[0].replace(",", ""))
    progress = read_progress(out)
    assert not progress["finished"] and "diverged" in progress["error"]
    assert progress["steps_done"] < step
    assert np.isfinite(open_run(out).weights.values).all()  # no NaN row is committed
    assert not (out / "metrics.json").exists() or "NaN" not in (out / "metrics.json").read_text()
    assert RunCatalog(out.parent).describe("r").state == "failed"
    json.loads((out / STORE_NAME / "zarr.json").read_text())  # the marker is valid JSON, no NaN in it
