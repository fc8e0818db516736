"""Softmax regression trained with its closed-form gradient in numpy: the fast CPU path.

For log-softmax followed by the mean negative log-likelihood, the gradient with respect to
the logits is ``(softmax - one_hot) / batch``, so a step needs two small matrix products
and no autograd graph. On this model the autograd path's cost is per-operation dispatch
(tens of tiny torch calls a step), not arithmetic, and a numpy call costs less.

The optimizers are pipeline.optimizers' numpy implementations (pipeline.numpy_optimizers),
which follow ``torch.optim``'s single-tensor formulas operation by operation, in float32, so
this path and the autograd path (pipeline.trainer) agree to float32 rounding for the same
seed. tests/test_closed_form.py checks it against autograd. Other models and optimizers take
the autograd path.

The model holds a stack of runs (one, for the train stage): a sweep's runs that differ only
in seed and learning rate step together, each exactly as it would alone
(pipeline.train.train_stack).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from weightlapse.pipeline.datasets import N_CLASSES, N_PIXELS, Dataset
from weightlapse.pipeline.optimizers import get_optimizer
from weightlapse.pipeline.params import TrainParams
from weightlapse.pipeline.trainer import (BlockCallback, RowsToFill, SoftmaxRegression, StepCallback, epoch_orders,
                                          plan_steps)


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
        spec = get_optimizer(optimizer)
        self._optimizer = spec.make_numpy(pairs, lrs=lrs, momentum=momentum, weight_decay=weight_decay)
        self._state_keys = spec.state_keys(momentum)  # a checkpoint's order, the torch engine's too
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
        """One run's optimizer state as one float32 vector (a copy): its state arrays in the
        optimizer's ``state_keys`` order, parameter by parameter (pipeline.engines.Engine)."""
        state = self._optimizer.state()
        arrays = [array[run].ravel() for key in self._state_keys for array in state[key]]
        return np.concatenate(arrays) if arrays else np.zeros(0, np.float32)

    def restore(self, weight: np.ndarray, bias: np.ndarray | None, state: np.ndarray, steps: int) -> None:
        """Put a stack of one where its run was after ``steps`` steps: parameters and optimizer state."""
        if self.n_runs != 1:
            raise ValueError("only a single run resumes; a stack's runs resume one by one")
        self.weight[0] = weight
        if self.bias is not None:
            self.bias[0] = bias
        shapes = [self.weight.shape] + ([] if self.bias is None else [self.bias.shape])
        arrays, offset = {}, 0
        for key in self._state_keys:
            arrays[key] = []
            for shape in shapes:
                size = int(np.prod(shape))
                arrays[key].append(state[offset:offset + size].reshape(shape))
                offset += size
        if offset != len(state):
            raise ValueError(f"optimizer state of {len(state)} values, expected {offset}")
        self._optimizer.load_state(arrays, steps)


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


def closed_form_stack(configs: Sequence[TrainParams]) -> ClosedFormSoftmaxRegression:
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
    """The numpy engine (pipeline.engines.Engine): the same model, initialisation and batches
    as the torch engine, stepped in numpy (a stack of one run)."""

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

    def train(self, on_step: StepCallback, start_step: int = 0, on_block: BlockCallback | None = None,
              rows_to_fill: RowsToFill | None = None) -> None:
        """Without ``rows_to_fill``, hands each step to ``on_step``. With it and ``on_block``
        (pipeline.engines.Engine), only step 0 goes to ``on_step``: each later step's rows
        are copied straight into the rows ``rows_to_fill(first_step)`` lends, and handed to
        ``on_block(first_step, rows)`` once those are full (or training ends), while the
        model is at their last step. No Python runs per step for recording: at a numpy step's
        70 microseconds, its per-step callbacks had cost several percent (docs/benchmarks.md)."""
        config = self.config
        if on_block is None or rows_to_fill is None:
            train_closed_form(self.model, self.images, self.labels, batch_size=config.batch_size,
                              epochs=config.epochs, seeds=[config.seed], max_steps=config.max_steps,
                              on_step=lambda step, losses: on_step(step, float(losses[0])), start_step=start_step)
            return
        if start_step == 0:
            on_step(0, float("nan"))
        model, images, labels = self.model, self.images, self.labels
        sources = {"weight": self._weight, "bias": self._bias, "gradient": self._gradient}
        rows, first, filled, targets = None, 0, 0, ()
        with flush_denormals():
            for step, index in stacked_batches(len(images), batch_size=config.batch_size, epochs=config.epochs,
                                               seeds=[config.seed], max_steps=config.max_steps,
                                               start_step=start_step):
                losses = model.step(images[index], labels[index])
                if rows is None:
                    rows, first, filled = rows_to_fill(step), step, 0
                    targets = [(rows[name], sources[name]) for name in ("weight", "bias", "gradient") if name in rows]
                    loss_rows = rows["loss"]
                for target, source in targets:
                    target[filled] = source
                loss_rows[filled] = losses[0]
                filled += 1
                if filled == len(loss_rows):
                    on_block(first, rows)
                    rows = None
        if rows is not None:
            on_block(first, {name: values[:filled] for name, values in rows.items()})
