"""The validating reader (pipeline/store.py): hostile or damaged stores give the project's own
error, naming the store and what is wrong, before anything is read or allocated."""

import json
import os
import shutil

import numpy as np
import pytest
from viewer_runs import training_like, write_run

from weightlapse.pipeline.store import MAX_CHUNK_BYTES, TrajectoryError, check_store
from weightlapse.pipeline.trajectory import STORE_NAME, open_run, read_progress
from weightlapse.viewer.analysis.runs import RunCatalog

N_STEPS = 60  # 16-step chunks: chunks 0..3


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "runs" / "good"
    write_run(run, training_like(N_STEPS, seed=2), chunk_steps=16)
    return run


def edit_json(path, change) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def set_marker(run, **values) -> None:
    edit_json(run / STORE_NAME / "zarr.json", lambda doc: doc["attributes"]["progress"].update(values))


def write_marker_text(run, field: str, literal: str) -> None:
    """Put a JSON literal that json.dumps would not write (Infinity, NaN) into the marker."""
    path = run / STORE_NAME / "zarr.json"
    document = json.loads(path.read_text())
    document["attributes"]["progress"][field] = "__LITERAL__"
    path.write_text(json.dumps(document).replace('"__LITERAL__"', literal))


MARKER_ATTACKS = {
    "infinite steps": lambda run: write_marker_text(run, "steps_done", "Infinity"),
    "NaN steps": lambda run: write_marker_text(run, "steps_done", "NaN"),
    "steps as text": lambda run: set_marker(run, steps_done="30"),
    "steps as a float": lambda run: set_marker(run, steps_done=30.0),
    "steps as a bool": lambda run: set_marker(run, steps_done=True),
    "past the plan": lambda run: set_marker(run, steps_done=N_STEPS + 5),
    "below -1": lambda run: set_marker(run, steps_done=-7),
    "absurd plan": lambda run: set_marker(run, n_steps=10**15, steps_done=10**15),
    "huge int": lambda run: write_marker_text(run, "steps_done", "1" + "0" * 400),
    "evals past the plan": lambda run: set_marker(run, evals_done=1000),
    "finished early": lambda run: set_marker(run, steps_done=10, finished=True),
    "finished as text": lambda run: set_marker(run, finished="yes"),
    "marker not a mapping": lambda run: edit_json(run / STORE_NAME / "zarr.json",
                                                  lambda doc: doc["attributes"].update(progress=[1, 2])),
    "bad checkpoint": lambda run: set_marker(run, resume={"step": "x"}),
}


def edit_array(run, name, change) -> None:
    edit_json(run / STORE_NAME / name / "zarr.json", change)


ARRAY_ATTACKS = {
    "weights as float64": lambda run: edit_array(run, "weights", lambda doc: doc.update(data_type="float64")),
    "weights as int8": lambda run: edit_array(run, "weights", lambda doc: doc.update(data_type="int8")),
    "eleven classes": lambda run: edit_array(run, "weights", lambda doc: doc.update(shape=[N_STEPS + 1, 11, 784])),
    "fewer rows than planned": lambda run: edit_array(run, "weights", lambda doc: doc.update(shape=[20, 10, 784])),
    "loss longer than the run": lambda run: edit_array(run, "loss", lambda doc: doc.update(shape=[10**9])),
    "huge chunk": lambda run: edit_array(run, "weights", lambda doc: doc["chunk_grid"]["configuration"].update(
        chunk_shape=[10**6, 10, 784])),
    "chunks split by class": lambda run: edit_array(run, "weights", lambda doc: doc["chunk_grid"]["configuration"]
                                                    .update(chunk_shape=[16, 1, 784])),
    "foreign codec": lambda run: edit_array(run, "weights", lambda doc: doc["codecs"].append(
        {"name": "numcodecs.zlib", "configuration": {"level": 1}})),
    "unknown codec": lambda run: edit_array(run, "weights", lambda doc: doc["codecs"].append(
        {"name": "evil.exec", "configuration": {}})),
    "renamed dims": lambda run: edit_array(run, "weights", lambda doc: doc.update(dimension_names=["a", "b", "c"])),
    "array missing": lambda run: shutil.rmtree(run / STORE_NAME / "heldout_loss"),
    "array is a group": lambda run: edit_array(run, "loss", lambda doc: doc.update(node_type="group")),
    "metadata not json": lambda run: (run / STORE_NAME / "weights" / "zarr.json").write_text("{ nope"),
    "huge metadata": lambda run: (run / STORE_NAME / "weights" / "zarr.json").write_text(" " * (2 * 2**20) + "{}"),
    "committed chunk missing": lambda run: (run / STORE_NAME / "weights" / "c" / "2" / "0" / "0").unlink(),
    "loss chunk missing": lambda run: (run / STORE_NAME / "loss" / "c" / "0").unlink(),
    "group metadata not json": lambda run: (run / STORE_NAME / "zarr.json").write_text("[[[["),
    "schema changed": lambda run: edit_json(run / STORE_NAME / "zarr.json",
                                            lambda doc: doc["attributes"]["weightlapse"].update(schema_version=99)),
}


