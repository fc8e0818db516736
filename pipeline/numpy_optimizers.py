"""torch.optim's update formulas in numpy, for the closed-form engine (pipeline.closed_form).

Each class follows its torch.optim optimizer's single-tensor formula operation by
operation, in float32, so that numpy and autograd training agree to float32 rounding for
the same seed (tests/test_optimizers.py steps each against torch).

They update a stack of runs at once: every parameter and gradient has the run as its
first axis, and each run has its own learning rate (``lrs``, float64, as the Python
float torch is given). Their state is a dict of torch's state keys, each one array per
parameter (pipeline.optimizers.OptimizerSpec.state_keys orders it into a checkpoint).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which the autograd path uses too
ADAM_EPS = 1e-8

# (parameter, its gradient), updated in place; the first axis of each is the run.
Pairs = Sequence[tuple[np.ndarray, np.ndarray]]
# torch's state key -> one array per parameter, shaped like it
State = dict[str, list[np.ndarray]]


def _f32(value: float) -> np.float32:
    # torch casts a Python scalar to the tensor's float32 before the elementwise op: so do we.
    return np.float32(value)


def _per_run(values: np.ndarray, param: np.ndarray) -> np.ndarray:
    """One float32 scalar per run (computed in float64 as torch computes its Python scalars),
    shaped to broadcast over that run's slice of ``param``."""
    return values.astype(np.float32).reshape((len(values),) + (1,) * (param.ndim - 1))


class Adam:
    """torch.optim.Adam / AdamW (single-tensor, amsgrad off), in the same operation order."""

    def __init__(self, pairs: Pairs, *, lrs: np.ndarray, weight_decay: float = 0.0, decoupled: bool = False,
                 betas: tuple[float, float] = ADAM_BETAS, eps: float = ADAM_EPS) -> None:
        self.pairs, self.lrs, self.weight_decay, self.decoupled = pairs, lrs, weight_decay, decoupled
        self.beta1, self.beta2, self.eps = betas[0], betas[1], eps
        self.steps = 0
        self.exp_avg = [np.zeros_like(param) for param, _ in pairs]
        self.exp_avg_sq = [np.zeros_like(param) for param, _ in pairs]
        self._scratch = [np.empty_like(param) for param, _ in pairs]
        self._denom = [np.empty_like(param) for param, _ in pairs]

    def state(self) -> State:
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state(self, state: State, steps: int) -> None:
        for key, targets in self.state().items():
            for target, value in zip(targets, state[key], strict=True):
                target[...] = value
        self.steps = steps

    def step(self) -> None:
        self.steps += 1
        step = self.steps
        bias_correction1 = 1 - self.beta1 ** step
        bias_correction2 = 1 - self.beta2 ** step
        step_sizes = self.lrs / bias_correction1
        one_minus_beta1, beta2, one_minus_beta2 = _f32(1 - self.beta1), _f32(self.beta2), _f32(1 - self.beta2)
        bias_correction2_sqrt, eps = _f32(bias_correction2 ** 0.5), _f32(self.eps)
        for (param, grad), exp_avg, exp_avg_sq, scratch, denom in zip(
                self.pairs, self.exp_avg, self.exp_avg_sq, self._scratch, self._denom):
            if self.weight_decay:
                if self.decoupled:
                    param *= _per_run(1 - self.lrs * self.weight_decay, param)
                else:
                    grad = grad + _f32(self.weight_decay) * param
            # exp_avg.lerp_(grad, 1 - beta1)
            np.subtract(grad, exp_avg, out=scratch)
            scratch *= one_minus_beta1
            exp_avg += scratch
            # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            exp_avg_sq *= beta2
            np.multiply(grad, one_minus_beta2, out=scratch)
            scratch *= grad
            exp_avg_sq += scratch
            # denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            np.sqrt(exp_avg_sq, out=denom)
            denom /= bias_correction2_sqrt
            denom += eps
            # param.addcdiv_(exp_avg, denom, value=-step_size)
            np.multiply(exp_avg, _per_run(-step_sizes, param), out=scratch)
            scratch /= denom
            param += scratch


class SGD:
    """torch.optim.SGD (single-tensor, no dampening, not Nesterov), in the same operation order."""

    def __init__(self, pairs: Pairs, *, lrs: np.ndarray, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        self.pairs, self.momentum, self.weight_decay = pairs, momentum, weight_decay
        self._minus_lrs = [_per_run(-lrs, param) for param, _ in pairs]
        self.buffers: list[np.ndarray | None] = [None] * len(pairs)
        self._scratch = [np.empty_like(param) for param, _ in pairs]

    def state(self) -> State:
        if not self.momentum:
            return {}
        # before the first step torch has no buffer: it checkpoints as zeros
        return {"momentum_buffer": [np.zeros_like(param) if buffer is None else buffer
                                    for (param, _), buffer in zip(self.pairs, self.buffers)]}

    def load_state(self, state: State, steps: int) -> None:
        if self.momentum and steps > 0:  # before the first step torch has no buffer either
            self.buffers = [np.array(value, dtype=np.float32) for value in state["momentum_buffer"]]

    def step(self) -> None:
        for index, ((param, grad), scratch, minus_lr) in enumerate(zip(self.pairs, self._scratch, self._minus_lrs)):
            if self.weight_decay:
                grad = grad + _f32(self.weight_decay) * param
            if self.momentum:
                buffer = self.buffers[index]
                if buffer is None:
                    buffer = self.buffers[index] = grad.copy()
                else:
                    buffer *= _f32(self.momentum)
                    buffer += grad
                grad = buffer
            np.multiply(grad, minus_lr, out=scratch)
            param += scratch
