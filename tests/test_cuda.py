"""The CUDA path of the train stage. Skipped on machines without a CUDA GPU (CI has none)."""

import json

import numpy as np
import pytest
import torch

from weightlapse.pipeline.datasets import load_dataset
from weightlapse.pipeline.params import TrainParams
from weightlapse.pipeline.train import run_training
from weightlapse.pipeline.store import open_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch here")


def test_a_cuda_run_records_the_same_trajectory_as_cpu_to_float_rounding(tmp_path, generated_data):
    data_dir, _ = generated_data
    dataset = load_dataset(data_dir, "mnist")
    stores = {}
    for device in ("cuda", "cpu"):
        config = TrainParams(device=device, eval_every=5)
        run_training(config, dataset, tmp_path / device, run_name=device, progress=False)
        stores[device] = open_run(tmp_path / device)
    gpu, cpu = stores["cuda"], stores["cpu"]
    assert gpu.attrs["weightlapse"]["device"].startswith("cuda")
    assert gpu.attrs["progress"]["finished"] and gpu.sizes["step"] == cpu.sizes["step"] == 11
    np.testing.assert_array_equal(gpu.weights.values[0], cpu.weights.values[0])  # same initialisation
    np.testing.assert_allclose(gpu.weights.values, cpu.weights.values, rtol=0, atol=1e-5)
    metrics = json.loads((tmp_path / "cuda" / "metrics.json").read_text())
    assert metrics["steps"] == 10


def test_cuda_runs_are_bitwise_repeatable(tmp_path, generated_data):
    data_dir, _ = generated_data
    dataset = load_dataset(data_dir, "mnist")
    for name in ("a", "b"):
        run_training(TrainParams(device="cuda"), dataset, tmp_path / name, run_name=name, progress=False)
    a, b = open_run(tmp_path / "a").weights.values, open_run(tmp_path / "b").weights.values
    assert np.array_equal(a.view(np.int32), b.view(np.int32))


def test_the_graph_engine_runs_on_cuda_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    """Auto picks the cuda-graph engine on CUDA. Interrupted mid-block and resumed, the
    run ends with the uninterrupted run's arrays, bit for bit (the CPU twin of this test,
    without graphs, is in tests/test_graph_engine.py)."""
    from interrupted_runs import clean_and_resumed

    from weightlapse.pipeline.params import CaptureParams

    config = TrainParams(device="cuda", epochs=3, eval_every=40, capture=CaptureParams(chunk_steps=16, gradients=True))
    clean, resumed, stopped = clean_and_resumed(config, tmp_path, monkeypatch)
    assert clean.attrs["weightlapse"]["engine"] == "cuda-graph" and stopped["resume"]["step"] == 127
    for name in ("weights", "gradients", "loss", "heldout_accuracy"):
        assert np.array_equal(clean[name].values.view(np.int32), resumed[name].values.view(np.int32)), name
    # and the graph engine agrees with the CPU's autograd to float32 rounding
    run_training(TrainParams(device="cpu", engine="torch", epochs=3, eval_every=40),
                 load_dataset(tmp_path / "data", "mnist"), tmp_path / "cpu", run_name="r", progress=False)
    np.testing.assert_allclose(clean.weights.values, open_run(tmp_path / "cpu").weights.values, rtol=0, atol=1e-5)


def test_a_hidden_layer_run_trains_on_cuda_repeatably_and_as_on_the_cpu(tmp_path, generated_data):
    dataset = load_dataset(generated_data[0], "mnist")
    for name, device in (("a", "cuda"), ("b", "cuda"), ("cpu", "cpu")):
        run_training(TrainParams(device=device, hidden=(16, 8), bias=True, eval_every=5), dataset, tmp_path / name,
                     run_name=name, progress=False)
    a, b, cpu = (open_run(tmp_path / name) for name in ("a", "b", "cpu"))
    assert a.attrs["weightlapse"]["engine"] == "torch" and a.attrs["weightlapse"]["device"].startswith("cuda")
    assert a.attrs["progress"]["finished"] and a.sizes["step"] == cpu.sizes["step"] == 11
    for name in ("hidden1.weight", "hidden2.bias", "output.weight", "loss"):
        assert a[name].values.tobytes() == b[name].values.tobytes(), name  # bitwise repeatable
        np.testing.assert_allclose(a[name].values[1:], cpu[name].values[1:], rtol=0, atol=1e-4, err_msg=name)
    np.testing.assert_array_equal(a["hidden1.weight"].values[0], cpu["hidden1.weight"].values[0])  # same init
    np.testing.assert_allclose(a.heldout_loss.values, cpu.heldout_loss.values, rtol=1e-4)


def test_a_hidden_layer_run_resumes_on_cuda_bit_for_bit(tmp_path, monkeypatch):
    from interrupted_runs import clean_and_resumed_network

    config = TrainParams(device="cuda", epochs=3, eval_every=40, hidden=(16,))
    clean, resumed, stopped = clean_and_resumed_network(config, tmp_path, monkeypatch)
    assert stopped["resume"]["step"] == 255
    for name in clean.data_vars:
        assert clean[name].values.tobytes() == resumed[name].values.tobytes(), name
