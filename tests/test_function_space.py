"""Function-space comparisons on real trained stores, against the train stage's own scores and numpy."""

import numpy as np
import pytest

from weightlapse.pipeline.datasets import load_dataset
from weightlapse.pipeline.params import TrainParams
from weightlapse.pipeline.train import run_training
from weightlapse.viewer.analysis import function_space
from weightlapse.viewer.analysis.runs import RunCatalog


@pytest.fixture
def trained(tmp_path, generated_data):
    """Two seeds of Adam and one SGD run with a bias, 3 epochs of generated data (30 steps)."""
    data_dir, _ = generated_data
    dataset = load_dataset(data_dir, "mnist")
    runs = tmp_path / "runs"
    for name, config in {"adam-0": TrainParams(seed=0, epochs=3, eval_every=5, device="cpu"),
                         "adam-1": TrainParams(seed=1, epochs=3, eval_every=5, device="cpu"),
                         "sgd-bias": TrainParams(optimizer="sgd", lr=0.05, bias=True, epochs=3, eval_every=5,
                                                 device="cpu")}.items():
        run_training(config, dataset, runs / name, run_name=name, progress=False)
    return RunCatalog(runs), function_space.load_heldout(data_dir, "mnist")


def softmax_reference(weights, bias, images):
    """Plain float64 numpy, one step: (image, class) probabilities."""
    logits = images.astype(np.float64) @ weights.astype(np.float64).T
    if bias is not None:
        logits = logits + bias
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def test_accuracy_from_the_stored_weights_is_the_train_stages_held_out_score(trained):
    catalog, heldout = trained
    models = function_space.open_models(catalog, ["adam-0", "sgd-bias"])
    result = function_space.agreement_over_steps(models, heldout)
    for name, model in models.items():
        for step, accuracy in zip(model.eval_step.values, model.heldout_accuracy.values):
            assert result.accuracy.sel(run=name, step=step).item() == pytest.approx(accuracy, abs=1e-6)


def test_agreement_and_kl_match_a_numpy_reference_and_a_run_agrees_with_itself(trained):
    catalog, heldout = trained
    models = function_space.open_models(catalog, ["adam-0", "adam-1", "sgd-bias"])
    models["adam-0 again"] = models["adam-0"]
    result = function_space.agreement_over_steps(models, heldout, every=7)
    assert list(result.step.values) == [0, 7, 14, 21, 28, 30]
    assert result.agreement.sel(pair="adam-0 | adam-0 again").values.tolist() == [1.0] * 6
    assert np.abs(result.symmetric_kl.sel(pair="adam-0 | adam-0 again").values).max() < 1e-12

    a, b = models["adam-1"], models["sgd-bias"]
    for step in (0, 14, 30):
        p = softmax_reference(a.weights.values[step], None, heldout.images)
        q = softmax_reference(b.weights.values[step], b.bias.values[step], heldout.images)
        agree = (p.argmax(axis=1) == q.argmax(axis=1)).mean()
        kl = (0.5 * (p * np.log(p / q) + q * np.log(q / p)).sum(axis=1)).mean()
        assert result.agreement.sel(pair="adam-1 | sgd-bias", step=step).item() == agree
        assert result.symmetric_kl.sel(pair="adam-1 | sgd-bias", step=step).item() == pytest.approx(kl, rel=1e-5)
    # two seeds start from different random weights, so they disagree at step 0 more than later
    seeds = result.symmetric_kl.sel(pair="adam-0 | adam-1")
    assert seeds.sel(step=0).item() > 0


def test_the_loss_between_two_softmax_runs_is_convex_and_its_ends_are_the_runs(trained):
    """Softmax regression's loss is convex in the weights, so the line between two runs never
    rises above the straight line between its ends: no barrier, and nothing to match."""
    catalog, heldout = trained
    models = function_space.open_models(catalog, ["adam-0", "adam-1", "sgd-bias"])
    line = function_space.loss_along_line(models, heldout, points=11)
    assert line.attrs["matching"] == "units not matched: the model has no hidden layer"
    np.testing.assert_array_equal(line.matched_loss.values, line.loss.values)
    for row in line.loss.values:
        ends = row[0] + (row[-1] - row[0]) * np.linspace(0, 1, 11)
        assert (row <= ends + 1e-6).all()
    assert line.loss.values[:, 0] == pytest.approx(models["adam-0"].heldout_loss.values[-1], abs=1e-5)
    with pytest.raises(ValueError, match="outside the steps all runs have, 0..30"):
        function_space.loss_along_line(models, heldout, step=31)


