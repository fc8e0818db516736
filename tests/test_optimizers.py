"""Every entry of the optimizer table: its params validation, its torch and numpy
implementations stepped side by side, and the checkpoint's state layout both engines use."""

import dataclasses

import numpy as np
import pytest
import torch

from weightlapse.pipeline.optimizers import HYPERPARAMETERS, OPTIMIZERS, OptimizerSpec, closed_form_names, get_optimizer
from weightlapse.pipeline.params import ParamsError, TrainParams

# What each entry decides. A new optimizer fails here until its line says whether the numpy
# engine implements it and whether the cuda-graph engine can capture it.
DECIDED = {
    # name: (hyper-parameters, numpy implementation, capturable)
    "adam": (("weight_decay",), True, True),
    "adamw": (("weight_decay",), True, True),
    "sgd": (("momentum", "weight_decay"), True, True),
    "rmsprop": (("momentum", "weight_decay"), False, True),
}
NAMES = list(OPTIMIZERS)


def test_every_entry_decides_its_numpy_implementation_and_capture():
    assert {name: (spec.hyperparameters, spec.numpy_factory is not None, spec.capturable)
            for name, spec in OPTIMIZERS.items()} == DECIDED
    assert all(name == spec.name for name, spec in OPTIMIZERS.items())
    # no default: an entry that leaves either out cannot be built
    undecided = {f.name for f in dataclasses.fields(OptimizerSpec)
                 if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    assert {"numpy_factory", "capturable", "state_keys", "counts_steps"} <= undecided
    assert closed_form_names() == ("adam", "adamw", "sgd")


@pytest.mark.parametrize("name", NAMES)
def test_params_accept_what_the_optimizer_takes_and_refuse_the_rest(name):
    takes = OPTIMIZERS[name].hyperparameters
    for key in HYPERPARAMETERS:
        values = {key: 0.5}
        if key in takes:
            assert getattr(TrainParams(optimizer=name, **values), key) == 0.5
        else:
            takers = "/".join(other for other, spec in OPTIMIZERS.items() if key in spec.hyperparameters)
            with pytest.raises(ParamsError, match=rf"^{key}: {name} has no {key} parameter \(it takes lr, "
                                                  rf"{', '.join(takes)}\); set {key} to 0 or use {takers}$"):
                TrainParams(optimizer=name, **values)
        assert getattr(TrainParams(optimizer=name), key) == 0.0  # 0 is always accepted


def test_an_unknown_optimizer_is_refused_with_the_choices():
    choices = "choose one of adam, adamw, sgd, rmsprop"
    with pytest.raises(ParamsError, match=f"optimizer: unknown optimizer 'lamb'; {choices}"):
        TrainParams(optimizer="lamb")
    with pytest.raises(ValueError, match=f"unknown optimizer 'lamb'; {choices}"):
        get_optimizer("lamb")


def settings(name):
    """(momentum, weight_decay) pairs worth stepping: plain, and every hyper-parameter it takes set."""
    takes = OPTIMIZERS[name].hyperparameters
    return [(0.0, 0.0), (0.9 if "momentum" in takes else 0.0, 0.01 if "weight_decay" in takes else 0.0)]


def stepped(name, momentum, weight_decay, *, steps=5, seed=0):
    """A (class, pixel) weight and a (class,) bias stepped by the torch and the numpy optimizer
    with the same gradients: (torch optimizer, torch parameters, numpy optimizer, numpy parameters)."""
    spec = OPTIMIZERS[name]
    rng = np.random.default_rng(seed)
    initial = [rng.standard_normal((10, 7)).astype(np.float32), rng.standard_normal(10).astype(np.float32)]
    torch_params = [torch.nn.Parameter(torch.from_numpy(value.copy())) for value in initial]
    torch_opt = spec.make_torch(torch_params, lr=0.01, momentum=momentum, weight_decay=weight_decay)
    pairs = [(value[None].copy(), np.zeros_like(value[None])) for value in initial]  # a stack of one run
    numpy_opt = spec.make_numpy(pairs, lrs=np.array([0.01]), momentum=momentum, weight_decay=weight_decay) \
        if spec.numpy_factory is not None else None
    for step in range(steps):
        gradients = [rng.standard_normal(value.shape).astype(np.float32) for value in initial]
        for param, gradient in zip(torch_params, gradients):
            param.grad = torch.from_numpy(gradient.copy())
        torch_opt.step()
        if numpy_opt is not None:
            for (_, grad), gradient in zip(pairs, gradients):
                grad[0] = gradient
            numpy_opt.step()
            for param, (numpy_param, _) in zip(torch_params, pairs):
                # the same formulas in float32; numpy and torch round a fused multiply-add differently
                np.testing.assert_allclose(numpy_param[0], param.detach().numpy(), rtol=0, atol=1e-6,
                                           err_msg=f"{name} step {step + 1}")
    return torch_opt, torch_params, numpy_opt, [param for param, _ in pairs]


@pytest.mark.parametrize("name", closed_form_names())
def test_the_numpy_implementation_steps_as_torch_does(name):
    for momentum, weight_decay in settings(name):
        moved = stepped(name, momentum, weight_decay)[3]  # stepped compares them step by step
        initial = stepped(name, momentum, weight_decay, steps=0)[3]
        assert not np.allclose(moved[0], initial[0])  # two frozen parameters would agree too


@pytest.mark.parametrize("name", NAMES)
def test_the_state_layout_is_what_torch_and_numpy_keep(name):
    spec = OPTIMIZERS[name]
    for momentum, weight_decay in settings(name):
        torch_opt, torch_params, numpy_opt, _ = stepped(name, momentum, weight_decay)
        keys = spec.state_keys(momentum)
        for param in torch_params:
            kept = set(torch_opt.state[param])
            assert kept == set(keys) | ({"step"} if spec.counts_steps else set()), (name, momentum)
        assert spec.state_size(17, momentum) == 17 * len(keys)
        if numpy_opt is None:
            continue
        numpy_state = numpy_opt.state()
        assert list(numpy_state) == list(keys), (name, momentum)
        for key in keys:
            for param, array in zip(torch_params, numpy_state[key]):
                np.testing.assert_allclose(array[0], torch_opt.state[param][key].numpy(), rtol=0, atol=1e-6)


def test_a_numpy_optimizer_that_does_not_exist_is_refused():
    pairs = [(np.zeros((1, 3), np.float32), np.zeros((1, 3), np.float32))]
    with pytest.raises(ValueError, match="no closed-form path for optimizer 'rmsprop' \\(there is one for adam, "
                                         "adamw, sgd\\); use engine: torch"):
        OPTIMIZERS["rmsprop"].make_numpy(pairs, lrs=np.array([0.1]))
