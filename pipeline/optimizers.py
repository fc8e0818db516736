"""The optimizers a run can train with: one entry each in :data:`OPTIMIZERS`.

An entry is everything the pipeline knows about an optimizer: the hyper-parameters of
params.yaml it takes (pipeline.params validates them through it), how to build it in
torch (pipeline.trainer.make_optimizer), its numpy implementation for the closed-form
engine or None (pipeline.closed_form), the per-parameter state arrays a checkpoint holds
and in which order (both the torch and the numpy engines write and read them so), and
whether the cuda-graph engine can capture its step (pipeline.engines).

Adding an optimizer is one entry here plus its cases in tests/test_optimizers.py, which
steps its torch and numpy implementations side by side and checks the state layout.

Importing this module does not import torch (validating params.yaml should not load it):
the torch factories import it when they build an optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from weightlapse.pipeline import numpy_optimizers
from weightlapse.pipeline.numpy_optimizers import Pairs, State

if TYPE_CHECKING:  # annotations only: see the module docstring
    import torch

# The optimizer hyper-parameters of params.yaml besides lr, which every optimizer takes.
HYPERPARAMETERS = ("momentum", "weight_decay")


class NumpyOptimizer(Protocol):
    """What the closed-form engine needs of a numpy implementation (pipeline.numpy_optimizers)."""

    def step(self) -> None: ...

    def state(self) -> State: ...

    def load_state(self, state: State, steps: int) -> None: ...


# torch factory: (parameters, lr, momentum, weight_decay, capturable) -> torch.optim.Optimizer
TorchFactory = Callable[..., "torch.optim.Optimizer"]
# numpy factory: (pairs, lrs, momentum, weight_decay) -> NumpyOptimizer
NumpyFactory = Callable[..., NumpyOptimizer]


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer. ``numpy_factory`` and ``capturable`` have no default: each entry decides them."""

    name: str
    # which of HYPERPARAMETERS it takes; any other must be 0 in params.yaml
    hyperparameters: tuple[str, ...]
    torch_factory: TorchFactory
    # its closed-form (numpy) implementation; None: the numpy engine cannot train it
    numpy_factory: NumpyFactory | None
    # torch's per-parameter state keys, in checkpoint order, given the momentum
    state_keys: Callable[[float], tuple[str, ...]]
    # torch also keeps a "step" count in each parameter's state (restored from the checkpoint's step)
    counts_steps: bool
    # the cuda-graph engine can capture its step (with capturable=True, its step count stays on the GPU)
    capturable: bool

    def refusal(self, *, momentum: float, weight_decay: float) -> str | None:
        """What is wrong with these params.yaml values for this optimizer; None if nothing."""
        for key, value in (("momentum", momentum), ("weight_decay", weight_decay)):
            if value and key not in self.hyperparameters:
                takers = [spec.name for spec in OPTIMIZERS.values() if key in spec.hyperparameters]
                return (f"{key}: {self.name} has no {key} parameter (it takes lr"
                        f"{''.join(', ' + taken for taken in self.hyperparameters)}); set {key} to 0 or use "
                        f"{'/'.join(takers)}")
        return None

    def make_torch(self, parameters: Iterable[torch.Tensor], *, lr: float, momentum: float = 0.0,
                   weight_decay: float = 0.0, capturable: bool = False) -> torch.optim.Optimizer:
        """``capturable``: build it so that a CUDA graph can hold its step (see ``capturable``)."""
        if capturable and not self.capturable:
            raise ValueError(f"{self.name}'s step cannot be captured in a CUDA graph; train it with engine: torch")
        return self.torch_factory(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                  capturable=capturable)

    def make_numpy(self, pairs: Pairs, *, lrs: np.ndarray, momentum: float = 0.0,
                   weight_decay: float = 0.0) -> NumpyOptimizer:
        if self.numpy_factory is None:
            raise ValueError(f"no closed-form path for optimizer {self.name!r} (there is one for "
                             f"{', '.join(closed_form_names())}); use engine: torch")
        return self.numpy_factory(pairs, lrs=lrs, momentum=momentum, weight_decay=weight_decay)

    def state_size(self, n_parameters: int, momentum: float) -> int:
        """Length of a checkpoint's optimizer state vector for a model of ``n_parameters`` numbers."""
        return n_parameters * len(self.state_keys(momentum))


def _optim():
    import torch.optim  # here, not at the top: params.yaml is validated without loading torch

    return torch.optim


def _torch_adam(parameters, *, lr, momentum, weight_decay, capturable):
    return _optim().Adam(parameters, lr=lr, weight_decay=weight_decay, capturable=capturable)


def _torch_adamw(parameters, *, lr, momentum, weight_decay, capturable):
    return _optim().AdamW(parameters, lr=lr, weight_decay=weight_decay, capturable=capturable)


def _torch_sgd(parameters, *, lr, momentum, weight_decay, capturable):
    # SGD keeps no step count, so a CUDA graph holds its step as it is
    return _optim().SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _torch_rmsprop(parameters, *, lr, momentum, weight_decay, capturable):
    return _optim().RMSprop(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay, capturable=capturable)


def _numpy_adam(pairs, *, lrs, momentum, weight_decay):
    return numpy_optimizers.Adam(pairs, lrs=lrs, weight_decay=weight_decay)


def _numpy_adamw(pairs, *, lrs, momentum, weight_decay):
    return numpy_optimizers.Adam(pairs, lrs=lrs, weight_decay=weight_decay, decoupled=True)


def _numpy_sgd(pairs, *, lrs, momentum, weight_decay):
    return numpy_optimizers.SGD(pairs, lrs=lrs, momentum=momentum, weight_decay=weight_decay)


def _adam_state(momentum: float) -> tuple[str, ...]:
    return ("exp_avg", "exp_avg_sq")


def _sgd_state(momentum: float) -> tuple[str, ...]:
    return ("momentum_buffer",) if momentum else ()


def _rmsprop_state(momentum: float) -> tuple[str, ...]:
    return ("square_avg",) + (("momentum_buffer",) if momentum else ())


OPTIMIZERS: dict[str, OptimizerSpec] = {spec.name: spec for spec in (
    OptimizerSpec("adam", ("weight_decay",), torch_factory=_torch_adam, numpy_factory=_numpy_adam,
                  state_keys=_adam_state, counts_steps=True, capturable=True),
    OptimizerSpec("adamw", ("weight_decay",), torch_factory=_torch_adamw, numpy_factory=_numpy_adamw,
                  state_keys=_adam_state, counts_steps=True, capturable=True),
    OptimizerSpec("sgd", ("momentum", "weight_decay"), torch_factory=_torch_sgd, numpy_factory=_numpy_sgd,
                  state_keys=_sgd_state, counts_steps=False, capturable=True),
    OptimizerSpec("rmsprop", ("momentum", "weight_decay"), torch_factory=_torch_rmsprop, numpy_factory=None,
                  state_keys=_rmsprop_state, counts_steps=True, capturable=True),
)}


def get_optimizer(name: str) -> OptimizerSpec:
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}") from None


def closed_form_names() -> tuple[str, ...]:
    """The optimizers the numpy engine trains."""
    return tuple(name for name, spec in OPTIMIZERS.items() if spec.numpy_factory is not None)
