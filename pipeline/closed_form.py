"""Softmax regression trained with its closed-form gradient in numpy: the fast CPU path.

For log-softmax followed by the mean negative log-likelihood, the gradient with respect to
the logits is ``(softmax - one_hot) / batch``, so a step needs two small matrix products
and no autograd graph. On this model the autograd path's cost is per-operation dispatch
(tens of tiny torch calls a step), not arithmetic, and a numpy call costs less.

The optimizers below follow ``torch.optim``'s single-tensor formulas operation by operation,
in float32, so this path and the autograd path (pipeline.trainer) agree to float32 rounding
for the same seed. tests/test_closed_form.py checks it against autograd. Other models and
optimizers take the autograd path.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from pipeline.params import CLOSED_FORM_OPTIMIZERS
from pipeline.trainer import remaining_batches

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which the autograd path uses too
ADAM_EPS = 1e-8


class ClosedFormSoftmaxRegression:
    """Softmax regression whose parameters are numpy arrays updated in place each step.

    ``weight`` is (class, pixel) and ``bias`` (class,) or None, as in nn.Linear. After
    :meth:`step`, ``weight_grad`` and ``bias_grad`` hold the gradient that step applied.
    """

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, *, optimizer: str, lr: float,
                 momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        self.weight = np.array(weight, dtype=np.float32, order="C")
        self.bias = None if bias is None else np.array(bias, dtype=np.float32)
        self.weight_grad = np.zeros_like(self.weight)
        self.bias_grad = None if bias is None else np.zeros_like(self.bias)
        pairs = [(self.weight, self.weight_grad)]
        if self.bias is not None:
            pairs.append((self.bias, self.bias_grad))
        self._optimizer = make_closed_form_optimizer(pairs, name=optimizer, lr=lr, momentum=momentum,
                                                     weight_decay=weight_decay)
        self._logits: np.ndarray | None = None  # work arrays, sized at the first batch

    def step(self, images: np.ndarray, labels: np.ndarray) -> float:
        """One optimizer step on a batch, (sample, pixel) float32 and (sample,) int; returns its loss."""
        n = len(labels)
        if self._logits is None or len(self._logits) != n:  # the last batch of an epoch may be short
            self._logits = np.empty((n, len(self.weight)), np.float32)
            self._rows = np.arange(n)
        logits, rows = self._logits, self._rows
        np.matmul(images, self.weight.T, out=logits)
        if self.bias is not None:
            logits += self.bias
        logits -= logits.max(axis=1, keepdims=True)  # softmax is shift-invariant; exp cannot overflow
        target_logit = logits[rows, labels]
        np.exp(logits, out=logits)
        sums = logits.sum(axis=1)
        loss = float(np.mean(np.log(sums) - target_logit))
        # d(mean NLL)/d(logits) = (softmax - one_hot) / n
        logits /= sums[:, None]
        logits[rows, labels] -= 1.0
        logits *= np.float32(1.0 / n)
        np.matmul(logits.T, images, out=self.weight_grad)
        if self.bias is not None:
            np.sum(logits, axis=0, out=self.bias_grad)
        self._optimizer.step()
        return loss

    def optimizer_state(self) -> np.ndarray:
        """The optimizer's state as one float32 vector, in pipeline.engines' order (a copy)."""
        arrays = self._optimizer.state_arrays()
        return np.concatenate([a.ravel() for a in arrays]) if arrays else np.zeros(0, np.float32)

    def restore(self, weight: np.ndarray, bias: np.ndarray | None, state: np.ndarray, steps: int) -> None:
        """Put the model where it was after ``steps`` steps: its parameters and optimizer state."""
        self.weight[...] = weight
        if self.bias is not None:
            self.bias[...] = bias
        arrays, offset = [], 0
        for target in self._optimizer.state_arrays():
            arrays.append(state[offset:offset + target.size].reshape(target.shape))
            offset += target.size
        if offset != len(state):
            raise ValueError(f"optimizer state of {len(state)} values, expected {offset}")
        self._optimizer.load_state(arrays, steps)


Pairs = Sequence[tuple[np.ndarray, np.ndarray]]  # (parameter, its gradient), updated in place


def make_closed_form_optimizer(pairs: Pairs, *, name: str, lr: float, momentum: float = 0.0,
                               weight_decay: float = 0.0) -> Adam | SGD:
    if name in ("adam", "adamw"):
        return Adam(pairs, lr=lr, weight_decay=weight_decay, decoupled=name == "adamw")
    if name == "sgd":
        return SGD(pairs, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"no closed-form path for optimizer {name!r} (it has one for {', '.join(CLOSED_FORM_OPTIMIZERS)}); "
                     "use engine: torch")


def _f32(value: float) -> np.float32:
    # torch casts a Python scalar to the tensor's float32 before the elementwise op: so do we.
    return np.float32(value)


class Adam:
    """torch.optim.Adam / AdamW (single-tensor, amsgrad off), in the same operation order."""

    def __init__(self, pairs: Pairs, *, lr: float, weight_decay: float = 0.0, decoupled: bool = False,
                 betas: tuple[float, float] = ADAM_BETAS, eps: float = ADAM_EPS) -> None:
        self.pairs, self.lr, self.weight_decay, self.decoupled = pairs, lr, weight_decay, decoupled
        self.beta1, self.beta2, self.eps = betas[0], betas[1], eps
        self.steps = 0
        self.exp_avg = [np.zeros_like(param) for param, _ in pairs]
        self.exp_avg_sq = [np.zeros_like(param) for param, _ in pairs]
        self._scratch = [np.empty_like(param) for param, _ in pairs]
        self._denom = [np.empty_like(param) for param, _ in pairs]

    def state_arrays(self) -> list[np.ndarray]:
        return [*self.exp_avg, *self.exp_avg_sq]  # torch's keys in order: exp_avg, exp_avg_sq

    def load_state(self, arrays: list[np.ndarray], steps: int) -> None:
        for target, value in zip(self.state_arrays(), arrays):
            target[...] = value
        self.steps = steps

    def step(self) -> None:
        self.steps += 1
        step = self.steps
        bias_correction1 = 1 - self.beta1 ** step
        bias_correction2 = 1 - self.beta2 ** step
        step_size = self.lr / bias_correction1
        one_minus_beta1, beta2, one_minus_beta2 = _f32(1 - self.beta1), _f32(self.beta2), _f32(1 - self.beta2)
        bias_correction2_sqrt, eps = _f32(bias_correction2 ** 0.5), _f32(self.eps)
        for (param, grad), exp_avg, exp_avg_sq, scratch, denom in zip(
                self.pairs, self.exp_avg, self.exp_avg_sq, self._scratch, self._denom):
            if self.weight_decay:
                if self.decoupled:
                    param *= _f32(1 - self.lr * self.weight_decay)
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
            np.multiply(exp_avg, _f32(-step_size), out=scratch)
            scratch /= denom
            param += scratch


class SGD:
    """torch.optim.SGD (single-tensor, no dampening, not Nesterov), in the same operation order."""

    def __init__(self, pairs: Pairs, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        self.pairs, self.lr, self.momentum, self.weight_decay = pairs, lr, momentum, weight_decay
        self.buffers: list[np.ndarray | None] = [None] * len(pairs)
        self._scratch = [np.empty_like(param) for param, _ in pairs]

    def state_arrays(self) -> list[np.ndarray]:
        if not self.momentum:
            return []
        return [np.zeros_like(param) if buffer is None else buffer
                for (param, _), buffer in zip(self.pairs, self.buffers)]

    def load_state(self, arrays: list[np.ndarray], steps: int) -> None:
        if self.momentum and steps > 0:  # before the first step torch has no buffer either
            self.buffers = [np.array(value, dtype=np.float32) for value in arrays]

    def step(self) -> None:
        for index, ((param, grad), scratch) in enumerate(zip(self.pairs, self._scratch)):
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
            np.multiply(grad, _f32(-self.lr), out=scratch)
            param += scratch


@contextlib.contextmanager
def flush_denormals():
    """Treat subnormal floats as zero on this thread while the block runs.

    Adam's first moment of a pixel that is rarely lit decays by 0.9 a step into the
    subnormal range, where each arithmetic operation costs many times a normal one; that
    made a numpy step about 1.6 times slower. Values that small (below 1.2e-38) move no
    float32 weight, so the trajectory's weights are unchanged (the test against autograd
    checks it). torch sets the CPU's flush-to-zero flags, which numpy's loops obey too.
    """
    # set_flush_denormal returns whether the CPU supports it, not the previous setting;
    # torch's default, which this restores, is off.
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported:
            torch.set_flush_denormal(False)


def train_closed_form(model: ClosedFormSoftmaxRegression, images: np.ndarray, labels: np.ndarray, *,
                      batch_size: int, epochs: int, seed: int, max_steps: int | None = None,
                      on_step: Callable[[int, float], None], start_step: int = 0) -> None:
    """Train ``model`` as pipeline.trainer.train trains a torch model: same batches, same calls.

    Calls ``on_step(0, nan)`` first, then ``on_step(t, loss_t)`` right after step t, while
    ``model.weight`` holds the weights after t steps and ``model.weight_grad`` the gradient
    of step t. With ``start_step`` s, ``model`` holds the state after s steps (see
    :meth:`ClosedFormSoftmaxRegression.load_state`) and training continues with step s + 1.
    """
    if start_step == 0:
        on_step(0, math.nan)
    with flush_denormals():
        for step, batch in remaining_batches(len(images), batch_size=batch_size, epochs=epochs, seed=seed,
                                             max_steps=max_steps, start_step=start_step):
            index = batch.numpy()
            on_step(step, model.step(images[index], labels[index]))
