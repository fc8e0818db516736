"""Hidden-layer runs of the train stage (``train.hidden``): their stores' size and speed.

    python benchmarks/hidden_runs.py --data /usr/share/datasets/fashion-mnist [--repeats N] [--widths 16 32]

Trains one epoch (batch 20, Adam, CPU) of softmax regression with the torch engine (the
engine every hidden-layer run takes) and of a 784-W-10 MLP for each width, through the
train stage's ``run_training``, interleaved over repeats; prints each run's steps/s (median;
the loop with its recording, store closed), bytes on disk of its store (and of a
softmax-regression run's pixel history) and its held-out accuracy. Nothing here is a test;
the numbers go into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

from weightlapse.pipeline.datasets import load_dataset
from weightlapse.pipeline.params import TrainParams
from weightlapse.pipeline.store import HISTORY_NAME, STORE_NAME
from weightlapse.pipeline.train import run_training


def size(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file()) if path.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a directory of Fashion-MNIST (or MNIST) IDX files")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32])
    args = parser.parse_args()
    dataset = load_dataset(args.data, args.dataset)
    runs = {"softmax (torch engine)": TrainParams(device="cpu", engine="torch"),
            **{f"mlp-{width}": TrainParams(device="cpu", hidden=(width,)) for width in args.widths}}
    rates: dict[str, list[float]] = {name: [] for name in runs}
    results = {}
    with tempfile.TemporaryDirectory(prefix="hidden-runs-") as scratch:
        for repeat in range(args.repeats):
            for name, config in (runs.items() if repeat % 2 == 0 else reversed(runs.items())):
                out = Path(scratch) / name.split()[0]
                shutil.rmtree(out, ignore_errors=True)
                summary = run_training(config, dataset, out, run_name=out.name, progress=False)
                rates[name].append(summary.steps_per_s)
                results[name] = (summary.metrics, size(out / STORE_NAME), size(out / HISTORY_NAME))
    print("| run | steps/s (median) | store bytes | pixel history bytes | held-out accuracy |")
    print("|---|---|---|---|---|")
    for name, (metrics, store, history) in results.items():
        print(f"| {name} | {statistics.median(rates[name]):,.0f} | {store:,} | {history:,} | "
              f"{metrics['heldout_accuracy']:.4f} |")


if __name__ == "__main__":
    main()
