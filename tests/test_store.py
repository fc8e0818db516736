"""The store format and its validating reader (pipeline/store/): what other readers see, the
typed attributes, and hostile or damaged stores giving the project's own error, naming the
store and what is wrong, before anything is read or allocated."""

import gzip
import json
import os
import shutil
import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr
from viewer_runs import random_rows, training_like, write_run, write_store

from weightlapse.pipeline.store import (
    MAX_CHUNK_BYTES,
    SCHEMA,
    SCHEMA_VERSION,
    STORE_NAME,
    RunMetadata,
    StoreLayout,
    TrajectoryError,
    TrajectoryNotFoundError,
    check_store,
    open_run,
    open_store,
    read_progress,
)
from weightlapse.pipeline.writer import TrajectoryWriter
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
    # numcodecs' BitRound is lossy: a store using it is not a lossless record of the run.
    "lossy numcodecs filter": lambda run: edit_array(run, "weights", lambda doc: doc["codecs"].insert(
        0, {"name": "numcodecs.bitround", "configuration": {"keepbits": 8}})),
    "pcodec with a compressor after it": lambda run: edit_array(run, "weights", lambda doc: doc.update(codecs=[
        doc["codecs"][0], {"name": "numcodecs.pcodec", "configuration": {"level": 7}}, doc["codecs"][-1]])),
    "numcodecs serializer other than pcodec": lambda run: edit_array(run, "weights", lambda doc: doc.update(codecs=[
        doc["codecs"][0], {"name": "numcodecs.zfpy", "configuration": {"mode": 4, "tolerance": 0.1}}])),
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


def test_plain_zarr_dask_and_xarray_open_it_without_weightlapse(tmp_path):
    rows = random_rows(20)
    path = tmp_path / "trajectory.zarr"
    write_store(path, rows)
    group = zarr.open_group(path, mode="r")
    assert group["weights"].metadata.dimension_names == ("step", "class", "pixel")
    assert np.array_equal(group["weights"][3], rows[3])
    assert np.array_equal(da.from_zarr(str(path), component="weights")[4].compute(), rows[4])
    plain = xr.open_zarr(path, consolidated=False)
    assert plain.weights.dims == ("step", "class", "pixel")
    assert json.loads((path / "zarr.json").read_text())["attributes"]["weightlapse"]["schema"] == \
        "weightlapse.trajectory"


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
    write_store(path, random_rows(3))
    group = zarr.open_group(path, mode="r+")
    group.attrs["weightlapse"] = {**group.attrs["weightlapse"], "schema_version": 0}
    with pytest.raises(TrajectoryError, match="schema version 0, this weightlapse reads versions 1 and 2"):
        open_store(path)


def test_store_is_smaller_than_raw(tmp_path):
    # A realistic trajectory: small Adam-like steps from a random start.
    rng = np.random.default_rng(0)
    start = rng.uniform(-0.036, 0.036, (10, 784)).astype(np.float32)
    steps = rng.choice(np.float32([-1e-3, 0, 1e-3]), (256, 10, 784))
    rows = np.concatenate([start[None], start + np.cumsum(steps, axis=0)]).astype(np.float32)
    path = tmp_path / "trajectory.zarr"
    write_store(path, rows, chunk_steps=64)
    on_disk = sum(f.stat().st_size for f in (path / "weights").rglob("*") if f.is_file())
    assert on_disk < rows.nbytes


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
    write_store(path, rows[:513], chunk_steps=64)
    on_disk = sum(f.stat().st_size for f in (path / "weights").rglob("*") if f.is_file() and f.name != "zarr.json")
    assert rows.nbytes / on_disk >= 1.3


