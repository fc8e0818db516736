"""Train stage: train one run and record every step's weights into its trajectory store.

    python -m weightlapse.pipeline.train --params params.yaml --run original --data data/mnist --out runs/original

Writes, under --out: trajectory.zarr (see pipeline.store), metrics.json (DVC metrics),
loss.csv and accuracy.csv (per-step history for `dvc plots`).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import csv
import functools
import json
import logging
import math
import platform
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm import tqdm

from weightlapse import __version__
from weightlapse.pipeline.closed_form import train_closed_form
from weightlapse.pipeline.datasets import DATASETS, N_CLASSES, N_PIXELS, Dataset, DatasetError, load_dataset
from weightlapse.pipeline.engines import closed_form_stack, make_engine, optimizer_state_size, select_engine
from weightlapse.pipeline.graph_engine import CudaGraphEngine
from weightlapse.pipeline.params import CLOSED_FORM_OPTIMIZERS, ParamsError, TrainParams, load_params
from weightlapse.pipeline.run_files import open_new, write_text_atomic
from weightlapse.pipeline.runlock import RunLockedError, exclusive_writer
from weightlapse.pipeline.trainer import DeviceError, Evaluation, evaluate, plan_evals, plan_steps, select_device
from weightlapse.pipeline.resume import ResumePoint, find_resume_point
from weightlapse.pipeline.store import STORE_NAME, RunMetadata, StoreLayout, TrajectoryError
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
    engine: str                # "numpy" or "torch"
    # Wall time from the first recorded step until the store was closed and flushed: the
    # training loop with its capture, without setup (loading data, creating the store).
    loop_seconds: float

    @property
    def steps_per_s(self) -> float:
        return self.metrics["steps"] / self.loop_seconds


def run_training(config: TrainParams, dataset: Dataset, out_dir: Path, *, run_name: str,
                 overwrite: bool = False, resume: bool = False, progress: bool = True) -> RunSummary:
    """Train one run on ``dataset`` and write its store, metrics and history into ``out_dir``.

    With ``resume``, an unfinished store of the same run (same params, data and engine)
    is carried on from its last checkpoint, giving the trajectory an uninterrupted run
    gives, bit for bit; any other store there is replaced. Raises RunLockedError if
    another process is writing ``out_dir``.
    """
    with exclusive_writer(out_dir):
        return _train_and_record(config, dataset, out_dir, run_name=run_name, overwrite=overwrite,
                                 resume=resume, progress=progress)


def _train_and_record(config: TrainParams, dataset: Dataset, out_dir: Path, *, run_name: str,
                      overwrite: bool, resume: bool, progress: bool) -> RunSummary:
    device = select_device(config.device)
    engine = select_engine(config.engine, config.optimizer, device,
                           even_batches=len(dataset.train.labels) % config.batch_size == 0)
    _use_one_cpu_thread(device)
    plan = RunPlan.of(config, dataset)
    model = make_engine(engine, config, dataset, device, block_steps=plan.block_steps)
    metadata = run_metadata(run_name, config, dataset, device, engine)
    point = None
    if resume and (out_dir / STORE_NAME).exists():
        found = find_resume_point(out_dir / STORE_NAME, plan.layout, metadata)
        if isinstance(found, str):
            log.info("%s: training from the start, replacing the store in %s: %s", run_name, out_dir, found)
            overwrite = True
        else:
            point = found
            model.restore(point.weight, point.bias, point.optimizer_state, point.step)
            log.info("%s: resuming after step %d of %d", run_name, point.step, plan.layout.n_steps)

    with contextlib.ExitStack() as open_files:
        recording = RunRecording(open_files, plan, dataset, device, out_dir, metadata, run_name=run_name,
                                 sources=(model.weight_now, model.bias_now, model.gradient_now),
                                 checkpoint=model.optimizer_state, overwrite=overwrite, point=point,
                                 progress=progress)
        loop_started = time.perf_counter()
        if isinstance(model, CudaGraphEngine):
            model.train(recording.on_step, start_step=point.step if point else 0, on_block=recording.on_block)
        else:
            model.train(recording.on_step, start_step=point.step if point else 0)
        recording.finish_training()
    return recording.summary(engine, time.perf_counter() - loop_started)


def train_stack(runs: dict[str, tuple[TrainParams, Path]], dataset: Dataset, *, overwrite: bool = False,
                progress: bool = False) -> dict[str, RunSummary]:
    """Train several runs together, as one stack, and record each into its own directory.

    ``runs`` maps each run's name to its params and output directory. The runs must differ
    in ``seed`` and ``lr`` only (:func:`stack_key`), and train on the CPU's numpy engine:
    one numpy call then steps them all (pipeline.closed_form), so a sweep's runs train
    faster together than one after another (docs/benchmarks.md). Each run's store, metrics
    and history are the ones :func:`run_training` writes for it, bit for bit. Runs start
    from the beginning: an interrupted run resumes alone, with :func:`run_training`.
    """
    configs = [config for config, _ in runs.values()]
    keys = {stack_key(config) for config in configs}
    if len(keys) != 1 or None in keys:
        raise ValueError("a stack's runs must differ in seed and lr only, and train on the CPU's numpy engine; "
                         "group them with pipeline.train.stack_key")
    first = configs[0]
    device = select_device(first.device)
    if device.type != "cpu":
        raise ValueError(f"a stack trains on the CPU, and device: {first.device} picks {device} here; "
                         "train these runs one by one (run_training), or set device: cpu")
    _use_one_cpu_thread(device)
    plan = RunPlan.of(first, dataset)
    model = closed_form_stack(configs)
    with contextlib.ExitStack() as open_files:
        scoring = scoring_thread()  # one for the stack: one per run would take turns with training
        open_files.callback(scoring.shutdown, wait=True, cancel_futures=True)
        recordings = []
        for run, (name, (config, out_dir)) in enumerate(runs.items()):
            open_files.enter_context(exclusive_writer(out_dir))
            weight, gradient = model.weight[run], model.weight_grad[run]  # views, updated in place
            bias = None if model.bias is None else model.bias[run]
            recordings.append(RunRecording(
                open_files, plan, dataset, device, out_dir, run_metadata(name, config, dataset, device, "numpy"),
                run_name=name, sources=(lambda w=weight: w, lambda b=bias: b, lambda g=gradient: g),
                checkpoint=functools.partial(model.optimizer_state, run), overwrite=overwrite, point=None,
                progress=progress, scoring=scoring))
        record_steps = [recording.on_step for recording in recordings]

        def on_step(step: int, losses: np.ndarray) -> None:
            for record_step, loss in zip(record_steps, losses.tolist()):
                record_step(step, loss)

        loop_started = time.perf_counter()
        train_closed_form(model, dataset.train.images, dataset.train.labels, batch_size=first.batch_size,
                          epochs=first.epochs, seeds=[config.seed for config in configs],
                          max_steps=first.max_steps, on_step=on_step)
        for recording in recordings:
            recording.finish_training()
    seconds = time.perf_counter() - loop_started
    return {name: recording.summary("numpy", seconds) for name, recording in zip(runs, recordings)}


def stack_key(config: TrainParams) -> tuple | None:
    """Runs with equal keys can train as one stack (:func:`train_stack`) on a machine without
    a GPU; None: this run trains alone anywhere (its engine is not the CPU's numpy engine)."""
    if config.device == "cuda" or config.engine not in ("auto", "numpy") or \
            config.optimizer not in CLOSED_FORM_OPTIMIZERS:
        return None
    return tuple(sorted((key, repr(value)) for key, value in config.to_dict().items() if key not in ("seed", "lr")))


def _use_one_cpu_thread(device: torch.device) -> None:
    if device.type == "cpu":
        # This model's ops are tiny: one thread is faster than several, and it keeps the
        # float reduction order, hence the trajectory's bits, independent of the core count.
        torch.set_num_threads(1)


@dataclass(frozen=True)
class RunPlan:
    """What a run's params and data fix before it trains: its steps, evaluations and store layout."""

    layout: StoreLayout
    block_steps: int

    @classmethod
    def of(cls, config: TrainParams, dataset: Dataset) -> RunPlan:
        n_steps = plan_steps(len(dataset.train.labels), batch_size=config.batch_size, epochs=config.epochs,
                             max_steps=config.max_steps)
        layout = StoreLayout(n_steps=n_steps, eval_steps=plan_evals(n_steps, config.eval_every), n_classes=N_CLASSES,
                             n_pixels=N_PIXELS, chunk_steps=config.capture.chunk_steps, bias=config.bias,
                             gradients=config.capture.gradients, resume_size=optimizer_state_size(config))
        return cls(layout, TrajectoryWriter.default_block_steps(layout))


class RunRecording:
    """Everything one run records while it trains: its trajectory store, held-out scores,
    loss and accuracy history, and progress bar.

    Opens them into ``open_files`` (an ExitStack), which closes them; ``sources`` are the
    engine's ``weight_now``, ``bias_now`` and ``gradient_now``; ``scoring``, the held-out
    scorer's thread if shared (a stack's runs share one). The engine calls
    :meth:`on_step` after every step (or :meth:`on_block` after a block of them); after the
    last, :meth:`finish_training` writes the rest, and :meth:`summary` gives the metrics.
    """

    def __init__(self, open_files: contextlib.ExitStack, plan: RunPlan, dataset: Dataset, device: torch.device,
                 out_dir: Path, metadata: dict, *, run_name: str,
                 sources: tuple[Callable[[], np.ndarray], Callable[[], np.ndarray | None], Callable[[], np.ndarray]],
                 checkpoint: Callable[[], np.ndarray | None], overwrite: bool, point: ResumePoint | None,
                 progress: bool, scoring: ThreadPoolExecutor | None = None) -> None:
        layout = plan.layout
        self.run_name, self.out_dir, self.eval_steps = run_name, out_dir, layout.eval_steps
        self._eval_set = set(layout.eval_steps)
        self.recent_losses: deque[float] = deque(maxlen=FINAL_LOSS_WINDOW)
        self.last_eval: Evaluation | None = None
        out_dir.mkdir(parents=True, exist_ok=True)
        self.writer = open_files.enter_context(TrajectoryWriter(
            out_dir / STORE_NAME, layout, metadata, overwrite=overwrite, block_steps=plan.block_steps,
            checkpoint=checkpoint, resume_from=point))
        self.scorer = open_files.enter_context(HeldOutScorer(torch.from_numpy(dataset.test.images).to(device),
                                                             torch.from_numpy(dataset.test.labels).to(device),
                                                             thread=scoring))
        loss_file = open_files.enter_context(open_new(out_dir / "loss.csv", newline=""))
        accuracy_file = open_files.enter_context(open_new(out_dir / "accuracy.csv", newline=""))
        self.bar = open_files.enter_context(tqdm(total=layout.n_steps, initial=point.step if point else 0, unit="step",
                                                 desc=run_name, disable=not progress, mininterval=0.5))
        self.loss_csv = csv.writer(loss_file)
        self.loss_csv.writerow(["step", "loss"])
        self.accuracy_csv = csv.writer(accuracy_file)
        self.accuracy_csv.writerow(["step", "heldout_accuracy", "heldout_loss"])
        # The loss history goes to loss.csv (and the recent-loss window) in batches: per step
        # that Python would cost the training thread about a tenth of a numpy step.
        self.new_losses: list[float] = []
        self.first_new_step = point.step + 1 if point else 1
        if point is not None:
            self._replay_history(point)
        self._record_step = self.writer.record_step
        self._weight_now, self._bias_now, gradient_now = sources
        self._gradient_now = gradient_now if layout.gradients else lambda: None

    def _replay_history(self, point: ResumePoint) -> None:
        """The history so far, from the store, as the first run wrote it."""
        for step, loss in enumerate(point.losses.tolist(), start=1):
            self.loss_csv.writerow([step, f"{loss:.7g}"])
        self.recent_losses.extend(point.losses[-FINAL_LOSS_WINDOW:].tolist())
        for step, (accuracy, loss) in zip(self.eval_steps, point.heldout.tolist()):
            self.last_eval = Evaluation(accuracy=accuracy, loss=loss)
            self.accuracy_csv.writerow([step, f"{accuracy:.6f}", f"{loss:.7g}"])
        # evaluations of steps before the checkpoint that were not written: score them again
        group = self.writer.group
        for step in self.eval_steps[len(point.heldout):]:
            if step > point.step:
                break
            self.scorer.submit(step, group["weights"][step], group["bias"][step] if "bias" in group else None)

    def on_step(self, step: int, loss: float) -> None:
        # Once per training step: only what must happen now. The rest is batched.
        if step and not math.isfinite(loss):
            self._diverged(step, loss)
        weight, bias = self._weight_now(), self._bias_now()
        self._record_step(step, weight, loss, bias=bias, gradient=self._gradient_now() if step else None)
        if step:
            self.new_losses.append(loss)
            if len(self.new_losses) == LOSS_HISTORY_BATCH:
                self._write_loss_history()
        if step in self._eval_set:
            self.scorer.submit(step, weight, bias)
            self._record_evaluations()

    def on_block(self, first: int, rows: dict[str, np.ndarray]) -> None:
        """A block of steps at once (the cuda-graph engine): the same records as on_step's,
        with one copy per block instead of one per step, which the GPU path is fast enough to need."""
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
        self.loss_csv.writerows([step, f"{loss:.7g}"] for step, loss in enumerate(losses, start=first))
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


def scoring_thread() -> ThreadPoolExecutor:
    """A worker thread for :class:`HeldOutScorer`, which the scorers of a stack's runs share."""
    # torch's thread count is per thread under OpenMP: a new thread would use every core
    # and take the training thread's, so it gets the caller's count explicitly.
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="held-out-scorer",
                              initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),))


