"""Comparing seeds of a hidden-layer run: what matching hidden units does, and what it costs.

    python benchmarks/network_compare.py --data /usr/share/datasets/fashion-mnist [--seeds 3] [--width 32]

Trains one epoch (batch 20, Adam, CPU) of a 784-W-10 MLP for each seed through the train
stage's ``run_training``, then, in this one process: the weight-space comparison
(``network_compare.compare_networks``) at the viewer's default spacing (500 points a run)
and at every step, its time and the process's peak memory after it; the spread across the
runs by dask's generic std against the one-task-per-block reduction compare_networks uses,
interleaved; and the held-out loss on the line between the first run and each other
(``function_space.loss_along_line``), as recorded and with units matched, with its barrier.
Nothing here is a test; the numbers go into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import tempfile
import time
from pathlib import Path

import dask.array as da
import numpy as np

from weightlapse.pipeline.datasets import load_dataset
from weightlapse.pipeline.params import TrainParams
from weightlapse.pipeline.train import run_training
from weightlapse.viewer.analysis import function_space, network_compare
from weightlapse.viewer.analysis.runs import RunCatalog
from weightlapse.viewer.comparison import DEFAULT_POINTS
from weightlapse.viewer.predictions import barrier


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def spread_timings(runs: dict, every: int, repeats: int) -> dict[str, float]:
    """Median seconds of the mean spread across the runs, two ways, on the same lazy rows."""
    names = list(runs)
    steps = np.arange(0, runs[names[0]].last_step + 1, every)

    def rows(name):
        return da.concatenate([runs[name].values(p)[steps].astype(np.float64).reshape(len(steps), -1)
                               for p in runs[name].names], axis=1)

    ways = {
        "dask's generic std over a stacked axis": lambda: da.stack([rows(n) for n in names]).std(axis=0, ddof=1),
        "one task per block (compare_networks)": lambda: da.map_blocks(
            network_compare._std_over_runs, *[rows(n) for n in names], dtype=np.float64),
    }
    times: dict[str, list[float]] = {way: [] for way in ways}
    for repeat in range(repeats):
        for way, build in (ways.items() if repeat % 2 == 0 else reversed(ways.items())):
            start = time.perf_counter()
            build().mean(axis=1).compute()
            times[way].append(time.perf_counter() - start)
    return {way: statistics.median(values) for way, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a directory of Fashion-MNIST (or MNIST) IDX files")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dataset = load_dataset(args.data, args.dataset)
    with tempfile.TemporaryDirectory(prefix="network-compare-") as scratch:
        for seed in range(args.seeds):
            run_training(TrainParams(device="cpu", hidden=(args.width,), seed=seed), dataset,
                         Path(scratch) / f"mlp-{seed}", run_name=f"mlp-{seed}", progress=False)
        catalog = RunCatalog(scratch)
        runs = {f"mlp-{seed}": catalog.open(f"mlp-{seed}") for seed in range(args.seeds)}
        n_steps = min(run.last_step for run in runs.values()) + 1
        default_every = max(1, math.ceil(n_steps / DEFAULT_POINTS))
        print(f"{args.seeds} runs of 784-{args.width}-10, {n_steps - 1:,} steps each\n")
        print("| comparison | every | seconds | peak memory after it (MB) |")
        print("|---|---|---|---|")
        for every in (default_every, 1):
            start = time.perf_counter()
            result = network_compare.compare_networks(runs, every=every)
            print(f"| compare_networks | {every} | {time.perf_counter() - start:.1f} | {peak_mb():,.0f} |")
        print("\n| run | units relabelled | distance at the last step, as recorded | matched |")
        print("|---|---|---|---|")
        for name in result.other_run.values:
            print(f"| {name} | {int(result.moved_units.sel(other_run=name))} of {args.width} | "
                  f"{float(result.unmatched_distance.sel(other_run=name)[-1]):.2f} | "
                  f"{float(result.distance_to_reference.sel(other_run=name)[-1]):.2f} |")
        print(f"\n| spread across the runs, every {default_every} | seconds (median of {args.repeats}) |")
        print("|---|---|")
        for way, seconds in spread_timings(runs, default_every, args.repeats).items():
            print(f"| {way} | {seconds:.2f} |")
        heldout = function_space.HeldOut(dataset.test.images, dataset.test.labels.astype(np.int64), args.dataset, {})
        models = function_space.open_models(catalog, list(runs))
        start = time.perf_counter()
        line = function_space.loss_along_line(models, heldout)
        seconds = time.perf_counter() - start
        print(f"\nloss_along_line: {seconds:.1f} s for {len(line.other_run)} lines of {len(line.alpha)} points")
        print("\n| run | barrier as recorded (nats) | with units matched |")
        print("|---|---|---|")
        for name in line.other_run.values:
            print(f"| {name} | {barrier(line.loss.sel(other_run=name).values):.3f} | "
                  f"{barrier(line.matched_loss.sel(other_run=name).values):.3f} |")


if __name__ == "__main__":
    main()
