"""The engine table: which engine trains which run where, the refusals of an engine named
where it cannot train, and the checkpoints the engines share."""

import dataclasses

import numpy as np
import pytest
import torch

from weightlapse.pipeline.datasets import load_dataset
from weightlapse.pipeline.engines import ENGINES, Engine, EngineError, optimizer_state_size, select_engine
from weightlapse.pipeline.optimizers import OPTIMIZERS
from weightlapse.pipeline.params import ENGINE_NAMES, ParamsError, TrainParams

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


def test_params_know_every_engine():
    assert sorted(ENGINE_NAMES) == sorted(["auto", *ENGINES])
    assert issubclass(EngineError, ParamsError)  # the train stage reports it as a params error


# optimizer, device, every batch the same size -> the engine "auto" takes
AUTO = [
    ("adam", CPU, True, "numpy"),
    ("adamw", CPU, True, "numpy"),
    ("sgd", CPU, False, "numpy"),  # uneven batches are nothing to the numpy engine
    ("rmsprop", CPU, True, "torch"),  # no numpy rmsprop
    ("adam", CUDA, True, "cuda-graph"),
    ("rmsprop", CUDA, True, "cuda-graph"),
    ("sgd", CUDA, True, "cuda-graph"),
    ("adam", CUDA, False, "torch"),  # a graph replays one batch shape
]


@pytest.mark.parametrize(("optimizer", "device", "even_batches", "engine"), AUTO)
def test_auto_takes_the_fastest_engine_that_can_train_the_run(optimizer, device, even_batches, engine):
    assert select_engine(TrainParams(optimizer=optimizer), device, even_batches=even_batches) == engine
    assert set(OPTIMIZERS) == {case[0] for case in AUTO}  # every optimizer is in the table


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("device", [CPU, CUDA])
def test_auto_trains_hidden_layers_with_the_torch_engine(optimizer, device):
    assert select_engine(TrainParams(optimizer=optimizer, hidden=(8,)), device, even_batches=True) == "torch"


@pytest.mark.parametrize(("engine", "device", "usable"), [("numpy", CPU, "torch"), ("cuda-graph", CUDA, "torch")])
def test_the_softmax_regression_engines_refuse_hidden_layers(engine, device, usable):
    with pytest.raises(EngineError, match=rf"^engine: {engine} trains softmax regression only, and this run has "
                                          rf"hidden layers \(hidden: \[8, 4\]\); use engine: {usable} \(or auto\)$"):
        select_engine(TrainParams(engine=engine, hidden=(8, 4)), device, even_batches=True)


@pytest.mark.parametrize("config", [
    TrainParams(device="cpu", max_steps=7, hidden=(6,)),
    TrainParams(device="cpu", max_steps=7, hidden=(6, 3), bias=True, optimizer="sgd", momentum=0.9, lr=0.05),
    TrainParams(device="cpu", max_steps=7, hidden=(5,), optimizer="rmsprop", activation="tanh"),
], ids=["adam", "sgd-momentum-bias", "rmsprop-tanh"])
def test_a_network_checkpoint_restores_the_run_exactly(generated_data, config):
    """The torch engine's checkpoint of an MLP is optimizer_state_size values, and a model
    restored from it (and the parameters) after step 3 takes the uninterrupted run's steps 4..7."""
    torch.set_num_threads(1)
    dataset = load_dataset(generated_data[0], "mnist")
    clean = ENGINES["torch"].build(config, dataset, CPU, 4)
    kept = {}
    clean.train(lambda step, loss: kept.__setitem__(step, ([p.numpy().copy() for p in clean.parameters_now()],
                                                           clean.optimizer_state())))
    assert kept[3][1].shape == (optimizer_state_size(config),)
    resumed = ENGINES["torch"].build(config, dataset, CPU, 4)
    resumed.restore_parameters(*kept[3], 3)
    after = {}
    resumed.train(lambda step, loss: after.__setitem__(step, [p.numpy().copy() for p in resumed.parameters_now()]),
                  start_step=3)
    assert sorted(after) == [4, 5, 6, 7]
    for step in after:
        for a, b in zip(after[step], kept[step][0]):
            assert a.tobytes() == b.tobytes(), step