class HeldOutScorer:
    """Scores held-out data for recorded weights on a worker thread, handing results back in order.

    Scoring 10,000 test images takes milliseconds, as long as dozens of training steps; on
    the worker thread (torch releases the GIL in its kernels) it overlaps training instead.
    A stack's runs share one ``thread`` (:func:`scoring_thread`, closed by its creator): one
    thread each took turns on the training core with it.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, thread: ThreadPoolExecutor | None = None) -> None:
        self.images, self.labels = images, labels
        self._owns_thread = thread is None
        self._executor = scoring_thread() if thread is None else thread
        self._pending: deque[tuple[int, Future]] = deque()

    def submit(self, step: int, weight: np.ndarray, bias: np.ndarray | None) -> None:
        # Copies: the training thread goes on updating the arrays it passed in.
        self._pending.append((step, self._executor.submit(
            evaluate, weight.copy(), None if bias is None else bias.copy(), self.images, self.labels)))

    def scored(self, *, wait: bool = False) -> Iterator[tuple[int, Evaluation]]:
        """(step, evaluation) of the scorings finished so far (all of them, with ``wait``), in step order."""
        while self._pending and (wait or self._pending[0][1].done()):
            step, future = self._pending.popleft()
            yield step, future.result()

    def __enter__(self) -> HeldOutScorer:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._owns_thread:
            self._executor.shutdown(wait=True, cancel_futures=True)
        else:  # the thread goes on for the other runs; this run's scorings are not wanted any more
            for _, future in self._pending:
                future.cancel()


def run_metadata(run_name: str, config: TrainParams, dataset: Dataset, device: torch.device, engine: str
                 ) -> RunMetadata:
    """Everything needed to know how a store was made, saved next to the result."""
    spec = DATASETS[dataset.name]
    return RunMetadata(
        run=run_name,
        params=config.to_dict(),
        model="softmax-regression",
        dataset=dataset.name,
        dataset_files=dataset.file_checksums,
        class_names=tuple(spec.class_names),
        n_train=len(dataset.train.labels),
        n_test=len(dataset.test.labels),
        device=str(device) if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})",
        engine=engine,
        versions={
            "weightlapse": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "zarr": zarr.__version__,
        },
        git_commit=git_commit(),
        command=" ".join(sys.argv),
    )


def git_commit() -> str | None:
    """The checkout's commit, with '-dirty' if it has uncommitted changes; None outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file")
    parser.add_argument("--run", required=True, help="run name, a key under 'runs' in the params file")
    parser.add_argument("--data", required=True, help="directory written by the data stage")
    parser.add_argument("--out", required=True, help="run directory to write (runs/<run>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing trajectory store")
    parser.add_argument("--resume", action="store_true",
                        help="carry on an unfinished store of this run from its last checkpoint (bit for bit "
                             "as if never interrupted); any other existing store is replaced")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params)
        config = params.run(args.run)
        dataset = load_dataset(args.data, params.data.dataset)
        metrics = run_training(config, dataset, Path(args.out), run_name=args.run, overwrite=args.overwrite,
                               resume=args.resume).metrics
    except (ParamsError, DatasetError, DeviceError, TrajectoryError, RunLockedError, FileExistsError,
            FileNotFoundError, TrainingDiverged) as error:
        log.error("%s", error)
        return 1
    except OSError as error:  # a full disk, a read-only directory: one line a user can act on
        log.error("%s: cannot write %s (%s). Free space or fix the directory, then run the stage again: "
                  "`dvc repro` (or --resume) carries the run on from its last committed step", args.run, args.out,
                  error.strerror or error)
        return 1
    log.info("%s: %d steps, final train loss %.4f, held-out accuracy %.4f", args.run, metrics["steps"],
             metrics["final_train_loss"], metrics["heldout_accuracy"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
