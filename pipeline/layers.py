"""The layers of a run's network, from ``train.hidden``: their names and parameter shapes.

No torch here: params.yaml is validated (and a run's store sized) without loading it.
``hidden: []`` is softmax regression, 784 -> 10 (pipeline.trainer.SoftmaxRegression); a
list of widths is a multi-layer perceptron 784 -> h1 -> ... -> 10 (pipeline.mlp.MLP), whose
parameters are named ``hidden1.weight`` (h1, 784), ``hidden1.bias`` (h1,), ...,
``output.weight`` (10, h_last): the arrays of its network store (pipeline/store/network.py).
"""

from __future__ import annotations

import math

from weightlapse.pipeline.datasets import N_CLASSES, N_PIXELS
from weightlapse.pipeline.safe_yaml import shown

ACTIVATIONS = ("relu", "tanh")
MAX_HIDDEN_LAYERS = 4
MAX_WIDTH = 4096


def hidden_problem(hidden: tuple[int, ...], activation: str) -> str | None:
    """Why ``hidden`` and ``activation`` cannot describe a network, as a params error (key first), or None."""
    if len(hidden) > MAX_HIDDEN_LAYERS:
        return (f"hidden: {len(hidden)} hidden layers, more than the limit of {MAX_HIDDEN_LAYERS}; list at most "
                f"{MAX_HIDDEN_LAYERS} widths, e.g. hidden: [128, 64] ([] is softmax regression)")
    for width in hidden:
        if not 1 <= width <= MAX_WIDTH:
            return (f"hidden: a layer of width {width:,}; each width is 1 to {MAX_WIDTH:,} units, "
                    f"e.g. hidden: [32]")
    if activation not in ACTIVATIONS:
        return f"activation: {shown(activation)} is not one of {', '.join(ACTIVATIONS)}"
    return None


def layer_names(hidden: tuple[int, ...]) -> tuple[str, ...]:
    """The network's linear layers, input to output: ``hidden1``, ..., ``output``."""
    return (*(f"hidden{index}" for index in range(1, len(hidden) + 1)), "output")


def layer_shapes(hidden: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """Each layer's weight shape, (out, in), input to output."""
    widths = (N_PIXELS, *hidden, N_CLASSES)
    return tuple((out, fan_in) for fan_in, out in zip(widths, widths[1:]))


def parameter_shapes(hidden: tuple[int, ...], *, bias: bool) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(name, shape) of every parameter, in the model's order (each layer's weight, then its bias)."""
    shapes: list[tuple[str, tuple[int, ...]]] = []
    for name, (out, fan_in) in zip(layer_names(hidden), layer_shapes(hidden)):
        shapes.append((f"{name}.weight", (out, fan_in)))
        if bias:
            shapes.append((f"{name}.bias", (out,)))
    return tuple(shapes)


def parameter_count(hidden: tuple[int, ...], *, bias: bool) -> int:
    """Values of the model's parameters: softmax regression's 7,840 (+10 with a bias) for ``hidden: []``."""
    return sum(math.prod(shape) for _, shape in parameter_shapes(hidden, bias=bias))