def test_plain_xarray_open_zarr_reads_a_run_without_a_warning(tmp_path):
    # The group's zarr.json carries consolidated metadata, kept there as the marker moves.
    rows = training_like(70, seed=1)
    write_run(tmp_path / "run", rows, chunk_steps=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = xr.open_zarr(tmp_path / "run" / STORE_NAME)
        weights = plain.weights.values
    np.testing.assert_array_equal(weights.view(np.int32), open_run(tmp_path / "run").weights.values.view(np.int32))
    assert plain.weights.dims == ("step", "class", "pixel") and plain.attrs["progress"]["finished"] is True


def test_a_store_without_consolidated_metadata_still_opens(tmp_path):
    # Stores written before the metadata was consolidated: the same format otherwise.
    rows = training_like(40, seed=5)
    write_run(tmp_path / "old", rows, chunk_steps=16)
    edit_json(tmp_path / "old" / STORE_NAME / "zarr.json", lambda doc: doc.pop("consolidated_metadata"))
    np.testing.assert_array_equal(open_run(tmp_path / "old").weights.values, rows)
    assert check_store(tmp_path / "old").progress.finished
    assert RunCatalog(tmp_path).open("old").weights_at(7).tolist() == rows[7].tolist()


def full_metadata(**changes) -> RunMetadata:
    fields = dict(run="original", params={"optimizer": "adam", "lr": 0.001, "capture": {"chunk_steps": 64}},
                  model="softmax-regression", dataset="fashion-mnist", dataset_files={"train.gz": "sha256:ab"},
                  class_names=tuple(f"class {c}" for c in range(10)), n_train=60000, n_test=10000,
                  device="cuda:0 (NVIDIA H200)", engine="cuda-graph", versions={"weightlapse": "0.1.0", "zarr": "3.1.6"},
                  git_commit="0123abc-dirty", command="weightlapse train --run original")
    return RunMetadata(**{**fields, **changes})


@pytest.mark.parametrize("git_commit", ["0123abc-dirty", None])
def test_run_metadata_written_reads_back_equal(tmp_path, git_commit):
    metadata = full_metadata(git_commit=git_commit)
    path = tmp_path / STORE_NAME
    TrajectoryWriter(path, StoreLayout(n_steps=3, eval_steps=(0,)), metadata).close()
    assert check_store(path).metadata == metadata
    # The attribute is exactly the typed metadata's serialisation, key order included.
    written = json.loads((path / "zarr.json").read_text())["attributes"]["weightlapse"]
    expected = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **metadata.to_attributes()}
    assert list(written.items()) == list(expected.items())
    assert list(written["dataset"]) == ["name", "files", "class_names", "n_train", "n_test"]


@pytest.mark.parametrize(("changes", "message"), [
    ({"run": 12}, "RunMetadata.run must be a str, got 12"),
    ({"params": ["lr", 0.1]}, "RunMetadata.params must be a dict"),
    ({"class_names": ["a", "b"]}, "RunMetadata.class_names must be a tuple of strings"),
    ({"n_train": -1}, "RunMetadata.n_train must be a count of examples"),
    ({"n_test": True}, "RunMetadata.n_test must be a count of examples"),
    ({"git_commit": 5}, "RunMetadata.git_commit must be a str"),
])
def test_run_metadata_of_the_wrong_type_is_refused_when_made(changes, message):
    with pytest.raises(TypeError, match=message):
        full_metadata(**changes)


def test_the_writer_takes_typed_metadata_only(tmp_path):
    with pytest.raises(TypeError, match="a store's metadata is a RunMetadata, got dict"):
        TrajectoryWriter(tmp_path / STORE_NAME, StoreLayout(n_steps=3, eval_steps=(0,)), {"run": "x"})
    assert not (tmp_path / STORE_NAME).exists()


# -- schema version 2: a network store (pipeline/store/network.py), as weightlapse.Recorder writes it


@pytest.fixture
def network_run(tmp_path):
    import torch

    from weightlapse import Recorder

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 3))
    with Recorder(tmp_path / "runs" / "net", model) as rec:
        for _ in range(5):
            with torch.no_grad():
                model[0].weight.mul_(0.5)
            rec.step(loss=0.25)
    return tmp_path / "runs" / "net"


def edit_parameters(run, change) -> None:
    edit_json(run / STORE_NAME / "zarr.json", lambda doc: change(doc["attributes"]["weightlapse"]["parameters"]))


def rename_first(name):
    def change(parameters):
        parameters[0]["name"] = name
        parameters[0]["dims"] = ["step", f"{name}.out", f"{name}.in"]
    return change


