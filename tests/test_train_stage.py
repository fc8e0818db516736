"""The train stage end to end: params file and data directory in, run directory out."""

import contextlib
import csv
import dataclasses
import gzip
import json

import numpy as np
import pytest
import torch
import yaml
from idx_files import declaration, idx_bytes

from weightlapse.pipeline.closed_form import ClosedFormSoftmaxRegression, train_closed_form
from weightlapse.pipeline.datasets import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS, load_dataset
from weightlapse.pipeline.idx import read_idx_file
from weightlapse.pipeline.params import CaptureParams, TrainParams
from weightlapse.pipeline.layers import parameter_shapes
from weightlapse.pipeline.mlp import MLP, evaluate_network
from weightlapse.pipeline.store import (
    HISTORY_NAME, NETWORK_SCHEMA_VERSION, SCHEMA, SCHEMA_VERSION, check_store, open_history, open_run, read_progress,
)
from weightlapse.pipeline.train import main, run_training, stack_key, train_stack
from weightlapse.pipeline.trainer import SoftmaxRegression, make_optimizer, train
from weightlapse.pipeline.writer import TrajectoryWriter

PARAMS = """
data: {dataset: mnist}
# device: cpu, so the bit-exact comparisons below hold on a machine with a GPU too
# (tests/test_cuda.py covers the CUDA path).
train: {eval_every: 4, device: cpu, capture: {chunk_steps: 4}}
runs:
  original: {seed: 0}
  autograd: {seed: 0, engine: torch}
  sgd: {optimizer: sgd, lr: 0.05, momentum: 0.9, bias: true, capture: {gradients: true}}
  mlp: {hidden: [6, 4], activation: tanh, bias: true, optimizer: sgd, lr: 0.05, momentum: 0.9}
  mlp-adam: {hidden: [8]}
  mlp-diverging: {hidden: [8], optimizer: sgd, lr: 3.0e+38}
"""


@pytest.fixture
def params_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS)
    return path


def train_run(params_file, data_dir, out, run="original", *extra):
    return main(["--params", str(params_file), "--run", run, "--data", str(data_dir), "--out", str(out), *extra])


