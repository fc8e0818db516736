"""Writing a run never follows a symbolic link out of its directory (pipeline/run_files.py,
used by the train stage for its store, metrics, history and lock)."""

import json

from viewer_runs import training_like, write_run

from weightlapse.pipeline.train import main
from weightlapse.pipeline.store import STORE_NAME, open_run

PARAMS = "data: {dataset: mnist}\ntrain: {eval_every: 4, device: cpu, capture: {chunk_steps: 4}}\nruns: {planted: {}}\n"


def train(tmp_path, data_dir, out):
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS)
    return main(["--params", str(params), "--run", "planted", "--data", str(data_dir), "--out", str(out), "--resume"])


def test_training_replaces_planted_links_and_leaves_their_targets_alone(tmp_path, generated_data):
    data_dir, _ = generated_data
    victims = tmp_path / "victims"
    victims.mkdir()
    for name in ("metrics.json", "loss.csv", "accuracy.csv"):
        (victims / name).write_text(f"the user's own {name}")
    write_run(victims / "other-run", training_like(30, seed=1), chunk_steps=8)
    victim_store = victims / "other-run" / STORE_NAME
    store_files = {path: path.read_bytes() for path in victim_store.rglob("*") if path.is_file()}

    out = tmp_path / "runs" / "planted"
    out.mkdir(parents=True)
    for name in ("metrics.json", "loss.csv", "accuracy.csv"):
        (out / name).symlink_to(victims / name)
    (out / STORE_NAME).symlink_to(victim_store)  # as a DVC symlink checkout, or a planted link

    assert train(tmp_path, data_dir, out) == 0
    for name in ("metrics.json", "loss.csv", "accuracy.csv"):
        assert (victims / name).read_text() == f"the user's own {name}"
        assert not (out / name).is_symlink() and (out / name).stat().st_size > 0
    assert {path: path.read_bytes() for path in victim_store.rglob("*") if path.is_file()} == store_files
    assert not (out / STORE_NAME).is_symlink() and open_run(out).sizes["step"] == 11
    assert json.loads((out / "metrics.json").read_text())["steps"] == 10


def test_a_link_inside_a_store_is_never_resumed_through(tmp_path, generated_data):
    data_dir, _ = generated_data
    out = tmp_path / "runs" / "planted"
    assert train(tmp_path, data_dir, out) == 0
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    chunks = out / STORE_NAME / "weights" / "c"
    import shutil

    shutil.rmtree(chunks)
    chunks.symlink_to(outside)
    progress = out / STORE_NAME / "zarr.json"  # make it resumable-looking: unfinished
    document = json.loads(progress.read_text())
    document["attributes"]["progress"].update(finished=False, steps_done=3)
    progress.write_text(json.dumps(document))
    assert train(tmp_path, data_dir, out) == 0  # replaced, not carried on through the link
    assert sorted(path.name for path in outside.iterdir()) == ["keep.txt"]
    assert not chunks.is_symlink() and open_run(out).sizes["step"] == 11


def test_a_linked_writer_lock_is_refused(tmp_path, generated_data, caplog):
    data_dir, _ = generated_data
    out = tmp_path / "runs" / "planted"
    out.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("unchanged")
    (out / ".writer.lock").symlink_to(victim)
    assert train(tmp_path, data_dir, out) == 1
    assert "symbolic link" in caplog.text and victim.read_text() == "unchanged"
