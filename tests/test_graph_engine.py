"""The cuda-graph engine's ring and host-side machinery, run eagerly on the CPU.

On CUDA the step is captured once and replayed as a graph (tests/test_cuda.py); everything
else (the batch table, ring slots, block ends aligned with the writer's, copies to the
host, optimizer-state snapshots, resuming) is the same code here, so it must give exactly
the trajectory of the plain torch engine, and resume to it bit for bit.
"""

import numpy as np
import pytest
import torch
from interrupted_runs import clean_and_resumed

import weightlapse.pipeline.train as train_stage
from weightlapse.pipeline.datasets import load_dataset
from weightlapse.pipeline.graph_engine import CudaGraphEngine
from weightlapse.pipeline.params import CaptureParams, TrainParams
from weightlapse.pipeline.torch_engine import TorchEngine

CPU = torch.device("cpu")


def recorded(engine, start_step=0):
    rows = {}

    def on_step(step, loss):
        gradient = engine.gradient_now().copy() if engine.config.capture.gradients and step else None
        bias = engine.bias_now()
        rows[step] = (engine.weight_now().copy(), loss, None if bias is None else bias.copy(), gradient)

    engine.train(on_step, start_step)
    return rows


@pytest.mark.parametrize("config", [
    TrainParams(device="cpu", epochs=3),
    TrainParams(device="cpu", optimizer="sgd", lr=0.05, momentum=0.9, bias=True, capture=CaptureParams(gradients=True)),
    TrainParams(device="cpu", optimizer="rmsprop", lr=1e-3, epochs=2),
], ids=["adam", "sgd-bias-gradients", "rmsprop"])
def test_the_ring_gives_exactly_the_torch_engines_trajectory(generated_data, config):
    torch.set_num_threads(1)
    dataset = load_dataset(generated_data[0], "mnist")
    plain = recorded(TorchEngine(config, dataset, CPU))
    ring = recorded(CudaGraphEngine(config, dataset, CPU, block_steps=4))  # many blocks, both halves reused
    assert list(ring) == list(plain) == list(range(len(plain)))
    for step in plain:
        for ours, theirs in zip(ring[step], plain[step]):
            if theirs is None:
                assert ours is None
            elif isinstance(theirs, float):
                assert ours == theirs or (np.isnan(ours) and np.isnan(theirs))
            else:
                assert np.array_equal(ours.view(np.int32), theirs.view(np.int32)), step


def test_checkpoints_are_the_optimizer_state_at_each_block_end(generated_data):
    dataset = load_dataset(generated_data[0], "mnist")
    config = TrainParams(device="cpu", epochs=3)
    ring = CudaGraphEngine(config, dataset, CPU, block_steps=8)
    states = {}
    ring.train(lambda step, loss: states.__setitem__(step, ring.optimizer_state()))
    # step 0 (before training) and each block end: 30 steps in blocks ending where the writer's do
    assert [step for step, state in states.items() if state is not None] == [0, 7, 15, 23, 30]
    plain = TorchEngine(config, dataset, CPU)
    expected = {}
    plain.train(lambda step, loss: step in (7, 15, 23, 30) and expected.__setitem__(step, plain.optimizer_state()))
    for step, state in expected.items():
        assert np.array_equal(states[step], state), step


def test_a_run_interrupted_mid_block_resumes_to_the_uninterrupted_store(tmp_path, monkeypatch):
    """The train stage on the ring engine (forced on the CPU): stopped by an error recording the block of step 150,
    resumed from its last checkpoint, it ends with the uninterrupted run's arrays, bit for bit."""
    config = TrainParams(device="cpu", epochs=3, eval_every=40, capture=CaptureParams(chunk_steps=16))
    monkeypatch.setattr(train_stage, "select_engine", lambda *args, **kwargs: "cuda-graph")
    clean, resumed, stopped = clean_and_resumed(config, tmp_path, monkeypatch)
    assert stopped["resume"]["step"] == 127 and not stopped["finished"]  # the last block end before 150
    assert resumed.attrs["progress"]["finished"] and resumed.attrs["weightlapse"]["engine"] == "cuda-graph"
    for name in ("weights", "loss", "heldout_accuracy", "heldout_loss"):
        assert np.array_equal(clean[name].values.view(np.int32), resumed[name].values.view(np.int32)), name

