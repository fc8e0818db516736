"""The pixel history (pipeline/history.py builds it, pipeline.store.history checks it, Run.pixel_history
reads through it): a copy of the store's weights, bit for bit, never used for another store and
never read half-built; one weight over every step reads the same with or without it."""

import shutil

import numpy as np
import pytest
from viewer_runs import training_like, write_run

import weightlapse.pipeline.history as history_module
from weightlapse.cli import main as cli_main
from weightlapse.pipeline.compact import compact_run
from weightlapse.pipeline.history import build_history
from weightlapse.pipeline.runlock import RunLockedError, exclusive_writer
from weightlapse.pipeline.store import (
    HISTORY_NAME,
    STORE_NAME,
    StaleHistoryError,
    TrajectoryError,
    check_store,
    open_history,
)
from weightlapse.viewer.analysis.run import Run

SHARD = 64  # small shards, so that a short run spans several


def bits(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values).view(np.uint32)


@pytest.fixture
def rows():
    return training_like(300, seed=2)


@pytest.fixture
def run_dir(tmp_path, rows):
    write_run(tmp_path / "run", rows)
    return tmp_path / "run"


def test_the_copy_is_the_stores_weights_time_major_bit_for_bit(run_dir, rows):
    build = build_history(run_dir, shard_steps=SHARD)
    assert build.built and build.steps == 301 and build.bytes > 0
    history = open_history(run_dir, check_store(run_dir))
    assert history.steps == 301 and history.array.shape == (784, 10, 301)
    assert np.array_equal(bits(history.array[:]), bits(rows.transpose(2, 1, 0)))
    assert np.array_equal(bits(history.read(405)), bits(rows[:, :, 405].T))
    # a current copy is kept, not rebuilt
    again = build_history(run_dir / STORE_NAME, shard_steps=SHARD)
    assert not again.built and again.steps == 301


def test_a_pixels_history_reads_the_same_with_the_copy_without_it_and_with_a_tail(tmp_path, rows):
    writer = write_run(tmp_path / "live", rows[:150], n_steps=300, finish=False)  # chunks of 16 steps
    try:
        build = build_history(tmp_path / "live", shard_steps=SHARD)
        assert build.steps == 144  # the complete chunks only: the one being filled still changes
        for step in range(150, 231):
            writer.record_step(step, rows[step], 0.1)
        writer.flush()
        run = Run("live", tmp_path / "live" / STORE_NAME)
        trace = run.pixel_history(200)
        assert trace.from_copy == 144 and np.array_equal(trace.steps, np.arange(231))
        assert np.array_equal(bits(trace.values), bits(rows[:231, :, 200].T))  # copy + the store's tail
        shutil.rmtree(tmp_path / "live" / HISTORY_NAME)
        without = run.pixel_history(200)
        assert without.from_copy == 0 and np.array_equal(bits(without.values), bits(trace.values))
    finally:
        writer.close()


def test_a_copy_of_another_store_is_never_used(run_dir, tmp_path):
    build_history(run_dir, shard_steps=SHARD)
    run = Run("run", run_dir / STORE_NAME)
    assert run.pixel_history(3).from_copy == 301
    # retrained under the copy with another seed: same length, same metadata, other weights
    retrained = training_like(300, seed=7)
    shutil.rmtree(run_dir / STORE_NAME)
    write_run(run_dir, retrained)
    with pytest.raises(StaleHistoryError, match="another store"):
        open_history(run_dir, check_store(run_dir))
    trace = run.pixel_history(3)
    assert trace.from_copy == 0 and np.array_equal(bits(trace.values), bits(retrained[:, :, 3].T))
    # the same values re-encoded (compacted): the copy names the old encoding, and is rebuilt
    build_history(run_dir, shard_steps=SHARD)
    compact_run(run_dir)
    with pytest.raises(StaleHistoryError):
        open_history(run_dir, check_store(run_dir))
    assert build_history(run_dir, shard_steps=SHARD).built
    assert run.pixel_history(3).from_copy == 301


def test_a_damaged_or_foreign_copy_is_not_used(run_dir, rows):
    build_history(run_dir, shard_steps=SHARD)
    for shard in sorted((run_dir / HISTORY_NAME / "weights" / "c").rglob("*"))[-1:]:
        shard.write_bytes(b"not a shard")
    run = Run("run", run_dir / STORE_NAME)
    trace = run.pixel_history(10)  # the damaged shard holds steps 256..300: the store is read instead
    assert trace.from_copy == 0 and np.array_equal(bits(trace.values), bits(rows[:, :, 10].T))
    (run_dir / HISTORY_NAME / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    with pytest.raises(StaleHistoryError, match="not a pixel history"):
        open_history(run_dir, check_store(run_dir))


class Killed(BaseException):
    """Stands for the process being killed at that point."""


def test_an_interrupted_build_leaves_the_old_copy_or_none_never_a_partial_one(run_dir, rows, monkeypatch):
    class DiesAfterOneRead(history_module.CheckedSteps):
        reads = 0

        def __getitem__(self, key):
            DiesAfterOneRead.reads += 1
            if DiesAfterOneRead.reads > 1:
                raise Killed
            return super().__getitem__(key)

    with monkeypatch.context() as patched:
        patched.setattr(history_module, "CheckedSteps", DiesAfterOneRead)
        patched.setattr(history_module, "READ_STEPS", 32)
        with pytest.raises(Killed):
            build_history(run_dir, shard_steps=SHARD)
    assert (run_dir / f".{HISTORY_NAME}.building").exists() and not (run_dir / HISTORY_NAME).exists()
    with pytest.raises(StaleHistoryError, match="no pixel history"):
        open_history(run_dir, check_store(run_dir))
    assert Run("run", run_dir / STORE_NAME).pixel_history(7).from_copy == 0

    build_history(run_dir, shard_steps=SHARD)  # a good copy; then a rebuild killed just before its swap
    old = open_history(run_dir, check_store(run_dir))
    with monkeypatch.context() as patched:
        patched.setattr(history_module, "covered_steps", lambda checked: 300)  # so that it rebuilds
        patched.setattr(history_module.os, "rename", lambda *args: (_ for _ in ()).throw(Killed()))
        with pytest.raises(Killed):
            build_history(run_dir, shard_steps=SHARD)
    assert open_history(run_dir, check_store(run_dir)).steps == old.steps == 301  # the old copy, still whole
    assert build_history(run_dir, shard_steps=SHARD).built is False  # still current: kept ...
    assert not (run_dir / f".{HISTORY_NAME}.building").exists()    # ... and what the killed one left is gone


def test_a_run_being_trained_or_reached_through_a_link_is_refused(run_dir, tmp_path):
    with exclusive_writer(run_dir), pytest.raises(RunLockedError, match="being trained"):
        build_history(run_dir)
    (tmp_path / "link").symlink_to(run_dir)
    with pytest.raises(TrajectoryError, match="symbolic link"):
        build_history(tmp_path / "link")


def test_the_index_command_builds_it(run_dir, tmp_path, capsys):
    assert cli_main(["index", str(run_dir)]) == 0
    assert "301 steps" in capsys.readouterr().out
    assert open_history(run_dir, check_store(run_dir)).steps == 301
    assert cli_main(["index", str(tmp_path / "nothing-here")]) == 1