def test_stage_writes_the_trajectory_metrics_and_history(tmp_path, params_file, generated_data):
    data_dir, checksums = generated_data
    out = tmp_path / "runs" / "original"
    assert train_run(params_file, data_dir, out) == 0

    ds = open_run(out)
    assert ds.sizes["step"] == 11  # 200 samples / batch 20 = 10 steps, plus the initial weights
    meta = ds.attrs["weightlapse"]
    assert meta["run"] == "original" and meta["params"]["optimizer"] == "adam"
    assert meta["dataset"]["name"] == "mnist" and meta["dataset"]["files"] == checksums
    assert meta["device"] == "cpu" and meta["versions"]["torch"] == torch.__version__
    assert ds.attrs["progress"] == {**ds.attrs["progress"], "finished": True, "steps_done": 10}
    # The train stage's typed metadata reads back as what was written, key for key.
    assert list(meta.items()) == list({"schema": SCHEMA, "schema_version": SCHEMA_VERSION,
                                       **check_store(out).metadata.to_attributes()}.items())

    # The stored trajectory is exactly what the loop produces for these params: on the CPU
    # the stage takes the closed-form numpy engine.
    assert meta["engine"] == "numpy"
    dataset = load_dataset(data_dir, "mnist")
    initial = SoftmaxRegression(seed=0).weight.detach().numpy()
    model = ClosedFormSoftmaxRegression(initial[None], None, optimizer="adam", lr=1e-3)
    expected = []
    train_closed_form(model, dataset.train.images, dataset.train.labels, batch_size=20, epochs=1, seeds=[0],
                      on_step=lambda step, losses: expected.append(model.weight[0].copy()))
    assert np.array_equal(ds.weights.values.view(np.int32), np.stack(expected).view(np.int32))

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"steps", "final_train_loss", "heldout_accuracy", "heldout_loss"}
    assert metrics["heldout_accuracy"] == pytest.approx(float(ds.heldout_accuracy[-1]))
    with open(out / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 11))
    assert float(rows[2]["loss"]) == pytest.approx(float(ds.loss.sel(step=3)), rel=1e-6)
    with open(out / "accuracy.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [0, 4, 8, 10]
    # and the weights time-major beside the store, for the viewer's pixel inspector
    history = open_history(out, check_store(out))
    assert np.array_equal(history.array[:], ds.weights.values.transpose(2, 1, 0))


def test_bias_and_gradients_are_captured_when_asked(tmp_path, params_file, generated_data):
    data_dir, _ = generated_data
    out = tmp_path / "sgd"
    assert train_run(params_file, data_dir, out, "sgd") == 0
    ds = open_run(out)
    assert ds.bias.dims == ("step", "class") and ds.gradients.dims == ("step", "class", "pixel")
    # Plain SGD's first step: w1 = w0 - lr * g1 (momentum starts from the first gradient).
    w0, w1, g1 = ds.weights.values[0], ds.weights.values[1], ds.gradients.values[1]
    np.testing.assert_allclose(w1, w0 - 0.05 * g1, atol=1e-7)
    assert np.isnan(ds.gradients.values[0]).all()


def test_the_autograd_engine_stores_exactly_what_torch_computes(tmp_path, params_file, generated_data):
    data_dir, _ = generated_data
    out = tmp_path / "autograd"
    assert train_run(params_file, data_dir, out, "autograd") == 0
    ds = open_run(out)
    assert ds.attrs["weightlapse"]["engine"] == "torch"
    dataset = load_dataset(data_dir, "mnist")
    model = SoftmaxRegression(seed=0)
    optimizer = make_optimizer(model.parameters(), name="adam", lr=1e-3)
    expected = []
    train(model, optimizer, torch.from_numpy(dataset.train.images), torch.from_numpy(dataset.train.labels),
          batch_size=20, epochs=1, seed=0, on_step=lambda step, loss: expected.append(model.weight.detach().clone()))
    assert np.array_equal(ds.weights.values.view(np.int32), torch.stack(expected).numpy().view(np.int32))
    # The two engines agree to float32 rounding (tests/test_closed_form.py checks longer runs).
    np.testing.assert_allclose(ds.weights.values, open_run_after(params_file, data_dir, tmp_path / "numpy"),
                               rtol=0, atol=1e-6)


def open_run_after(params_file, data_dir, out, run="original"):
    assert train_run(params_file, data_dir, out, run) == 0
    return open_run(out).weights.values


@pytest.mark.parametrize("run", ["original", "autograd", "sgd"])
def test_two_runs_with_the_same_params_are_bitwise_identical(tmp_path, params_file, generated_data, run):
    data_dir, _ = generated_data
    for name in ("a", "b"):
        assert train_run(params_file, data_dir, tmp_path / name, run) == 0
    a, b = open_run(tmp_path / "a"), open_run(tmp_path / "b")
    assert np.array_equal(a.weights.values.view(np.int32), b.weights.values.view(np.int32))
    assert np.array_equal(a.loss.values, b.loss.values, equal_nan=True)


def test_bad_input_fails_with_a_message_and_loses_nothing(tmp_path, params_file, generated_data, caplog):
    data_dir, _ = generated_data
    out = tmp_path / "run"
    assert train_run(params_file, data_dir, out) == 0
    before = open_run(out).weights.values

    assert train_run(params_file, data_dir, out) == 1
    assert "already holds a trajectory" in caplog.text and "--overwrite" in caplog.text
    assert np.array_equal(open_run(out).weights.values, before)

    assert train_run(params_file, data_dir, tmp_path / "x", "nope") == 1
    assert "run 'nope' is neither listed under 'runs'" in caplog.text

    # an engine that cannot train the run is refused before the run directory is made
    params_file.write_text(PARAMS + "  rms: {optimizer: rmsprop, engine: numpy}\n")
    assert train_run(params_file, data_dir, tmp_path / "rms", "rms") == 1
    assert "engine: numpy implements adam, adamw, sgd, not 'rmsprop'; use engine: torch (or auto)" in caplog.text
    assert not (tmp_path / "rms").exists()

    (data_dir / TRAIN_LABELS).unlink()
    assert train_run(params_file, data_dir, tmp_path / "y") == 1
    assert "missing train-labels-idx1-ubyte.gz; run the data stage first" in caplog.text

    (data_dir / TRAIN_LABELS).write_bytes(gzip.compress(b"\x00\x00\x08\x01\xff\xff\xff\xff"))
    assert train_run(params_file, data_dir, tmp_path / "z") == 1
    assert "not a dataset file; delete" in caplog.text


def test_learns_real_digits(tmp_path, shared_mnist):
    # The real MNIST test split, cut into 8,000 training and 2,000 held-out digits.
    images = read_idx_file(shared_mnist / TEST_IMAGES)
    labels = read_idx_file(shared_mnist / TEST_LABELS)
    data_dir = tmp_path / "mnist"
    data_dir.mkdir()
    for name, array in ((TRAIN_IMAGES, images[:8000]), (TRAIN_LABELS, labels[:8000]),
                        (TEST_IMAGES, images[8000:]), (TEST_LABELS, labels[8000:])):
        (data_dir / name).write_bytes(gzip.compress(idx_bytes(array), compresslevel=1))
    params = tmp_path / "params.yaml"
    params.write_text("train: {eval_every: 100}\nruns: {original: {seed: 0}}\n")
    assert train_run(params, data_dir, tmp_path / "run") == 0
    ds = open_run(tmp_path / "run")
    assert ds.sizes["step"] == 401
    accuracy = ds.heldout_accuracy.values
    assert accuracy[0] < 0.3 and accuracy[-1] > 0.85  # from chance to a working classifier
    # The "7" template's weights moved from their initial values.
    assert float(abs(ds.weights.sel(step=400) - ds.weights.sel(step=0)).max()) > 0.05


def test_runs_trained_as_a_stack_write_what_each_run_writes_alone(tmp_path, generated_data):
    # A sweep's runs that differ in seed and lr train as one stack (pipeline.sweep): each
    # run directory must hold what the run's own train stage writes, bit for bit.
    data_dir, _ = generated_data
    dataset = load_dataset(data_dir, "mnist")
    base = TrainParams(device="cpu", epochs=3, eval_every=4, bias=True,
                       capture=CaptureParams(chunk_steps=4, gradients=True))
    configs = {f"s{seed}-lr{lr}": dataclasses.replace(base, seed=seed, lr=lr)
               for seed, lr in [(0, 1e-3), (1, 1e-3), (2, 3e-2)]}
    assert len({stack_key(config) for config in configs.values()}) == 1
    summaries = train_stack({name: (config, tmp_path / "stack" / name) for name, config in configs.items()}, dataset)

    for name, config in configs.items():
        run_training(config, dataset, tmp_path / "alone" / name, run_name=name, progress=False)
        stacked, alone = open_run(tmp_path / "stack" / name), open_run(tmp_path / "alone" / name)
        assert stacked.attrs["progress"]["finished"] and stacked.sizes["step"] == 31
        for variable in ("weights", "gradients", "bias", "loss", "heldout_accuracy", "heldout_loss"):
            assert np.array_equal(stacked[variable].values.view(np.int32), alone[variable].values.view(np.int32)), \
                f"{name}: {variable} differs"
        for file in ("metrics.json", "loss.csv", "accuracy.csv"):
            assert (tmp_path / "stack" / name / file).read_text() == (tmp_path / "alone" / name / file).read_text()
        assert summaries[name].metrics == json.loads((tmp_path / "stack" / name / "metrics.json").read_text())
    finals = [open_run(tmp_path / "stack" / name).weights[-1].values for name in configs]
    assert not np.array_equal(finals[0], finals[1])  # the runs went their own ways


def test_only_runs_that_differ_in_seed_and_lr_stack(tmp_path, generated_data):
    base = TrainParams(device="cpu")
    assert stack_key(base) == stack_key(dataclasses.replace(base, seed=4, lr=0.1))
    assert stack_key(base) != stack_key(dataclasses.replace(base, batch_size=10))
    assert stack_key(base) != stack_key(dataclasses.replace(base, optimizer="sgd"))
    assert stack_key(dataclasses.replace(base, engine="torch")) is None  # autograd runs train alone
    assert stack_key(dataclasses.replace(base, optimizer="rmsprop")) is None  # no closed form for it
    assert stack_key(dataclasses.replace(base, optimizer="rmsprop", engine="numpy")) is None  # refused alone
    assert stack_key(dataclasses.replace(base, engine="cuda-graph", device="auto")) is None  # trains on a GPU
    assert stack_key(dataclasses.replace(base, device="cuda")) is None
    assert stack_key(dataclasses.replace(base, engine="numpy")) is not None
    dataset = load_dataset(generated_data[0], "mnist")
    runs = {"a": (base, tmp_path / "a"), "b": (dataclasses.replace(base, epochs=2), tmp_path / "b")}
    with pytest.raises(ValueError, match="must differ in seed and lr only"):
        train_stack(runs, dataset)
    assert not (tmp_path / "a").exists()


@contextlib.contextmanager
def crash_when_recording(*, step, monkeypatch):
    """Training inside the block fails when it records ``step`` (as a bug or a full disk would),
    whether the engine records it alone or with the rows around it (the numpy engine)."""
    one, several = TrajectoryWriter.record_step, TrajectoryWriter.record_steps

    def crashing_one(self, at, *args, **kwargs):
        if at == step:
            raise RuntimeError("simulated crash")
        return one(self, at, *args, **kwargs)

    def crashing_several(self, first, weights, *args, **kwargs):
        if first <= step < first + len(weights):
            raise RuntimeError("simulated crash")
        return several(self, first, weights, *args, **kwargs)

    monkeypatch.setattr(TrajectoryWriter, "record_step", crashing_one)
    monkeypatch.setattr(TrajectoryWriter, "record_steps", crashing_several)
    with pytest.raises(RuntimeError, match="simulated crash"):
        yield
    monkeypatch.setattr(TrajectoryWriter, "record_step", one)
    monkeypatch.setattr(TrajectoryWriter, "record_steps", several)


def test_a_sweep_task_stacks_new_runs_and_resumes_an_interrupted_one_alone(tmp_path, generated_data, monkeypatch,
                                                                         caplog):
    from weightlapse.pipeline.sweep import train_and_publish

    data_dir, _ = generated_data
    dataset = load_dataset(data_dir, "mnist")
    monkeypatch.setattr(TrajectoryWriter, "default_block_steps", classmethod(lambda cls, layout: 64))
    runs = {f"seed{seed}": TrainParams(device="cpu", epochs=20, eval_every=50, seed=seed) for seed in range(4)}
    out = tmp_path / "runs"
    # Finished with other params: trained again. Finished with the same: kept.
    run_training(dataclasses.replace(runs["seed2"], eval_every=25), dataset, out / "seed2", run_name="seed2",
                 progress=False)
    run_training(runs["seed3"], dataset, out / "seed3", run_name="seed3", progress=False)
    kept = (out / "seed3" / "trajectory.zarr" / "zarr.json").stat().st_mtime_ns
    with crash_when_recording(step=150, monkeypatch=monkeypatch):
        run_training(runs["seed1"], dataset, out / "seed1", run_name="seed1", progress=False)

    stacked = []

    def spy(stack_runs, *args, **kwargs):
        stacked.append(sorted(stack_runs))
        return train_stack(stack_runs, *args, **kwargs)

    monkeypatch.setattr("weightlapse.pipeline.train.train_stack", spy)
    with caplog.at_level("INFO", logger="weightlapse.pipeline.train"):
        metrics = train_and_publish(runs, str(data_dir), "mnist", str(out))
    assert sorted(metrics) == ["seed0", "seed1", "seed2", "seed3"]
    assert stacked == [["seed0", "seed2"]]
    assert "seed1: resuming after step 127 of 200" in caplog.text  # the last block's checkpoint
    assert "seed3: finished in" in caplog.text and "kept" in caplog.text
    assert (out / "seed3" / "trajectory.zarr" / "zarr.json").stat().st_mtime_ns == kept
    for name, config in runs.items():
        run_training(config, dataset, tmp_path / "alone" / name, run_name=name, progress=False)
        swept, alone = open_run(out / name), open_run(tmp_path / "alone" / name)
        assert swept.attrs["progress"]["finished"]
        assert np.array_equal(swept.weights.values.view(np.int32), alone.weights.values.view(np.int32)), name


def test_runs_of_a_stack_stopped_by_an_error_each_resume_exactly_alone(tmp_path, generated_data, monkeypatch):
    from weightlapse.pipeline.store import read_progress

    dataset = load_dataset(generated_data[0], "mnist")
    monkeypatch.setattr(TrajectoryWriter, "default_block_steps", classmethod(lambda cls, layout: 64))
    runs = {f"seed{seed}": TrainParams(device="cpu", epochs=20, eval_every=50, seed=seed, lr=lr)
            for seed, lr in [(0, 1e-3), (1, 1e-2)]}
    with crash_when_recording(step=150, monkeypatch=monkeypatch):
        train_stack({name: (config, tmp_path / "stack" / name) for name, config in runs.items()}, dataset)
    for name, config in runs.items():
        stopped = read_progress(tmp_path / "stack" / name / "trajectory.zarr")
        assert not stopped["finished"] and stopped["resume"]["step"] == 127, name
        run_training(config, dataset, tmp_path / "stack" / name, run_name=name, resume=True, progress=False)
        run_training(config, dataset, tmp_path / "alone" / name, run_name=name, progress=False)
        resumed, alone = open_run(tmp_path / "stack" / name), open_run(tmp_path / "alone" / name)
        for variable in ("weights", "loss", "heldout_accuracy", "heldout_loss"):
            assert np.array_equal(resumed[variable].values.view(np.int32), alone[variable].values.view(np.int32)), \
                f"{name}: {variable}"


def test_resume_keeps_a_finished_run_of_the_same_code_and_retrains_after_a_code_change(
        tmp_path, generated_data, monkeypatch, caplog):
    import weightlapse.pipeline.train as train_module

    data_dir, _ = generated_data
    (tmp_path / "data").mkdir()
    data_dir.rename(tmp_path / "data" / "my-set")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"datasets": {"my-set": declaration(tmp_path / "data" / "my-set")},
                                      "data": {"dataset": "my-set"}, "train": {"device": "cpu"},
                                      "runs": {"a": {}}}))
    out = tmp_path / "runs" / "a"

    def stage():
        return main(["--params", str(params), "--run", "a", "--data-root", str(tmp_path / "data"), "--out", str(out),
                     "--resume"])

    assert stage() == 0
    assert open_run(out).attrs["weightlapse"]["dataset"]["class_names"][3] == "class-3"  # the declared dataset's
    written = (out / "trajectory.zarr" / "zarr.json").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="weightlapse.pipeline.train"):
        assert stage() == 0
    assert "a: finished in" in caplog.text and (out / "trajectory.zarr" / "zarr.json").stat().st_mtime_ns == written
    monkeypatch.setattr(train_module, "code_digest", lambda: "0" * 64)  # as after an edit to the training code
    assert stage() == 0
    assert (out / "trajectory.zarr" / "zarr.json").stat().st_mtime_ns != written
    assert open_run(out).attrs["weightlapse"]["versions"]["weightlapse-code"] == "0" * 64


