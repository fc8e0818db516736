"""The store writer (pipeline/store_writer.py) and what it is told (pipeline/writer_messages.py):
chunks it encodes are the bytes zarr writes, its messages are typed, and it never writes
after the training process is gone."""

import pickle
import subprocess
import sys
import time
from dataclasses import FrozenInstanceError
from pathlib import Path

import numpy as np
import pytest
import zarr
from viewer_runs import random_rows, write_store

from weightlapse.pipeline.chunkwriter import ChunkWriter
from weightlapse.pipeline.handoff import WriterProcess, shared_buffers
from weightlapse.pipeline.store import RunMetadata, StoreLayout, create_store, open_run, read_progress
from weightlapse.pipeline.store_writer import StoreWriter
from weightlapse.pipeline.writer import TrajectoryWriter
from weightlapse.pipeline.writer_messages import Finish, WriteBlock, WriteRows, Written


def test_chunks_written_directly_are_the_bytes_zarr_writes(tmp_path):
    # The writer encodes whole chunks itself (off zarr's write path, for speed); any zarr
    # reader must see exactly what zarr would have stored.
    rows = random_rows(49)  # 50 rows, chunks of 8: six whole chunks and a partial one
    rows[3, 2, 1] = -0.0
    rows[9, 0, 5] = np.float32(1e-42)
    ours = tmp_path / "ours.zarr"
    write_store(ours, rows, chunk_steps=8)
    assert isinstance(TrajectoryWriter(tmp_path / "probe.zarr", StoreLayout(n_steps=3, eval_steps=(0,)), RunMetadata())
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


def test_every_array_the_writer_encodes_is_the_bytes_zarr_writes(tmp_path):
    # Loss, bias, gradients, evaluations and checkpoints are encoded by the writer too,
    # rewritten whole as their chunks fill up a few rows at a time.
    rng = np.random.default_rng(5)
    n = 90
    layout = StoreLayout(n_steps=n, eval_steps=(0, 40, 90), chunk_steps=16, bias=True, gradients=True,
                         resume_size=20)
    states = iter(rng.standard_normal((50, 20)).astype(np.float32))
    ours = tmp_path / "ours.zarr"
    with TrajectoryWriter(ours, layout, RunMetadata(run="x"), block_steps=32, checkpoint=lambda: next(states)) as writer:
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
from weightlapse.pipeline.store import RunMetadata, StoreLayout
from weightlapse.pipeline.writer import TrajectoryWriter
original = chunkwriter.ChunkWriter._write_chunk
def slow(self, index, rows):
    time.sleep(2)
    original(self, index, rows)
chunkwriter.ChunkWriter._write_chunk = slow
writer = TrajectoryWriter({str(store)!r}, StoreLayout(n_steps=200, eval_steps=(0,), chunk_steps=64), RunMetadata())
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


def test_the_store_writer_carries_out_typed_messages_in_order(tmp_path):
    layout = StoreLayout(n_steps=15, eval_steps=(0, 8), chunk_steps=4)
    path = tmp_path / "t.zarr"
    group = create_store(path, layout, RunMetadata(run="messages"))
    slots = shared_buffers({"weights": (8, 10, 784), "loss": (8,)}, 2, shared=False)
    rows = random_rows(15, seed=4)
    slots[0]["weights"][:], slots[0]["loss"][:] = rows[:8], np.arange(8)
    writer = StoreWriter(group, layout, slots, None)
    assert writer.handle([WriteRows(slot=0, block_start=0, first_row=0, n_rows=4),
                          WriteBlock(slot=0, block_start=0, rows_handed=4, n_rows=8, first_eval=0,
                                     evals=((0.5, 1.5),), has_checkpoint=False)]) == \
        [Written(steps_done=-1, finished=False), Written(steps_done=7, finished=False)]
    assert read_progress(path) | {"updated": None} == \
        {"steps_done": 7, "n_steps": 15, "evals_done": 1, "finished": False, "updated": None}
    slots[1]["weights"][:], slots[1]["loss"][:] = rows[8:], np.arange(8, 16)
    assert writer.handle([WriteBlock(slot=1, block_start=8, rows_handed=0, n_rows=8, first_eval=1,
                                     evals=((0.75, 0.25),), has_checkpoint=False), Finish()]) == \
        [Written(steps_done=15, finished=False), Written(steps_done=15, finished=True)]
    ds = open_run(path)
    np.testing.assert_array_equal(ds.weights.values, rows)
    assert ds.loss.values.tolist() == list(range(16)) and ds.heldout_accuracy.values.tolist() == [0.5, 0.75]
    assert read_progress(path) == {"steps_done": 15, "n_steps": 15, "evals_done": 2, "finished": True}


def test_writer_messages_are_frozen_values_that_survive_the_pipe():
    messages = [WriteRows(1, 64, 0, 32), WriteBlock(None, 128, 0, 0, 2, ((0.5, 1.25),), False),
                Finish("RuntimeError: out of memory"), Written(127, False)]
    for message in messages:
        assert pickle.loads(pickle.dumps(message)) == message
    with pytest.raises(FrozenInstanceError):
        messages[0].n_rows = 5
    assert Finish() == Finish(error=None)


def test_a_message_the_store_writer_does_not_know_is_refused_and_the_marker_says_so(tmp_path):
    layout = StoreLayout(n_steps=7, eval_steps=(0,), chunk_steps=4)
    path = tmp_path / "t.zarr"
    slots = shared_buffers({"weights": (4, 10, 784), "loss": (4,)}, 2, shared=False)
    writer = StoreWriter(create_store(path, layout, RunMetadata()), layout, slots, None)
    with pytest.raises(TypeError, match="the store writer got a tuple, not a writer message"):
        writer.handle([("rows", 0, 0, 0, 4)])
    progress = read_progress(path)
    assert progress["steps_done"] == -1 and "writing the store failed: TypeError" in progress["error"]


@pytest.mark.parametrize("codec", ["fast", "compact"])
@pytest.mark.parametrize("layout", [
    {"chunk_steps": 16},                                     # 6 whole chunks and a partial one
    {"chunk_steps": 64, "bias": True, "gradients": True},    # one partial chunk, every array
    {"chunk_steps": 7, "gradients": True},                   # chunks that do not divide the blocks
])
def test_both_codecs_read_back_bit_for_bit_by_fresh_readers(tmp_path, codec, layout):
    # zarr writes config={"order": "F"} pcodec chunks that read back wrong, so every layout
    # is read here by readers that did not write it: weightlapse's, plain zarr, plain xarray.
    import warnings

    import xarray as xr

    rng = np.random.default_rng(7)
    n = 100
    steps = np.cumsum(rng.standard_normal((n + 1, 10, 784)).astype(np.float32) * 1e-3, axis=0)
    steps[3, 2, 1], steps[9, 0, 5], steps[11, 4, 4] = -0.0, np.float32(1e-42), np.float32(3e38)
    gradients = rng.standard_normal((n + 1, 10, 784)).astype(np.float32)
    layout = StoreLayout(n_steps=n, eval_steps=(0, n), codec=codec, **layout)
    path = tmp_path / "trajectory.zarr"
    with TrajectoryWriter(path, layout, RunMetadata(), block_steps=layout.chunk_steps * 3) as writer:
        for step in range(n + 1):
            writer.record_step(step, steps[step], float(step), bias=steps[step, :, 0],
                               gradient=gradients[step] if step else None)
            if step in layout.eval_steps:
                writer.record_eval(step, 0.5, 1.0)
    gradients[0] = np.nan
    assert isinstance(ChunkWriter.wrap(zarr.open_array(path / "weights", mode="r+")), ChunkWriter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # plain readers warn that pcodec is outside the Zarr v3 spec
        readers = {"open_run": open_run(path), "zarr": zarr.open_group(path, mode="r"), "xarray": xr.open_zarr(path)}
        expected = {"weights": steps, **({"gradients": gradients} if layout.gradients else {}),
                    **({"bias": np.ascontiguousarray(steps[:, :, 0])} if layout.bias else {})}
        for reader, opened in readers.items():
            for name, values in expected.items():
                read = np.asarray(opened[name][:] if reader == "zarr" else opened[name].values)
                assert np.array_equal(read.view(np.uint32), values.view(np.uint32)), (reader, name)
    codecs = [c.to_dict()["name"] for c in zarr.open_array(path / "weights", mode="r").metadata.codecs]
    assert codecs == (["transpose", "numcodecs.pcodec"] if codec == "compact" else ["transpose", "bytes", "blosc"])


def test_compact_chunks_encoded_side_by_side_are_all_written_and_a_failed_one_is_raised(tmp_path, monkeypatch):
    # pcodec chunks of a hand-off are encoded on a pool: every one must be on disk when the
    # write returns (the marker comes next), and a failure must reach the store writer.
    import warnings

    from weightlapse.pipeline import chunkwriter
    from weightlapse.pipeline.store import step_series_codecs

    if chunkwriter.ENCODING_THREADS < 2:
        pytest.skip("one core: chunks are encoded one at a time")
    rows = np.cumsum(random_rows(8 * 6 - 1), axis=0, dtype=np.float32)  # six whole chunks of 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numcodecs' pcodec is outside the Zarr v3 spec
        array = zarr.create_array(tmp_path / "weights", shape=rows.shape, chunks=(8, 10, 784), dtype=np.float32,
                                  fill_value=np.nan, zarr_format=3, **step_series_codecs(3, "compact"))
        writer = ChunkWriter.wrap(array)
        assert isinstance(writer, ChunkWriter)
        writer[0:48] = rows
        np.testing.assert_array_equal(zarr.open_array(tmp_path / "weights", mode="r")[:], rows)

        real = chunkwriter._write_atomically

        def disk_full_on_chunk_3(path, data):
            if path.relative_to(tmp_path / "weights").parts[:2] == ("c", "3"):  # chunk key c/3/0/0
                raise OSError(28, "No space left on device")
            real(path, data)
        monkeypatch.setattr(chunkwriter, "_write_atomically", disk_full_on_chunk_3)
        with pytest.raises(OSError, match="No space left"):
            writer[0:48] = rows[::-1].copy()
        written = zarr.open_array(tmp_path / "weights", mode="r")[:]
    for chunk in (0, 1, 2, 4, 5):  # the others were all written before the failure was raised
        np.testing.assert_array_equal(written[chunk * 8:chunk * 8 + 8], rows[::-1][chunk * 8:chunk * 8 + 8])
    np.testing.assert_array_equal(written[24:32], rows[24:32])