def test_the_confusion_counts_each_held_out_image_once(trained):
    catalog, heldout = trained
    model = function_space.open_models(catalog, ["sgd-bias"])["sgd-bias"]
    confusion = function_space.confusion_at(model, heldout, step=30)
    assert confusion.dims == ("true", "predicted")
    assert confusion.sum("predicted").values.tolist() == np.bincount(heldout.labels, minlength=10).tolist()
    assert np.trace(confusion.values) / len(heldout.labels) == pytest.approx(model.heldout_accuracy.values[-1],
                                                                           abs=1e-6)
    with pytest.raises(ValueError, match="outside the run's valid steps 0..30"):
        function_space.confusion_at(model, heldout, step=31)


def test_runs_of_different_shapes_or_without_steps_are_refused(trained):
    catalog, heldout = trained
    models = function_space.open_models(catalog, ["adam-0"])
    with pytest.raises(ValueError, match="every must be at least 1"):
        function_space.agreement_over_steps(models, heldout, every=0)
    with pytest.raises(ValueError, match="at least 1 runs"):
        function_space.agreement_over_steps({}, heldout)


def test_the_command_writes_agreement_and_confusion_and_refuses_other_data(trained, generated_data, tmp_path):
    import xarray as xr
    from idx_files import write_dataset

    catalog, heldout = trained
    data_dir, _ = generated_data
    out = tmp_path / "predictions.zarr"
    assert function_space.main([str(catalog.runs_dir), "--runs", "adam-0", "adam-1", "--data", str(data_dir),
                                "--every", "10", "--out", str(out)]) == 0
    result = xr.open_zarr(out)
    assert list(result.pair.values) == ["adam-0 | adam-1"] and list(result.step.values) == [0, 10, 20, 30]
    assert result.confusion.dims == ("run", "true", "predicted") and int(result.confusion.sum()) == 2 * 50
    # the same command again replaces its own output; anything else is left alone
    assert function_space.main([str(catalog.runs_dir), "--runs", "adam-0", "--data", str(data_dir),
                                "--out", str(out)]) == 0
    other = tmp_path / "other-data"
    write_dataset(other, seed=5)
    assert function_space.main([str(catalog.runs_dir), "--runs", "adam-0", "--data", str(other),
                                "--out", str(tmp_path / "x.zarr")]) == 1
    assert not (tmp_path / "x.zarr").exists()
    assert function_space.main([str(catalog.runs_dir), "--runs", "adam-0", "--data", str(data_dir),
                                "--out", str(catalog.runs_dir)]) == 1


