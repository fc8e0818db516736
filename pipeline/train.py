"""Train stage: train one run and record every step's weights into its trajectory store.

    python -m pipeline.train --params params.yaml --run original --data data/mnist --out runs/original

Writes, under --out: trajectory.zarr (see pipeline.trajectory), metrics.json (DVC metrics),
loss.csv and accuracy.csv (per-step history for `dvc plots`).
"""

from __future__ import annotations

import argparse
import bisect
import csv
import json
import logging
import platform
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm import tqdm

import pipeline
from pipeline.datasets import DATASETS, N_CLASSES, N_PIXELS, Dataset, DatasetError, load_dataset
from pipeline.engines import make_engine, optimizer_state_size, select_engine
from pipeline.graph_engine import CudaGraphEngine
from pipeline.params import ParamsError, TrainParams, load_params
from pipeline.runlock import RunLockedError, exclusive_writer
from pipeline.trainer import DeviceError, Evaluation, evaluate, plan_evals, plan_steps, select_device
from pipeline.trajectory import STORE_NAME, StoreLayout, TrajectoryError, TrajectoryWriter, find_resume_point

log = logging.getLogger(__name__)

# final_train_loss in metrics.json is the mean batch loss over this many last steps:
# a single batch's loss is too noisy to compare runs by.
FINAL_LOSS_WINDOW = 100
# Steps whose loss rows are written to loss.csv at once.
LOSS_HISTORY_BATCH = 256


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
    if device.type == "cpu":
        # This model's ops are tiny: one thread is faster than several, and it keeps the
        # float reduction order, hence the trajectory's bits, independent of the core count.
        torch.set_num_threads(1)
    test_x = torch.from_numpy(dataset.test.images).to(device)
    test_y = torch.from_numpy(dataset.test.labels).to(device)

    n_steps = plan_steps(len(dataset.train.labels), batch_size=config.batch_size, epochs=config.epochs,
                         max_steps=config.max_steps)
    eval_steps = plan_evals(n_steps, config.eval_every)
    eval_set = set(eval_steps)
    layout = StoreLayout(n_steps=n_steps, eval_steps=eval_steps, n_classes=N_CLASSES, n_pixels=N_PIXELS,
                         chunk_steps=config.capture.chunk_steps, bias=config.bias,
                         gradients=config.capture.gradients, resume_size=optimizer_state_size(config))
    block_steps = TrajectoryWriter.default_block_steps(layout)
    model = make_engine(engine, config, dataset, device, block_steps=block_steps)
    metadata = run_metadata(run_name, config, dataset, device, engine)
    point = None
    if resume and (out_dir / STORE_NAME).exists():
        found = find_resume_point(out_dir / STORE_NAME, layout, metadata)
        if isinstance(found, str):
            log.info("%s: training from the start, replacing the store in %s: %s", run_name, out_dir, found)
            overwrite = True
        else:
            point = found
            model.restore(point.weight, point.bias, point.optimizer_state, point.step)
            log.info("%s: resuming after step %d of %d", run_name, point.step, n_steps)

    out_dir.mkdir(parents=True, exist_ok=True)
    recent_losses: deque[float] = deque(maxlen=FINAL_LOSS_WINDOW)
    last_eval = None
    with TrajectoryWriter(out_dir / STORE_NAME, layout, metadata, overwrite=overwrite, block_steps=block_steps,
                          checkpoint=model.optimizer_state, resume_from=point) as writer, \
            HeldOutScorer(test_x, test_y) as scorer, \
            open(out_dir / "loss.csv", "w", newline="") as loss_file, \
            open(out_dir / "accuracy.csv", "w", newline="") as accuracy_file, \
            tqdm(total=n_steps, initial=point.step if point else 0, unit="step", desc=run_name,
                 disable=not progress, mininterval=0.5) as bar:
        loss_csv = csv.writer(loss_file)
        loss_csv.writerow(["step", "loss"])
        accuracy_csv = csv.writer(accuracy_file)
        accuracy_csv.writerow(["step", "heldout_accuracy", "heldout_loss"])
        if point is not None:  # the history so far, from the store, as the first run wrote it
            for step, loss in enumerate(point.losses.tolist(), start=1):
                loss_csv.writerow([step, f"{loss:.7g}"])
            recent_losses.extend(point.losses[-FINAL_LOSS_WINDOW:].tolist())
            for step, (accuracy, loss) in zip(eval_steps, point.heldout.tolist()):
                last_eval = Evaluation(accuracy=accuracy, loss=loss)
                accuracy_csv.writerow([step, f"{accuracy:.6f}", f"{loss:.7g}"])
            # evaluations of steps before the checkpoint that were not written: score them again
            for step in eval_steps[len(point.heldout):]:
                if step > point.step:
                    break
                scorer.submit(step, writer.group["weights"][step],
                              writer.group["bias"][step] if config.bias else None)

        def record_evaluations(*, wait: bool = False) -> None:
            nonlocal last_eval
            for step, evaluation in scorer.scored(wait=wait):
                last_eval = evaluation
                writer.record_eval(step, evaluation.accuracy, evaluation.loss)
                accuracy_csv.writerow([step, f"{evaluation.accuracy:.6f}", f"{evaluation.loss:.7g}"])
                bar.set_postfix(accuracy=f"{evaluation.accuracy:.3f}", refresh=False)

        # The loss history goes to loss.csv (and the recent-loss window) in batches: per step
        # that Python would cost the training thread about a tenth of a numpy step.
        new_losses: list[float] = []
        first_new_step = [point.step + 1 if point else 1]

        def write_loss_history() -> None:
            first = first_new_step[0]
            loss_csv.writerows([step, f"{loss:.7g}"] for step, loss in enumerate(new_losses, start=first))
            recent_losses.extend(new_losses[-FINAL_LOSS_WINDOW:])
            bar.update(len(new_losses))
            first_new_step[0] = first + len(new_losses)
            new_losses.clear()

        record_step, weight_now, bias_now = writer.record_step, model.weight_now, model.bias_now
        gradient_now = model.gradient_now if config.capture.gradients else lambda: None

        def on_step(step: int, loss: float) -> None:
            # Once per training step: only what must happen now. The rest is batched.
            weight, bias = weight_now(), bias_now()
            record_step(step, weight, loss, bias=bias, gradient=gradient_now() if step else None)
            if step:
                new_losses.append(loss)
                if len(new_losses) == LOSS_HISTORY_BATCH:
                    write_loss_history()
            if step in eval_set:
                scorer.submit(step, weight, bias)
                record_evaluations()

        def on_block(first: int, rows: dict[str, np.ndarray]) -> None:
            """A block of steps at once (the cuda-graph engine): the same records as on_step's,
            with one copy per block instead of one per step, which the GPU path is fast enough to need."""
            losses = rows["loss"]
            writer.record_steps(first, rows["weight"], losses, biases=rows.get("bias"), gradients=rows.get("gradient"))
            new_losses.extend(losses.tolist())
            write_loss_history()
            index = bisect.bisect_left(eval_steps, first)
            while index < len(eval_steps) and eval_steps[index] < first + len(losses):
                row = eval_steps[index] - first
                scorer.submit(eval_steps[index], rows["weight"][row], rows["bias"][row] if "bias" in rows else None)
                index += 1
            record_evaluations()

        loop_started = time.perf_counter()
        if isinstance(model, CudaGraphEngine):
            model.train(on_step, start_step=point.step if point else 0, on_block=on_block)
        else:
            model.train(on_step, start_step=point.step if point else 0)
        write_loss_history()
        # The last rows go to the store writer while the last step is scored.
        writer.send_recorded()
        record_evaluations(wait=True)
    loop_seconds = time.perf_counter() - loop_started

    metrics = {
        "steps": n_steps,
        "final_train_loss": float(np.mean(recent_losses)),  # plan_steps guarantees >= 1 step
        "heldout_accuracy": last_eval.accuracy,
        "heldout_loss": last_eval.loss,
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    summary = RunSummary(metrics, engine, loop_seconds)
    log.info("%s: %d steps in %.2f s (%s steps/s, %s engine), every step recorded", run_name, n_steps,
             loop_seconds, f"{summary.steps_per_s:,.0f}", engine)
    return summary


class HeldOutScorer:
    """Scores held-out data for recorded weights on a worker thread, handing results back in order.

    Scoring 10,000 test images takes milliseconds, as long as dozens of training steps; on
    the worker thread (torch releases the GIL in its kernels) it overlaps training instead.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels
        # torch's thread count is per thread under OpenMP: a new thread would use every core
        # and take the training thread's, so it gets the caller's count explicitly.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="held-out-scorer",
                                            initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),))
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
        self._executor.shutdown(wait=True, cancel_futures=True)


def run_metadata(run_name: str, config: TrainParams, dataset: Dataset, device: torch.device, engine: str) -> dict:
    """Everything needed to know how a store was made, saved next to the result."""
    spec = DATASETS[dataset.name]
    return {
        "run": run_name,
        "params": config.to_dict(),
        "model": "softmax-regression",
        "dataset": {
            "name": dataset.name,
            "files": dataset.file_checksums,
            "class_names": list(spec.class_names),
            "n_train": len(dataset.train.labels),
            "n_test": len(dataset.test.labels),
        },
        "device": str(device) if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})",
        "engine": engine,
        "versions": {
            "weightlapse": pipeline.__version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "zarr": zarr.__version__,
        },
        "git_commit": git_commit(),
        "command": " ".join(sys.argv),
    }


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
            FileNotFoundError) as error:
        log.error("%s", error)
        return 1
    log.info("%s: %d steps, final train loss %.4f, held-out accuracy %.4f", args.run, metrics["steps"],
             metrics["final_train_loss"], metrics["heldout_accuracy"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
