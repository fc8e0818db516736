"""A run's stored layers as an image classifier, step by step: what function-space comparisons compute with.

A softmax-regression run is one linear layer; a network run that is a chain of linear
layers (pipeline/mlp.py's MLPs, a recorded ``nn.Sequential`` of ``Linear`` layers) is its
layers with the activation its params record between them. Pure computation: stored
arrays in, log-probabilities out, in float32 as the train stage scores (then float64 for
the log-softmax).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr

from weightlapse.pipeline.store import TrajectoryError
from weightlapse.pipeline.store.network import parse_parameters
from weightlapse.viewer.analysis.network import LinearLayer, linear_chain

# Steps per task: the logits of one run for one step over 10,000 images are 400 KB (float32).
BLOCK_STEPS = 16
# A network's widest layer's outputs for a task's steps and images, at most (float32).
BLOCK_BYTES = 64 * 2**20
# The activations between a network's layers, as the train stage applies them (pipeline/mlp.py).
ACTIVATIONS = {"relu": lambda values: np.maximum(values, np.float32(0)), "tanh": np.tanh}


@dataclass(frozen=True)
class Classifier:
    """A run's stored layers as an image classifier, step by step: (weight, bias or None) lazy
    (step, out, in) and (step, out) arrays from input to output, the activation between them."""

    layers: tuple[tuple[xr.DataArray, xr.DataArray | None], ...]
    activation: str | None  # None for a single layer (softmax regression)
    chain: tuple[LinearLayer, ...] | None = None  # a network's layers by parameter name; None for softmax

    @property
    def n_steps(self) -> int:
        return self.layers[0][0].shape[0]

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(weight.shape[1:] for weight, _ in self.layers)

    @property
    def widest(self) -> int:
        return max(weight.shape[1] for weight, _ in self.layers)

    @property
    def parameters_per_step(self) -> int:
        return sum(weight[0].size + (0 if bias is None else bias[0].size) for weight, bias in self.layers)


def classifier(name: str, model: xr.Dataset, *, pixels: int | None = None, classes: int | None = None) -> Classifier:
    """Run ``name``'s Dataset (open_run's) as a :class:`Classifier`, or a ValueError saying why
    its predictions cannot be computed from what it stores (or, given the images' ``pixels``
    and ``classes``, why it cannot classify them)."""
    found = _stored_classifier(name, model)
    inputs, outputs = found.layers[0][0].shape[-1], found.layers[-1][0].shape[1]
    if pixels is not None and inputs != pixels:
        raise ValueError(f"run {name!r} takes {inputs:,} inputs, not the held-out images' {pixels:,} pixels")
    if classes is not None and outputs != classes:
        raise ValueError(f"run {name!r} scores {outputs:,} classes, not the held-out images' {classes:,}")
    return found


def _stored_classifier(name: str, model: xr.Dataset) -> Classifier:
    if "weights" in model:
        return Classifier(((model.weights, model.bias if "bias" in model else None),), None)
    meta = model.attrs.get("weightlapse") or {}
    try:
        chain = linear_chain(parse_parameters(meta.get("parameters"), name).parameters)
    except TrajectoryError as error:
        chain = str(error)
    if isinstance(chain, str):
        raise ValueError(f"run {name!r}: its predictions cannot be computed from its parameters ({chain}); "
                         "only chains of linear layers are")
    params = meta.get("params") if isinstance(meta.get("params"), dict) else {}
    activation = params.get("activation") if len(chain) > 1 else None
    if len(chain) > 1 and not (isinstance(activation, str) and activation in ACTIVATIONS):
        raise ValueError(f"run {name!r} records no activation between its layers that this knows "
                         f"({', '.join(ACTIVATIONS)}): its predictions cannot be computed")
    return Classifier(tuple((model[layer.weight], model[layer.bias] if layer.bias else None) for layer in chain),
                      activation, chain)


def log_probabilities(weights: np.ndarray, bias: np.ndarray | None, images: np.ndarray) -> np.ndarray:
    """(step, image, class) log-softmax of the model's logits. ``weights`` (step, class, pixel)."""
    logits = np.einsum("scp,np->snc", weights.astype(np.float32), images, optimize=True).astype(np.float64)
    if bias is not None:
        logits += bias.astype(np.float64)[:, None, :]
    logits -= logits.max(axis=2, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=2, keepdims=True))


def network_log_probabilities(layers: list[tuple[np.ndarray, np.ndarray | None]], activation: str,
                              images: np.ndarray) -> np.ndarray:
    """(step, image, class) log-softmax of a chain of linear layers' logits, ``activation``
    after each but the last; each layer's (weight (step, out, in), bias (step, out) or None)."""
    if len(layers) == 1:
        return log_probabilities(*layers[0], images)
    weight, bias = layers[0]
    values = np.einsum("sop,np->sno", weight.astype(np.float32), images, optimize=True)
    for index, (weight, bias) in enumerate(layers):
        if index:
            values = np.einsum("soi,sni->sno", weight.astype(np.float32), values, optimize=True)
        if bias is not None:
            values += bias.astype(np.float32)[:, None, :]
        if index < len(layers) - 1:
            values = ACTIVATIONS[activation](values)
    logits = values.astype(np.float64)
    logits -= logits.max(axis=2, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=2, keepdims=True))


def steps_per_task(model: Classifier, n_images: int) -> int:
    """Steps of ``model`` whose predictions on ``n_images`` images one task computes."""
    if model.activation is None:
        return BLOCK_STEPS
    # A step's activations (float32), and its weights: read (float32) and mixed on a line (float64).
    per_step = n_images * model.widest * 4 + model.parameters_per_step * 12
    return int(max(1, min(BLOCK_STEPS, BLOCK_BYTES // per_step)))


def layers_at(model: Classifier, steps: np.ndarray) -> list[tuple]:
    """The model's layers at ``steps``, lazily (dask arrays)."""
    return [(weight.data[steps], None if bias is None else bias.data[steps]) for weight, bias in model.layers]
