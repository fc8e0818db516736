"""Train stage: train one run and record every step's weights into its trajectory store.

    python -m weightlapse.pipeline.train --params params.yaml --run sgd-momentum --data-root data \
        --out runs/sgd-momentum

``--data-root DIR`` reads the run's dataset from ``DIR/<dataset>`` (the data stage writes one
directory per dataset there); ``--data DIR`` names that directory itself.

Writes, under --out: trajectory.zarr (see pipeline.store), metrics.json (DVC metrics),
loss.csv and accuracy.csv (per-step history for `dvc plots`), and pixel-history.zarr, the
weights copied time-major for the viewer's pixel inspector (pipeline.history; derived data,
not a DVC output).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from weightlapse import __version__
from weightlapse.pipeline.closed_form import closed_form_stack, train_closed_form
from weightlapse.pipeline.datasets import Dataset, DatasetError, load_dataset
from weightlapse.pipeline.engines import ENGINES, EngineError, select_engine
from weightlapse.pipeline.history import index_trained_run
from weightlapse.pipeline.network_recording import NetworkRecording
from weightlapse.pipeline.params import ParamsError, TrainParams, load_params
from weightlapse.pipeline.recording import RunPlan, RunRecording, RunSummary, TrainingDiverged
from weightlapse.pipeline.runlock import RunLockedError, exclusive_writer
from weightlapse.pipeline.scoring import scoring_thread
from weightlapse.pipeline.trainer import DeviceError, select_device
from weightlapse.pipeline.resume import differs, find_resume_point
from weightlapse.pipeline.store import STORE_NAME, Progress, RunMetadata, TrajectoryError, open_store
from weightlapse.pipeline.summary import write_manifest

log = logging.getLogger(__name__)

# The key of RunMetadata.versions that holds code_digest(): with it a finished store says
# which code made it, so a stage that DVC reruns for another reason can keep it.
CODE_VERSION = "weightlapse-code"


def run_training(config: TrainParams, dataset: Dataset, out_dir: Path, *, run_name: str,
                 overwrite: bool = False, resume: bool = False, progress: bool = True) -> RunSummary:
    """Train one run on ``dataset`` and write its store, metrics and history into ``out_dir``.

    With ``resume``, a finished store of the same run made by the same code is kept
    (:func:`kept_run`), an unfinished one is carried on from its last checkpoint, giving
    the trajectory an uninterrupted run gives, bit for bit; any other store there is replaced. Raises RunLockedError if
    another process is writing ``out_dir``, and EngineError, before writing anything, if the
    engine the params name cannot train the run here.
    """
    device = select_device(config.device)
    engine = select_engine(config, device, even_batches=len(dataset.train.labels) % config.batch_size == 0)
    if resume:
        kept = kept_run(out_dir, run_metadata(run_name, config, dataset, device, engine))
        if kept is not None:
            _index(out_dir, config, locked=False)  # none yet, or one of an older store: built now
            return kept
    with exclusive_writer(out_dir):
        summary = _train_and_record(config, dataset, out_dir, device, engine, run_name=run_name,
                                    overwrite=overwrite, resume=resume, progress=progress)
        _index(out_dir, config, locked=True)
        return summary


def _index(out_dir: Path, config: TrainParams, *, locked: bool) -> None:
    """The pixel history, a copy of a softmax-regression run's (class, pixel) weights; a network
    run (hidden layers) has no such matrix, and its readers read the store."""
    if not config.hidden:
        index_trained_run(out_dir, locked=locked)


def _train_and_record(config: TrainParams, dataset: Dataset, out_dir: Path, device: torch.device, engine: str, *,
                      run_name: str, overwrite: bool, resume: bool, progress: bool) -> RunSummary:
    _use_one_cpu_thread(device)
    plan = RunPlan.of(config, dataset)
    model = ENGINES[engine].build(config, dataset, device, plan.block_steps)
    metadata = run_metadata(run_name, config, dataset, device, engine)
    point = None
    if resume and (out_dir / STORE_NAME).exists():
        found = find_resume_point(out_dir / STORE_NAME, plan.layout, metadata)
        if isinstance(found, str):
            log.info("%s: training from the start, replacing the store in %s: %s", run_name, out_dir, found)
            overwrite = True
        else:
            point = found
            if config.hidden:
                model.restore_parameters(list(point.parameters), point.optimizer_state, point.step)
            else:
                model.restore(point.weight, point.bias, point.optimizer_state, point.step)
            log.info("%s: resuming after step %d of %d", run_name, point.step, plan.layout.n_steps)

    with contextlib.ExitStack() as open_files:
        common = {"run_name": run_name, "checkpoint": model.optimizer_state, "overwrite": overwrite, "point": point,
                  "progress": progress}
        if config.hidden:  # an MLP, recorded parameter by parameter into a network store
            recording = NetworkRecording(open_files, plan, dataset, device, out_dir, metadata,
                                         sources=model.parameters_now(), activation=config.activation, **common)
        else:
            recording = RunRecording(open_files, plan, dataset, device, out_dir, metadata,
                                     sources=(model.weight_now, model.bias_now, model.gradient_now), **common)
        loop_started = time.perf_counter()
        model.train(recording.on_step, start_step=point.step if point else 0, **recording.block_callbacks())
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
    summaries = {name: recording.summary("numpy", seconds) for name, recording in zip(runs, recordings)}
    for _, out_dir in runs.values():
        index_trained_run(out_dir, locked=False)
    return summaries


def kept_run(out_dir: Path, metadata: RunMetadata) -> RunSummary | None:
    """The summary of the finished run in ``out_dir`` if training ``metadata``'s run again
    would give it bit for bit: the same model, params, dataset files and engine, and the
    same code (:func:`code_digest`); else None. Runs are bitwise repeatable, so a stage that
    DVC reruns for another reason (a new grid point, a new dataset) trains nothing again."""
    store = out_dir / STORE_NAME
    if not store.is_dir():
        return None
    try:
        group = open_store(store)
        stored = RunMetadata.parse(group.attrs["weightlapse"])
        finished = Progress.parse(group.attrs.get("progress"), str(store)).finished
        metrics = json.loads((out_dir / "metrics.json").read_text())
    except (TrajectoryError, KeyError, TypeError, ValueError, OSError):
        return None
    same = differs(stored, metadata) is None  # as JSON: a network's hidden widths read back as a list
    code = stored.versions.get(CODE_VERSION)
    if not (finished and same and code == metadata.versions[CODE_VERSION]
            and all((out_dir / name).is_file() for name in ("loss.csv", "accuracy.csv"))):
        return None
    log.info("%s: finished in %s by the same code from the same params and data; kept", metadata.run, out_dir)
    return RunSummary(metrics, metadata.engine, 0.0)


@functools.cache
def code_digest() -> str:
    """sha256 of the package's training code: every module under ``pipeline/`` (a superset
    of the train stage's imports, so any change that could change a trajectory changes it;
    the root package holds only the version and the public API, as in dvc.yaml's deps)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted((root / "pipeline").rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def stack_key(config: TrainParams) -> tuple | None:
    """Runs with equal keys can train as one stack (:func:`train_stack`) on a machine without
    a GPU; None: this run trains alone anywhere (its engine is not the CPU's numpy engine)."""
    if config.device == "cuda":
        return None
    try:
        # No CPU engine depends on the batches, so the split's size, unknown here, does not matter.
        engine = select_engine(config, torch.device("cpu"), even_batches=False)
    except EngineError:
        return None  # an engine that cannot train on the CPU: trained alone, where run_training decides
    if engine != "numpy":
        return None
    return tuple(sorted((key, repr(value)) for key, value in config.to_dict().items() if key not in ("seed", "lr")))