@pytest.mark.parametrize("attack", sorted({**MARKER_ATTACKS, **ARRAY_ATTACKS}))
def test_a_damaged_or_hostile_store_is_refused_with_the_projects_error(run_dir, attack):
    ({**MARKER_ATTACKS, **ARRAY_ATTACKS})[attack](run_dir)
    for read in (check_store, open_run, read_progress if attack in MARKER_ATTACKS else check_store):
        with pytest.raises(TrajectoryError) as caught:
            read(run_dir)
        message = str(caught.value)
        assert str(run_dir) in message and len(message) < 800
        assert "Traceback" not in message
    # The runs index lists it as broken with that reason, and the other runs still work.
    write_run(run_dir.parent / "fine", training_like(20, seed=3), chunk_steps=16)
    infos = {info.name: info for info in RunCatalog(run_dir.parent).list()}
    assert infos["good"].state == "broken" and infos["good"].message
    assert infos["fine"].state == "finished"


def test_the_marker_check_allocates_nothing_for_an_absurd_plan(run_dir):
    # A store claiming 10**9 steps with matching shapes is refused by the marker's bound,
    # before any array of that length is made.
    set_marker(run_dir, n_steps=10**9, steps_done=10**9)
    for name, shape in (("weights", [10**9 + 1, 10, 784]), ("loss", [10**9 + 1]), ("step", [10**9 + 1])):
        edit_array(run_dir, name, lambda doc, shape=shape: doc.update(shape=shape))
    with pytest.raises(TrajectoryError, match="plans 1,000,000,000 steps"):
        open_run(run_dir)


def test_a_chunk_limit_bounds_what_one_read_allocates():
    assert MAX_CHUNK_BYTES <= 64 * 2**20


def test_a_corrupt_chunk_names_its_steps_and_leaves_the_rest_readable(tmp_path):
    run_dir = tmp_path / "runs" / "good"
    expected = training_like(600, seed=2)
    write_run(run_dir, expected, chunk_steps=16)
    chunk = run_dir / STORE_NAME / "weights" / "c" / "1" / "0" / "0"  # steps 16..31
    chunk.write_bytes(b"\x02\x01" + os.urandom(200))
    ds = open_run(run_dir)  # the files are all there: it opens
    with pytest.raises(TrajectoryError, match=r"steps 16\.\.31 cannot be read.*other steps can still be read"):
        ds.weights.isel(step=20).values
    # steps in other reads of the analysis API, and every other chunk in the viewer's reader
    np.testing.assert_array_equal(ds.weights.isel(step=550).values, expected[550])
    run = RunCatalog(run_dir.parent).open("good")
    np.testing.assert_array_equal(run.weights_at(40), expected[40])
    with pytest.raises(TrajectoryError, match=r"steps 16\.\.31 cannot be read"):
        run.weights_at(20)
    np.testing.assert_array_equal(run.weights_at(3), expected[3])