def test_a_declared_dataset_is_read_with_its_declaration_from_the_params_file(tmp_path, generated_data):
    import yaml
    from idx_files import declaration

    from weightlapse.pipeline.datasets import DatasetError

    data_dir, _ = generated_data
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"datasets": {"mine": declaration(data_dir)}}))
    assert function_space.declared_spec("mnist", params) is None  # built in
    spec = function_space.declared_spec("mine", params)
    heldout = function_space.load_heldout(data_dir, "mine", spec=spec)
    np.testing.assert_array_equal(heldout.images, load_dataset(data_dir, "mnist").test.images)
    with pytest.raises(DatasetError, match="does not declare it under datasets"):
        function_space.declared_spec("other", params)
    with pytest.raises(DatasetError, match="cannot be read"):
        function_space.declared_spec("mine", tmp_path / "missing.yaml")


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_a_hidden_layer_runs_predictions_are_computed_from_its_stored_layers(tmp_path, generated_data, activation):
    """A train-stage MLP (two hidden layers, biases): accuracy from the stored layers is the
    train stage's own held-out score, and the confusion at the last step agrees with it."""
    from network_runs import mlp, record

    data_dir, _ = generated_data
    dataset = load_dataset(data_dir, "mnist")
    runs = tmp_path / "runs"
    for seed in (0, 1):
        config = TrainParams(seed=seed, epochs=3, eval_every=5, hidden=(12, 6), activation=activation, bias=True,
                             device="cpu")
        run_training(config, dataset, runs / f"mlp-{seed}", run_name=f"mlp-{seed}", progress=False)
    record(runs / "recorded", mlp(hidden=12), steps=3)
    catalog, heldout = RunCatalog(runs), function_space.load_heldout(data_dir, "mnist")
    models = function_space.open_models(catalog, ["mlp-0", "mlp-1"])
    result = function_space.agreement_over_steps(models, heldout, every=5)
    for name, model in models.items():
        for step, accuracy in zip(model.eval_step.values, model.heldout_accuracy.values):
            assert result.accuracy.sel(run=name, step=step).item() == pytest.approx(accuracy, abs=1e-6)
    confusion = function_space.confusion_at(models["mlp-1"], heldout, step=30)
    assert np.trace(confusion.values) / len(heldout.labels) == pytest.approx(
        models["mlp-1"].heldout_accuracy.values[-1], abs=1e-6)
    # the line between the two runs' weights: its ends are the runs themselves, and with the
    # hidden units matched the far end is the same network, so it predicts the same
    line = function_space.loss_along_line(models, heldout)
    assert line.attrs["step"] == 30 and line.attrs["matched"] == 1 and list(line.other_run.values) == ["mlp-1"]
    assert line.alpha.values.tolist() == pytest.approx(np.linspace(0, 1, 21).tolist())
    for name, end in (("mlp-0", 0), ("mlp-1", -1)):
        assert line.loss.values[0, end] == pytest.approx(models[name].heldout_loss.values[-1], abs=1e-5)
        assert line.accuracy.values[0, end] == pytest.approx(models[name].heldout_accuracy.values[-1], abs=1e-6)
    assert line.matched_loss.values[0, -1] == pytest.approx(line.loss.values[0, -1], abs=1e-5)
    assert line.matched_accuracy.values[0, -1] == line.accuracy.values[0, -1]
    unmatched = function_space.loss_along_line(models, heldout, match=False)
    assert unmatched.attrs["matching"] == "units not matched: not asked for" and unmatched.attrs["matched"] == 0
    np.testing.assert_array_equal(unmatched.matched_loss.values, unmatched.loss.values)
    together = function_space.compare_predictions(models, heldout, every=5)
    np.testing.assert_array_equal(together.line_matched_loss.values, line.matched_loss.values)
    # a run recorded by a loop of its own has no activation recorded, so nothing to predict with
    with pytest.raises(ValueError, match="records no activation"):
        function_space.open_models(catalog, ["recorded"])


def test_runs_of_other_activations_are_each_predicted_with_their_own(tmp_path, generated_data):
    data_dir, _ = generated_data
    dataset = load_dataset(data_dir, "mnist")
    runs = tmp_path / "runs"
    for activation in ("relu", "tanh"):
        config = TrainParams(epochs=3, eval_every=10, hidden=(6,), activation=activation, device="cpu")
        run_training(config, dataset, runs / activation, run_name=activation, progress=False)
    heldout = function_space.load_heldout(data_dir, "mnist")
    models = function_space.open_models(RunCatalog(runs), ["relu", "tanh"])
    result = function_space.agreement_over_steps(models, heldout, every=10)
    for name, model in models.items():
        assert result.accuracy.sel(run=name).values.tolist() == pytest.approx(model.heldout_accuracy.values.tolist(),
                                                                            abs=1e-6)
    with pytest.raises(ValueError, match=r"the runs differ in activation \(relu, tanh\)"):
        function_space.loss_along_line(models, heldout)
    together = function_space.compare_predictions(models, heldout, every=10)
    assert "line_loss" not in together and together.attrs["line_problem"].startswith("the runs differ in activation")