NETWORK_ATTACKS = {
    "parameter list not a list": lambda run: edit_parameters(run, lambda ps: ps.clear() or ps.append("x")),
    "parameter list missing": lambda run: edit_json(run / STORE_NAME / "zarr.json", lambda doc: doc["attributes"][
        "weightlapse"].pop("parameters")),
    "empty parameter list": lambda run: edit_parameters(run, lambda ps: ps.clear()),
    "entry without dims": lambda run: edit_parameters(run, lambda ps: ps[0].pop("dims")),
    "name with a slash": lambda run: edit_parameters(run, rename_first("0/weight")),
    "name going up": lambda run: edit_parameters(run, rename_first("../../etc")),
    "zarr's reserved name": lambda run: edit_parameters(run, rename_first("__weight")),
    "name of the loss array": lambda run: edit_parameters(run, rename_first("loss")),
    "name used twice": lambda run: edit_parameters(run, lambda ps: ps.__setitem__(1, dict(ps[0]))),
    "huge shape": lambda run: edit_parameters(run, lambda ps: ps[0].update(shape=[10**9, 10**9])),
    "shape of floats": lambda run: edit_parameters(run, lambda ps: ps[0].update(shape=[4.0, 6.0])),
    "many axes": lambda run: edit_parameters(run, lambda ps: ps[0].update(shape=[1] * 40)),
    "unknown role": lambda run: edit_parameters(run, lambda ps: ps[0].update(role="exec")),
    "wrong dims": lambda run: edit_parameters(run, lambda ps: ps[0].update(dims=["step", "a", "b"])),
    "array shape not as listed": lambda run: edit_array(run, "0.weight", lambda doc: doc.update(shape=[6, 4, 7])),
    "fewer rows than committed": lambda run: edit_array(run, "0.weight", lambda doc: doc.update(shape=[3, 4, 6])),
    "absurd rows": lambda run: edit_array(run, "loss", lambda doc: doc.update(shape=[10**12])),
    "parameter array missing": lambda run: shutil.rmtree(run / STORE_NAME / "1.bias"),
    "committed chunk missing": lambda run: shutil.rmtree(run / STORE_NAME / "0.weight" / "c"),
    "foreign codec": lambda run: edit_array(run, "1.weight", lambda doc: doc["codecs"].append(
        {"name": "evil.exec", "configuration": {}})),
    "no store id": lambda run: edit_json(run / STORE_NAME / "zarr.json", lambda doc: doc["attributes"][
        "weightlapse"].pop("store_id")),
}


def test_a_network_store_opens_through_the_same_api(network_run):
    checked = check_store(network_run)
    assert [spec.name for spec in checked.network.parameters] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert check_store(network_run).identity == checked.identity  # the same store
    ds = open_run(network_run)
    assert ds["0.weight"].dims == ("step", "0.weight.out", "0.weight.in") and ds.sizes["step"] == 6
    assert np.array_equal(ds["0.weight"][5].values, ds["0.weight"][0].values / 32)
    assert read_progress(network_run) == {"steps_done": 5, "n_steps": 5, "evals_done": 0, "finished": True}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = xr.open_zarr(network_run / STORE_NAME)
    assert plain["0.weight"].dims == ds["0.weight"].dims and np.array_equal(plain.loss[1:].values, [0.25] * 5)


@pytest.mark.parametrize("attack", sorted(NETWORK_ATTACKS))
def test_a_hostile_network_store_is_refused_with_the_projects_error(network_run, attack):
    NETWORK_ATTACKS[attack](network_run)
    for read in (check_store, open_run):
        with pytest.raises(TrajectoryError) as caught:
            read(network_run)
        message = str(caught.value)
        assert str(network_run) in message and len(message) < 800, message
    assert RunCatalog(network_run.parent).describe("net").state == "broken"


# -- a planned network store: the train stage's run with hidden layers, its held-out scores and checkpoints


@pytest.fixture
def planned_network_run(tmp_path, generated_data):
    from weightlapse.pipeline.datasets import load_dataset
    from weightlapse.pipeline.params import TrainParams
    from weightlapse.pipeline.train import run_training

    run = tmp_path / "runs" / "mlp"
    run_training(TrainParams(device="cpu", hidden=(3,), bias=True, eval_every=4), load_dataset(generated_data[0], "mnist"),
                 run, run_name="mlp", progress=False)
    return run


def test_a_planned_network_store_has_version_1s_scores_and_checkpoints(planned_network_run):
    checked = check_store(planned_network_run)
    assert checked.network.names == ("hidden1.weight", "hidden1.bias", "output.weight", "output.bias")
    assert checked.progress.as_dict() == {"steps_done": 10, "n_steps": 10, "evals_done": 4, "finished": True,
                                          "resume": {"step": 10, "row": 0}}
    ds = open_run(planned_network_run)
    assert ds.eval_step.values.tolist() == [0, 4, 8, 10] and ds.heldout_accuracy.dims == ("eval_step",)
    assert np.isfinite(ds.heldout_loss.values).all() and "resume_state" not in ds
    assert checked.group["resume_state"].shape == (2, 2 * (3 * 784 + 3 + 10 * 3 + 10))  # Adam: two moments
    assert RunCatalog(planned_network_run.parent).describe("mlp").state == "finished"


