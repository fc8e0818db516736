"""The two ways to train the model, behind one interface for the train stage.

Both start from the same seeded initialisation and take the same batches. ``train(on_step)``
runs the loop; during ``on_step(step, loss)``, ``weight_now()`` (and ``bias_now()``,
``gradient_now()``) give the current parameters as numpy arrays, which the caller copies.

For resuming a run, ``optimizer_state()`` gives the optimizer's state as one float32
vector (the arrays of :func:`optimizer_state_keys`, key by key, parameter by parameter),
and ``restore(weight, bias, state, steps)`` puts a model back where it was after
``steps`` steps; ``train(on_step, start_step=steps)`` then carries on.
"""

from __future__ import annotations

import numpy as np
import torch

from weightlapse.pipeline.closed_form import ClosedFormSoftmaxRegression, train_closed_form
from weightlapse.pipeline.datasets import N_CLASSES, N_PIXELS, Dataset
from weightlapse.pipeline.params import CLOSED_FORM_OPTIMIZERS, TrainParams
from weightlapse.pipeline.trainer import SoftmaxRegression, StepCallback, make_optimizer, train


def optimizer_state_keys(optimizer: str, momentum: float) -> tuple[str, ...]:
    """The per-parameter state arrays of a torch.optim optimizer, as torch names them."""
    if optimizer in ("adam", "adamw"):
        return ("exp_avg", "exp_avg_sq")
    if optimizer == "sgd":
        return ("momentum_buffer",) if momentum else ()
    if optimizer == "rmsprop":
        return ("square_avg",) + (("momentum_buffer",) if momentum else ())
    raise ValueError(f"unknown optimizer {optimizer!r}")


def optimizer_state_size(config: TrainParams) -> int:
    """Length of the optimizer state vector of a run (0 for plain SGD, which keeps none)."""
    n_parameters = N_CLASSES * N_PIXELS + (N_CLASSES if config.bias else 0)
    return n_parameters * len(optimizer_state_keys(config.optimizer, config.momentum))


def select_engine(engine: str, optimizer: str, device: torch.device, *, even_batches: bool = True) -> str:
    """The engine "auto" means here: "numpy" (closed-form gradient) on the CPU with the
    optimizers it implements, "cuda-graph" on CUDA when every batch has the same size (a
    graph replays one shape), else "torch". An engine named explicitly is kept, except
    "cuda-graph" with uneven batches, which falls back to "torch"."""
    if engine == "cuda-graph" and not even_batches:
        return "torch"
    if engine != "auto":
        return engine
    if device.type == "cuda":
        return "cuda-graph" if even_batches else "torch"
    return "numpy" if optimizer in CLOSED_FORM_OPTIMIZERS else "torch"


class TorchEngine:
    """The general path: a torch model trained with autograd, on any device."""

    def __init__(self, config: TrainParams, dataset: Dataset, device: torch.device, *,
                 capturable: bool = False) -> None:
        self.config = config
        self.model = SoftmaxRegression(N_PIXELS, N_CLASSES, bias=config.bias, seed=config.seed).to(device)
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

    def optimizer_state(self) -> np.ndarray:
        return self.optimizer_state_tensor().cpu().numpy()

    def optimizer_state_tensor(self) -> torch.Tensor:
        """The optimizer state as one float32 vector on the model's device (see the module docstring)."""
        device = self.model.weight.device
        vectors = []
        for key in optimizer_state_keys(self.config.optimizer, self.config.momentum):
            for p in self.model.parameters():
                value = self.optimizer.state.get(p, {}).get(key)  # none yet before the first step
                vectors.append(torch.zeros(p.numel(), device=device) if value is None
                               else value.detach().reshape(-1))
        return torch.cat(vectors) if vectors else torch.zeros(0, device=device)

    def restore(self, weight: np.ndarray, bias: np.ndarray | None, state: np.ndarray, steps: int) -> None:
        device = self.model.weight.device
        parameters = list(self.model.parameters())
        with torch.no_grad():
            self.model.weight.copy_(torch.from_numpy(weight))
            if bias is not None:
                self.model.bias.copy_(torch.from_numpy(bias))
        offset = 0
        states: dict[torch.nn.Parameter, dict] = {p: {} for p in parameters}
        for key in optimizer_state_keys(self.config.optimizer, self.config.momentum):
            for p in parameters:
                states[p][key] = torch.from_numpy(state[offset:offset + p.numel()].reshape(p.shape).copy()).to(device)
                offset += p.numel()
        if self.config.optimizer != "sgd":  # torch counts steps in the state (float32 tensor)
            for p in parameters:
                states[p]["step"] = torch.tensor(float(steps), dtype=torch.float32)
        for p in parameters:
            if states[p]:
                self.optimizer.state[p] = states[p]

    def train(self, on_step: StepCallback, start_step: int = 0) -> None:
        config = self.config
        train(self.model, self.optimizer, self.images, self.labels, batch_size=config.batch_size,
              epochs=config.epochs, seed=config.seed, max_steps=config.max_steps, on_step=on_step,
              start_step=start_step)


