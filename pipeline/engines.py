"""The ways to train the model (:data:`ENGINES`), and the one place that decides which
trains a run (:func:`select_engine`).

- "numpy" (pipeline.closed_form): the closed-form gradient in numpy, on the CPU, for the
  optimizers with a numpy implementation (pipeline.optimizers);
- "cuda-graph" (pipeline.graph_engine): autograd, each step replayed as a CUDA graph, on a
  CUDA GPU, when every batch has the same size (a graph replays one shape);
- "torch" (pipeline.torch_engine): autograd, on any device, with any optimizer, and the
  only one that trains hidden layers (``train.hidden``).

"auto" takes the first of these, in this order, that can train the run. Every engine
starts from the same seeded initialisation, takes the same batches and implements
:class:`Engine`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from weightlapse.pipeline.closed_form import ClosedFormEngine
from weightlapse.pipeline.datasets import Dataset
from weightlapse.pipeline.graph_engine import CudaGraphEngine
from weightlapse.pipeline.layers import parameter_count
from weightlapse.pipeline.optimizers import OPTIMIZERS, OptimizerSpec, closed_form_names, get_optimizer
from weightlapse.pipeline.params import ParamsError, TrainParams
from weightlapse.pipeline.torch_engine import TorchEngine
from weightlapse.pipeline.trainer import BlockCallback, RowsToFill, StepCallback


@runtime_checkable
class Engine(Protocol):
    """A run's model and optimizer, trained step by step.

    ``train(on_step)`` runs the loop; during ``on_step(step, loss)``, ``weight_now()`` (and
    ``bias_now()``, ``gradient_now()``) give the current parameters as numpy arrays, which
    the caller copies. An engine that has its rows a block at a time hands them to
    ``on_block(first_step, rows)`` when given one, and calls ``on_step`` for step 0 only.
    Given ``rows_to_fill`` too, an engine may instead write its steps straight into the
    rows ``rows_to_fill(first_step)`` lends (the writer's own buffer) and hand those to
    ``on_block`` when full (the numpy engine does).

    For resuming a run, ``optimizer_state()`` gives the optimizer's state as one float32
    vector (the arrays of its ``state_keys`` in pipeline.optimizers, key by key, parameter
    by parameter; None where the engine has no exact state for the step ``on_step`` is at),
    and ``restore(weight, bias, state, steps)`` puts a model back where it was after
    ``steps`` steps; ``train(on_step, start_step=steps)`` then carries on.
    """

    def weight_now(self) -> np.ndarray: ...

    def bias_now(self) -> np.ndarray | None: ...

    def gradient_now(self) -> np.ndarray: ...

    def optimizer_state(self) -> np.ndarray | None: ...

    def restore(self, weight: np.ndarray, bias: np.ndarray | None, state: np.ndarray, steps: int) -> None: ...

    def train(self, on_step: StepCallback, start_step: int = 0, on_block: BlockCallback | None = None,
              rows_to_fill: RowsToFill | None = None) -> None: ...


class EngineError(ParamsError):
    """params.yaml names an engine that cannot train the run on this machine."""


# (config, dataset, device, block_steps) -> the engine; block_steps is the trajectory
# writer's block, where the cuda-graph engine ends its ring blocks.
EngineBuilder = Callable[[TrainParams, Dataset, torch.device, int], Engine]

_DEVICE_NAMES = {"cpu": "the CPU", "cuda": "a CUDA GPU"}


@dataclass(frozen=True)
class EngineSpec:
    """One engine: where it can train a run, and how it is built."""

    name: str
    device_type: str | None  # the one device type it runs on; None: any
    needs_numpy_optimizer: bool  # the optimizer needs a numpy implementation (pipeline.optimizers)
    needs_capturable_optimizer: bool  # the optimizer's step must be capturable in a CUDA graph
    needs_even_batches: bool  # every batch of the run the same size
    build: EngineBuilder
    trains_hidden_layers: bool = False  # an MLP (train.hidden), not only softmax regression

    def refusal(self, optimizer: OptimizerSpec, device: torch.device, *, even_batches: bool,
                hidden: tuple[int, ...] = ()) -> str | None:
        """Why this engine cannot train ``optimizer`` on ``device`` (with ``hidden`` layers); None if it can."""
        if hidden and not self.trains_hidden_layers:
            return f"trains softmax regression only, and this run has hidden layers (hidden: {list(hidden)})"
        if self.device_type is not None and device.type != self.device_type:
            return f"runs on {_DEVICE_NAMES[self.device_type]} only, and this run trains on {device}"
        if self.needs_numpy_optimizer and optimizer.numpy_factory is None:
            return f"implements {', '.join(closed_form_names())}, not {optimizer.name!r}"
        if self.needs_capturable_optimizer and not optimizer.capturable:
            return f"cannot capture {optimizer.name}'s step in a CUDA graph"
        if self.needs_even_batches and not even_batches:
            return ("replays one batch shape, and this run's last batch of an epoch is short (the training "
                    "split is not a multiple of batch_size)")
        return None


def _numpy(config: TrainParams, dataset: Dataset, device: torch.device, block_steps: int) -> Engine:
    return ClosedFormEngine(config, dataset)


def _cuda_graph(config: TrainParams, dataset: Dataset, device: torch.device, block_steps: int) -> Engine:
    return CudaGraphEngine(config, dataset, device, block_steps=block_steps)


def _torch(config: TrainParams, dataset: Dataset, device: torch.device, block_steps: int) -> Engine:
    return TorchEngine(config, dataset, device)


# In the order "auto" prefers them: the fastest that can train the run.
ENGINES: dict[str, EngineSpec] = {spec.name: spec for spec in (
    EngineSpec("numpy", device_type="cpu", needs_numpy_optimizer=True, needs_capturable_optimizer=False,
               needs_even_batches=False, build=_numpy),
    EngineSpec("cuda-graph", device_type="cuda", needs_numpy_optimizer=False, needs_capturable_optimizer=True,
               needs_even_batches=True, build=_cuda_graph),
    EngineSpec("torch", device_type=None, needs_numpy_optimizer=False, needs_capturable_optimizer=False,
               needs_even_batches=False, build=_torch, trains_hidden_layers=True),
)}


def select_engine(config: TrainParams, device: torch.device, *, even_batches: bool) -> str:
    """The engine that trains this run on ``device``: the one params.yaml names, or for
    "auto" the first of :data:`ENGINES` that can. ``even_batches``: every batch of the run
    has the same size (the training split is a multiple of ``batch_size``).

    Raises EngineError, saying why and what would train it, if the named engine cannot."""
    optimizer = get_optimizer(config.optimizer)
    usable = [name for name, spec in ENGINES.items()
              if spec.refusal(optimizer, device, even_batches=even_batches, hidden=config.hidden) is None]
    if config.engine == "auto":
        return usable[0]
    spec = ENGINES.get(config.engine)
    if spec is None:
        raise EngineError(f"engine: unknown engine {config.engine!r}; choose auto or one of {', '.join(ENGINES)}")
    reason = spec.refusal(optimizer, device, even_batches=even_batches, hidden=config.hidden)
    if reason is None:
        return spec.name
    raise EngineError(f"engine: {spec.name} {reason}; use engine: {' or '.join(usable)} (or auto)")


def optimizer_state_size(config: TrainParams) -> int:
    """Length of a run's optimizer state vector, its checkpoint (0 for plain SGD, which keeps none)."""
    n_parameters = parameter_count(config.hidden, bias=config.bias)  # softmax regression's 7,840 (+10) for hidden: []
    return OPTIMIZERS[config.optimizer].state_size(n_parameters, config.momentum)
