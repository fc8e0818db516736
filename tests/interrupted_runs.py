"""A train-stage run stopped mid-block and resumed, next to an uninterrupted one (the graph engine's tests)."""

import pytest
from idx_files import write_dataset

from weightlapse.pipeline.datasets import load_dataset
from weightlapse.pipeline.store import open_run, read_progress
from weightlapse.pipeline.train import run_training
from weightlapse.pipeline.writer import TrajectoryWriter

CRASH_STEP = 150
BLOCK_STEPS = 64


def clean_and_resumed(config, root, monkeypatch):
    """Train ``config`` (300 steps, writer blocks of 64) once straight through, and once
    stopped by an error while recording the block holding step 150 and then resumed.
    Returns (clean run, resumed run, the progress marker the stopped run left)."""
    write_dataset(root / "data", n_train=2000, n_test=50)
    dataset = load_dataset(root / "data", "mnist")
    monkeypatch.setattr(TrajectoryWriter, "default_block_steps", classmethod(lambda cls, layout: BLOCK_STEPS))
    run_training(config, dataset, root / "clean", run_name="r", progress=False)

    original = TrajectoryWriter.record_steps  # the train stage records this engine's rows a block at a time

    def failing(self, first, weights, *args, **kwargs):
        if first <= CRASH_STEP < first + len(weights):
            raise RuntimeError("simulated crash")
        return original(self, first, weights, *args, **kwargs)

    monkeypatch.setattr(TrajectoryWriter, "record_steps", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(config, dataset, root / "resumed", run_name="r", progress=False)
    stopped = read_progress(root / "resumed" / "trajectory.zarr")
    monkeypatch.setattr(TrajectoryWriter, "record_steps", original)
    run_training(config, dataset, root / "resumed", run_name="r", resume=True, progress=False)
    return open_run(root / "clean"), open_run(root / "resumed"), stopped


def clean_and_resumed_network(config, root, monkeypatch, *, crash_step=280):
    """:func:`clean_and_resumed` for a run with hidden layers (300 steps; its writer's blocks
    of 256 steps for a 16-unit layer): stopped by an error as step ``crash_step`` is recorded."""
    from weightlapse.pipeline.network_recording import NetworkRecording

    write_dataset(root / "data", n_train=2000, n_test=50)
    dataset = load_dataset(root / "data", "mnist")
    run_training(config, dataset, root / "clean", run_name="r", progress=False)
    original = NetworkRecording.on_step

    def failing(self, step, loss):
        if step == crash_step:
            raise RuntimeError("simulated crash")
        return original(self, step, loss)

    monkeypatch.setattr(NetworkRecording, "on_step", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(config, dataset, root / "resumed", run_name="r", progress=False)
    stopped = read_progress(root / "resumed" / "trajectory.zarr")
    monkeypatch.setattr(NetworkRecording, "on_step", original)
    run_training(config, dataset, root / "resumed", run_name="r", resume=True, progress=False)
    return open_run(root / "clean"), open_run(root / "resumed"), stopped