PLANNED_NETWORK_ATTACKS = {
    "held-out scores of another length": lambda run: edit_array(run, "heldout_accuracy",
                                                                lambda doc: doc.update(shape=[3])),
    "held-out loss missing": lambda run: shutil.rmtree(run / STORE_NAME / "heldout_loss"),
    "eval steps as floats": lambda run: edit_array(run, "eval_step", lambda doc: doc.update(data_type="float32")),
    "more evaluations done than planned": lambda run: edit_json(run / STORE_NAME / "zarr.json", lambda doc: doc[
        "attributes"]["progress"].update(evals_done=5)),
    "checkpoints of one row": lambda run: edit_array(run, "resume_state", lambda doc: doc.update(shape=[1, 4])),
    "committed score chunk missing": lambda run: shutil.rmtree(run / STORE_NAME / "heldout_accuracy" / "c"),
}


@pytest.mark.parametrize("attack", sorted(PLANNED_NETWORK_ATTACKS))
def test_a_damaged_planned_network_store_is_refused_with_the_projects_error(planned_network_run, attack):
    PLANNED_NETWORK_ATTACKS[attack](planned_network_run)
    for read in (check_store, open_run):
        with pytest.raises(TrajectoryError) as caught:
            read(planned_network_run)
        assert str(planned_network_run) in str(caught.value) and len(str(caught.value)) < 800, str(caught.value)


def test_a_store_killed_as_its_directory_was_made_reads_as_being_created(tmp_path):
    from weightlapse.pipeline.store import StoreBeingCreatedError, open_run, read_progress

    store = tmp_path / "run" / "trajectory.zarr"
    store.mkdir(parents=True)  # the train stage killed between making the directory and writing zarr.json
    for read in (read_progress, open_run):
        with pytest.raises(StoreBeingCreatedError, match="still being created .* or its creation was interrupted"):
            read(store)
    (store / "notes.txt").write_text("a user's file")  # anything else there is not a store being made
    with pytest.raises(TrajectoryError, match="not a Zarr group"):
        open_run(store)


# What a train stage killed part way through creating its store leaves: every array before
# the kill, none after, and the one being written half there.
CREATION_KILLS = {
    "before the evaluation steps are written": lambda store: (store / "eval_step" / "c" / "0").unlink(),
    "while an array's metadata is written": lambda store: (store / "heldout_loss" / "zarr.json").write_text('{"shape"'),
    "before the last arrays are made": lambda store: [shutil.rmtree(store / name) for name in ("step", "eval_step")],
}


@pytest.mark.parametrize("kill", sorted(CREATION_KILLS))
def test_a_store_killed_while_it_was_created_reads_as_being_created(tmp_path, kill):
    from weightlapse.pipeline.store import StoreBeingCreatedError, create_store

    store = tmp_path / "runs" / "new" / STORE_NAME
    layout = StoreLayout(n_steps=100, eval_steps=(0, 50, 100), n_classes=10, n_pixels=784, chunk_steps=64,
                         bias=False, gradients=False, resume_size=0, codec="fast")
    create_store(store, layout, full_metadata())
    CREATION_KILLS[kill](store)
    for read in (check_store, open_run):
        with pytest.raises(StoreBeingCreatedError, match="no step is committed yet .* its creation was interrupted"):
            read(store)
    assert RunCatalog(tmp_path / "runs").describe("new").state != "broken"


def test_a_committed_store_missing_a_chunk_is_still_damaged(run_dir):
    from weightlapse.pipeline.store import StoreBeingCreatedError

    (run_dir / STORE_NAME / "eval_step" / "c" / "0").unlink()
    with pytest.raises(TrajectoryError, match="is missing") as caught:
        check_store(run_dir)
    assert not isinstance(caught.value, StoreBeingCreatedError)
    assert RunCatalog(run_dir.parent).describe("good").state == "broken"


BOMB_BYTES = 512 * 2**20  # what a crafted chunk of a few kilobytes decodes to


