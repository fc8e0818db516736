"""Exact resume: a train stage killed mid-run and run again with --resume ends with the store,
history and metrics an uninterrupted run writes, byte for byte."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
from idx_files import write_dataset

from weightlapse.pipeline.store import STORE_NAME, TrajectoryError, read_progress

pytestmark = pytest.mark.slow  # train stages killed and resumed

PARAMS = """\
data: {dataset: mnist}
train: {epochs: 40, eval_every: 50, device: cpu}
runs:
  numpy: {}
  torch: {engine: torch}
  sgd: {optimizer: sgd, lr: 0.05, momentum: 0.9, bias: true, capture: {gradients: true, chunk_steps: 16}}
  # a network store: checkpoints every 1,280 steps (its writer's blocks), 3,000 steps
  mlp: {hidden: [4], activation: tanh, bias: true, max_steps: 3000}
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    write_dataset(root / "data", n_train=2_000, n_test=100)  # 100 steps an epoch, 4,000 in all
    (root / "params.yaml").write_text(PARAMS)
    return root


def train_command(root, run, out, *extra):
    return [sys.executable, "-m", "weightlapse.pipeline.train", "--params", str(root / "params.yaml"), "--run", run,
            "--data", str(root / "data"), "--out", str(out), *extra]


def tree_digest(directory):
    """Every file under ``directory`` (but the writer lock) and its content hash."""
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*")) if path.is_file() and path.name != ".writer.lock"}


def kill_after_step(command, store, step, cwd, signal_number=signal.SIGKILL):
    """Start ``command`` and SIGKILL it (or send ``signal_number``) once the store has committed ``step``."""
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if read_progress(store)["steps_done"] >= step:
                break
        except (TrajectoryError, KeyError, OSError):
            pass
        time.sleep(0.005)
    assert process.poll() is None, "the run finished before it could be killed: make it longer"
    os.kill(process.pid, signal_number)
    process.wait(timeout=60)
    return read_progress(store)


@pytest.mark.parametrize("run", ["numpy", "torch", "sgd", "mlp"])
def test_a_killed_run_resumes_to_exactly_the_uninterrupted_result(project, run, tmp_path):
    # The same command in two directories, as `dvc repro` runs it: the store records it.
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    clean.mkdir()
    resumed.mkdir()
    command = train_command(project, run, "run", "--resume")
    subprocess.run(command, check=True, cwd=clean, capture_output=True)
    at_kill = kill_after_step(command, resumed / "run" / STORE_NAME, 1_200, cwd=resumed)
    assert not at_kill["finished"] and at_kill["resume"]["step"] >= 1_200
    result = subprocess.run(command, cwd=resumed, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming after step {at_kill['resume']['step']} of {3000 if run == 'mlp' else 4000}" in result.stderr
    assert tree_digest(resumed / "run") == tree_digest(clean / "run")


def test_resume_replaces_a_store_it_cannot_carry_on(project, tmp_path):
    for name in ("clean", "replaced"):
        (tmp_path / name).mkdir()
    replaced = tmp_path / "replaced"
    kill_after_step(train_command(project, "numpy", "run"), replaced / "run" / STORE_NAME, 600, cwd=replaced)
    # Another run's params in the same directory: nothing of the old store is reused.
    command = train_command(project, "torch", "run", "--resume")
    result = subprocess.run(command, cwd=replaced, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "training from the start, replacing the store" in result.stderr and "other params" in result.stderr
    subprocess.run(command, check=True, cwd=tmp_path / "clean", capture_output=True)
    assert tree_digest(replaced / "run") == tree_digest(tmp_path / "clean" / "run")


@pytest.mark.parametrize("run", ["numpy"])  # a network run stopped by an exception: the mid-block test below
def test_a_run_stopped_with_ctrl_c_resumes_to_exactly_the_uninterrupted_result(project, run, tmp_path):
    # Ctrl-C lands anywhere in the training loop, often between a step and its recording
    # or inside the optimizer's update: the model's state then is no checkpoint, and the
    # run must resume from the last block's.
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    clean.mkdir()
    resumed.mkdir()
    command = train_command(project, run, "run", "--resume")
    subprocess.run(command, check=True, cwd=clean, capture_output=True)
    stopped = kill_after_step(command, resumed / "run" / STORE_NAME, 1_200, cwd=resumed, signal_number=signal.SIGINT)
    assert not stopped["finished"] and stopped["error"]
    result = subprocess.run(command, cwd=resumed, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming after step {stopped['resume']['step']} of {3000 if run == 'mlp' else 4000}" in result.stderr
    assert tree_digest(resumed / "run") == tree_digest(clean / "run")


def test_a_hidden_layer_run_stopped_mid_block_resumes_every_array_exactly(tmp_path, monkeypatch):
    from interrupted_runs import clean_and_resumed_network

    from weightlapse.pipeline.params import TrainParams

    config = TrainParams(device="cpu", epochs=3, eval_every=40, hidden=(16,), optimizer="rmsprop", momentum=0.5)
    clean, resumed, stopped = clean_and_resumed_network(config, tmp_path, monkeypatch)
    assert stopped["resume"]["step"] == 255 and not stopped["finished"] and "simulated crash" in stopped["error"]
    assert sorted(resumed.data_vars) == sorted(clean.data_vars)
    for name in clean.data_vars:
        assert clean[name].values.tobytes() == resumed[name].values.tobytes(), name