def test_steps_whose_weights_overflowed_predict_nothing(tmp_path, generated_data):
    """A network run that diverged holds NaN weights from some step on (its reader lets them
    through, as the run recorded them): those steps have no accuracy, no agreement and no
    confusion matrix, rather than every image counted as class 0."""
    data_dir, _ = generated_data
    runs = tmp_path / "runs"
    for seed in (0, 1):
        run_training(TrainParams(seed=seed, epochs=1, eval_every=5, hidden=(6,), device="cpu"),
                     load_dataset(data_dir, "mnist"), runs / f"mlp-{seed}", run_name=f"mlp-{seed}", progress=False)
    heldout = function_space.load_heldout(data_dir, "mnist")
    models = function_space.open_models(RunCatalog(runs), ["mlp-0", "mlp-1"])
    diverged = models["mlp-1"].copy()
    diverged["hidden1.weight"] = diverged["hidden1.weight"].where(diverged.step < 6)  # NaN from step 6 on
    models["mlp-1"] = diverged
    result = function_space.agreement_over_steps(models, heldout)
    accuracy = result.accuracy.sel(run="mlp-1").values
    assert np.isfinite(accuracy[:6]).all() and np.isnan(accuracy[6:]).all()
    assert np.isfinite(result.accuracy.sel(run="mlp-0").values).all()
    assert np.isnan(result.agreement.sel(pair="mlp-0 | mlp-1").values[6:]).all()
    with pytest.raises(ValueError, match="mlp-1's weights at step 7 are not finite"):
        function_space.confusion_at(diverged, heldout, step=7)
    with pytest.raises(ValueError, match="mlp-1's weights at step 10 are not finite"):
        function_space.loss_along_line(models, heldout)
    assert "mlp-1's weights at step 10 are not finite" in function_space.compare_predictions(
        models, heldout).attrs["line_problem"]
    # a store whose first or last layer does not fit the images is named, not an index error
    narrow = {"mlp-0": models["mlp-0"].isel({"output.weight.out": slice(0, 5)})}
    with pytest.raises(ValueError, match="run 'mlp-0' scores 5 classes, not the held-out images' 10"):
        function_space.agreement_over_steps(narrow, heldout)
    cropped = {"mlp-0": models["mlp-0"].isel({"hidden1.weight.in": slice(0, 100)})}
    with pytest.raises(ValueError, match="run 'mlp-0' takes 100 inputs, not the held-out images' 784 pixels"):
        function_space.confusion_at(cropped["mlp-0"], heldout, step=3)


def test_a_dataset_name_in_a_store_is_never_a_path(tmp_path, generated_data, caplog, monkeypatch):
    """The held-out files are read from data/<dataset>, <dataset> as the store records it: a
    store naming a path there is refused before any directory is listed."""
    import json
    import os
    import sys

    from weightlapse.pipeline.datasets import DatasetError
    from weightlapse.pipeline.store import STORE_NAME
    from weightlapse.viewer.data import DataStore

    data_dir, _ = generated_data
    runs = tmp_path / "runs"
    run_training(TrainParams(epochs=1, eval_every=5, device="cpu"), load_dataset(data_dir, "mnist"), runs / "a",
                 run_name="a", progress=False)
    metadata = runs / "a" / STORE_NAME / "zarr.json"
    document = json.loads(metadata.read_text())
    document["attributes"]["weightlapse"]["dataset"]["name"] = "../../../../etc"
    document.pop("consolidated_metadata", None)
    metadata.write_text(json.dumps(document))
    listed, recording = [], [True]  # an audit hook stays for the process: it records during this test only
    sys.addaudithook(lambda event, args: listed.append(os.fsdecode(args[0])) if recording and event == "os.scandir"
                     and args and isinstance(args[0], (str, bytes, os.PathLike)) else None)
    monkeypatch.chdir(tmp_path)
    try:
        assert function_space.main([str(runs), "--runs", "a", "--out", str(tmp_path / "f.zarr")]) == 1
        with pytest.raises(DatasetError, match="is not a usable dataset name"):
            DataStore(runs, data_dir=tmp_path / "data").compute_predictions(["a"], 1)
    finally:
        recording.clear()
    assert "'../../../../etc' is not a usable dataset name" in caplog.text
    assert not [path for path in listed if "etc" in path]
