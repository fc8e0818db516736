"""Softmax regression trained with its closed-form gradient in numpy: the fast CPU path.

For log-softmax followed by the mean negative log-likelihood, the gradient with respect to
the logits is ``(softmax - one_hot) / batch``, so a step needs two small matrix products
and no autograd graph. On this model the autograd path's cost is per-operation dispatch
(tens of tiny torch calls a step), not arithmetic, and a numpy call costs less.

The optimizers below follow ``torch.optim``'s single-tensor formulas operation by operation,
in float32, so this path and the autograd path (pipeline.trainer) agree to float32 rounding
for the same seed. tests/test_closed_form.py checks it against autograd. Other models and
optimizers take the autograd path.

The model holds a stack of runs (one, for the train stage): a sweep's runs that differ only
in seed and learning rate step together, each exactly as it would alone
(pipeline.train.train_stack).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from weightlapse.pipeline.params import CLOSED_FORM_OPTIMIZERS
from weightlapse.pipeline.trainer import epoch_orders, plan_steps

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which the autograd path uses too
ADAM_EPS = 1e-8


class ClosedFormSoftmaxRegression:
    """Softmax regression for a stack of runs stepped together, parameters updated in place.

    ``weight`` is (run, class, pixel) and ``bias`` (run, class) or None: each run's slice
    is an nn.Linear's parameter. A stack of one is a single run. The runs of a stack share
    everything but their initial weights, their batches and their learning rate (``lr``, a
    number or one per run): one numpy call then steps them all, and a call's fixed cost,
    which dominates this tiny model's step, is paid once per stack instead of once per run.
    Every run's numbers are the ones it gets when trained alone, bit for bit: the stacked
    matrix products are the same BLAS calls slice by slice, and every other operation is
    elementwise or reduces along the same axis in the same order (tests/test_closed_form.py).

    After :meth:`step`, ``weight_grad`` and ``bias_grad`` hold the gradient that step applied.
    """

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, *, optimizer: str, lr: float | Sequence[float],
                 momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        self.weight = np.array(weight, dtype=np.float32, order="C")
        if self.weight.ndim != 3:
            raise ValueError(f"weight: expected (run, class, pixel), got shape {self.weight.shape}")
        self.n_runs = len(self.weight)
        self.bias = None if bias is None else np.array(bias, dtype=np.float32)
        self.weight_grad = np.zeros_like(self.weight)
        self.bias_grad = None if bias is None else np.zeros_like(self.bias)
        pairs = [(self.weight, self.weight_grad)]
        if self.bias is not None:
            pairs.append((self.bias, self.bias_grad))
        lrs = np.broadcast_to(np.asarray(lr, dtype=np.float64), (self.n_runs,))
        self._optimizer = make_closed_form_optimizer(pairs, name=optimizer, lrs=lrs, momentum=momentum,
                                                     weight_decay=weight_decay)
        self._logits: np.ndarray | None = None  # work arrays, sized at the first batch

    def step(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """One optimizer step on each run's batch, (run, sample, pixel) float32 and (run, sample)
        int; returns each run's loss."""
        n = labels.shape[1]
        if self._logits is None or self._logits.shape[1] != n:  # the last batch of an epoch may be short
            self._logits = np.empty((self.n_runs, n, self.weight.shape[1]), np.float32)
            self._runs, self._rows = np.arange(self.n_runs)[:, None], np.arange(n)[None, :]
        logits, runs, rows = self._logits, self._runs, self._rows
        np.matmul(images, self.weight.transpose(0, 2, 1), out=logits)
        if self.bias is not None:
            logits += self.bias[:, None, :]
        logits -= logits.max(axis=2, keepdims=True)  # softmax is shift-invariant; exp cannot overflow
        target_logit = logits[runs, rows, labels]
        np.exp(logits, out=logits)
        sums = logits.sum(axis=2)
        losses = np.mean(np.log(sums) - target_logit, axis=1)
        # d(mean NLL)/d(logits) = (softmax - one_hot) / n
        logits /= sums[:, :, None]
        logits[runs, rows, labels] -= 1.0
        logits *= np.float32(1.0 / n)
        np.matmul(logits.transpose(0, 2, 1), images, out=self.weight_grad)
        if self.bias is not None:
            np.sum(logits, axis=1, out=self.bias_grad)
        self._optimizer.step()
        return losses

    def optimizer_state(self, run: int = 0) -> np.ndarray:
        """One run's optimizer state as one float32 vector, in pipeline.engines' order (a copy)."""
        arrays = self._optimizer.state_arrays()
        return np.concatenate([a[run].ravel() for a in arrays]) if arrays else np.zeros(0, np.float32)

    def restore(self, weight: np.ndarray, bias: np.ndarray | None, state: np.ndarray, steps: int) -> None:
        """Put a stack of one where its run was after ``steps`` steps: parameters and optimizer state."""
        if self.n_runs != 1:
            raise ValueError("only a single run resumes; a stack's runs resume one by one")
        self.weight[0] = weight
        if self.bias is not None:
            self.bias[0] = bias
        arrays, offset = [], 0
        for target in self._optimizer.state_arrays():
            size = target[0].size
            arrays.append(state[offset:offset + size].reshape(target.shape))
            offset += size
        if offset != len(state):
            raise ValueError(f"optimizer state of {len(state)} values, expected {offset}")
        self._optimizer.load_state(arrays, steps)


