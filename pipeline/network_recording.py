"""What a run with hidden layers (``train.hidden``) records while it trains: every parameter
of its MLP at every step, into a planned network store (schema version 2,
pipeline/store/network.py), with the held-out scores, loss and accuracy history, progress
bar, checkpoints and metrics a softmax-regression run records (:class:`RunRecording`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from weightlapse.pipeline.datasets import Dataset
from weightlapse.pipeline.mlp import evaluate_network
from weightlapse.pipeline.network_writer import NetworkWriter
from weightlapse.pipeline.recorder import ParameterRows
from weightlapse.pipeline.recording import RunPlan, RunRecording
from weightlapse.pipeline.resume import ResumePoint
from weightlapse.pipeline.store import NetworkLayout, RunMetadata


class NetworkRecording(RunRecording):
    """:class:`RunRecording` for an MLP trained by the torch engine (pipeline.torch_engine):
    ``sources`` are its live parameters (``TorchEngine.parameters_now``), in the model's order.

    A step copies each parameter into the writer's block (pipeline.recorder.ParameterRows), on
    a GPU into a device block that goes to the host once per hand-off, as a recorder's does.
    Held-out scoring runs on a copy of the parameters, on the scorer's thread.
    """

    def __init__(self, open_files: contextlib.ExitStack, plan: RunPlan, dataset: Dataset, device: torch.device,
                 out_dir: Path, metadata: RunMetadata, *, activation: str, **kwargs) -> None:
        self._device = device  # what the writer and scorer need, before RunRecording opens them
        self._score = functools.partial(_score_network, activation=activation)
        super().__init__(open_files, plan, dataset, device, out_dir, metadata, **kwargs)

    def _open_writer(self, path: Path, plan: RunPlan, metadata: RunMetadata, *, overwrite: bool,
                     checkpoint: Callable[[], np.ndarray | None], point: ResumePoint | None) -> NetworkWriter:
        layout = plan.layout
        self._rows = ParameterRows(layout, self._device)
        writer = NetworkWriter(path, layout, metadata, overwrite=overwrite, before_send=self._rows.before_send,
                               store_id=network_store_id(metadata, layout), checkpoint=checkpoint, resume_from=point)
        self._rows.attach(writer)
        return writer

    def _set_sources(self, sources: list[torch.Tensor], layout: NetworkLayout) -> None:
        self._parameters = list(sources)

    def _recorded_parameters(self, step: int) -> tuple[np.ndarray, ...]:
        group = self.writer.group
        return tuple(group[name][step] for name in self.writer.layout.names)

    def block_callbacks(self) -> dict[str, Callable]:
        return {}  # the torch engine hands over its rows one step at a time

    def on_step(self, step: int, loss: float) -> None:
        if step and not math.isfinite(loss):
            self._diverged(step, loss)
        self._rows.record(self._parameters, loss)
        self._after_step(step, loss, *self._parameters)

    def _diverged(self, step: int, loss: float) -> None:
        self._rows.to_host()  # the writer looks at the last row for values that overflowed
        super()._diverged(step, loss)

    def on_block(self, first: int, rows: dict[str, np.ndarray]) -> None:
        raise TypeError("a network run is recorded a step at a time (on_step); no engine hands it blocks")


def network_store_id(metadata: RunMetadata, layout: NetworkLayout) -> str:
    """The store's id: a digest of how it is made (params, data, code, parameters). Training
    is bitwise repeatable, so a store made again the same way (a resumed run, a rerun stage)
    holds the same steps and may keep the id, and its files stay byte for byte the same."""
    made = {"metadata": metadata.to_attributes(), "parameters": [spec.as_dict() for spec in layout.parameters],
            "n_steps": layout.n_steps, "eval_steps": list(layout.eval_steps)}
    return hashlib.sha256(json.dumps(made, sort_keys=True).encode()).hexdigest()[:32]


def _score_network(parameters: tuple, images: torch.Tensor, labels: torch.Tensor, *, activation: str):
    # Names ending in "bias" come in pairs with their weight (pipeline.layers.parameter_shapes).
    bias = len(parameters) > 1 and parameters[1].ndim == 1
    return evaluate_network(parameters, images, labels, activation=activation, bias=bias)
