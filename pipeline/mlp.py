"""A multi-layer perceptron of ``train.hidden`` (pipeline.layers): 784 -> h1 -> ... -> 10,
an activation after each hidden layer, log-softmax; and its held-out score.

Pure computation on tensors, like pipeline.trainer: the training loop there trains this
model as it trains softmax regression, on the same seeded batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from weightlapse.pipeline.layers import layer_names, layer_shapes
from weightlapse.pipeline.trainer import Evaluation, derive_seeds

ACTIVATION_FUNCTIONS = {"relu": F.relu, "tanh": torch.tanh}  # pipeline.layers.ACTIVATIONS


class MLP(nn.Module):
    """784 -> hidden[0] -> ... -> 10. Its parameters are named ``hidden1.weight`` (out, in),
    ``hidden1.bias``, ..., ``output.weight``: the arrays of its store."""

    def __init__(self, hidden: Sequence[int], *, activation: str = "relu", bias: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.activation = activation
        # nn.Linear's own initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), from one seeded
        # generator, layer by layer from the input, as SoftmaxRegression draws its one layer:
        # an MLP's first draws are the ones softmax regression's would be.
        generator = torch.Generator().manual_seed(derive_seeds(seed)[0])
        for name, (out, fan_in) in zip(layer_names(tuple(hidden)), layer_shapes(tuple(hidden))):
            layer = nn.Linear(fan_in, out, bias=bias)
            bound = 1.0 / math.sqrt(fan_in)
            with torch.no_grad():
                layer.weight.uniform_(-bound, bound, generator=generator)
                if bias:
                    layer.bias.uniform_(-bound, bound, generator=generator)
            setattr(self, name, layer)

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(weight, bias) of each linear layer, input to output."""
        return [(module.weight, module.bias) for module in self.children()]

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (sample, pixel) -> (sample, class)
        return network_log_probs(images, self.layers(), self.activation)


def network_log_probs(images: torch.Tensor, layers: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
                      activation: str) -> torch.Tensor:
    """The MLP's log-probabilities, from its layers' (weight, bias), input to output."""
    values = images
    for index, (weight, bias) in enumerate(layers):
        values = F.linear(values, weight, bias)
        if index < len(layers) - 1:
            values = ACTIVATION_FUNCTIONS[activation](values)
    return F.log_softmax(values, dim=1)


@torch.no_grad()
def evaluate_network(parameters: Sequence[np.ndarray | torch.Tensor], images: torch.Tensor, labels: torch.Tensor, *,
                     activation: str, bias: bool) -> Evaluation:
    """Held-out accuracy and mean loss of the MLP with these parameters (in the model's order:
    each layer's weight, then its bias), as recorded or copied, so that a step is scored on
    another thread while training goes on."""
    tensors = [torch.as_tensor(value).to(images.device) for value in parameters]
    per_layer = 2 if bias else 1
    layers = [(tensors[at], tensors[at + 1] if bias else None) for at in range(0, len(tensors), per_layer)]
    log_probs = network_log_probs(images, layers, activation)
    loss = F.nll_loss(log_probs, labels).item()
    accuracy = (log_probs.argmax(dim=1) == labels).float().mean().item()
    return Evaluation(accuracy=accuracy, loss=loss)
