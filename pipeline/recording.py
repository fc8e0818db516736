"""What one run records while it trains: its plan (:class:`RunPlan`), and its trajectory
store, held-out scores, loss and accuracy history and progress bar (:class:`RunRecording`).
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import json
import logging
import math
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from weightlapse.pipeline.datasets import N_CLASSES, N_PIXELS, Dataset
from weightlapse.pipeline.engines import optimizer_state_size
from weightlapse.pipeline.layers import parameter_shapes
from weightlapse.pipeline.params import TrainParams
from weightlapse.pipeline.run_files import open_new, write_text_atomic
from weightlapse.pipeline.scoring import HeldOutScorer
from weightlapse.pipeline.trainer import Evaluation, plan_evals, plan_steps
from weightlapse.pipeline.resume import ResumePoint
from weightlapse.pipeline.store import STORE_NAME, NetworkLayout, ParameterSpec, RunMetadata, StoreLayout
from weightlapse.pipeline.writer import TrajectoryWriter

log = logging.getLogger(__name__)

# final_train_loss in metrics.json is the mean batch loss over this many last steps:
# a single batch's loss is too noisy to compare runs by.
FINAL_LOSS_WINDOW = 100
# Steps whose loss rows are written to loss.csv at once.
LOSS_HISTORY_BATCH = 256


class TrainingDiverged(ArithmeticError):
    """The loss (hence the weights) became NaN or infinite: nothing after that step is recorded."""


@dataclass(frozen=True)
class RunSummary:
    metrics: dict[str, float]  # what metrics.json holds
    engine: str                # the engine that trained it (pipeline.engines.ENGINES)
    # Wall time from the first recorded step until the store was closed and flushed: the
    # training loop with its capture, without setup (loading data, creating the store).
    loop_seconds: float

    @property
    def steps_per_s(self) -> float:
        return self.metrics["steps"] / self.loop_seconds


@dataclass(frozen=True)
class RunPlan:
    """What a run's params and data fix before it trains: its steps, evaluations and store
    layout (a network store's, planned, for a run with hidden layers)."""

    layout: StoreLayout | NetworkLayout
    block_steps: int

    @classmethod
    def of(cls, config: TrainParams, dataset: Dataset) -> RunPlan:
        n_steps = plan_steps(len(dataset.train.labels), batch_size=config.batch_size, epochs=config.epochs,
                             max_steps=config.max_steps)
        if config.hidden:  # a network store; its writer sizes its own blocks (block_steps: none)
            return cls(network_layout(config, n_steps, plan_evals(n_steps, config.eval_every)), 0)
        layout = StoreLayout(n_steps=n_steps, eval_steps=plan_evals(n_steps, config.eval_every), n_classes=N_CLASSES,
                             n_pixels=N_PIXELS, chunk_steps=config.capture.chunk_steps, bias=config.bias,
                             gradients=config.capture.gradients, resume_size=optimizer_state_size(config),
                             codec=config.capture.codec)
        return cls(layout, TrajectoryWriter.default_block_steps(layout))


def network_layout(config: TrainParams, n_steps: int, eval_steps: tuple[int, ...]) -> NetworkLayout:
    """The planned network store of a run with hidden layers: one array per MLP parameter."""
    specs = tuple(ParameterSpec(name, shape, name.rpartition(".")[2], "Linear")
                  for name, shape in parameter_shapes(config.hidden, bias=config.bias))
    return NetworkLayout(specs, n_steps=n_steps, eval_steps=eval_steps, resume_size=optimizer_state_size(config),
                         codec=config.capture.codec)


class RunRecording:
    """Everything one run records while it trains: its trajectory store, held-out scores,
    loss and accuracy history, and progress bar.

    Opens them into ``open_files`` (an ExitStack), which closes them; ``sources`` are the
    engine's ``weight_now``, ``bias_now`` and ``gradient_now``; ``scoring``, the held-out
    scorer's thread if shared (a stack's runs share one). The engine calls
    :meth:`on_step` after every step (or :meth:`on_block` after a block of them, which it
    may have written into ``writer.rows_to_fill``'s rows); after the last,
    :meth:`finish_training` writes the rest, and :meth:`summary` gives the metrics.
    A network run's recording (pipeline.network_recording) is this class with another writer,
    sources and score (``_open_writer``, ``_set_sources``, ``_recorded_parameters``, ``_score``).
    """

    def __init__(self, open_files: contextlib.ExitStack, plan: RunPlan, dataset: Dataset, device: torch.device,
                 out_dir: Path, metadata: RunMetadata, *, run_name: str,
                 sources: tuple[Callable[[], np.ndarray], Callable[[], np.ndarray | None], Callable[[], np.ndarray]],
                 checkpoint: Callable[[], np.ndarray | None], overwrite: bool, point: ResumePoint | None,
                 progress: bool, scoring: ThreadPoolExecutor | None = None) -> None:
        layout = plan.layout
        self.run_name, self.out_dir, self.eval_steps = run_name, out_dir, layout.eval_steps
        self._eval_set = set(layout.eval_steps)
        self.recent_losses: deque[float] = deque(maxlen=FINAL_LOSS_WINDOW)
        self.last_eval: Evaluation | None = None
        out_dir.mkdir(parents=True, exist_ok=True)
        self.writer = open_files.enter_context(self._open_writer(out_dir / STORE_NAME, plan, metadata, overwrite=overwrite,
                                                                 checkpoint=checkpoint, point=point))
        self.scorer = open_files.enter_context(HeldOutScorer(torch.from_numpy(dataset.test.images).to(device),
                                                             torch.from_numpy(dataset.test.labels).to(device),
                                                             thread=scoring, score=self._score))
        self.loss_file = open_files.enter_context(open_new(out_dir / "loss.csv", newline=""))
        accuracy_file = open_files.enter_context(open_new(out_dir / "accuracy.csv", newline=""))
        self.bar = open_files.enter_context(tqdm(total=layout.n_steps, initial=point.step if point else 0, unit="step",
                                                 desc=run_name, disable=not progress, mininterval=0.5))
        self.loss_csv = csv.writer(self.loss_file)
        self.loss_csv.writerow(["step", "loss"])
        self.accuracy_csv = csv.writer(accuracy_file)
        self.accuracy_csv.writerow(["step", "heldout_accuracy", "heldout_loss"])
        # The loss history goes to loss.csv (and the recent-loss window) in batches: per step
        # that Python would cost the training thread about a tenth of a numpy step.
        self.new_losses: list[float] = []
        self.first_new_step = point.step + 1 if point else 1
        if point is not None:
            self._replay_history(point)
        self._set_sources(sources, layout)

    # What a softmax-regression run's store and scores are; a network run's (pipeline.network_recording) differ.
    _score = None  # HeldOutScorer's default: softmax regression's (weight, bias)

    def _open_writer(self, path: Path, plan: RunPlan, metadata: RunMetadata, *, overwrite: bool,
                     checkpoint: Callable[[], np.ndarray | None], point: ResumePoint | None) -> TrajectoryWriter:
        return TrajectoryWriter(path, plan.layout, metadata, overwrite=overwrite, block_steps=plan.block_steps,
                                checkpoint=checkpoint, resume_from=point)

    def block_callbacks(self) -> dict[str, Callable]:
        """The engine's ``on_block`` and ``rows_to_fill`` (pipeline.engines.Engine.train)."""
        return {"on_block": self.on_block, "rows_to_fill": self.writer.rows_to_fill}

    def _set_sources(self, sources: tuple, layout: StoreLayout) -> None:
        self._record_step = self.writer.record_step
        self._weight_now, self._bias_now, gradient_now = sources
        self._gradient_now = gradient_now if layout.gradients else lambda: None

    def _recorded_parameters(self, step: int) -> tuple[np.ndarray | None, ...]:
        """What the scorer scores, for a step already in the store."""
        group = self.writer.group
        return group["weights"][step], group["bias"][step] if "bias" in group else None

    def _replay_history(self, point: ResumePoint) -> None:
        """The history so far, from the store, as the first run wrote it."""
        for step, loss in enumerate(point.losses.tolist(), start=1):
            self.loss_csv.writerow([step, f"{loss:.7g}"])
        self.recent_losses.extend(point.losses[-FINAL_LOSS_WINDOW:].tolist())
        for step, (accuracy, loss) in zip(self.eval_steps, point.heldout.tolist()):
            self.last_eval = Evaluation(accuracy=accuracy, loss=loss)
            self.accuracy_csv.writerow([step, f"{accuracy:.6f}", f"{loss:.7g}"])
        # evaluations of steps before the checkpoint that were not written: score them again
        for step in self.eval_steps[len(point.heldout):]:
            if step > point.step:
                break
            self.scorer.submit(step, *self._recorded_parameters(step))

    def on_step(self, step: int, loss: float) -> None:
        # Once per training step: only what must happen now. The rest is batched.
        if step and not math.isfinite(loss):
            self._diverged(step, loss)
        weight, bias = self._weight_now(), self._bias_now()
        self._record_step(step, weight, loss, bias=bias, gradient=self._gradient_now() if step else None)
        self._after_step(step, loss, weight, bias)

    def _after_step(self, step: int, loss: float, *parameters: np.ndarray | torch.Tensor | None) -> None:
        """The loss history, and a held-out scoring of ``parameters`` when the step is an evaluation's."""
        if step:
            self.new_losses.append(loss)
            if len(self.new_losses) == LOSS_HISTORY_BATCH:
                self._write_loss_history()
        if step in self._eval_set:
            self.scorer.submit(step, *parameters)
            self._record_evaluations()

    def on_block(self, first: int, rows: dict[str, np.ndarray]) -> None:
        """A block of steps at once (the cuda-graph engine, the numpy engine): the same records
        as on_step's, with one copy per block, or none for rows the engine wrote in place, and
        no Python per step, which engines this fast need."""
        losses = rows["loss"]
        finite = np.isfinite(losses)
        if first == 0:
            finite[0] = True  # step 0 has no loss
        if not finite.all():
            bad = int(np.argmin(finite))
            if bad:
                self.on_block(first, {name: values[:bad] for name, values in rows.items()})
            self._diverged(first + bad, float(losses[bad]))
        self.writer.record_steps(first, rows["weight"], losses, biases=rows.get("bias"),
                                 gradients=rows.get("gradient"))
        self.new_losses.extend(losses.tolist())
        self._write_loss_history()
        eval_steps = self.eval_steps
        index = bisect.bisect_left(eval_steps, first)
        while index < len(eval_steps) and eval_steps[index] < first + len(losses):
            row = eval_steps[index] - first
            self.scorer.submit(eval_steps[index], rows["weight"][row], rows["bias"][row] if "bias" in rows else None)
            index += 1
        self._record_evaluations()

    def _diverged(self, step: int, loss: float) -> None:
        # The loss of step t is that of the weights after step t - 1: they may be what overflowed.
        self.writer.drop_last_step_unless_finite()
        raise TrainingDiverged(
            f"{self.run_name}: training diverged at step {step:,}: its batch loss is {loss} (the weights overflowed); "
            "the steps before it are kept. Lower the learning rate (lr) and train the run again")

    def finish_training(self) -> None:
        """After the last step: the rest of the history, and the last rows to the store writer
        while the last step is scored."""
        self._write_loss_history()
        self.writer.send_recorded()
        self._record_evaluations(wait=True)

    def summary(self, engine: str, loop_seconds: float) -> RunSummary:
        """Write metrics.json (once the run's files are closed) and return the run's summary."""
        metrics = {
            "steps": self.writer.layout.n_steps,
            "final_train_loss": float(np.mean(self.recent_losses)),  # plan_steps guarantees >= 1 step
            "heldout_accuracy": self.last_eval.accuracy,
            "heldout_loss": self.last_eval.loss,
        }
        write_text_atomic(self.out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        summary = RunSummary(metrics, engine, loop_seconds)
        log.info("%s: %d steps in %.2f s (%s steps/s, %s engine), every step recorded", self.run_name,
                 metrics["steps"], loop_seconds, f"{summary.steps_per_s:,.0f}", engine)
        return summary

    def _write_loss_history(self) -> None:
        first, losses = self.first_new_step, self.new_losses
        # The rows csv.writer writes (numbers are never quoted), at half its cost per row.
        self.loss_file.write("".join([f"{step},{loss:.7g}\r\n" for step, loss in enumerate(losses, start=first)]))
        self.recent_losses.extend(losses[-FINAL_LOSS_WINDOW:])
        self.bar.update(len(losses))
        self.first_new_step = first + len(losses)
        losses.clear()

    def _record_evaluations(self, *, wait: bool = False) -> None:
        for step, evaluation in self.scorer.scored(wait=wait):
            self.last_eval = evaluation
            self.writer.record_eval(step, evaluation.accuracy, evaluation.loss)
            self.accuracy_csv.writerow([step, f"{evaluation.accuracy:.6f}", f"{evaluation.loss:.7g}"])
            self.bar.set_postfix(accuracy=f"{evaluation.accuracy:.3f}", refresh=False)
