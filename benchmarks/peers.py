"""What a user would pick instead of weightlapse, measured on the original notebook's loop.

    python benchmarks/peers.py [--dataset-dir DIR] [--epochs N] [--repeats N] [--json FILE]

Needs the optional peers: ``pip install -e ".[bench]"`` (TensorBoard and Weights & Biases);
a peer that is not installed is reported as such. On the same data and device, batch-20
Adam for --epochs epochs, the notebook's loop (benchmarks/capture.py, (a)) runs:

- bare, recording nothing;
- with TensorBoard's ``SummaryWriter.add_histogram`` of the weight matrix after every step;
- with W&B's ``wandb.watch(model, log="parameters", log_freq=1)`` and a ``wandb.log`` of the
  loss after every step, offline (nothing leaves the machine);
- weightlapse's train stage recording every step to Zarr (capture.py's (c)).

Each runs --repeats times, interleaved, and the medians count. Reported for each: steps/s,
its ratio to the bare loop, bytes written per step, and whether the full weights of every
step can be read back. TensorBoard and W&B keep a histogram of each step (bucket counts),
not the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from capture import capture_run, find_dataset, notebook_loop  # this folder is on sys.path

from weightlapse.pipeline.datasets import load_dataset
from weightlapse.pipeline.trainer import select_device


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def tensorboard_observer(log_dir: Path) -> tuple[Callable, Callable[[], None]]:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(log_dir))

    def after_step(model, step: int, loss: torch.Tensor) -> None:
        writer.add_histogram("weight", model.weight, step)

    return after_step, writer.close


def wandb_observer(log_dir: Path) -> tuple[Callable, Callable[[], None]]:
    import wandb

    run = wandb.init(project="weightlapse-peers", mode="offline", dir=str(log_dir), settings=wandb.Settings(
        silent=True, console="off", disable_git=True, x_disable_stats=True))
    watching: list = []

    def after_step(model, step: int, loss: torch.Tensor) -> None:
        if not watching:  # watch() needs the model, which the loop builds
            wandb.watch(model, log="parameters", log_freq=1)
            watching.append(model)
        run.log({"loss": loss.item()}, step=step)

    return after_step, run.finish


OBSERVERS = {"tensorboard": ("tensorboard", tensorboard_observer), "wandb": ("wandb", wandb_observer)}


def installed(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def observed_rate(images, labels, *, epochs: int, device: torch.device, peer: str) -> tuple[float, float]:
    """(steps/s, bytes written per step) of the notebook's loop observed by ``peer``."""
    with tempfile.TemporaryDirectory(prefix=f"weightlapse-{peer}-") as tmp:
        log_dir = Path(tmp)
        after_step, close = OBSERVERS[peer][1](log_dir)
        started = time.perf_counter()
        steps, _ = notebook_loop(images, labels, epochs=epochs, device=device, after_step=after_step)
        close()  # its files are complete only now: part of the cost
        seconds = time.perf_counter() - started
        return steps / seconds, directory_bytes(log_dir) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset-dir", help="directory with the four IDX files (as benchmarks/capture.py)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    results = measure_peers(*find_dataset(args.dataset_dir), epochs=args.epochs, repeats=args.repeats,
                            device=select_device(args.device))
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def measure_peers(dataset_dir: Path, name: str, *, epochs: int, repeats: int, device: torch.device) -> dict:
    """Steps/s, bytes per step and what is kept, for the bare notebook loop, each installed
    peer watching it, and weightlapse's capture; medians of ``repeats`` interleaved rounds."""
    if device.type == "cpu":
        torch.set_num_threads(1)
    os.environ.setdefault("WANDB_SILENT", "true")
    dataset = load_dataset(dataset_dir, name)
    images, labels = dataset.train.images, dataset.train.labels
    peers = [peer for peer, (module, _) in OBSERVERS.items() if installed(module)]
    rates: dict[str, list[float]] = {key: [] for key in ("notebook", *peers, "weightlapse")}
    sizes: dict[str, float] = {"notebook": 0.0}
    for _ in range(repeats):
        steps, seconds = notebook_loop(images, labels, epochs=epochs, device=device)
        rates["notebook"].append(steps / seconds)
        for peer in peers:
            rate, sizes[peer] = observed_rate(images, labels, epochs=epochs, device=device, peer=peer)
            rates[peer].append(rate)
        with tempfile.TemporaryDirectory(prefix="weightlapse-capture-") as tmp:
            capture = capture_run(dataset_dir, name, epochs, device.type, Path(tmp) / "run")
        rates["weightlapse"].append(capture["steps_per_s"])
        sizes["weightlapse"] = capture["bytes_per_step"]
    bare = statistics.median(rates["notebook"])
    keeps = {"notebook": "nothing", "tensorboard": "a histogram per step", "wandb": "a histogram per step",
             "weightlapse": "every weight of every step"}
    return {
        "dataset": name, "epochs": epochs, "repeats": repeats, "device": str(device),
        "not_installed": [peer for peer in OBSERVERS if peer not in peers],
        "peers": {key: {"steps_per_s": statistics.median(values), "vs_bare_loop": statistics.median(values) / bare,
                        "bytes_per_step": sizes[key], "keeps": keeps[key],
                        "all_runs_steps_per_s": [round(value) for value in values]}
                  for key, values in rates.items()},
    }


if __name__ == "__main__":
    sys.exit(main())
