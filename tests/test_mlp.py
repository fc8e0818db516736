"""The MLP of train.hidden: its parameters' names and shapes, its seeded initialisation, and
its held-out score computed from recorded parameters as the model computes it."""

import numpy as np
import pytest
import torch

from weightlapse.pipeline.layers import parameter_count, parameter_shapes
from weightlapse.pipeline.mlp import MLP, evaluate_network
from weightlapse.pipeline.trainer import SoftmaxRegression


def test_parameters_are_named_and_shaped_as_the_store_records_them():
    model = MLP((32, 16), bias=True)
    shapes = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    assert shapes == [("hidden1.weight", (32, 784)), ("hidden1.bias", (32,)), ("hidden2.weight", (16, 32)),
                      ("hidden2.bias", (16,)), ("output.weight", (10, 16)), ("output.bias", (10,))]
    assert shapes == list(parameter_shapes((32, 16), bias=True))
    assert parameter_count((32, 16), bias=True) == sum(p.numel() for p in model.parameters())
    assert parameter_count((), bias=False) == 7_840  # softmax regression's


def test_initialisation_is_seeded_and_drawn_like_softmax_regression():
    a, b = MLP((8,), seed=3), MLP((8,), seed=3)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(a.hidden1.weight, MLP((8,), seed=4).hidden1.weight)
    # nn.Linear's bounds, 1/sqrt(fan_in), layer by layer
    assert a.hidden1.weight.abs().max() <= 1 / np.sqrt(784) and a.output.weight.abs().max() <= 1 / np.sqrt(8)
    # the first layer's draws are the ones softmax regression's single layer takes, from the same seed
    first = SoftmaxRegression(seed=3).weight.detach().reshape(-1)[:8 * 784]
    assert torch.equal(a.hidden1.weight.detach().reshape(-1), first)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("bias", [False, True])
def test_a_recorded_copy_scores_as_the_model_does(activation, bias):
    torch.manual_seed(0)
    model = MLP((12, 5), activation=activation, bias=bias, seed=1)
    images, labels = torch.rand(50, 784), torch.randint(0, 10, (50,))
    log_probs = model(images)
    recorded = [p.detach().numpy().copy() for p in model.parameters()]
    evaluation = evaluate_network(recorded, images, labels, activation=activation, bias=bias)
    assert evaluation.loss == pytest.approx(torch.nn.functional.nll_loss(log_probs, labels).item(), rel=1e-6)
    assert evaluation.accuracy == (log_probs.argmax(dim=1) == labels).float().mean().item()
    hidden = torch.relu if activation == "relu" else torch.tanh
    assert torch.allclose(log_probs, torch.log_softmax(model.output(hidden(model.hidden2(hidden(model.hidden1(images))))),
                                                       dim=1))