# (parameter, its gradient), updated in place; the first axis of each is the run.
Pairs = Sequence[tuple[np.ndarray, np.ndarray]]


def make_closed_form_optimizer(pairs: Pairs, *, name: str, lrs: np.ndarray, momentum: float = 0.0,
                               weight_decay: float = 0.0) -> Adam | SGD:
    """``lrs``: each run's learning rate (float64, as the Python float torch is given)."""
    if name in ("adam", "adamw"):
        return Adam(pairs, lrs=lrs, weight_decay=weight_decay, decoupled=name == "adamw")
    if name == "sgd":
        return SGD(pairs, lrs=lrs, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"no closed-form path for optimizer {name!r} (it has one for {', '.join(CLOSED_FORM_OPTIMIZERS)}); "
                     "use engine: torch")


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

    def state_arrays(self) -> list[np.ndarray]:
        if not self.momentum:
            return []
        return [np.zeros_like(param) if buffer is None else buffer
                for (param, _), buffer in zip(self.pairs, self.buffers)]

    def load_state(self, arrays: list[np.ndarray], steps: int) -> None:
        if self.momentum and steps > 0:  # before the first step torch has no buffer either
            self.buffers = [np.array(value, dtype=np.float32) for value in arrays]

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
                      batch_size: int, epochs: int, seeds: Sequence[int], max_steps: int | None = None,
                      on_step: Callable[[int, np.ndarray], None], start_step: int = 0) -> None:
    """Train ``model``'s runs as pipeline.trainer.train trains a torch model: same batches, same calls.

    ``seeds`` holds each run's seed, which draws its batches. Calls ``on_step(0, nans)``
    first, then ``on_step(t, losses_t)`` (one loss per run) right after step t, while
    ``model.weight`` holds the weights after t steps and ``model.weight_grad`` the gradient
    of step t. With ``start_step`` s, ``model`` holds the state after s steps (see
    :meth:`ClosedFormSoftmaxRegression.restore`) and training continues with step s + 1.
    """
    if len(seeds) != model.n_runs:
        raise ValueError(f"{len(seeds)} seeds for a stack of {model.n_runs} runs")
    if start_step == 0:
        on_step(0, np.full(model.n_runs, np.nan, np.float32))
    with flush_denormals():
        for step, index in stacked_batches(len(images), batch_size=batch_size, epochs=epochs, seeds=seeds,
                                           max_steps=max_steps, start_step=start_step):
            on_step(step, model.step(images[index], labels[index]))


def stacked_batches(n_samples: int, *, batch_size: int, epochs: int, seeds: Sequence[int], max_steps: int | None,
                    start_step: int) -> Iterator[tuple[int, np.ndarray]]:
    """(step, sample indices (run, sample)) for the steps after ``start_step``: for each seed,
    the batches pipeline.trainer.remaining_batches gives it, side by side. Each epoch's
    orders become one numpy array, so a step's batches are one slice of it."""
    n_steps = plan_steps(n_samples, batch_size=batch_size, epochs=epochs, max_steps=max_steps)
    step = 0
    for orders in zip(*(epoch_orders(n_samples, epochs=epochs, seed=seed) for seed in seeds)):
        order = np.stack([run_order.numpy() for run_order in orders])
        for start in range(0, n_samples, batch_size):
            if step == n_steps:
                return
            step += 1
            if step > start_step:
                yield step, order[:, start:start + batch_size]
