"""Scale-out benchmark: sweep training and statistics on a dask.distributed cluster of 1 and 2 workers.

    python benchmarks/scale.py [--dataset-dir DIR] [--runs N] [--epochs N] [--out DIR] [--reuse] [--json FILE]

1. Trains a sweep of ``--runs`` seeds (default 8 runs of 7 Fashion-MNIST epochs: 168,000
   steps, 5.27 GB of raw float32 weights) one run after another in this process (as
   `dvc repro` does), then with ``pipeline.sweep.dispatch`` on a local cluster of 1 worker
   process and of 2, and reports the aggregate run-steps/s (every step recorded) of each.
   The 2-worker sweep's runs are kept for step 2.
2. Computes the per-pixel change statistics of every step of every run
   (``viewer.stats.change_statistics``) and the spread across the runs at every step
   (``viewer.compare.spread_summary``) on a fresh cluster of 1 worker, then of 2 workers
   (one thread each), then on threads in this process without a cluster, and reports
   throughput in GB of raw weights per second and each worker's peak memory (its
   process's maximum resident set; for the last, this process's, the sweeps' included).

Results are printed and, with ``--json``, written to a file; docs/benchmarks.md records them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cloudpickle
import dask
import memory  # this folder's, on sys.path when run as a script
from distributed import Client, LocalCluster
from memory import peak_rss_mb

from weightlapse.pipeline.params import parse_params
from weightlapse.pipeline.sweep import dispatch, local_cluster
from weightlapse.pipeline.store import open_run
from weightlapse.viewer.analysis import compare
from weightlapse.viewer.analysis.stats import change_statistics

DEFAULT_DATASET_DIRS = ("/usr/share/datasets/fashion-mnist", "data/fashion-mnist", "data/mnist")
RAW_BYTES_PER_STEP = 10 * 784 * 4
# distributed's worker profiler samples every thread's stack every 10 ms; with zarr's reads
# waiting on its I/O thread that halved read throughput here (docs/scaling.md).
WORKER_CONFIG = {"distributed.worker.profile.enabled": False}
# Workers cannot import this folder's modules: send the memory probe by value.
cloudpickle.register_pickle_by_value(memory)


def find_dataset(given: str | None) -> tuple[Path, str]:
    for candidate in [given] if given else DEFAULT_DATASET_DIRS:
        directory = Path(candidate)
        if (directory / "train-images-idx3-ubyte.gz").is_file():
            return directory, "fashion-mnist" if "fashion" in str(directory) else "mnist"
    raise SystemExit("no IDX dataset found: install Debian's dataset-fashion-mnist, run `dvc repro download`, "
                     "or pass --dataset-dir DIR")


def sweep_params(n_runs: int, epochs: int, dataset: str):
    return parse_params({"data": {"dataset": dataset}, "train": {"epochs": epochs, "device": "cpu"},
                         "runs": {"unused": {}},
                         "sweep": {"optimizer": ["adam"], "lr": [0.001], "batch_size": [20],
                                   "seed": list(range(n_runs))}})


def sequential(n_runs: int, epochs: int, data: Path, dataset: str, out: Path) -> dict:
    """The runs one after another in this process, as `dvc repro` trains them (less its start-ups)."""
    from weightlapse.pipeline.datasets import load_dataset
    from weightlapse.pipeline.train import run_training

    shutil.rmtree(out, ignore_errors=True)
    loaded = load_dataset(data, dataset)
    started = time.perf_counter()
    steps = sum(run_training(config, loaded, out / name, run_name=name, progress=False).metrics["steps"]
                for name, config in sweep_params(n_runs, epochs, dataset).sweep_runs.items())
    seconds = time.perf_counter() - started
    return {"workers": "sequential", "runs": n_runs, "run_steps": steps, "seconds": round(seconds, 2),
            "run_steps_per_s": round(steps / seconds)}


def sweep(n_workers: int, n_runs: int, epochs: int, data: Path, dataset: str, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    with local_cluster(n_workers) as cluster, Client(cluster) as client:
        result = dispatch(sweep_params(n_runs, epochs, dataset).sweep_runs, data_dir=data, dataset_name=dataset,
                          out=str(out), scheduler=client)
    return {"workers": n_workers, "runs": n_runs, "run_steps": result.run_steps, "seconds": round(result.seconds, 2),
            "run_steps_per_s": round(result.run_steps_per_s)}


def statistics_in_process(run_dirs: list[Path]) -> dict:
    """The same work on dask's threaded scheduler in this process (no cluster): the baseline."""
    trajectories = {path.name: open_run(path).weights for path in run_dirs}
    raw = sum(weights.size * 4 for weights in trajectories.values())
    started = time.perf_counter()
    for weights in trajectories.values():
        change_statistics(weights)
    stats_s = time.perf_counter() - started
    started = time.perf_counter()
    compare.spread_summary(trajectories)
    spread_s = time.perf_counter() - started
    return {"workers": f"threads ({os.cpu_count()}), no cluster", "raw_gb": round(raw / 1e9, 3),
            "statistics_s": round(stats_s, 1), "statistics_gb_per_s": round(raw / 1e9 / stats_s, 3),
            "spread_s": round(spread_s, 1), "spread_gb_per_s": round(raw / 1e9 / spread_s, 3),
            "peak_rss_mb_per_worker": [round(peak_rss_mb())]}


