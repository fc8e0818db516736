"""The training side of recording (pipeline/writer.py): every row recorded reaches the store
exactly, in order, the marker covering only what is on disk, whatever the block boundaries."""

import tracemalloc

import dask.array as da
import numpy as np
import pytest
import zarr
from viewer_runs import random_rows, write_store

from weightlapse.pipeline.handoff import WriterProcess, WriterThread
from weightlapse.pipeline.store import RunMetadata, StoreLayout, TrajectoryError, open_run, read_progress
from weightlapse.pipeline.writer import TrajectoryWriter


def test_round_trip_is_exact_and_xarray_sees_the_named_dims(tmp_path):
    rows = random_rows(37)
    rows[5, 0, 0] = -0.0  # signed zero and denormals survive too
    rows[6, 1, 1] = np.float32(1e-42)
    path = tmp_path / "trajectory.zarr"
    write_store(path, rows)
    ds = open_run(path)
    assert ds.weights.dims == ("step", "class", "pixel")
    assert ds.weights.shape == (38, 10, 784) and ds.weights.dtype == np.float32
    assert isinstance(ds.weights.data, da.Array)  # lazy
    assert np.array_equal(ds.weights.values.view(np.int32), rows.view(np.int32))  # bit for bit
    assert ds.step.values.tolist() == list(range(38))
    assert np.isnan(ds.loss.values[0]) and ds.loss.values[7] == 7
    assert ds.eval_step.values.tolist() == [0, 5, 10, 15, 20, 25, 30, 35]
    assert float(ds.heldout_accuracy.sel(eval_step=10)) == pytest.approx(0.1)
    # pixel p is image row p // 28, column p % 28
    assert ds.row.sel(pixel=59).item() == 2 and ds.col.sel(pixel=59).item() == 3
    assert ds.attrs["progress"]["finished"] is True


def test_a_half_written_run_reads_as_its_valid_prefix(tmp_path):
    rows = random_rows(30)
    path = tmp_path / "trajectory.zarr"
    writer = TrajectoryWriter(path, StoreLayout(n_steps=30, eval_steps=(0, 30), chunk_steps=8), RunMetadata(), block_steps=8)
    for step in range(20):
        writer.record_step(step, rows[step])
    # 20 rows recorded: two full one-chunk blocks (16 rows) go to disk in the background,
    # the rest stays buffered; the marker covers only what is written.
    assert read_progress(path)["steps_done"] in (-1, 7, 15)
    writer.wait_written()
    progress = read_progress(path)
    assert progress["steps_done"] == 15 and progress["finished"] is False
    ds = open_run(path)
    assert ds.sizes["step"] == 16 and not np.isnan(ds.weights.values).any()
    writer.flush()
    assert open_run(path).sizes["step"] == 20


def test_a_crash_in_training_keeps_the_recorded_steps_and_marks_the_run_unfinished(tmp_path):
    rows = random_rows(30)
    path = tmp_path / "trajectory.zarr"
    with pytest.raises(RuntimeError):
        with TrajectoryWriter(path, StoreLayout(n_steps=30, eval_steps=(0,), chunk_steps=8), RunMetadata()) as writer:
            for step in range(12):
                writer.record_step(step, rows[step])
            raise RuntimeError("out of memory")
    progress = read_progress(path)
    assert progress["steps_done"] == 11 and not progress["finished"]
    assert "RuntimeError: out of memory" in progress["error"]
    assert np.array_equal(open_run(path).weights.values, rows[:12])


@pytest.fixture(params=["writer process", "writer thread"])
def chunk_path(request, monkeypatch):
    """Run a test with the store written by the writer process (Linux) and by the writer thread."""
    if request.param == "writer thread":
        monkeypatch.setattr(WriterProcess, "available", classmethod(lambda cls: False))
    elif not WriterProcess.available():
        pytest.skip("the writer process is used on Linux only")
    return request.param


def test_a_failing_disk_stops_training_with_the_reason(tmp_path, chunk_path):
    path = tmp_path / "trajectory.zarr"
    writer = TrajectoryWriter(path, StoreLayout(n_steps=30, eval_steps=(0,), chunk_steps=4), RunMetadata(), block_steps=8)
    assert isinstance(writer._worker, WriterProcess if chunk_path == "writer process" else WriterThread)
    (path / "weights" / "c").write_bytes(b"")  # a file where the chunk directory must go: every write fails
    with pytest.raises(TrajectoryError, match="writing the store failed.*(Not a directory|File exists)"):
        for step in range(31):
            writer.record_step(step, random_rows(0)[0])
        writer.close()
    assert read_progress(path)["steps_done"] == -1  # nothing claimed that is not on disk


def test_rows_are_exact_whatever_the_block_and_flush_boundaries(tmp_path, chunk_path):
    rows = random_rows(70)
    path = tmp_path / "trajectory.zarr"
    writer = TrajectoryWriter(path, StoreLayout(n_steps=70, eval_steps=(0,), chunk_steps=8), RunMetadata(), block_steps=16)
    for step, row in enumerate(rows):
        writer.record_step(step, row)
        if step in (5, 6, 29):  # flushes inside a chunk, then blocks that start mid-chunk
            writer.flush()
            assert open_run(path).sizes["step"] == step + 1
    writer.close()
    assert np.array_equal(open_run(path).weights.values.view(np.int32), rows.view(np.int32))


