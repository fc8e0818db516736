"""Train a sweep's runs as tasks on a Dask cluster, for sweeps that outgrow one machine.

    python -m weightlapse.pipeline.sweep --params params.yaml --data data/mnist --out s3://bucket/runs \\
        --scheduler tcp://10.0.0.5:8786 [--runs NAME ...]

``dvc repro`` runs this command once per stage of its sweep, in-process, for the points of
one (dataset, optimizer, batch size): ``--in-process --where dataset=mnist optimizer=adam
batch_size=20 --manifest manifests/sweep-mnist-adam-b20.json``. Without ``--in-process``, it trains the same runs (every grid point of
``sweep``, or the runs named, which may also come from ``runs``) as tasks on the cluster's
workers, several at a time, with the same code and params, so each gives the trajectory its
DVC stage would, bit for bit. Runs that differ only in seed and learning rate train
together, as one stack, in one task (:func:`plan_tasks`, pipeline.train.train_stack): on
the CPU that is faster than training them one after another or side by side.

Each task trains into a staging directory on its worker's local disk (the writer relies
on atomic renames, which object stores lack), then publishes the run to ``--out/<run>``
(pipeline/locations.py); with a local ``--out`` on a shared file system it trains there
directly. ``--data`` must be readable by every worker (a shared path; the data stage's
directory). Without ``--scheduler`` a local cluster of one process per two cores is started,
or on a machine with fewer than four, the runs train in this process.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from weightlapse.pipeline.datasets import DatasetSpec
from weightlapse.pipeline.locations import Location, as_location, publish_run
from weightlapse.pipeline.params import SWEEP_AXES, Params, ParamsError, TrainParams, load_params
from weightlapse.pipeline.run_files import write_text_atomic
from weightlapse.pipeline.store import STORE_NAME, TrajectoryError, read_progress

log = logging.getLogger(__name__)


# Cores a training task keeps busy: the training thread, its held-out scorer and store
# writers (about half a core each while they work). On 2 cores, two stacks at once trained
# a 12-run sweep 1.03x and 1.22x as fast as one run after another (two measurements), the
# stacks in turn in one process 1.26x and 1.28x (docs/scaling.md).
CORES_PER_TASK = 2

# Runs in one stack at most. Past 4 runs a stack steps no faster per run (docs/benchmarks.md),
# and each of its runs has its own block buffers (48 MB) and store writer process.
MAX_STACK_RUNS = 8


@dataclass(frozen=True)
class SweepResult:
    metrics: dict[str, dict[str, float]]  # run name -> its metrics.json
    run_steps: int                        # optimizer steps over all runs
    seconds: float                        # wall time, first task submitted to last run published

    @property
    def run_steps_per_s(self) -> float:
        """Aggregate throughput: training steps recorded per second, over all runs together."""
        return self.run_steps / self.seconds


def train_and_publish(runs: dict[str, TrainParams], data_dir: str, dataset_name: str, out: str | Location, *,
                      spec: DatasetSpec | None = None) -> dict:
    """A task: train ``runs`` (one stack, or one run) and put each at ``out/<name>``; their metrics by name.

    A run whose local destination holds a finished store of the same run made by the same
    code is kept (pipeline.train.kept_run); an unfinished one is carried on from its
    checkpoint, alone; any other is trained again. On a worker with a GPU, where
    ``device: auto`` trains on it, every run trains alone, as does every run that no stack
    can train (hidden layers, an optimizer the numpy engine lacks). ``spec``: a declared dataset's.
    """
    import torch

    from weightlapse.pipeline.engines import select_engine
    from weightlapse.pipeline.train import kept_run, run_metadata, run_training, stack_key, train_stack
    from weightlapse.pipeline.trainer import select_device

    torch.set_num_threads(1)  # one run per worker thread; the model's ops are tiny
    dataset = load_dataset_once(data_dir, dataset_name, spec=spec)
    out = as_location(out)
    staging = None if out.local else Path(tempfile.mkdtemp(prefix="weightlapse-sweep-"))
    try:
        directories = {name: (out / name).local_path if staging is None else staging / name for name in runs}
        metrics = {}
        if staging is None:
            for name, config in list(runs.items()):
                device = select_device(config.device)
                engine = select_engine(config, device, even_batches=len(dataset.train.labels) % config.batch_size == 0)
                kept = kept_run(directories[name], run_metadata(name, config, dataset, device, engine))
                if kept is not None:
                    metrics[name] = kept.metrics
            runs = {name: config for name, config in runs.items() if name not in metrics}
        # Alone: an unfinished run (it resumes), one on a GPU, one no stack can train (hidden layers, an optimizer
        # without a numpy implementation: pipeline.train.stack_key).
        alone = {name: config for name, config in runs.items()
                 if _unfinished_store(directories[name]) or select_device(config.device).type != "cpu"
                 or stack_key(config) is None}
        stacked = {name: (config, directories[name]) for name, config in runs.items() if name not in alone}
        if len(stacked) > 1:
            results = train_stack(stacked, dataset, overwrite=True)  # replacing finished stores, as run_training does
            metrics.update({name: summary.metrics for name, summary in results.items()})
        else:
            alone.update({name: config for name, (config, _) in stacked.items()})
        for name, config in alone.items():
            metrics[name] = run_training(config, dataset, directories[name], run_name=name, resume=True,
                                         progress=False).metrics
        if staging is not None:
            for name in runs:
                publish_run(staging / name, out / name)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return metrics


def _unfinished_store(run_dir: Path) -> bool:
    store = run_dir / STORE_NAME
    if not store.exists():
        return False
    try:
        return not read_progress(store).get("finished", False)
    except (TrajectoryError, OSError, KeyError):
        return True  # run_training looks closer, and replaces what it cannot resume


def plan_tasks(runs: dict[str, TrainParams], slots: int) -> list[dict[str, TrainParams]]:
    """The sweep's runs as cluster tasks: runs that can train as one stack (pipeline.train.stack_key)
    in one task, up to ``MAX_STACK_RUNS`` a stack; stacks are halved while there are fewer
    tasks than ``slots`` (the cluster's worker threads), so that no worker stays idle."""
    from weightlapse.pipeline.train import stack_key

    groups: dict[tuple, list[str]] = {}
    alone: list[list[str]] = []
    for name, config in runs.items():
        key = stack_key(config)
        if key is None:
            alone.append([name])
        else:
            groups.setdefault(key, []).append(name)
    stacks = [part for names in groups.values() for part in _split_evenly(names, -(-len(names) // MAX_STACK_RUNS))]
    while len(stacks) + len(alone) < slots and any(len(stack) > 1 for stack in stacks):
        largest = max(stacks, key=len)
        stacks.remove(largest)
        stacks.extend(_split_evenly(largest, 2))
    return [{name: runs[name] for name in task} for task in stacks + alone]


def _split_evenly(names: list[str], parts: int) -> list[list[str]]:
    size, extra = divmod(len(names), parts)
    bounds = [part * size + min(part, extra) for part in range(parts + 1)]
    return [names[start:end] for start, end in itertools.pairwise(bounds)]


def load_dataset_once(data_dir: str, dataset_name: str, *, spec: DatasetSpec | None = None):
    """The dataset, loaded (and checksum-verified) once per worker process, not once per run:
    decompressing Fashion-MNIST takes about 0.8 s, as long as training a 1-epoch run. Loaded
    again if the directory's files or the dataset's declaration changed."""
    from weightlapse.pipeline.datasets import load_dataset

    files = tuple((path.name, path.stat().st_mtime_ns, path.stat().st_size)
                  for path in sorted(Path(data_dir).iterdir()) if path.is_file())
    key = (data_dir, dataset_name, files, repr(spec))
    if _loaded.get("key") != key:
        _loaded.clear()
        _loaded.update(key=key, dataset=load_dataset(data_dir, dataset_name, spec=spec))
    return _loaded["dataset"]


_loaded: dict = {}  # the one dataset a worker process holds, and what it was loaded from


def warm_up_worker(data_dir: str, dataset_name: str, *, spec: DatasetSpec | None = None) -> None:
    """Import the training code and load the dataset into this worker's cache (for
    ``Client.run`` before timing a sweep: both take a worker seconds the first time)."""
    import weightlapse.pipeline.train  # noqa: F401 - the import is the point

    load_dataset_once(data_dir, dataset_name, spec=spec)


def training_workers() -> int:
    """Worker processes for a local cluster that trains: one per ``CORES_PER_TASK`` cores."""
    return max(1, (os.cpu_count() or 1) // CORES_PER_TASK)


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


def sweep_runs(params: Params, names: Iterable[str] | None = None, *, where: dict[str, str] | None = None
               ) -> dict[str, TrainParams]:
    """The sweep's grid points, those whose grid values are ``where``'s (compared as text,
    as DVC writes them into a command), or the named runs (grid points or ``runs`` entries)."""
    if names is not None:
        return {name: params.run(name) for name in names}
    if not params.sweep_runs:
        raise ParamsError("params.yaml declares no sweep grid; add a 'sweep' section or name runs with --runs")
    where = where or {}
    unknown = sorted(set(where) - set(SWEEP_AXES))
    if unknown:
        raise ParamsError(f"--where: {', '.join(unknown)} is not an axis of the sweep; use {', '.join(SWEEP_AXES)}")
    return {name: config for name, config in params.sweep_runs.items()
            if all(str(params.sweep_points[name][axis]) == value for axis, value in where.items())}


def _parse_where(pairs: list[str]) -> dict[str, str]:
    where = {}
    for pair in pairs:
        axis, sep, value = pair.partition("=")
        if not sep or not axis or not value:
            raise ParamsError(f"--where: {pair!r} is not AXIS=VALUE, e.g. dataset=mnist optimizer=adam batch_size=20")
        where[axis] = value
    return where


def dispatch(runs: dict[str, TrainParams], *, data_dir: str | Path, dataset_name: str, out: str | Location,
             scheduler, progress: Callable[[str, dict], None] | None = None,
             spec: DatasetSpec | None = None) -> SweepResult:
    """Train ``runs`` on the cluster at ``scheduler`` (an address or Client), all at once, or
    with ``scheduler=None`` in this process, one task after another."""
    from weightlapse.pipeline.cluster import as_completed, client_for, submit

    started = time.perf_counter()
    if scheduler is None:
        # The same tasks, here: on a machine with too few cores for two at once (CORES_PER_TASK),
        # a one-worker cluster only adds its own cost (a 12-run sweep: 7.2 s on it, 6.4 s
        # here, medians of 3).
        results = (train_and_publish(task, str(data_dir), dataset_name, out, spec=spec)
                   for task in plan_tasks(runs, 1))
    else:
        slots = sum(client_for(scheduler).nthreads().values())
        # A Location travels whole (with its storage options) to the workers.
        futures = [submit(train_and_publish, task, str(data_dir), dataset_name, out, spec=spec, scheduler=scheduler,
                          key=f"train-{'+'.join(task)}")
                   for task in plan_tasks(runs, slots)]
        results = (future.result() for future in as_completed(futures))  # a failed run raises, naming its error
    metrics: dict[str, dict] = {}
    for task_metrics in results:
        for name, run_metrics in task_metrics.items():
            metrics[name] = run_metrics
            if progress:
                progress(name, run_metrics)
    seconds = time.perf_counter() - started
    return SweepResult(metrics, sum(int(m["steps"]) for m in metrics.values()), seconds)


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    from tqdm import tqdm

    from weightlapse.pipeline.cluster import ClusterError
    from weightlapse.pipeline.datasets import DatasetError

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="the data stage's directory of the runs' one dataset, readable by every worker")
    data.add_argument("--data-root", help="the data stage's directories, one per dataset (DATA_ROOT/<dataset>)")
    parser.add_argument("--out", required=True, help="runs location: a shared directory or an fsspec URL")
    parser.add_argument("--scheduler", default=None,
                        help="Dask scheduler address (default: a local cluster of one process per 2 cores, "
                             "or this process on a machine of 2 or 3 cores)")
    parser.add_argument("--in-process", action="store_true", help="train in this process, no cluster (dvc.yaml)")
    parser.add_argument("--runs", nargs="+", default=None, help="train these runs (default: every sweep point)")
    parser.add_argument("--where", nargs="+", default=[], metavar="AXIS=VALUE",
                        help="only the sweep points with these grid values, e.g. dataset=mnist optimizer=adam")
    parser.add_argument("--manifest", default=None, help="write the runs' grid values and metrics here (dvc.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cluster = client = None
    try:
        params = load_params(args.params)
        runs = sweep_runs(params, args.runs, where=_parse_where(args.where))
        by_dataset: dict[str, dict[str, TrainParams]] = {}
        for name, config in runs.items():
            by_dataset.setdefault(params.dataset_of(name).name, {})[name] = config
        if args.data and len(by_dataset) > 1:
            raise ParamsError(f"--data names one dataset's directory, and these runs train on {len(by_dataset)} "
                              f"({', '.join(by_dataset)}); pass --data-root, the directory holding one per dataset")
        scheduler = args.scheduler
        if scheduler is None and not args.in_process and training_workers() > 1:
            from distributed import Client

            cluster = local_cluster(training_workers())
            scheduler = client = Client(cluster)
        metrics, seconds, run_steps = {}, 0.0, 0
        with tqdm(total=len(runs), unit="run", desc="sweep") as bar:
            for dataset_name, dataset_runs in by_dataset.items():
                result = dispatch(dataset_runs, data_dir=args.data or Path(args.data_root) / dataset_name,
                                  dataset_name=dataset_name, spec=params.datasets[dataset_name], out=args.out,
                                  scheduler=scheduler, progress=lambda name, metrics: bar.update())
                metrics.update(result.metrics)
                seconds, run_steps = seconds + result.seconds, run_steps + result.run_steps
        if args.manifest:
            from weightlapse.pipeline.summary import write_manifest

            write_manifest(Path(args.manifest), params, metrics)
            if as_location(args.out).local:
                for name in metrics:  # not DVC outputs, so git must be told to leave them alone
                    write_text_atomic(as_location(args.out).local_path / name / ".gitignore", "*\n")
    except (ParamsError, DatasetError, ClusterError, OSError) as error:
        log.error("%s", error)
        return 1
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    log.info("%d runs in %.1f s: %s run-steps/s together, every step recorded, in %s", len(metrics), seconds,
             f"{run_steps / max(seconds, 1e-9):,.0f}", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