def closed_form_stack(configs: list[TrainParams]) -> ClosedFormSoftmaxRegression:
    """The numpy model of these runs, each initialised from its seed as the torch model is.
    They must differ in seed and lr only (pipeline.train.stack_key); the first sets the rest."""
    initial = [SoftmaxRegression(N_PIXELS, N_CLASSES, bias=config.bias, seed=config.seed) for config in configs]
    first = configs[0]
    return ClosedFormSoftmaxRegression(
        np.stack([model.weight.detach().numpy() for model in initial]),
        np.stack([model.bias.detach().numpy() for model in initial]) if first.bias else None,
        optimizer=first.optimizer, lr=[config.lr for config in configs], momentum=first.momentum,
        weight_decay=first.weight_decay)


class ClosedFormEngine:
    """The fast CPU path: the same model, initialisation and batches, stepped in numpy (a stack of one run)."""

    def __init__(self, config: TrainParams, dataset: Dataset) -> None:
        self.config = config
        self.model = closed_form_stack([config])
        self.images, self.labels = dataset.train.images, dataset.train.labels
        # Views of the run's slice: updated in place, like the arrays of the stack.
        self._weight, self._gradient = self.model.weight[0], self.model.weight_grad[0]
        self._bias = None if self.model.bias is None else self.model.bias[0]

    def weight_now(self) -> np.ndarray:
        return self._weight

    def bias_now(self) -> np.ndarray | None:
        return self._bias

    def gradient_now(self) -> np.ndarray:
        return self._gradient

    def optimizer_state(self) -> np.ndarray:
        return self.model.optimizer_state()

    def restore(self, weight: np.ndarray, bias: np.ndarray | None, state: np.ndarray, steps: int) -> None:
        self.model.restore(weight, bias, state, steps)

    def train(self, on_step: StepCallback, start_step: int = 0) -> None:
        config = self.config
        train_closed_form(self.model, self.images, self.labels, batch_size=config.batch_size,
                          epochs=config.epochs, seeds=[config.seed], max_steps=config.max_steps,
                          on_step=lambda step, losses: on_step(step, float(losses[0])), start_step=start_step)


def make_engine(engine: str, config: TrainParams, dataset: Dataset, device: torch.device, *,
                block_steps: int = 512) -> TorchEngine | ClosedFormEngine:
    """``block_steps``: the trajectory writer's block, where the cuda-graph engine ends its ring blocks."""
    if engine == "numpy":
        return ClosedFormEngine(config, dataset)
    if engine == "cuda-graph":
        from weightlapse.pipeline.graph_engine import CudaGraphEngine

        return CudaGraphEngine(config, dataset, device, block_steps=block_steps)
    return TorchEngine(config, dataset, device)
