"""Compacting a finished run in place (pipeline/compact.py): the values stay bit for bit,
the store shrinks, and no interruption leaves a store that does not open or differs."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import xarray as xr
import zarr
from idx_files import write_dataset

from weightlapse.pipeline.compact import compact_run
from weightlapse.pipeline.datasets import load_dataset
from weightlapse.pipeline.params import CaptureParams, TrainParams
from weightlapse.pipeline.runlock import RunLockedError, exclusive_writer
from weightlapse.pipeline.store import STORE_NAME, TrajectoryError, check_store, open_run, read_progress
from weightlapse.pipeline.train import run_training

ARRAYS = ("weights", "gradients", "bias", "loss", "heldout_accuracy", "heldout_loss")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real 400-step Adam run with bias and gradients, recorded with the fast codec."""
    root = tmp_path_factory.mktemp("compact")
    write_dataset(root / "data", n_train=8000, n_test=50)
    dataset = load_dataset(root / "data", "mnist")
    config = TrainParams(bias=True, max_steps=400, eval_every=100, capture=CaptureParams(gradients=True, chunk_steps=16))
    run_training(config, dataset, root / "run", run_name="r", progress=False)
    return root / "run"


@pytest.fixture
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def values(run_dir) -> dict[str, np.ndarray]:
    """Every array's values as three readers see them: weightlapse, plain zarr and plain xarray."""
    store = run_dir / STORE_NAME
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # plain readers warn that pcodec is outside the Zarr v3 spec
        ours, plain = open_run(run_dir), xr.open_zarr(store)
        group = zarr.open_group(store, mode="r")
        seen = {}
        for name in ARRAYS:
            seen[name] = np.asarray(ours[name].values)
            for other in (np.asarray(group[name][:]), np.asarray(plain[name].values)):
                assert np.array_equal(other.view(np.uint32), seen[name].view(np.uint32)), name
    return seen


def assert_same(before, after) -> None:
    for name in ARRAYS:
        assert np.array_equal(after[name].view(np.uint32), before[name].view(np.uint32)), name


def codec_names(run_dir, name) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [codec.to_dict()["name"] for codec in zarr.open_array(run_dir / STORE_NAME / name, mode="r").metadata.codecs]


def test_a_compacted_run_reads_back_bit_for_bit_and_is_smaller(run):
    before = values(run)
    sizes = compact_run(run)
    assert set(sizes) == {"weights", "gradients"}
    assert sizes["weights"][1] < sizes["weights"][0] / 1.15, sizes  # this synthetic run's gradients are noise
    assert codec_names(run, "weights") == ["transpose", "numcodecs.pcodec"]
    assert codec_names(run, "loss") == ["bytes", "blosc"]  # the small arrays stay as they were
    assert_same(before, values(run))
    assert read_progress(run)["finished"] is True
    assert not (run / f".{STORE_NAME}.compacting").exists()
    assert not (run / STORE_NAME / "weights" / "c").exists()  # the old chunks are gone
    # Once compact, again is a no-op.
    assert compact_run(run / STORE_NAME) == sizes | {name: (after, after) for name, (_, after) in sizes.items()}
    assert_same(before, values(run))


def test_a_run_being_trained_or_unfinished_is_refused(run, tmp_path):
    with exclusive_writer(run), pytest.raises(RunLockedError, match="being trained"):
        compact_run(run)
    rows = zarr.open_group(run / STORE_NAME, mode="r+")
    progress = dict(rows.attrs["progress"]) | {"finished": False, "steps_done": 200, "updated": time.time()}
    rows.attrs["progress"] = progress
    with pytest.raises(TrajectoryError, match="not finished"):
        compact_run(run)
    assert codec_names(run, "weights") == ["transpose", "bytes", "blosc"]