@pytest.mark.parametrize(("engine", "optimizer", "device"), [
    ("torch", "adam", CPU), ("torch", "rmsprop", CUDA), ("numpy", "sgd", CPU), ("cuda-graph", "adam", CUDA)])
def test_an_engine_named_where_it_can_train_is_kept(engine, optimizer, device):
    assert select_engine(TrainParams(engine=engine, optimizer=optimizer), device, even_batches=True) == engine


@pytest.mark.parametrize(("params", "device", "even_batches", "message"), [
    ({"engine": "numpy", "optimizer": "rmsprop"}, CPU, True,
     "engine: numpy implements adam, adamw, sgd, not 'rmsprop'; use engine: torch (or auto)"),
    ({"engine": "numpy", "device": "cuda"}, CUDA, True,
     "engine: numpy runs on the CPU only, and this run trains on cuda; use engine: cuda-graph or torch (or auto)"),
    ({"engine": "cuda-graph", "device": "cpu"}, CPU, True,
     "engine: cuda-graph runs on a CUDA GPU only, and this run trains on cpu; use engine: numpy or torch (or auto)"),
    ({"engine": "cuda-graph", "batch_size": 33}, CUDA, False,
     "engine: cuda-graph replays one batch shape, and this run's last batch of an epoch is short (the training "
     "split is not a multiple of batch_size); use engine: torch (or auto)"),
])
def test_an_engine_named_where_it_cannot_train_is_refused_with_what_can(params, device, even_batches, message):
    with pytest.raises(EngineError, match=f"^{message.replace('(', '[(]').replace(')', '[)]')}$"):
        select_engine(TrainParams(**params), device, even_batches=even_batches)


def test_the_graph_engine_refuses_an_optimizer_it_cannot_capture():
    uncapturable = dataclasses.replace(OPTIMIZERS["adam"], capturable=False)
    assert ENGINES["cuda-graph"].refusal(uncapturable, CUDA, even_batches=True) == \
        "cannot capture adam's step in a CUDA graph"
    assert ENGINES["torch"].refusal(uncapturable, CUDA, even_batches=True) is None


@pytest.mark.parametrize("config", [
    TrainParams(device="cpu", max_steps=7),
    TrainParams(device="cpu", max_steps=7, optimizer="adamw", bias=True, weight_decay=0.05),
    TrainParams(device="cpu", max_steps=7, optimizer="sgd", momentum=0.9, bias=True),
    TrainParams(device="cpu", max_steps=7, optimizer="sgd"),
    TrainParams(device="cpu", max_steps=7, optimizer="rmsprop", momentum=0.5),
], ids=["adam", "adamw-bias", "sgd-momentum-bias", "sgd", "rmsprop-momentum"])
def test_every_engine_checkpoints_the_same_state_vector(generated_data, config):
    """Each engine that can train the run gives a checkpoint of optimizer_state_size values
    in the same layout, so that a run resumes on any engine."""
    torch.set_num_threads(1)
    dataset = load_dataset(generated_data[0], "mnist")
    states = {}
    for name, spec in ENGINES.items():
        if spec.refusal(OPTIMIZERS[config.optimizer], CPU, even_batches=True) is not None and name != "cuda-graph":
            continue  # the cuda-graph engine runs eagerly on the CPU, for tests
        engine = spec.build(config, dataset, CPU, 4)
        assert isinstance(engine, Engine)
        kept = {}
        engine.train(lambda step, loss, engine=engine, kept=kept: kept.__setitem__(step, engine.optimizer_state()))
        states[name] = kept[7]
        assert states[name].shape == (optimizer_state_size(config),) and states[name].dtype == np.float32
    assert ("numpy" in states) == (OPTIMIZERS[config.optimizer].numpy_factory is not None)
    for name, state in states.items():
        np.testing.assert_allclose(state, states["torch"], rtol=0, atol=1e-5, err_msg=name)
    if optimizer_state_size(config):
        assert np.abs(states["torch"]).max() > 0  # a state that never moved would agree too
