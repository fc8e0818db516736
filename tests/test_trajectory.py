"""The store format: what the viewer and research scripts rely on."""

import json
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr

from weightlapse.pipeline.chunkwriter import ChunkWriter
from weightlapse.pipeline.handoff import WriterProcess, WriterThread
from weightlapse.pipeline.trajectory import (
    StoreLayout,
    TrajectoryError,
    TrajectoryNotFoundError,
    TrajectoryWriter,
    check_schema,
    open_run,
    read_progress,
)


def random_rows(n_steps, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n_steps + 1, 10, 784)).astype(np.float32)


def write_run(path, rows, *, chunk_steps=8, finish=True, eval_every=5, **layout):
    n_steps = len(rows) - 1
    evals = tuple(range(0, n_steps + 1, eval_every))
    writer = TrajectoryWriter(path, StoreLayout(n_steps=n_steps, eval_steps=evals, chunk_steps=chunk_steps,
                                                **layout), {"run": "test"})
    for step, row in enumerate(rows):
        writer.record_step(step, row, float(step) if step else float("nan"))
        if step in evals:
            writer.record_eval(step, step / 100, 1.0 / (step + 1))
    if finish:
        writer.close()
    return writer


def test_round_trip_is_exact_and_xarray_sees_the_named_dims(tmp_path):
    rows = random_rows(37)
    rows[5, 0, 0] = -0.0  # signed zero and denormals survive too
    rows[6, 1, 1] = np.float32(1e-42)
    path = tmp_path / "trajectory.zarr"
    write_run(path, rows)
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


def test_plain_zarr_dask_and_xarray_open_it_without_weightlapse(tmp_path):
    rows = random_rows(20)
    path = tmp_path / "trajectory.zarr"
    write_run(path, rows)
    group = zarr.open_group(path, mode="r")
    assert group["weights"].metadata.dimension_names == ("step", "class", "pixel")
    assert np.array_equal(group["weights"][3], rows[3])
    assert np.array_equal(da.from_zarr(str(path), component="weights")[4].compute(), rows[4])
    plain = xr.open_zarr(path, consolidated=False)
    assert plain.weights.dims == ("step", "class", "pixel")
    assert json.loads((path / "zarr.json").read_text())["attributes"]["weightlapse"]["schema"] == \
        "weightlapse.trajectory"


def test_a_half_written_run_reads_as_its_valid_prefix(tmp_path):
    rows = random_rows(30)
    path = tmp_path / "trajectory.zarr"
    writer = TrajectoryWriter(path, StoreLayout(n_steps=30, eval_steps=(0, 30), chunk_steps=8), {}, block_steps=8)
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
        with TrajectoryWriter(path, StoreLayout(n_steps=30, eval_steps=(0,), chunk_steps=8), {}) as writer:
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
    writer = TrajectoryWriter(path, StoreLayout(n_steps=30, eval_steps=(0,), chunk_steps=4), {}, block_steps=8)
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
    writer = TrajectoryWriter(path, StoreLayout(n_steps=70, eval_steps=(0,), chunk_steps=8), {}, block_steps=16)
    for step, row in enumerate(rows):
        writer.record_step(step, row)
        if step in (5, 6, 29):  # flushes inside a chunk, then blocks that start mid-chunk
            writer.flush()
            assert open_run(path).sizes["step"] == step + 1
    writer.close()
    assert np.array_equal(open_run(path).weights.values.view(np.int32), rows.view(np.int32))


def test_steps_must_come_in_order(tmp_path):
    writer = TrajectoryWriter(tmp_path / "t.zarr", StoreLayout(n_steps=3, eval_steps=(0,)), {})
    with pytest.raises(ValueError, match="expected 0, got 1"):
        writer.record_step(1, random_rows(0)[0])


def test_memory_stays_bounded_by_a_few_blocks(tmp_path):
    row = random_rows(0)[0]
    n_steps = 2000  # 63 MB of weights
    writer = TrajectoryWriter(tmp_path / "t.zarr", StoreLayout(n_steps=n_steps, eval_steps=(0,), chunk_steps=16), {},
                              block_steps=16)
    tracemalloc.start()
    for step in range(n_steps + 1):
        writer.record_step(step, row)
    writer.close()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * 16 * row.nbytes, f"peak {peak / 1e6:.1f} MB while writing {n_steps * row.nbytes / 1e6:.0f} MB"


def test_a_missing_or_foreign_store_gets_a_clear_error(tmp_path):
    with pytest.raises(TrajectoryNotFoundError, match="no trajectory store"):
        open_run(tmp_path / "nothing")
    foreign = zarr.open_group(tmp_path / "foreign.zarr", mode="w")
    foreign.create_array("x", shape=(3,), dtype="int8")
    with pytest.raises(TrajectoryError, match="not a weightlapse trajectory"):
        open_run(tmp_path / "foreign.zarr")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "zarr.json").write_text("{not json")
    with pytest.raises(TrajectoryError, match="not a Zarr group"):
        open_run(tmp_path / "junk")


