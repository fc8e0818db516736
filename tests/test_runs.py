"""The runs directory as the viewer sees it: listing, states, safe opening by name only."""

import json
import os

import numpy as np
import pytest
import zarr
from viewer_runs import training_like, write_run

from weightlapse.pipeline.store import STORE_NAME, TrajectoryError
from weightlapse.viewer.analysis.runs import RunCatalog, RunNotFoundError


@pytest.fixture
def runs_dir(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "done", training_like(40), chunk_steps=8)
    write_run(runs / "going", training_like(40, seed=1)[:21], n_steps=40, finish=False, chunk_steps=8)
    (runs / "empty").mkdir()
    foreign = zarr.open_group(runs / "foreign" / STORE_NAME, mode="w")
    foreign.attrs["hello"] = "world"
    (runs / "corrupt" / STORE_NAME).mkdir(parents=True)
    (runs / "corrupt" / STORE_NAME / "zarr.json").write_text("{not json")
    return runs


def test_each_run_has_a_state_and_a_reason(runs_dir):
    infos = {info.name: info for info in RunCatalog(runs_dir).list()}
    assert sorted(infos) == ["corrupt", "done", "empty", "foreign", "going"]
    assert infos["done"].state == "finished" and infos["done"].metrics["heldout_accuracy"] == 0.9
    assert infos["done"].params["optimizer"] == "adam" and infos["done"].steps_done == 40
    assert infos["going"].state == "being written" and infos["going"].steps_done == 20
    assert infos["empty"].state == "empty" and "dvc repro" in infos["empty"].message
    assert infos["foreign"].state == "broken" and "not a weightlapse trajectory" in infos["foreign"].message
    assert infos["corrupt"].state == "broken" and infos["corrupt"].message
    assert [info.readable for info in infos.values()].count(True) == 2


def test_a_missing_runs_directory_lists_nothing(tmp_path):
    assert RunCatalog(tmp_path / "nowhere").list() == []


@pytest.mark.parametrize("name", ["../runs/done", "/etc", "done/../done", "..", ".", "", "done\x00", "x" * 5000,
                                  "%2e%2e", "outside", None, 7])
def test_only_listed_names_open_and_nothing_else_is_touched(runs_dir, tmp_path, name, monkeypatch):
    outside = tmp_path / "secret"
    write_run(outside, training_like(5))
    os.symlink(outside, runs_dir / "outside")  # a symlink out of the runs directory
    opened = []
    real_open = zarr.open_group
    monkeypatch.setattr(zarr, "open_group", lambda path, **kw: opened.append(path) or real_open(path, **kw))
    catalog = RunCatalog(runs_dir)
    assert "outside" not in catalog.names()
    with pytest.raises(RunNotFoundError, match="no run named"):
        catalog.open(name)
    with pytest.raises(RunNotFoundError):
        catalog.describe(name)
    assert opened == []


def test_weights_are_the_stored_bits_and_reads_stop_at_the_progress_marker(runs_dir):
    catalog = RunCatalog(runs_dir)
    expected = training_like(40, seed=1)
    run = catalog.open("going")
    assert run.last_step == 20 and not run.finished
    for step in (0, 7, 8, 20):
        assert np.array_equal(run.weights_at(step).view(np.int32), expected[step].view(np.int32))
    with pytest.raises(IndexError, match="outside this run's valid steps 0..20"):
        run.weights_at(21)
    np.testing.assert_array_equal(run.weights(5, 20).compute(), expected[5:21])
    steps, loss = run.loss()
    assert steps.tolist() == list(range(1, 21)) and len(loss) == 20
    assert catalog.open("going") is run  # shared between pages


def test_a_run_being_written_grows_when_refreshed(tmp_path):
    rows = training_like(40)
    writer = write_run(tmp_path / "runs" / "live", rows[:10], n_steps=40, finish=False, chunk_steps=8)
    run = RunCatalog(tmp_path / "runs").open("live")
    assert run.last_step == 9
    first_chunk_tail = run.weights_at(9)  # the frontier chunk (rows 8..15) is read, not cached
    for step in range(10, 30):
        writer.record_step(step, rows[step], 0.5)
    writer.flush()
    assert run.refresh() and run.last_step == 29
    np.testing.assert_array_equal(run.weights_at(15), rows[15])
    np.testing.assert_array_equal(first_chunk_tail, rows[9])
    writer.close()


def test_a_damaged_chunk_is_a_clear_error(runs_dir):
    run = RunCatalog(runs_dir).open("done")
    chunk = runs_dir / "done" / STORE_NAME / "weights" / "c" / "1" / "0" / "0"
    chunk.write_bytes(b"garbage")
    with pytest.raises(TrajectoryError, match="steps 8..15 cannot be read.*damaged"):
        run.weights_at(9)


def test_metrics_that_are_not_json_are_ignored(runs_dir):
    (runs_dir / "done" / "metrics.json").write_text("<script>")
    info = RunCatalog(runs_dir).describe("done")
    assert info.state == "finished" and info.metrics == {}
    json.dumps(info.params)


def test_one_bad_run_never_takes_the_index_or_its_command_down(runs_dir, capsys):
    from weightlapse.viewer.analysis.runs import main

    write_run(runs_dir / "infinite", training_like(20, seed=2), chunk_steps=8)
    path = runs_dir / "infinite" / STORE_NAME / "zarr.json"
    document = json.loads(path.read_text())
    document["attributes"]["progress"]["steps_done"] = "__INF__"
    path.write_text(json.dumps(document).replace('"__INF__"', "Infinity"))
    write_run(runs_dir / "odd-metrics", training_like(20, seed=3), chunk_steps=8)
    (runs_dir / "odd-metrics" / "metrics.json").write_text('{"heldout_accuracy": {"deep": [1, 2]}, "steps": 20}')
    infos = {info.name: info for info in RunCatalog(runs_dir).list()}
    assert infos["infinite"].state == "broken" and "not a whole number" in infos["infinite"].message
    assert infos["odd-metrics"].state == "finished" and infos["odd-metrics"].metrics == {"steps": 20}
    assert infos["done"].state == "finished"
    assert main([str(runs_dir)]) == 0
    printed = capsys.readouterr().out
    assert "infinite" in printed and "broken" in printed and "done" in printed


def replace_run(run_dir, rows, **options) -> None:
    """Retrain a run in place, as `dvc repro --force` does: the store is deleted and written anew."""
    import shutil

    shutil.rmtree(run_dir / STORE_NAME)
    write_run(run_dir, rows, chunk_steps=8, **options)


def test_a_run_retrained_under_an_open_reader_is_read_afresh(tmp_path):
    runs = tmp_path / "runs"
    old = training_like(300, seed=0)
    write_run(runs / "retrained", old, chunk_steps=8)
    catalog = RunCatalog(runs)
    run = catalog.open("retrained")
    for step in (100, 250):  # cached chunks of the old store
        np.testing.assert_array_equal(run.weights_at(step), old[step])
    assert run.finished

    new = training_like(900, seed=7)  # another seed, another length, still being written
    replace_run(runs / "retrained", new[:512], n_steps=900, finish=False)
    np.testing.assert_array_equal(run.weights_at(100), new[100])  # never the old run's bits
    assert not run.finished and run.last_step == 511
    with pytest.raises(IndexError):
        run.weights_at(600)
    again = catalog.open("retrained")  # a page opened now shares it, just as fresh
    np.testing.assert_array_equal(again.weights_at(250), new[250])
    assert catalog.describe("retrained").state in ("being written", "unfinished")
