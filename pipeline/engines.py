"""The two ways to train the model, behind one interface for the train stage.

Both start from the same seeded initialisation and take the same batches. ``train(on_step)``
runs the loop; during ``on_step(step, loss)``, ``weight_now()`` (and ``bias_now()``,
``gradient_now()``) give the current parameters as numpy arrays, which the caller copies.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.closed_form import ClosedFormSoftmaxRegression, train_closed_form
from pipeline.datasets import N_CLASSES, N_PIXELS, Dataset
from pipeline.params import CLOSED_FORM_OPTIMIZERS, TrainParams
from pipeline.trainer import SoftmaxRegression, StepCallback, make_optimizer, train


def select_engine(engine: str, optimizer: str, device: torch.device) -> str:
    """"numpy" (closed-form gradient) where it applies and was not ruled out, else "torch"."""
    if engine != "auto":
        return engine
    return "numpy" if device.type == "cpu" and optimizer in CLOSED_FORM_OPTIMIZERS else "torch"


class TorchEngine:
    """The general path: a torch model trained with autograd, on any device."""

    def __init__(self, config: TrainParams, dataset: Dataset, device: torch.device) -> None:
        self.config = config
        self.model = SoftmaxRegression(N_PIXELS, N_CLASSES, bias=config.bias, seed=config.seed).to(device)
        self.optimizer = make_optimizer(self.model.parameters(), name=config.optimizer, lr=config.lr,
                                        momentum=config.momentum, weight_decay=config.weight_decay)
        self.images = torch.from_numpy(dataset.train.images).to(device)
        self.labels = torch.from_numpy(dataset.train.labels).to(device)

    def weight_now(self) -> np.ndarray:
        return self.model.weight.detach().cpu().numpy()

    def bias_now(self) -> np.ndarray | None:
        return None if self.model.bias is None else self.model.bias.detach().cpu().numpy()

    def gradient_now(self) -> np.ndarray:
        return self.model.weight.grad.detach().cpu().numpy()

    def train(self, on_step: StepCallback) -> None:
        config = self.config
        train(self.model, self.optimizer, self.images, self.labels, batch_size=config.batch_size,
              epochs=config.epochs, seed=config.seed, max_steps=config.max_steps, on_step=on_step)


class ClosedFormEngine:
    """The fast CPU path: the same model, initialisation and batches, stepped in numpy."""

    def __init__(self, config: TrainParams, dataset: Dataset) -> None:
        self.config = config
        initial = SoftmaxRegression(N_PIXELS, N_CLASSES, bias=config.bias, seed=config.seed)
        self.model = ClosedFormSoftmaxRegression(
            initial.weight.detach().numpy(), None if initial.bias is None else initial.bias.detach().numpy(),
            optimizer=config.optimizer, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        self.images, self.labels = dataset.train.images, dataset.train.labels

    def weight_now(self) -> np.ndarray:
        return self.model.weight

    def bias_now(self) -> np.ndarray | None:
        return self.model.bias

    def gradient_now(self) -> np.ndarray:
        return self.model.weight_grad

    def train(self, on_step: StepCallback) -> None:
        config = self.config
        train_closed_form(self.model, self.images, self.labels, batch_size=config.batch_size,
                          epochs=config.epochs, seed=config.seed, max_steps=config.max_steps, on_step=on_step)


def make_engine(engine: str, config: TrainParams, dataset: Dataset,
                device: torch.device) -> TorchEngine | ClosedFormEngine:
    return ClosedFormEngine(config, dataset) if engine == "numpy" else TorchEngine(config, dataset, device)
