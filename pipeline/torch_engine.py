"""The torch engine: softmax regression, or the MLP of ``train.hidden`` (pipeline.mlp),
trained with autograd on any device (pipeline.trainer), behind the engines' interface
(pipeline.engines.Engine). The cuda-graph engine (pipeline.graph_engine) is this engine
with its steps replayed from a CUDA graph.
"""

from __future__ import annotations

import numpy as np
import torch

from weightlapse.pipeline.datasets import N_CLASSES, N_PIXELS, Dataset
from weightlapse.pipeline.mlp import MLP
from weightlapse.pipeline.optimizers import get_optimizer
from weightlapse.pipeline.params import TrainParams
from weightlapse.pipeline.trainer import SoftmaxRegression, StepCallback, make_optimizer, train


class TorchEngine:
    """The general path: a torch model trained with autograd, on any device.

    A network run (``train.hidden``) has no single (class, pixel) matrix: its recording reads
    :meth:`parameters_now` instead of ``weight_now``, and resumes with :meth:`restore_parameters`.
    """

    def __init__(self, config: TrainParams, dataset: Dataset, device: torch.device, *,
                 capturable: bool = False) -> None:
        self.config = config
        self.optimizer_spec = get_optimizer(config.optimizer)
        self.model = (MLP(config.hidden, activation=config.activation, bias=config.bias, seed=config.seed)
                      if config.hidden else SoftmaxRegression(N_PIXELS, N_CLASSES, bias=config.bias, seed=config.seed)
                      ).to(device)
        self.optimizer = make_optimizer(self.model.parameters(), name=config.optimizer, lr=config.lr,
                                        momentum=config.momentum, weight_decay=config.weight_decay,
                                        capturable=capturable)
        self.images = torch.from_numpy(dataset.train.images).to(device)
        self.labels = torch.from_numpy(dataset.train.labels).to(device)

    def weight_now(self) -> np.ndarray:
        return self.model.weight.detach().cpu().numpy()

    def bias_now(self) -> np.ndarray | None:
        return None if self.model.bias is None else self.model.bias.detach().cpu().numpy()

    def gradient_now(self) -> np.ndarray:
        return self.model.weight.grad.detach().cpu().numpy()

    def parameters_now(self) -> list[torch.Tensor]:
        """The model's parameters, live, in its order (pipeline.layers.parameter_shapes for an MLP)."""
        return [p.detach() for p in self.model.parameters()]

    def optimizer_state(self) -> np.ndarray:
        return self.optimizer_state_tensor().cpu().numpy()

    def _state_keys(self) -> tuple[str, ...]:
        return self.optimizer_spec.state_keys(self.config.momentum)

    def optimizer_state_tensor(self) -> torch.Tensor:
        """The optimizer state as one float32 vector on the model's device (pipeline.engines.Engine)."""
        device = next(self.model.parameters()).device
        vectors = []
        for key in self._state_keys():
            for p in self.model.parameters():
                value = self.optimizer.state.get(p, {}).get(key)  # none yet before the first step
                vectors.append(torch.zeros(p.numel(), device=device) if value is None
                               else value.detach().reshape(-1))
        return torch.cat(vectors) if vectors else torch.zeros(0, device=device)

    def restore(self, weight: np.ndarray, bias: np.ndarray | None, state: np.ndarray, steps: int) -> None:
        self.restore_parameters([weight] if bias is None else [weight, bias], state, steps)

    def restore_parameters(self, values: list[np.ndarray], state: np.ndarray, steps: int) -> None:
        """Put the model (its parameters' ``values``, in its order) and optimizer back where
        they were after ``steps`` steps (pipeline.engines.Engine.restore)."""
        parameters = list(self.model.parameters())
        device = parameters[0].device
        with torch.no_grad():
            for parameter, value in zip(parameters, values, strict=True):
                parameter.copy_(torch.from_numpy(value))
        offset = 0
        states: dict[torch.nn.Parameter, dict] = {p: {} for p in parameters}
        for key in self._state_keys():
            for p in parameters:
                states[p][key] = torch.from_numpy(state[offset:offset + p.numel()].reshape(p.shape).copy()).to(device)
                offset += p.numel()
        if self.optimizer_spec.counts_steps:  # torch counts steps in the state (float32 tensor)
            for p in parameters:
                states[p]["step"] = torch.tensor(float(steps), dtype=torch.float32)
        for p in parameters:
            if states[p]:
                self.optimizer.state[p] = states[p]

    def train(self, on_step: StepCallback, start_step: int = 0, on_block=None, rows_to_fill=None) -> None:
        """``on_block`` and ``rows_to_fill`` are not used: this engine hands over its rows one step at a time."""
        config = self.config
        train(self.model, self.optimizer, self.images, self.labels, batch_size=config.batch_size,
              epochs=config.epochs, seed=config.seed, max_steps=config.max_steps, on_step=on_step,
              start_step=start_step)