def bomb(codec: str) -> bytes:
    """A chunk file that decodes to BOMB_BYTES of zeros with ``codec``."""
    import numcodecs
    from pcodec import ChunkConfig, standalone

    if codec == "zstd frames":  # many small frames, each declaring 1 MiB, decoded one after another
        return numcodecs.Zstd(level=19).encode(np.zeros(2**18, np.float32)) * (BOMB_BYTES // 2**20)
    zeros = np.zeros(BOMB_BYTES // 4, np.float32)
    if codec == "pcodec":
        return standalone.simple_compress(zeros, ChunkConfig())
    return {"blosc": numcodecs.Blosc(cname="lz4", clevel=5), "gzip": numcodecs.GZip(level=9),
            "zstd": numcodecs.Zstd(level=19)}[codec].encode(zeros)


@pytest.mark.parametrize("codec", ["blosc", "gzip", "zstd", "zstd frames", "pcodec"])
def test_a_chunk_that_would_decode_past_its_size_is_refused_before_it_is_allocated(tmp_path, codec):
    from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec
    from zarr.codecs.numcodecs import PCodec

    import weightlapse.pipeline.store  # noqa: F401 - installs the bounded decoders

    values = np.random.default_rng(0).standard_normal((8, 1000)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pcodec is outside the Zarr v3 spec
        options = ({"serializer": PCodec(level=7), "compressors": None} if codec == "pcodec" else
                   {"compressors": [{"blosc": BloscCodec(cname="lz4"), "gzip": GzipCodec(),
                                     "zstd": ZstdCodec()}[codec.split()[0]]]})
        array = zarr.create_array(tmp_path / "a", shape=values.shape, chunks=(4, 1000), dtype="float32",
                                  zarr_format=3, **options)
        array[:] = values
        reread = zarr.open_array(tmp_path / "a", mode="r")
        np.testing.assert_array_equal(reread[:], values)  # a valid chunk decodes as zarr's own decoder does
        chunk = tmp_path / "a" / "c" / "1" / "0"
        chunk.write_bytes(bomb(codec))
        assert chunk.stat().st_size < 3 * 2**20
        with pytest.raises(ValueError, match="more|would decode"):
            zarr.open_array(tmp_path / "a", mode="r")[4:]
        np.testing.assert_array_equal(zarr.open_array(tmp_path / "a", mode="r")[:4], values[:4])
        if codec == "gzip":  # a chunk of two gzip members decodes as gzip reads it: both, in turn
            raw = values[4:].tobytes()
            chunk.write_bytes(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]))
            np.testing.assert_array_equal(zarr.open_array(tmp_path / "a", mode="r")[4:], values[4:])


def test_a_store_holding_a_decompression_bomb_names_its_steps_in_bounded_memory(tmp_path):
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to read the reader's peak memory")
    run_dir = tmp_path / "runs" / "bombed"
    write_run(run_dir, training_like(60, seed=2), chunk_steps=16)
    (run_dir / STORE_NAME / "weights" / "c" / "1" / "0" / "0").write_bytes(bomb("blosc"))
    # The peak is read from /proc (VmHWM, this process image's own): ru_maxrss would carry over
    # the peak of the pytest process it was forked from.
    probe = ("from pathlib import Path\n"
             "from weightlapse.pipeline.store import TrajectoryError, open_run\n"
             "try:\n"
             f"    open_run({str(run_dir)!r}).weights.values\n"
             "except TrajectoryError as error:\n"
             "    print(error)\n"
             "peak = next(line for line in Path('/proc/self/status').read_text().splitlines() if line.startswith('VmHWM'))\n"
             "print(int(peak.split()[1]) // 1024, 'MB')\n")
    import subprocess
    import sys

    output = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "steps 16..31 cannot be read" in output, output
    peak = int(output.split()[-2])
    assert peak < 400, f"{peak} MB to refuse a chunk that decodes to {BOMB_BYTES // 2**20} MB"


def test_a_link_planted_after_the_store_was_opened_is_not_followed(tmp_path):
    # Another run's chunk (valid data) planted as a link while a reader has the run open:
    # the reader names the link's steps instead of showing another store's weights as this run's.
    run_dir, other = tmp_path / "runs" / "good", tmp_path / "elsewhere" / "other"
    write_run(run_dir, training_like(60, seed=2), chunk_steps=16)
    write_run(other, training_like(60, seed=5), chunk_steps=16)
    ds, run = open_run(run_dir), RunCatalog(run_dir.parent).open("good")
    chunk = run_dir / STORE_NAME / "weights" / "c" / "1" / "0" / "0"   # steps 16..31
    chunk.unlink()
    chunk.symlink_to(other / STORE_NAME / "weights" / "c" / "1" / "0" / "0")
    directory = run_dir / STORE_NAME / "weights" / "c" / "2"            # steps 32..47: a linked directory
    shutil.rmtree(directory)
    directory.symlink_to(other / STORE_NAME / "weights" / "c" / "2")
    with pytest.raises(TrajectoryError, match=r"steps 16\.\.31 cannot be read .*symbolic link"):
        ds.weights.isel(step=20).values
    for step, steps in ((20, r"16\.\.31"), (40, r"32\.\.47")):
        with pytest.raises(TrajectoryError, match=rf"steps {steps} cannot be read .*symbolic link"):
            run.weights_at(step)
    np.testing.assert_array_equal(run.weights_at(50), training_like(60, seed=2)[50])  # its own chunk reads
