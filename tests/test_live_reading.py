"""Reading a run while the train stage is still writing it, from another process."""

import subprocess
import sys
import time
import traceback

import numpy as np
import pytest
from idx_files import write_dataset

from weightlapse.pipeline.store import TrajectoryError, open_run, read_progress
from weightlapse.viewer.analysis.runs import RunCatalog

pytestmark = pytest.mark.slow  # 10 s of reading a run being trained

# 40 steps an epoch at batch 500: far more steps than 10 s can train, so the stage is
# still writing when the reader stops, and is then killed.
PARAMS = """\
data: {dataset: mnist}
train: {epochs: 1000, batch_size: 500, eval_every: 500, device: cpu}
runs: {live: {}}
"""
READ_FOR_S = 10


def not_started(store) -> bool:
    if not (store / "zarr.json").exists():
        return True
    try:
        return read_progress(store)["steps_done"] == -1
    except TrajectoryError:
        return False


def test_a_reader_never_sees_past_the_committed_step_while_training_appends(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, n_train=20_000, n_test=100)
    (tmp_path / "params.yaml").write_text(PARAMS)
    store = tmp_path / "runs" / "live" / "trajectory.zarr"
    trainer = subprocess.Popen([sys.executable, "-m", "weightlapse.pipeline.train",
                                "--params", str(tmp_path / "params.yaml"),
                                "--run", "live", "--data", str(data), "--out", str(tmp_path / "runs" / "live")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    reads, seen = 0, []
    try:
        while not (store / "zarr.json").exists():
            assert trainer.poll() is None, trainer.stderr.read()[-2000:]
            time.sleep(0.01)
        stop = time.monotonic() + READ_FOR_S
        while time.monotonic() < stop:
            assert trainer.poll() is None, "the train stage stopped before the reader did"
            try:
                progress = read_progress(store)
                ds = open_run(store)                   # a fresh open, as a reader process would
            except TrajectoryError:
                assert not_started(store), traceback.format_exc()  # unreadable only while the store is being created
                continue
            last = ds.sizes["step"] - 1
            assert last >= progress["steps_done"]     # the marker never runs ahead of the data
            if last >= 0:
                tail = ds.weights.isel(step=slice(max(last - 63, 0), last + 1)).values
                assert np.isfinite(tail).all() and np.abs(tail).sum(axis=(1, 2)).min() > 0  # no NaN, no zero rows
            run = RunCatalog(tmp_path / "runs").open("live")  # the viewer's reader
            run.refresh()
            if run.last_step >= 0:
                assert np.isfinite(run.weights_at(run.last_step)).all()
            seen.append(last)
            reads += 1
    finally:
        trainer.kill()
        trainer.wait(timeout=60)
    assert reads > 50 and seen == sorted(seen) and len(set(seen)) >= 3  # it grew while we read
    killed = open_run(store)  # and what the killed stage left reads cleanly
    assert not killed.attrs["progress"]["finished"] and killed.sizes["step"] - 1 == killed.attrs["progress"]["steps_done"]
    assert np.isfinite(killed.weights.isel(step=-1).values).all()
