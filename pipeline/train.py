"""Train stage: train one run and record every step's weights into its trajectory store.

    python -m pipeline.train --params params.yaml --run original --data data/mnist --out runs/original

Writes, under --out: trajectory.zarr (see pipeline.trajectory), metrics.json (DVC metrics),
loss.csv and accuracy.csv (per-step history for `dvc plots`).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import platform
import subprocess
import sys
from collections import deque
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm import tqdm

import pipeline
from pipeline.datasets import DATASETS, N_CLASSES, N_PIXELS, Dataset, DatasetError, load_dataset
from pipeline.params import ParamsError, TrainParams, load_params
from pipeline.trainer import (
    DeviceError, SoftmaxRegression, evaluate, make_optimizer, plan_evals, plan_steps,
    select_device, train,
)
from pipeline.trajectory import STORE_NAME, StoreLayout, TrajectoryError, TrajectoryWriter

log = logging.getLogger(__name__)

# final_train_loss in metrics.json is the mean batch loss over this many last steps:
# a single batch's loss is too noisy to compare runs by.
FINAL_LOSS_WINDOW = 100


def run_training(config: TrainParams, dataset: Dataset, out_dir: Path, *, run_name: str,
                 overwrite: bool = False, progress: bool = True) -> dict[str, float]:
    """Train one run on ``dataset`` and write its store, metrics and history into ``out_dir``."""
    device = select_device(config.device)
    if device.type == "cpu":
        # This model's ops are tiny: one thread is faster than several, and it keeps the
        # float reduction order, hence the trajectory's bits, independent of the core count.
        torch.set_num_threads(1)
    train_x = torch.from_numpy(dataset.train.images).to(device)
    train_y = torch.from_numpy(dataset.train.labels).to(device)
    test_x = torch.from_numpy(dataset.test.images).to(device)
    test_y = torch.from_numpy(dataset.test.labels).to(device)

    n_steps = plan_steps(len(train_x), batch_size=config.batch_size, epochs=config.epochs,
                         max_steps=config.max_steps)
    eval_steps = plan_evals(n_steps, config.eval_every)
    eval_set = set(eval_steps)
    model = SoftmaxRegression(N_PIXELS, N_CLASSES, bias=config.bias, seed=config.seed).to(device)
    optimizer = make_optimizer(model.parameters(), name=config.optimizer, lr=config.lr,
                               momentum=config.momentum, weight_decay=config.weight_decay)
    layout = StoreLayout(n_steps=n_steps, eval_steps=eval_steps, n_classes=N_CLASSES, n_pixels=N_PIXELS,
                         chunk_steps=config.capture.chunk_steps, bias=config.bias,
                         gradients=config.capture.gradients)
    metadata = run_metadata(run_name, config, dataset, device)

    out_dir.mkdir(parents=True, exist_ok=True)
    recent_losses: deque[float] = deque(maxlen=FINAL_LOSS_WINDOW)
    last_eval = None
    with TrajectoryWriter(out_dir / STORE_NAME, layout, metadata, overwrite=overwrite) as writer, \
            open(out_dir / "loss.csv", "w", newline="") as loss_file, \
            open(out_dir / "accuracy.csv", "w", newline="") as accuracy_file, \
            tqdm(total=n_steps, unit="step", desc=run_name, disable=not progress,
                 mininterval=0.5) as bar:
        loss_csv = csv.writer(loss_file)
        loss_csv.writerow(["step", "loss"])
        accuracy_csv = csv.writer(accuracy_file)
        accuracy_csv.writerow(["step", "heldout_accuracy", "heldout_loss"])

        def on_step(step: int, loss: float) -> None:
            nonlocal last_eval
            gradient = None
            if config.capture.gradients and step > 0:
                gradient = model.weight.grad.detach().cpu().numpy()
            writer.record_step(
                step, model.weight.detach().cpu().numpy(), loss,
                bias=None if model.bias is None else model.bias.detach().cpu().numpy(),
                gradient=gradient,
            )
            if step > 0:
                recent_losses.append(loss)
                loss_csv.writerow([step, f"{loss:.7g}"])
                bar.update()
            if step in eval_set:
                last_eval = evaluate(model, test_x, test_y)
                writer.record_eval(step, last_eval.accuracy, last_eval.loss)
                accuracy_csv.writerow([step, f"{last_eval.accuracy:.6f}", f"{last_eval.loss:.7g}"])
                bar.set_postfix(accuracy=f"{last_eval.accuracy:.3f}", refresh=False)

        train(model, optimizer, train_x, train_y, batch_size=config.batch_size, epochs=config.epochs,
              seed=config.seed, max_steps=config.max_steps, on_step=on_step)

    metrics = {
        "steps": n_steps,
        "final_train_loss": float(np.mean(recent_losses)),  # plan_steps guarantees >= 1 step
        "heldout_accuracy": last_eval.accuracy,
        "heldout_loss": last_eval.loss,
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def run_metadata(run_name: str, config: TrainParams, dataset: Dataset, device: torch.device) -> dict:
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params)
        config = params.run(args.run)
        dataset = load_dataset(args.data, params.data.dataset)
        metrics = run_training(config, dataset, Path(args.out), run_name=args.run, overwrite=args.overwrite)
    except (ParamsError, DatasetError, DeviceError, TrajectoryError, FileExistsError, FileNotFoundError) as error:
        log.error("%s", error)
        return 1
    log.info("%s: %d steps, final train loss %.4f, held-out accuracy %.4f", args.run, metrics["steps"],
             metrics["final_train_loss"], metrics["heldout_accuracy"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