@pytest.mark.parametrize("run", ["mlp", "mlp-adam"])
def test_a_hidden_layer_run_records_every_parameter_at_every_step(tmp_path, params_file, generated_data, run, caplog):
    data_dir, _ = generated_data
    out = tmp_path / "runs" / run
    with caplog.at_level("WARNING"):
        assert train_run(params_file, data_dir, out, run) == 0
    config = TrainParams(**{**yaml.safe_load(PARAMS)["train"], "capture": CaptureParams(chunk_steps=4),
                            **{key: tuple(value) if key == "hidden" else value
                               for key, value in yaml.safe_load(PARAMS)["runs"][run].items()}})
    checked = check_store(out)
    assert checked.meta["schema_version"] == NETWORK_SCHEMA_VERSION
    assert [(spec.name, spec.shape) for spec in checked.network.parameters] == list(
        parameter_shapes(config.hidden, bias=config.bias))
    meta = checked.meta
    assert (meta["engine"], meta["model"], meta["params"]["hidden"]) == ("torch", "mlp", list(config.hidden))
    assert checked.progress.as_dict() == {**checked.progress.as_dict(), "finished": True, "steps_done": 10,
                                          "n_steps": 10, "evals_done": 4}

    # Every step is exactly what the loop computes for the seeded MLP on the seeded batches.
    dataset = load_dataset(data_dir, "mnist")
    model = MLP(config.hidden, activation=config.activation, bias=config.bias, seed=config.seed)
    optimizer = make_optimizer(model.parameters(), name=config.optimizer, lr=config.lr, momentum=config.momentum)
    expected = []
    train(model, optimizer, torch.from_numpy(dataset.train.images), torch.from_numpy(dataset.train.labels),
          batch_size=20, epochs=1, seed=0, on_step=lambda step, loss: expected.append(
              [p.detach().numpy().copy() for p in model.parameters()]))
    ds = open_run(out)
    for index, (name, _) in enumerate(parameter_shapes(config.hidden, bias=config.bias)):
        assert ds[name].values.tobytes() == np.stack([row[index] for row in expected]).tobytes(), name

    # held-out scores at steps 0, 4, 8, 10, of the parameters recorded there, in the store and accuracy.csv
    assert ds.eval_step.values.tolist() == [0, 4, 8, 10]
    images, labels = torch.from_numpy(dataset.test.images), torch.from_numpy(dataset.test.labels)
    for at, step in enumerate([0, 4, 8, 10]):
        scored = evaluate_network(expected[step], images, labels, activation=config.activation, bias=config.bias)
        assert float(ds.heldout_accuracy[at]) == pytest.approx(scored.accuracy)
        assert float(ds.heldout_loss[at]) == pytest.approx(scored.loss, rel=1e-6)
    with open(out / "accuracy.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [0, 4, 8, 10]
    with open(out / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 11))
    assert float(rows[2]["loss"]) == pytest.approx(float(ds.loss.sel(step=3)), rel=1e-6)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["heldout_accuracy"] == pytest.approx(float(ds.heldout_accuracy[-1]))
    # No pixel history (a (class, pixel) matrix copy), and no warning that there is none.
    assert not (out / HISTORY_NAME).exists() and not caplog.records


