"""One writer per run: a second train stage on the same run fails at once; a killed one frees the run."""

import os
import signal
import subprocess
import sys
import time

import pytest
from idx_files import write_dataset

from weightlapse.pipeline.runlock import RunLockedError, exclusive_writer, is_being_written
from weightlapse.pipeline.train import main
from weightlapse.pipeline.store import open_run, read_progress
from weightlapse.viewer.analysis.runs import RunCatalog

PARAMS = """\
data: {dataset: mnist}
train: {epochs: 400, eval_every: 10000, device: cpu}
runs: {shared: {}}
"""


def start_writer(tmp_path, data):
    return subprocess.Popen([sys.executable, "-m", "weightlapse.pipeline.train",
                             "--params", str(tmp_path / "params.yaml"),
                             "--run", "shared", "--data", str(data), "--out", str(tmp_path / "runs" / "shared")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_until_writing(run_dir, process, timeout=60):
    deadline = time.monotonic() + timeout
    while not (is_being_written(run_dir) and (run_dir / "trajectory.zarr" / "weights" / "zarr.json").exists()):
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "the train stage did not start writing"
        time.sleep(0.02)


@pytest.fixture
def setup(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, n_train=2_000, n_test=100)  # 100 steps an epoch, 40,000 in all
    (tmp_path / "params.yaml").write_text(PARAMS)
    return tmp_path, data, tmp_path / "runs" / "shared"


def test_a_second_writer_fails_at_once_and_the_first_finishes_intact(setup, caplog):
    tmp_path, data, run_dir = setup
    first = start_writer(tmp_path, data)
    try:
        wait_until_writing(run_dir, first)
        started = time.monotonic()
        code = main(["--params", str(tmp_path / "params.yaml"), "--run", "shared", "--data", str(data),
                     "--out", str(run_dir), "--overwrite"])
        assert code == 1 and time.monotonic() - started < 5
        assert f"process {first.pid} on" in caplog.text and "is writing this run" in caplog.text
        assert RunCatalog(run_dir.parent).describe("shared").state == "being written"
    finally:
        first.wait(timeout=120)
    assert first.returncode == 0, first.stderr.read()[-2000:]
    ds = open_run(run_dir)  # --overwrite did not delete the first writer's store
    assert ds.attrs["progress"]["finished"] and ds.sizes["step"] == 40_001
    assert not is_being_written(run_dir)


def test_a_killed_writer_leaves_no_lock_behind(setup):
    tmp_path, data, run_dir = setup
    first = start_writer(tmp_path, data)
    wait_until_writing(run_dir, first)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    assert not is_being_written(run_dir)
    # The viewer knows at once that nobody is writing it any more, whatever the marker's age.
    info = RunCatalog(run_dir.parent).describe("shared")
    assert info.state == "unfinished" and not read_progress(run_dir / "trajectory.zarr")["finished"]
    # and the run can be trained again without anyone cleaning up a lock
    assert main(["--params", str(tmp_path / "params.yaml"), "--run", "shared", "--data", str(data),
                 "--out", str(run_dir), "--overwrite"]) == 0
    assert read_progress(run_dir / "trajectory.zarr")["finished"]


def test_the_lock_is_exclusive_within_a_process_too(tmp_path):
    with exclusive_writer(tmp_path / "run"):
        assert is_being_written(tmp_path / "run")
        with pytest.raises(RunLockedError, match=rf"process {os.getpid()} on .* is writing this run"):
            with exclusive_writer(tmp_path / "run"):
                pass
    assert not is_being_written(tmp_path / "run")
    with exclusive_writer(tmp_path / "run"):  # released: it can be taken again
        pass
