import csv
import json

import pytest

from weightlapse.pipeline.params import parse_params
from weightlapse.pipeline.summary import binned_losses, main, sweep_rows, write_manifest


def test_losses_are_averaged_over_bins_of_consecutive_steps():
    assert binned_losses([1, 2, 3, 4, 5], [1.0, 3.0, 5.0, 7.0, 9.0], max_points=2) == [(3, 3.0), (5, 8.0)]
    assert binned_losses([1, 2], [1.0, 2.0]) == [(1, 1.0), (2, 2.0)]  # short runs keep every step


def fake_run(runs_dir, name, losses, accuracies):
    (runs_dir / name).mkdir(parents=True)
    (runs_dir / name / "loss.csv").write_text("step,loss\n" + "".join(f"{i + 1},{v}\n" for i, v in enumerate(losses)))
    (runs_dir / name / "accuracy.csv").write_text(
        "step,heldout_accuracy,heldout_loss\n" + "".join(f"{i * 5},{v},0.5\n" for i, v in enumerate(accuracies)))


def test_the_stage_writes_one_long_file_per_plot_from_the_manifests(tmp_path):
    params = parse_params({"runs": {"momentum": {"optimizer": "sgd", "momentum": 0.9}},
                           "sweep": {"optimizer": ["adam"], "lr": [0.001, 0.01], "batch_size": [20], "seed": [0, 1]}})
    accuracy = {"adam-lr0.001-b20-seed0": 0.5, "adam-lr0.001-b20-seed1": 0.7,
                "adam-lr0.01-b20-seed0": 0.8, "adam-lr0.01-b20-seed1": 0.9, "momentum": 0.1}
    for name, value in accuracy.items():
        fake_run(tmp_path / "runs", name, [2.0, 1.0], [0.1, value])
    write_manifest(tmp_path / "manifests" / "sweep-mnist-adam-b20.json", params,
                   {name: {"heldout_accuracy": value} for name, value in accuracy.items() if name != "momentum"})
    write_manifest(tmp_path / "manifests" / "run-momentum.json", params, {"momentum": {"heldout_accuracy": 0.1}})
    assert main(["--manifests", str(tmp_path / "manifests"), "--runs", str(tmp_path / "runs"),
                 "--out", str(tmp_path / "summary")]) == 0

    def rows(name):
        with open(tmp_path / "summary" / name, newline="") as stream:
            return list(csv.DictReader(stream))
    assert {row["run"] for row in rows("loss.csv")} == set(accuracy) and len(rows("loss.csv")) == 10
    assert rows("accuracy.csv")[1] == {"run": "adam-lr0.001-b20-seed0", "step": "5", "heldout_accuracy": "0.500000"}
    assert [(row["series"], row["lr"], row["heldout_accuracy"], row["seeds"]) for row in rows("sweep.csv")] == [
        ("adam on mnist", "0.001", "0.6", "2"), ("adam on mnist", "0.01", "0.85", "2")]  # the listed run is no point
    assert json.loads((tmp_path / "summary" / "metrics.json").read_text()) == {
        "mnist-adam-b20": {"best_lr": 0.01, "heldout_accuracy": 0.85}}


def test_series_name_the_batch_size_when_the_sweep_has_several():
    entries = {f"r{i}": {"kind": "sweep", "dataset": "mnist", "optimizer": "sgd", "batch_size": b, "lr": 0.1,
                         "heldout_accuracy": 0.5} for i, b in enumerate((20, 50))}
    assert [row["series"] for row in sweep_rows(entries)] == ["sgd on mnist (b20)", "sgd on mnist (b50)"]


def test_a_run_without_its_history_names_the_file_and_the_fix(tmp_path, caplog):
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "run-a.json").write_text(json.dumps({"a": {"kind": "run"}}))
    assert main(["--manifests", str(tmp_path / "manifests"), "--runs", str(tmp_path / "runs"),
                 "--out", str(tmp_path / "summary")]) == 1
    assert "a/loss.csv: cannot read its loss history" in caplog.text and "dvc repro" in caplog.text


@pytest.mark.parametrize("text", ["[1, 2]", "{not json"])
def test_a_broken_manifest_is_refused(tmp_path, caplog, text):
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "sweep-x.json").write_text(text)
    assert main(["--manifests", str(tmp_path / "manifests"), "--runs", str(tmp_path), "--out", str(tmp_path / "s")]) == 1
    assert "sweep-x.json" in caplog.text