def test_links_are_refused(run, tmp_path):
    linked = tmp_path / "linked"
    linked.symlink_to(run)
    with pytest.raises(TrajectoryError, match="symbolic link"):
        compact_run(linked)
    chunk = next((run / STORE_NAME / "weights" / "c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    moved = tmp_path / "elsewhere"
    chunk.rename(moved)
    chunk.symlink_to(moved)
    with pytest.raises(TrajectoryError, match="symbolic link"):
        compact_run(run)
    assert codec_names(run, "weights") == ["transpose", "bytes", "blosc"]


def mid_compaction(run_dir) -> bool:
    """Whether a compaction of ``run_dir`` was stopped partway (staged, moved or switched chunks left)."""
    weights = run_dir / STORE_NAME / "weights"
    return (run_dir / f".{STORE_NAME}.compacting").exists() or any(weights.glob("c.*"))


@pytest.mark.slow
def test_compaction_killed_at_any_moment_leaves_the_run_as_it_was(run, tmp_path):
    before = values(run)
    work = tmp_path / "work"
    command = [sys.executable, "-m", "weightlapse.pipeline.compact", str(work)]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import weightlapse.pipeline.compact"], check=True)
    imported = time.perf_counter() - started
    shutil.copytree(run, work)
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    whole = time.perf_counter() - started
    rng = random.Random(19)
    stopped_partway = 0
    trials = 6
    for trial in range(trials):  # kills spread over the compaction's own work, after the imports
        shutil.rmtree(work)
        shutil.copytree(run, work)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(imported + (whole - imported) * (trial + rng.random()) / trials)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        stopped_partway += mid_compaction(work)
        check_store(work)
        assert_same(before, values(work))  # it opens and equals the original, whatever was done
        compact_run(work)  # and compacting again finishes the job
        assert_same(before, values(work)) and not mid_compaction(work)
        assert codec_names(work, "gradients")[-1] == "numcodecs.pcodec"
    assert stopped_partway, "no kill landed during the compaction's work: the test measured nothing"


def test_a_network_run_is_compacted_parameter_by_parameter_bit_for_bit(tmp_path):
    write_dataset(tmp_path / "data", n_train=4000, n_test=50)
    config = TrainParams(hidden=(16,), max_steps=300, eval_every=100, capture=CaptureParams(chunk_steps=16))
    run = tmp_path / "mlp"
    dataset = load_dataset(tmp_path / "data", "mnist")
    run_training(config, dataset, run, run_name="mlp", progress=False)
    names = ("hidden1.weight", "output.weight")

    def parameters(run=run) -> dict[str, np.ndarray]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours, plain = open_run(run), xr.open_zarr(run / STORE_NAME)
            group = zarr.open_group(run / STORE_NAME, mode="r")
            seen = {name: np.asarray(ours[name].values) for name in (*names, "loss")}
            for name, value in seen.items():
                for other in (np.asarray(group[name][:]), np.asarray(plain[name].values)):
                    assert np.array_equal(other.view(np.uint32), value.view(np.uint32)), name
        return seen
    before = parameters()
    sizes = compact_run(run)
    assert set(sizes) == set(names)
    assert sizes["hidden1.weight"][1] < sizes["hidden1.weight"][0] / 1.15, sizes
    assert codec_names(run, "hidden1.weight") == ["transpose", "numcodecs.pcodec"]
    assert codec_names(run, "loss") == ["bytes", "blosc"]
    after = parameters()
    for name in before:
        assert np.array_equal(after[name].view(np.uint32), before[name].view(np.uint32)), name
    check_store(run / STORE_NAME)
    assert read_progress(run)["finished"] is True and not (run / f".{STORE_NAME}.compacting").exists()
    # captured with the compact codec from the start: the same trajectory, bit for bit
    captured = tmp_path / "mlp-compact"
    run_training(TrainParams(hidden=(16,), max_steps=300, eval_every=100,
                             capture=CaptureParams(chunk_steps=16, codec="compact")),
                 dataset, captured, run_name="mlp-compact", progress=False)
    assert codec_names(captured, "hidden1.weight") == ["transpose", "numcodecs.pcodec"]
    for name, value in parameters(captured).items():
        assert np.array_equal(value.view(np.uint32), before[name].view(np.uint32)), name
