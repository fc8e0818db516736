"""The training loop: softmax regression, seeded batches, one callback per optimizer step.

Pure computation on tensors: nothing here reads params or touches disk. The loop calls
``on_step(step, loss)`` after every optimizer step (and once for step 0, before any), and
the caller decides what to record, as in minGPT's trainer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from weightlapse.pipeline.optimizers import get_optimizer


class DeviceError(RuntimeError):
    """The requested device is not available."""


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device: 'cuda' was requested but torch sees no CUDA GPU; "
                          "use device: auto (or cpu), or install a CUDA build of torch")
    return torch.device(name)


def derive_seeds(seed: int) -> tuple[int, int]:
    """Independent seeds for initialisation and shuffling, so options that change one
    (a bias adds parameters) leave the other's stream untouched."""
    init_state, shuffle_state = np.random.SeedSequence(seed).spawn(2)
    return int(init_state.generate_state(1)[0]), int(shuffle_state.generate_state(1)[0])


class SoftmaxRegression(nn.Module):
    """784 -> 10 linear map followed by log-softmax; no bias unless asked (the original had none)."""

    def __init__(self, n_pixels: int = 784, n_classes: int = 10, *, bias: bool = False,
                 seed: int = 0) -> None:
        super().__init__()
        self.linear = nn.Linear(n_pixels, n_classes, bias=bias)
        # nn.Linear's own initialisation (U(-1/sqrt(fan_in), 1/sqrt(fan_in))) from a seeded
        # generator instead of the global RNG.
        generator = torch.Generator().manual_seed(derive_seeds(seed)[0])
        bound = 1.0 / math.sqrt(n_pixels)
        with torch.no_grad():
            self.linear.weight.uniform_(-bound, bound, generator=generator)
            if bias:
                self.linear.bias.uniform_(-bound, bound, generator=generator)

    @property
    def weight(self) -> torch.Tensor:  # (class, pixel)
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:  # (class,)
        return self.linear.bias

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (sample, pixel) -> (sample, class)
        return F.log_softmax(self.linear(images), dim=1)


def make_optimizer(parameters, *, name: str, lr: float, momentum: float = 0.0,
                   weight_decay: float = 0.0, capturable: bool = False) -> torch.optim.Optimizer:
    """The torch optimizer ``name`` of pipeline.optimizers. ``capturable``: its step count
    stays on the device, so a CUDA graph can hold its step."""
    return get_optimizer(name).make_torch(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                          capturable=capturable)


def plan_steps(n_samples: int, *, batch_size: int, epochs: int, max_steps: int | None) -> int:
    """Optimizer steps a run takes: every batch of every epoch (the last may be short)."""
    if n_samples < 1:
        raise ValueError("the training split is empty")
    total = math.ceil(n_samples / batch_size) * epochs
    return min(total, max_steps) if max_steps is not None else total


def plan_evals(n_steps: int, every: int) -> tuple[int, ...]:
    """Steps at which held-out data is scored: 0, every, 2*every, ..., and the last step."""
    steps = list(range(0, n_steps + 1, every))
    if steps[-1] != n_steps:
        steps.append(n_steps)
    return tuple(steps)


def epoch_orders(n_samples: int, *, epochs: int, seed: int) -> Iterator[torch.Tensor]:
    """The order in which each epoch visits the samples: a seeded permutation per epoch."""
    generator = torch.Generator().manual_seed(derive_seeds(seed)[1])
    for _ in range(epochs):
        yield torch.randperm(n_samples, generator=generator)


def batch_indices(n_samples: int, *, batch_size: int, epochs: int, seed: int,
                  max_steps: int | None = None) -> Iterator[torch.Tensor]:
    """Sample indices of each batch: a fresh seeded permutation per epoch, in order."""
    n_steps = plan_steps(n_samples, batch_size=batch_size, epochs=epochs, max_steps=max_steps)
    step = 0
    for order in epoch_orders(n_samples, epochs=epochs, seed=seed):
        for start in range(0, n_samples, batch_size):
            if step == n_steps:
                return
            yield order[start:start + batch_size]
            step += 1


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    loss: float


@torch.no_grad()
def evaluate(weight: np.ndarray, bias: np.ndarray | None, images: torch.Tensor,
             labels: torch.Tensor) -> Evaluation:
    """Held-out accuracy and mean loss of softmax regression with these (class, pixel) weights.

    Takes the weights as recorded rather than a live model, so it can score a step on
    another thread while training goes on.
    """
    log_probs = F.log_softmax(F.linear(images, torch.from_numpy(weight).to(images.device),
                                       None if bias is None else torch.from_numpy(bias).to(images.device)), dim=1)
    loss = F.nll_loss(log_probs, labels).item()
    accuracy = (log_probs.argmax(dim=1) == labels).float().mean().item()
    return Evaluation(accuracy=accuracy, loss=loss)


StepCallback = Callable[[int, float], None]
# on_block(first_step, {"weight": (n, class, pixel), "loss": (n,), ...}): a block of recorded rows
BlockCallback = Callable[[int, dict[str, np.ndarray]], None]
# rows_to_fill(first_step): rows like a block's, lent for an engine to write the steps from first_step on into
RowsToFill = Callable[[int], dict[str, np.ndarray]]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
          labels: torch.Tensor, *, batch_size: int, epochs: int, seed: int,
          max_steps: int | None = None, on_step: StepCallback, start_step: int = 0) -> None:
    """Train with shuffled mini-batches; ``images`` (sample, pixel) and ``labels`` on the model's device.

    Calls ``on_step(0, nan)`` first, then ``on_step(t, loss_t)`` right after optimizer step t,
    while the model holds the weights after t steps and ``.grad`` the gradient of step t.
    With ``start_step`` s, the model and optimizer hold the state after s steps and training
    continues with step s + 1, on the batches an uninterrupted run would use.
    """
    if start_step == 0:
        on_step(0, float("nan"))
    for step, batch in remaining_batches(len(images), batch_size=batch_size, epochs=epochs, seed=seed,
                                         max_steps=max_steps, start_step=start_step):
        batch = batch.to(images.device)
        optimizer.zero_grad(set_to_none=True)
        loss = F.nll_loss(model(images[batch]), labels[batch])
        loss.backward()
        optimizer.step()
        on_step(step, loss.item())


def remaining_batches(n_samples: int, *, batch_size: int, epochs: int, seed: int, max_steps: int | None,
                      start_step: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(step, sample indices) for the steps after ``start_step``: the shuffles are redrawn from
    the seed, so a resumed run takes exactly the batches an uninterrupted one would."""
    batches = batch_indices(n_samples, batch_size=batch_size, epochs=epochs, seed=seed, max_steps=max_steps)
    for step, batch in enumerate(batches, start=1):
        if step > start_step:
            yield step, batch
