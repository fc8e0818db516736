"""Train a sweep's runs as tasks on a Dask cluster, for sweeps that outgrow one machine.

    python -m pipeline.sweep --params params.yaml --data data/mnist --out s3://bucket/runs \\
        --scheduler tcp://10.0.0.5:8786 [--runs NAME ...]

``dvc repro`` trains the sweep of params.yaml one stage after another on one machine and
keeps the results in DVC. This command trains the same runs (every grid point of
``sweep``, or the runs named, which may also come from ``runs``), each as one task on the
cluster's workers, several at a time, with the same code and params, so each gives the
trajectory its DVC stage would, bit for bit.

Each task trains into a staging directory on its worker's local disk (the writer relies
on atomic renames, which object stores lack), then publishes the run to ``--out/<run>``
(pipeline/locations.py); with a local ``--out`` on a shared file system it trains there
directly. ``--data`` must be readable by every worker (a shared path; the data stage's
directory). Without ``--scheduler`` a local cluster of one process per core is started.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pipeline.locations import Location, as_location, publish_run
from pipeline.params import Params, ParamsError, TrainParams, load_params

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepResult:
    metrics: dict[str, dict[str, float]]  # run name -> its metrics.json
    run_steps: int                        # optimizer steps over all runs
    seconds: float                        # wall time, first task submitted to last run published

    @property
    def run_steps_per_s(self) -> float:
        """Aggregate throughput: training steps recorded per second, over all runs together."""
        return self.run_steps / self.seconds


def train_and_publish(name: str, config: TrainParams, data_dir: str, dataset_name: str, out: str | Location) -> dict:
    """One run, as a cluster task: train it and put it at ``out/<name>``; its metrics."""
    import torch

    from pipeline.train import run_training

    torch.set_num_threads(1)  # one run per worker thread; the model's ops are tiny
    dataset = load_dataset_once(data_dir, dataset_name)
    destination = as_location(out) / name
    if destination.local:
        return run_training(config, dataset, destination.local_path, run_name=name, resume=True,
                            progress=False).metrics
    staging = Path(tempfile.mkdtemp(prefix=f"weightlapse-{name}-"))
    try:
        metrics = run_training(config, dataset, staging / name, run_name=name, progress=False).metrics
        publish_run(staging / name, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return metrics


def load_dataset_once(data_dir: str, dataset_name: str):
    """The dataset, loaded (and checksum-verified) once per worker process, not once per run:
    decompressing Fashion-MNIST takes about 0.8 s, as long as training a 1-epoch run. Loaded
    again if the directory's files changed."""
    files = tuple((path.name, path.stat().st_mtime_ns, path.stat().st_size)
                  for path in sorted(Path(data_dir).iterdir()) if path.is_file())
    return _load_dataset_cached(data_dir, dataset_name, files)


def warm_up_worker(data_dir: str, dataset_name: str) -> None:
    """Import the training code and load the dataset into this worker's cache (for
    ``Client.run`` before timing a sweep: both take a worker seconds the first time)."""
    import pipeline.train  # noqa: F401 - the import is the point

    load_dataset_once(data_dir, dataset_name)


@functools.lru_cache(maxsize=1)
def _load_dataset_cached(data_dir: str, dataset_name: str, files: tuple):
    from pipeline.datasets import load_dataset

    return load_dataset(data_dir, dataset_name)


def local_cluster(n_workers: int):
    """A LocalCluster whose workers can train runs at full speed.

    Its worker processes are not daemonic, so each run's store writer can be a child
    process (pipeline.handoff); a daemonic worker writes on a thread, which takes the GIL
    from training. Distributed's worker profiler is off (docs/scaling.md).
    """
    import dask
    from distributed import LocalCluster

    with dask.config.set({"distributed.worker.daemon": False, "distributed.worker.profile.enabled": False}):
        return LocalCluster(n_workers=n_workers, threads_per_worker=1, dashboard_address=None, silence_logs=40,
                            memory_limit=0)


def sweep_runs(params: Params, names: Iterable[str] | None = None) -> dict[str, TrainParams]:
    """The sweep's grid points, or the named runs (grid points or ``runs`` entries)."""
    if names is None:
        if not params.sweep_runs:
            raise ParamsError("params.yaml declares no sweep grid; add a 'sweep' section or name runs with --runs")
        return dict(params.sweep_runs)
    return {name: params.run(name) for name in names}


def dispatch(runs: dict[str, TrainParams], *, data_dir: str | Path, dataset_name: str, out: str | Location,
             scheduler, progress: Callable[[str, dict], None] | None = None) -> SweepResult:
    """Train ``runs`` on the cluster at ``scheduler`` (an address or Client), all at once."""
    from pipeline.cluster import as_completed, submit

    started = time.perf_counter()
    # A Location travels whole (with its storage options) to the workers.
    futures = {submit(train_and_publish, name, config, str(data_dir), dataset_name, out, scheduler=scheduler,
                      key=f"train-{name}"): name
               for name, config in runs.items()}
    metrics: dict[str, dict] = {}
    for future in as_completed(list(futures)):
        name = futures[future]
        metrics[name] = future.result()  # a failed run raises here, naming its error
        if progress:
            progress(name, metrics[name])
    seconds = time.perf_counter() - started
    return SweepResult(metrics, sum(int(m["steps"]) for m in metrics.values()), seconds)


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    from pipeline.cluster import ClusterError
    from pipeline.datasets import DatasetError

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, help="the data stage's directory, readable by every worker")
    parser.add_argument("--out", required=True, help="runs location: a shared directory or an fsspec URL")
    parser.add_argument("--scheduler", default=None,
                        help="Dask scheduler address (default: start a local cluster, one process per core)")
    parser.add_argument("--runs", nargs="+", default=None, help="train these runs (default: every sweep point)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cluster = client = None
    try:
        params = load_params(args.params)
        runs = sweep_runs(params, args.runs)
        scheduler = args.scheduler
        if scheduler is None:
            from distributed import Client

            cluster = local_cluster(os.cpu_count() or 1)
            scheduler = client = Client(cluster)
        with tqdm(total=len(runs), unit="run", desc="sweep") as bar:
            result = dispatch(runs, data_dir=args.data, dataset_name=params.data.dataset, out=args.out,
                              scheduler=scheduler, progress=lambda name, metrics: bar.update())
    except (ParamsError, DatasetError, ClusterError, OSError) as error:
        log.error("%s", error)
        return 1
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    log.info("%d runs in %.1f s: %s run-steps/s together, every step recorded, in %s", len(result.metrics),
             result.seconds, f"{result.run_steps_per_s:,.0f}", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