def test_a_hidden_layer_run_is_bitwise_repeatable_and_kept_when_trained_again(tmp_path, params_file, generated_data,
                                                                              caplog):
    data_dir, _ = generated_data
    for name in ("a", "b"):
        assert train_run(params_file, data_dir, tmp_path / name, "mlp") == 0

    def files(directory):
        return {path.relative_to(directory): path.read_bytes() for path in sorted(directory.rglob("*"))
                if path.is_file() and path.name != ".writer.lock"}
    assert files(tmp_path / "a") == files(tmp_path / "b")  # every array and attribute, byte for byte
    written = (tmp_path / "a" / "trajectory.zarr" / "zarr.json").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="weightlapse.pipeline.train"):
        assert train_run(params_file, data_dir, tmp_path / "a", "mlp", "--resume") == 0
    assert "mlp: finished in" in caplog.text
    assert (tmp_path / "a" / "trajectory.zarr" / "zarr.json").stat().st_mtime_ns == written


def test_a_diverging_hidden_layer_run_stops_at_the_step_and_keeps_the_steps_before(tmp_path, params_file,
                                                                                   generated_data, caplog):
    data_dir, _ = generated_data
    out = tmp_path / "diverging"
    assert train_run(params_file, data_dir, out, "mlp-diverging") == 1
    assert "training diverged at step" in caplog.text and "Lower the learning rate" in caplog.text
    progress = read_progress(out)
    assert not progress["finished"] and "diverged" in progress["error"]
    ds = open_run(out)
    assert ds.sizes["step"] == progress["steps_done"] + 1 >= 1
    for name in ("hidden1.weight", "output.weight"):
        assert np.isfinite(ds[name].values).all()  # no row that overflowed is committed