def statistics(n_workers: int, run_dirs: list[Path]) -> dict:
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, dashboard_address=None, silence_logs=40,
                      memory_limit=0) as cluster, Client(cluster) as client:
        trajectories = {path.name: open_run(path).weights for path in run_dirs}
        raw = sum(weights.size * 4 for weights in trajectories.values())
        started = time.perf_counter()
        for weights in trajectories.values():
            change_statistics(weights, scheduler=client)
        stats_s = time.perf_counter() - started
        started = time.perf_counter()
        compare.spread_summary(trajectories, scheduler=client)
        spread_s = time.perf_counter() - started
        peaks = client.run(peak_rss_mb)
    return {"workers": n_workers, "raw_gb": round(raw / 1e9, 3),
            "statistics_s": round(stats_s, 1), "statistics_gb_per_s": round(raw / 1e9 / stats_s, 3),
            "spread_s": round(spread_s, 1), "spread_gb_per_s": round(raw / 1e9 / spread_s, 3),
            "peak_rss_mb_per_worker": sorted(round(value) for value in peaks.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset-dir", help="directory with the four IDX files (default: Debian's Fashion-MNIST)")
    parser.add_argument("--runs", type=int, default=8, help="runs in the sweep (seeds)")
    parser.add_argument("--epochs", type=int, default=7, help="epochs per run")
    parser.add_argument("--out", default="/tmp/weightlapse-scale", help="where the runs are written")
    parser.add_argument("--reuse", action="store_true", help="skip the sweeps, use the runs already in --out")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    dask.config.set(WORKER_CONFIG)
    data, dataset = find_dataset(args.dataset_dir)
    out = Path(args.out)
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
                     "dataset": dataset}
    if not args.reuse:
        results["sweep"] = [sequential(args.runs, args.epochs, data, dataset, out / "runs")]
        for n_workers in (1, 2):  # the 2-worker sweep's runs stay for the statistics
            results["sweep"].append(sweep(n_workers, args.runs, args.epochs, data, dataset, out / "runs"))
        for row in results["sweep"]:
            print(f"sweep, {row['workers']} worker(s): {row['runs']} runs, {row['run_steps']:,} steps in "
                  f"{row['seconds']} s = {row['run_steps_per_s']:,} run-steps/s", flush=True)
        base, _, two = results["sweep"]
        results["sweep_2_workers_vs_sequential"] = round(two["run_steps_per_s"] / base["run_steps_per_s"], 2)
    run_dirs = sorted(path for path in (out / "runs").iterdir() if path.is_dir())
    disk = sum(file.stat().st_size for path in run_dirs for file in path.rglob("*") if file.is_file())
    results["disk_gb"] = round(disk / 1e9, 3)
    results["statistics"] = []
    for n_workers in (1, 2, 0):
        row = statistics(n_workers, run_dirs) if n_workers else statistics_in_process(run_dirs)
        results["statistics"].append(row)
        print(f"statistics, {n_workers} worker(s): {row['raw_gb']} GB raw ({results['disk_gb']} GB on disk): "
              f"change statistics {row['statistics_s']} s = {row['statistics_gb_per_s']} GB/s, spread "
              f"{row['spread_s']} s = {row['spread_gb_per_s']} GB/s, peak per worker {row['peak_rss_mb_per_worker']} MB",
              flush=True)
    one, two, _ = results["statistics"]
    results["statistics_speedup"] = round(two["statistics_gb_per_s"] / one["statistics_gb_per_s"], 2)
    results["spread_speedup"] = round(two["spread_gb_per_s"] / one["spread_gb_per_s"], 2)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