def test_another_schema_version_is_named(tmp_path):
    path = tmp_path / "old.zarr"
    write_run(path, random_rows(3))
    group = zarr.open_group(path, mode="r+")
    group.attrs["weightlapse"] = {**group.attrs["weightlapse"], "schema_version": 0}
    with pytest.raises(TrajectoryError, match="schema version 0, this weightlapse reads version 1"):
        check_schema(path)


def test_an_existing_store_is_never_overwritten_silently(tmp_path):
    path = tmp_path / "trajectory.zarr"
    rows = random_rows(3)
    write_run(path, rows)
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_run(path, random_rows(3, seed=1))
    assert np.array_equal(open_run(path).weights.values, rows)  # nothing lost
    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(foreign, mode="w").attrs["owner"] = "someone else"
    with pytest.raises(TrajectoryError, match="not a weightlapse trajectory.*Refusing to write over it"):
        write_run(foreign, rows)
    assert zarr.open_group(foreign, mode="r").attrs["owner"] == "someone else"


def test_store_is_smaller_than_raw(tmp_path):
    # A realistic trajectory: small Adam-like steps from a random start.
    rng = np.random.default_rng(0)
    start = rng.uniform(-0.036, 0.036, (10, 784)).astype(np.float32)
    steps = rng.choice(np.float32([-1e-3, 0, 1e-3]), (256, 10, 784))
    rows = np.concatenate([start[None], start + np.cumsum(steps, axis=0)]).astype(np.float32)
    path = tmp_path / "trajectory.zarr"
    write_run(path, rows, chunk_steps=64)
    on_disk = sum(f.stat().st_size for f in (path / "weights").rglob("*") if f.is_file())
    assert on_disk < rows.nbytes


def test_chunks_written_directly_are_the_bytes_zarr_writes(tmp_path):
    # The writer encodes whole chunks itself (off zarr's write path, for speed); any zarr
    # reader must see exactly what zarr would have stored.
    rows = random_rows(49)  # 50 rows, chunks of 8: six whole chunks and a partial one
    rows[3, 2, 1] = -0.0
    rows[9, 0, 5] = np.float32(1e-42)
    ours = tmp_path / "ours.zarr"
    write_run(ours, rows, chunk_steps=8)
    assert isinstance(TrajectoryWriter(tmp_path / "probe.zarr", StoreLayout(n_steps=3, eval_steps=(0,)), {})
                      ._store_writer.arrays["weights"], ChunkWriter)  # the direct path is in use
    reference = zarr.open_array(ours / "weights", mode="r")
    by_zarr = zarr.create_array(tmp_path / "zarr-written", shape=reference.shape, chunks=reference.chunks,
                                dtype="float32", fill_value=np.nan, filters=reference.filters,
                                compressors=reference.compressors)
    by_zarr[:] = rows
    for index in range(7):
        key = f"c/{index}/0/0"
        assert (ours / "weights" / key).read_bytes() == (tmp_path / "zarr-written" / key).read_bytes(), key
    assert np.array_equal(open_run(ours).weights.values.view(np.int32), rows.view(np.int32))
    assert not list((ours / "weights").rglob("*.partial"))  # no temporary file left behind


def test_a_training_trajectory_compresses_at_least_1_3_times(tmp_path):
    # Adam-like: each weight moves by about 1e-3 of the scale a step, most in the same
    # direction for a while, pixels of the border never.
    rng = np.random.default_rng(0)
    start = rng.uniform(-0.036, 0.036, (10, 784)).astype(np.float32)
    drift = rng.choice(np.float32([-1e-3, 1e-3]), (1, 10, 784))
    steps = drift * rng.uniform(0.5, 1.0, (512, 10, 784)).astype(np.float32)
    steps[:, :, :100] = 0
    rows = np.concatenate([start[None], start + np.cumsum(steps, axis=0)]).astype(np.float32)
    path = tmp_path / "trajectory.zarr"
    write_run(path, rows[:513], chunk_steps=64)
    on_disk = sum(f.stat().st_size for f in (path / "weights").rglob("*") if f.is_file() and f.name != "zarr.json")
    assert rows.nbytes / on_disk >= 1.3