def test_a_sweep_of_hidden_layer_runs_trains_them_one_by_one(tmp_path, generated_data, monkeypatch):
    from weightlapse.pipeline.params import parse_params
    from weightlapse.pipeline.sweep import dispatch, plan_tasks, sweep_runs

    data_dir, _ = generated_data
    params = parse_params({"train": {"hidden": [5], "device": "cpu", "eval_every": 4},
                           "runs": {"one": {"seed": 9}},
                           "sweep": {"optimizer": ["adam"], "lr": [0.001, 0.01], "batch_size": [20], "seed": [0, 1]}})
    runs = sweep_runs(params)
    assert all(config.hidden == (5,) for config in runs.values())
    assert plan_tasks(runs, 1) == [{name: config} for name, config in runs.items()]  # no stacks
    monkeypatch.setattr("weightlapse.pipeline.train.train_stack", lambda *args, **kwargs: pytest.fail("stacked"))
    result = dispatch(runs, data_dir=data_dir, dataset_name="mnist", out=tmp_path / "runs", scheduler=None)
    assert sorted(result.metrics) == sorted(runs)
    dataset = load_dataset(data_dir, "mnist")
    for name, config in runs.items():
        run_training(config, dataset, tmp_path / "alone" / name, run_name=name, progress=False)
        swept, alone = open_run(tmp_path / "runs" / name), open_run(tmp_path / "alone" / name)
        assert swept.attrs["progress"]["finished"] and swept.attrs["weightlapse"]["params"]["lr"] == config.lr
        for variable in ("hidden1.weight", "output.weight", "loss", "heldout_accuracy"):
            assert swept[variable].values.tobytes() == alone[variable].values.tobytes(), (name, variable)


@pytest.mark.parametrize("run", ["mlp", "mlp-diverging"])
def test_rows_staged_on_the_device_give_the_host_path_s_run_exactly(tmp_path, params_file, generated_data, monkeypatch,
                                                                  run):
    # The GPU path (a device block, copied to the host once per hand-off), run on the CPU.
    import weightlapse.pipeline.recorder as recorder

    data_dir, _ = generated_data
    expected = 1 if run == "mlp-diverging" else 0
    assert train_run(params_file, data_dir, tmp_path / "host", run) == expected
    monkeypatch.setattr(recorder, "stages_on_device", lambda device: True)
    assert train_run(params_file, data_dir, tmp_path / "staged", run) == expected
    host, staged = open_run(tmp_path / "host"), open_run(tmp_path / "staged")
    assert sorted(staged.data_vars) == sorted(host.data_vars) and staged.sizes["step"] == host.sizes["step"]
    # A diverged run's held-out scores are those scored before it stopped: as many as the scorer's thread finished.
    compared = [name for name in host.data_vars if not (expected and name.startswith("heldout"))]
    for name in compared:
        assert staged[name].values.tobytes() == host[name].values.tobytes(), name