def test_steps_must_come_in_order(tmp_path):
    writer = TrajectoryWriter(tmp_path / "t.zarr", StoreLayout(n_steps=3, eval_steps=(0,)), RunMetadata())
    with pytest.raises(ValueError, match="expected 0, got 1"):
        writer.record_step(1, random_rows(0)[0])


def test_memory_stays_bounded_by_a_few_blocks(tmp_path):
    row = random_rows(0)[0]
    n_steps = 2000  # 63 MB of weights
    writer = TrajectoryWriter(tmp_path / "t.zarr", StoreLayout(n_steps=n_steps, eval_steps=(0,), chunk_steps=16), RunMetadata(),
                              block_steps=16)
    tracemalloc.start()
    for step in range(n_steps + 1):
        writer.record_step(step, row)
    writer.close()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * 16 * row.nbytes, f"peak {peak / 1e6:.1f} MB while writing {n_steps * row.nbytes / 1e6:.0f} MB"


def test_an_existing_store_is_never_overwritten_silently(tmp_path):
    path = tmp_path / "trajectory.zarr"
    rows = random_rows(3)
    write_store(path, rows)
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_store(path, random_rows(3, seed=1))
    assert np.array_equal(open_run(path).weights.values, rows)  # nothing lost
    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(foreign, mode="w").attrs["owner"] = "someone else"
    with pytest.raises(TrajectoryError, match="not a weightlapse trajectory.*Refusing to write over it"):
        write_store(foreign, rows)
    assert zarr.open_group(foreign, mode="r").attrs["owner"] == "someone else"


def test_recording_steps_a_block_at_a_time_writes_the_same_store(tmp_path):
    rng = np.random.default_rng(3)
    n = 100
    weights = rng.standard_normal((n + 1, 10, 784)).astype(np.float32)
    losses = rng.random(n + 1).astype(np.float32)
    biases = rng.standard_normal((n + 1, 10)).astype(np.float32)
    gradients = rng.standard_normal((n + 1, 10, 784)).astype(np.float32)
    layout = StoreLayout(n_steps=n, eval_steps=(0, n), chunk_steps=8, bias=True, gradients=True)
    with TrajectoryWriter(tmp_path / "one.zarr", layout, RunMetadata(run="x"), block_steps=16) as writer:
        for step in range(n + 1):
            writer.record_step(step, weights[step], losses[step], bias=biases[step],
                               gradient=gradients[step] if step else None)
    with TrajectoryWriter(tmp_path / "blocks.zarr", layout, RunMetadata(run="x"), block_steps=16) as writer:
        first = 0
        for size in (7, 30, 1, 62, 1):  # across block edges, and a block of one
            rows = slice(first, first + size)
            writer.record_steps(first, weights[rows], losses[rows], biases=biases[rows], gradients=gradients[rows])
            first += size
        with pytest.raises(ValueError, match="in order"):
            writer.record_steps(5, weights[:2], losses[:2], biases=biases[:2], gradients=gradients[:2])
    one, blocks = open_run(tmp_path / "one.zarr"), open_run(tmp_path / "blocks.zarr")
    for name in ("weights", "loss", "bias", "gradients"):
        np.testing.assert_array_equal(one[name].values, blocks[name].values, err_msg=name)
    assert np.isnan(blocks.gradients.values[0]).all()


def test_rows_an_engine_writes_in_place_are_the_rows_recorded(tmp_path):
    # The numpy engine writes each step straight into the rows rows_to_fill lends, up to
    # the next hand-off, then records them: the store is the one record_step writes.
    rng = np.random.default_rng(4)
    n = 100
    weights = rng.standard_normal((n + 1, 10, 784)).astype(np.float32)
    losses = rng.random(n + 1).astype(np.float32)
    biases = rng.standard_normal((n + 1, 10)).astype(np.float32)
    gradients = rng.standard_normal((n + 1, 10, 784)).astype(np.float32)
    layout = StoreLayout(n_steps=n, eval_steps=(0, n), chunk_steps=8, bias=True, gradients=True)
    with TrajectoryWriter(tmp_path / "one.zarr", layout, RunMetadata(run="x"), block_steps=32) as writer:
        for step in range(n + 1):
            writer.record_step(step, weights[step], losses[step], bias=biases[step],
                               gradient=gradients[step] if step else None)
    lent = []
    with TrajectoryWriter(tmp_path / "in-place.zarr", layout, RunMetadata(run="x"), block_steps=32) as writer:
        writer.record_step(0, weights[0], losses[0], bias=biases[0])
        first = 1
        while first <= n:
            rows = writer.rows_to_fill(first)
            size = len(rows["loss"])
            lent.append((first, size))
            given = slice(first, first + size)
            for name, values in (("weight", weights), ("loss", losses), ("bias", biases), ("gradient", gradients)):
                rows[name][:] = values[given]
            writer.record_steps(first, rows["weight"], rows["loss"], biases=rows["bias"], gradients=rows["gradient"])
            first += size
        with pytest.raises(ValueError, match="past the planned"):
            writer.rows_to_fill(n + 1)
    # up to each hand-off (here the block's end: 32 rows), and no further than the run
    assert lent == [(1, 31), (32, 32), (64, 32), (96, 5)]
    one, in_place = open_run(tmp_path / "one.zarr"), open_run(tmp_path / "in-place.zarr")
    for name in ("weights", "loss", "bias", "gradients"):
        np.testing.assert_array_equal(one[name].values, in_place[name].values, err_msg=name)