def test_recording_steps_a_block_at_a_time_writes_the_same_store(tmp_path):
    rng = np.random.default_rng(3)
    n = 100
    weights = rng.standard_normal((n + 1, 10, 784)).astype(np.float32)
    losses = rng.random(n + 1).astype(np.float32)
    biases = rng.standard_normal((n + 1, 10)).astype(np.float32)
    gradients = rng.standard_normal((n + 1, 10, 784)).astype(np.float32)
    layout = StoreLayout(n_steps=n, eval_steps=(0, n), chunk_steps=8, bias=True, gradients=True)
    with TrajectoryWriter(tmp_path / "one.zarr", layout, {"run": "x"}, block_steps=16) as writer:
        for step in range(n + 1):
            writer.record_step(step, weights[step], losses[step], bias=biases[step],
                               gradient=gradients[step] if step else None)
    with TrajectoryWriter(tmp_path / "blocks.zarr", layout, {"run": "x"}, block_steps=16) as writer:
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


def test_every_array_the_writer_encodes_is_the_bytes_zarr_writes(tmp_path):
    # Loss, bias, gradients, evaluations and checkpoints are encoded by the writer too,
    # rewritten whole as their chunks fill up a few rows at a time.
    rng = np.random.default_rng(5)
    n = 90
    layout = StoreLayout(n_steps=n, eval_steps=(0, 40, 90), chunk_steps=16, bias=True, gradients=True,
                         resume_size=20)
    states = iter(rng.standard_normal((50, 20)).astype(np.float32))
    ours = tmp_path / "ours.zarr"
    with TrajectoryWriter(ours, layout, {"run": "x"}, block_steps=32, checkpoint=lambda: next(states)) as writer:
        for step in range(n + 1):
            writer.record_step(step, rng.standard_normal((10, 784)).astype(np.float32), float(rng.random()),
                               bias=rng.standard_normal(10).astype(np.float32),
                               gradient=rng.standard_normal((10, 784)).astype(np.float32) if step else None)
            if step in layout.eval_steps:
                writer.record_eval(step, float(rng.random()), float(rng.random()))
    group = zarr.open_group(ours, mode="r")
    for name in ("weights", "gradients", "loss", "bias", "heldout_accuracy", "heldout_loss", "resume_state"):
        reference = group[name]
        assert isinstance(ChunkWriter.wrap(zarr.open_array(ours / name, mode="r+")), ChunkWriter), name
        by_zarr = zarr.create_array(tmp_path / f"zarr-{name}", shape=reference.shape, chunks=reference.chunks,
                                    dtype="float32", fill_value=np.nan, filters=reference.filters,
                                    compressors=reference.compressors)
        by_zarr[...] = reference[...]
        chunk_files = sorted(p.relative_to(ours / name) for p in (ours / name).rglob("*")
                             if p.is_file() and p.name != "zarr.json")
        assert chunk_files, name
        for key in chunk_files:
            assert (ours / name / key).read_bytes() == (tmp_path / f"zarr-{name}" / key).read_bytes(), (name, key)


@pytest.mark.skipif(not WriterProcess.available(), reason="the writer process is used on Linux only")
def test_the_writer_process_stops_writing_when_the_training_process_dies(tmp_path):
    # An orphan writing on could overwrite the files and marker of a run resumed meanwhile.
    # Here the writer is slowed down mid-chunk; its parent dies; the chunk must never appear.
    store = tmp_path / "t.zarr"
    script = f"""
import os, time, numpy as np
from weightlapse.pipeline import chunkwriter
from weightlapse.pipeline.trajectory import StoreLayout, TrajectoryWriter
original = chunkwriter.ChunkWriter._write_chunk
def slow(self, index, rows):
    time.sleep(2)
    original(self, index, rows)
chunkwriter.ChunkWriter._write_chunk = slow
writer = TrajectoryWriter({str(store)!r}, StoreLayout(n_steps=200, eval_steps=(0,), chunk_steps=64), {{}})
for step in range(64):  # one whole chunk: handed to the writer process at once
    writer.record_step(step, np.zeros((10, 784), np.float32))
time.sleep(0.5)
os.kill(os.getpid(), 9)
"""
    subprocess.run([sys.executable, "-c", script], timeout=60, cwd=Path(__file__).resolve().parents[1], check=False)
    time.sleep(3)
    assert not (store / "weights" / "c" / "0" / "0" / "0").exists(), "the writer process wrote after its parent died"
    assert read_progress(store)["steps_done"] == -1


@pytest.mark.skipif(not WriterProcess.available(), reason="the writer process is used on Linux only")
def test_a_writer_process_exits_when_closed_while_a_later_one_runs():
    # Runs trained as a stack each have a writer process. A later one inherits the earlier
    # one's pipe at its fork; unless it closes that copy, the earlier writer never sees the
    # end of its input and lingers.
    first = WriterProcess(lambda messages: [None] * len(messages), "first")
    second = WriterProcess(lambda messages: [None] * len(messages), "second")
    try:
        first.close()
        first._process.join(timeout=10)
        assert first._process.exitcode == 0, "the first writer process did not exit when closed"
    finally:
        second.close()
        second._process.join(timeout=10)