def test_nan_rows_are_never_presented_as_data(run_dir):
    # A chunk file replaced by one holding NaN (as a store written by other code could be):
    # the reader says so instead of showing NaN weights.
    import zarr

    weights = zarr.open_array(run_dir / STORE_NAME / "weights", mode="r+")
    weights[33] = np.nan
    ds = open_run(run_dir)
    with pytest.raises(TrajectoryError, match="not finite"):
        ds.weights.isel(step=40).values
    with pytest.raises(TrajectoryError, match="not finite"):
        RunCatalog(run_dir.parent).open("good").weights_at(33)


def test_reads_never_go_past_the_marker(run_dir):
    set_marker(run_dir, steps_done=20, finished=False)
    ds = open_run(run_dir)
    assert ds.sizes["step"] == 21
    run = RunCatalog(run_dir.parent).open("good")
    with pytest.raises(IndexError, match="outside this run's valid steps 0..20"):
        run.weights_at(21)


def test_a_store_reached_through_symbolic_links_is_not_read(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    write_run(elsewhere / "victim", training_like(N_STEPS, seed=4), chunk_steps=16)
    runs = tmp_path / "runs"
    # a chunk linked to a file outside the run
    write_run(runs / "linked-chunk", training_like(N_STEPS, seed=2), chunk_steps=16)
    chunk = runs / "linked-chunk" / STORE_NAME / "weights" / "c" / "1" / "0" / "0"
    chunk.unlink()
    chunk.symlink_to(elsewhere / "victim" / STORE_NAME / "weights" / "c" / "1" / "0" / "0")
    # a chunk directory linked out
    write_run(runs / "linked-dir", training_like(N_STEPS, seed=2), chunk_steps=16)
    shutil.rmtree(runs / "linked-dir" / STORE_NAME / "weights" / "c")
    (runs / "linked-dir" / STORE_NAME / "weights" / "c").symlink_to(elsewhere / "victim" / STORE_NAME / "weights" / "c")
    # the whole store linked out of the run directory
    (runs / "linked-store").mkdir(parents=True)
    (runs / "linked-store" / STORE_NAME).symlink_to(elsewhere / "victim" / STORE_NAME)
    # metrics linked to a file outside
    write_run(runs / "linked-metrics", training_like(20, seed=2), chunk_steps=16)
    (runs / "linked-metrics" / "metrics.json").unlink()
    (tmp_path / "secret.json").write_text(json.dumps({"heldout_accuracy": 0.123456}))
    (runs / "linked-metrics" / "metrics.json").symlink_to(tmp_path / "secret.json")

    catalog = RunCatalog(runs)
    infos = {info.name: info for info in catalog.list()}
    for name in ("linked-chunk", "linked-dir", "linked-store"):
        assert infos[name].state == "broken" and "symbolic link" in infos[name].message, infos[name]
        with pytest.raises(TrajectoryError, match="symbolic link"):
            catalog.open(name)
    for name in ("linked-chunk", "linked-dir"):  # named directly, a store's own links are refused too
        with pytest.raises(TrajectoryError, match="symbolic link"):
            open_run(runs / name)
    assert infos["linked-metrics"].state == "finished" and infos["linked-metrics"].metrics == {}


def test_run_metadata_is_typed_on_read_and_wrong_types_read_as_absent(run_dir):
    checked = check_store(run_dir)
    assert checked.metadata.params["optimizer"] == "adam" and checked.metadata.dataset == "generated"
    assert checked.metadata.class_names == tuple(str(c) for c in range(10))
    edit_json(run_dir / STORE_NAME / "zarr.json", lambda doc: doc["attributes"]["weightlapse"].update(
        params=["not", "a", "mapping"], dataset={"name": {"x": 1}, "class_names": ["only", "three", "names"]},
        run=12, engine=None))
    metadata = check_store(run_dir).metadata
    assert (metadata.params, metadata.dataset, metadata.class_names, metadata.run, metadata.engine) == \
        ({}, "", None, "", "")
    run = RunCatalog(run_dir.parent).open("good")
    assert run.class_names == [str(c) for c in range(10)]
    info = RunCatalog(run_dir.parent).describe("good")
    assert info.state == "finished" and info.params == {} and info.dataset == ""