def _use_one_cpu_thread(device: torch.device) -> None:
    if device.type == "cpu":
        # This model's ops are tiny: one thread is faster than several, and it keeps the
        # float reduction order, hence the trajectory's bits, independent of the core count.
        torch.set_num_threads(1)


def run_metadata(run_name: str, config: TrainParams, dataset: Dataset, device: torch.device, engine: str
                 ) -> RunMetadata:
    """Everything needed to know how a store was made, saved next to the result."""
    return RunMetadata(
        run=run_name,
        params=config.to_dict(),
        model="mlp" if config.hidden else "softmax-regression",  # an MLP's layers: params' hidden, activation
        dataset=dataset.name,
        dataset_files=dataset.file_checksums,
        class_names=tuple(dataset.class_names),
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
            CODE_VERSION: code_digest(),
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
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="the run's dataset: a directory written by the data stage")
    data.add_argument("--data-root", help="the data stage's directories, one per dataset: the run's is read from "
                                          "DATA_ROOT/<dataset>")
    parser.add_argument("--out", required=True, help="run directory to write (runs/<run>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing trajectory store")
    parser.add_argument("--manifest", default=None,
                        help="also write the run's params and metrics here, for the summary stage (dvc.yaml)")
    parser.add_argument("--resume", action="store_true",
                        help="carry on an unfinished store of this run from its last checkpoint (bit for bit "
                             "as if never interrupted); any other existing store is replaced")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params)
        config = params.run(args.run)
        spec = params.dataset_of(args.run)
        dataset = load_dataset(args.data or Path(args.data_root) / spec.name, spec.name, spec=spec)
        metrics = run_training(config, dataset, Path(args.out), run_name=args.run, overwrite=args.overwrite,
                               resume=args.resume).metrics
        if args.manifest:
            write_manifest(Path(args.manifest), params, {args.run: metrics})
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
