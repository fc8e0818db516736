"""Capture benchmark: how fast weightlapse trains while recording every step, against the
original notebook's loop that recorded nothing.

    python benchmarks/capture.py [--dataset-dir DIR] [--epochs N] [--repeats N] [--sweep-runs N] [--json FILE]

Measures, in one process, on the same data and device, batch-20 Adam for --epochs epochs:

(a) the original notebook's approach, written from its description: a per-sample Dataset
    with a transform (one-hot label -> class index), a shuffling DataLoader, Adam, and the
    weights copied to the CPU after each step; nothing stored;
(b) the project's training loop with capture off, on the engine the train stage picks
    (the closed-form numpy engine on the CPU; on CUDA the cuda-graph engine, whose rows
    still reach the host but go nowhere); the eager autograd loop is reported beside it;
(c) the project's train stage (pipeline.train.run_training) capturing every step to Zarr,
    timed from its first step until the store is closed and flushed. Held-out data is
    scored only at the first and last step, as the notebook scored none; the stage with
    its default scoring every 100 steps is reported beside it, and (c) with the
    ``compact`` codec (``capture.codec: compact``), with its bytes per step.

Each of these runs --repeats times, interleaved, and the medians count: timings on a
small shared machine drift by 20% between runs.

Then the aggregate throughput of a sweep of --sweep-runs seeds: trained one after another,
as one stack (one numpy computation for all, pipeline.train.train_stack), and as
`python -m weightlapse.pipeline.sweep` trains them (on its local Dask cluster, or in its own process on
a machine with fewer than 4 cores). Then, each in a fresh process, (c) for 1 epoch and
for --memory-epochs epochs, to show that peak memory does not grow with run length. Prints
steps/s, the ratios (c)/(a) and (c)/(b), bytes per step on disk and peak memory; --json
writes them for comparison across machines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from memory import ChildPeakMemory, peak_rss_mb  # this folder is on sys.path
from torch import nn
from torch.utils.data import DataLoader, Dataset

from weightlapse.pipeline.datasets import Dataset as RunData
from weightlapse.pipeline.datasets import Split, load_dataset
from weightlapse.pipeline.engines import ENGINES, select_engine
from weightlapse.pipeline.params import CaptureParams, TrainParams
from weightlapse.pipeline.train import run_training
from weightlapse.pipeline.trainer import SoftmaxRegression, make_optimizer, plan_steps, select_device, train

RAW_BYTES_PER_STEP = 10 * 784 * 4
DEFAULT_DATASET_DIRS = ("data/mnist", "data/fashion-mnist", "/usr/share/datasets/fashion-mnist")


class NotebookDataset(Dataset):
    """The notebook's dataset: a list of (image, one-hot label) samples and a transform."""

    def __init__(self, samples, transform) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        return self.transform(self.samples[index])


def to_tensor(sample):
    image, one_hot = sample
    return torch.from_numpy(image).to(torch.float32), torch.tensor(np.argmax(one_hot)).to(torch.long)


def notebook_loop(images: np.ndarray, labels: np.ndarray, *, epochs: int, device: torch.device,
                  after_step=None) -> tuple[int, float]:
    """(steps, seconds) of the original notebook's training loop; ``after_step(model, step, loss)``
    is what a logging library's user adds to it (benchmarks/peers.py)."""
    one_hot = np.eye(10, dtype=np.float32)[labels]
    samples = list(zip(images, one_hot))
    loader = DataLoader(NotebookDataset(samples, to_tensor), batch_size=20, shuffle=True)
    torch.manual_seed(0)
    model = nn.Linear(784, 10, bias=False).to(device)
    optimizer = torch.optim.Adam(model.parameters())
    steps = 0
    started = time.perf_counter()
    for _ in range(epochs):
        for sample, target in loader:
            optimizer.zero_grad()
            loss = F.nll_loss(F.log_softmax(model(sample.to(device)), dim=1), target.to(device))
            loss.backward()
            optimizer.step()
            model.weight.cpu().detach().numpy().copy()  # what its live view read each step
            steps += 1
            if after_step is not None:
                after_step(model, steps, loss)
    return steps, time.perf_counter() - started


def project_loop(images: np.ndarray, labels: np.ndarray, *, epochs: int, device: torch.device,
                 engine: str) -> tuple[int, float]:
    """(steps, seconds) of the project's training loop with nothing recorded, on ``engine``."""
    steps = [0]

    def count(step: int, loss: float) -> None:
        steps[0] = step

    split = Split(images, labels)
    dataset = RunData("benchmark", split, split, {}, tuple(str(label) for label in range(10)))
    if engine != "torch":  # the engine the train stage drives, as it drives it
        model = ENGINES[engine].build(TrainParams(epochs=epochs, device=device.type), dataset, device, 512)
        started = time.perf_counter()
        model.train(count, on_block=lambda first, rows: count(first + len(rows["loss"]) - 1, 0.0))
        return steps[0], time.perf_counter() - started
    model = SoftmaxRegression(seed=0).to(device)
    x, y = torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)
    optimizer = make_optimizer(model.parameters(), name="adam", lr=1e-3)
    started = time.perf_counter()
    train(model, optimizer, x, y, batch_size=20, epochs=epochs, seed=0, on_step=count)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps[0], time.perf_counter() - started


def capture_run(dataset_dir: Path, name: str, epochs: int, device: str, out: Path, *,
                heldout_every: int | None = None, codec: str = "fast") -> dict:
    """The train stage, recording every step; its loop's steps/s, bytes per step and peak memory.

    Held-out data is scored only at the first and last step unless ``heldout_every`` is
    given: the notebook scored none, and scoring is not capture. ``codec``: params'
    ``capture.codec``.
    """
    dataset = load_dataset(dataset_dir, name)
    steps = plan_steps(len(dataset.train.labels), batch_size=20, epochs=epochs, max_steps=None)
    config = TrainParams(epochs=epochs, device=device, eval_every=heldout_every or steps,
                         capture=CaptureParams(codec=codec))
    # The store writer is forked from the training process: most of its resident pages
    # (the dataset, the interpreter) are the parent's, shared, and counted in both peaks.
    with ChildPeakMemory() as writer:
        summary = run_training(config, dataset, out, run_name="benchmark", progress=False)
    store = out / "trajectory.zarr" / "weights"
    size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file() and f.name != "zarr.json")
    return {"steps": summary.metrics["steps"], "seconds": summary.loop_seconds, "steps_per_s": summary.steps_per_s,
            "engine": summary.engine, "bytes_per_step": size / (summary.metrics["steps"] + 1),
            "peak_rss_mb": peak_rss_mb(), "writer_peak_rss_mb": writer.peak_mb}


def sweep_throughput(dataset_dir: Path, name: str, n_runs: int, epochs: int, device: str, repeats: int) -> dict:
    """Aggregate run-steps/s of ``n_runs`` seeds, every step recorded: one after another in this
    process (as `dvc repro` trains a sweep); as one stack in this process (pipeline.train.train_stack);
    and as ``pipeline.sweep`` trains them without ``--scheduler``: on its local Dask cluster of
    one worker process per 2 cores, stacks split across the workers, or with fewer than 4
    cores in this process. Data is loaded beforehand in all three; each is timed
    ``repeats`` times and the median counts."""
    from distributed import Client

    from weightlapse.pipeline.sweep import dispatch, local_cluster, training_workers, warm_up_worker
    from weightlapse.pipeline.train import train_stack

    dataset = load_dataset(dataset_dir, name)
    steps = plan_steps(len(dataset.train.labels), batch_size=20, epochs=epochs, max_steps=None)
    runs = {f"seed-{seed}": TrainParams(epochs=epochs, device=device, seed=seed, eval_every=steps)
            for seed in range(n_runs)}
    stackable = select_device(device).type == "cpu"  # a stack is the CPU's numpy engine
    timings: dict[str, list[float]] = {"sequential": [], "stacked": [], "sweep_command": []}
    n_workers = training_workers()
    with tempfile.TemporaryDirectory(prefix="weightlapse-sweep-") as tmp:
        for repeat in range(repeats):
            started = time.perf_counter()
            for run, config in runs.items():
                run_training(config, dataset, Path(tmp) / f"sequential-{repeat}" / run, run_name=run, progress=False)
            timings["sequential"].append(n_runs * steps / (time.perf_counter() - started))
            if stackable:
                started = time.perf_counter()
                train_stack({run: (config, Path(tmp) / f"stacked-{repeat}" / run) for run, config in runs.items()},
                            dataset)
                timings["stacked"].append(n_runs * steps / (time.perf_counter() - started))
        with contextlib.ExitStack() as cluster_open:
            scheduler = None  # as `python -m weightlapse.pipeline.sweep` picks it
            if n_workers > 1:
                scheduler = cluster_open.enter_context(Client(cluster_open.enter_context(local_cluster(n_workers))))
                scheduler.run(warm_up_worker, str(dataset_dir), name)  # imports and data, before timing
            else:
                warm_up_worker(str(dataset_dir), name)
            for repeat in range(repeats):
                result = dispatch(runs, data_dir=str(dataset_dir), dataset_name=name,
                                  out=str(Path(tmp) / f"sweep-{repeat}"), scheduler=scheduler)
                timings["sweep_command"].append(result.run_steps_per_s)
    medians = {way: statistics.median(values) if values else None for way, values in timings.items()}
    sequential = medians["sequential"]
    return {"runs": n_runs, "epochs": epochs,
            "sweep_command_on": f"{n_workers} worker processes" if n_workers > 1 else "its own process",
            "sequential_run_steps_per_s": sequential,
            "stacked_run_steps_per_s": medians["stacked"],
            "sweep_command_run_steps_per_s": medians["sweep_command"],
            "stacked_vs_sequential": medians["stacked"] / sequential if stackable else None,
            "sweep_command_vs_sequential": medians["sweep_command"] / sequential}


def capture_in_subprocess(dataset_dir: Path, name: str, epochs: int, device: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="weightlapse-capture-") as tmp:
        code = ("import json, sys; from pathlib import Path; sys.path.insert(0, 'benchmarks'); "
                "from capture import capture_run; "
                f"print(json.dumps(capture_run(Path({str(dataset_dir)!r}), {name!r}, {epochs}, {device!r}, "
                f"Path({tmp!r}) / 'run')))")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).resolve().parents[1])
    return json.loads(result.stdout.strip().splitlines()[-1])


def peers_in_subprocess(dataset_dir: Path, epochs: int, repeats: int, device: str) -> dict:
    """benchmarks/peers.py's figures, measured in a fresh process: W&B leaves its service
    process and threads behind, which would slow what is measured after it."""
    with tempfile.TemporaryDirectory(prefix="weightlapse-peers-") as tmp:
        out = Path(tmp) / "peers.json"
        subprocess.run([sys.executable, str(Path(__file__).with_name("peers.py")), "--dataset-dir", str(dataset_dir),
                        "--epochs", str(epochs), "--repeats", str(repeats), "--device", device, "--json", str(out)],
                       check=True, stdout=subprocess.DEVNULL, cwd=Path(__file__).resolve().parents[1])
        return json.loads(out.read_text())


def find_dataset(given: str | None) -> tuple[Path, str]:
    candidates = [given] if given else list(DEFAULT_DATASET_DIRS)
    for candidate in candidates:
        directory = Path(candidate)
        if (directory / "train-images-idx3-ubyte.gz").is_file():
            name = "fashion-mnist" if "fashion" in str(directory) else "mnist"
            return directory, name
    raise SystemExit(f"no IDX dataset found in {', '.join(candidates)}: run `dvc repro download` first, "
                     "install Debian's dataset-fashion-mnist, or pass --dataset-dir DIR")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset-dir", help="directory with the four IDX files (default: data/mnist, "
                                              "data/fashion-mnist, Debian's fashion-mnist)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs for (a), (b) and (c) (default 1)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="times each of (a), (b), (c) runs, interleaved; the median counts (default 3)")
    parser.add_argument("--memory-epochs", type=int, default=20, help="long run for the memory check (default 20)")
    parser.add_argument("--sweep-runs", type=int, default=4,
                        help="seeds trained one after another, as one stack and by pipeline.sweep for the "
                             "sweep throughput (default 4; 0 skips it)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--no-peers", action="store_true",
                        help="skip TensorBoard and W&B on the notebook's loop (benchmarks/peers.py)")
    args = parser.parse_args(argv)

    dataset_dir, name = find_dataset(args.dataset_dir)
    device = select_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # as the train stage does: tiny ops run faster on one thread
    dataset = load_dataset(dataset_dir, name)
    images, labels = dataset.train.images, dataset.train.labels
    defaults = TrainParams(device=device.type)  # the engine the train stage picks for the default run here
    engine = select_engine(defaults, device, even_batches=len(labels) % defaults.batch_size == 0)

    rates: dict[str, list[float]] = {key: [] for key in ("notebook", "no_capture", "autograd", "capture", "heldout",
                                                         "compact")}
    for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits all alike
        rates["notebook"].append(steps_per_s(notebook_loop(images, labels, epochs=args.epochs, device=device)))
        rates["no_capture"].append(steps_per_s(project_loop(images, labels, epochs=args.epochs, device=device,
                                                            engine=engine)))
        if engine != "torch":  # the eager autograd loop beside the stage's engine
            rates["autograd"].append(steps_per_s(project_loop(images, labels, epochs=args.epochs, device=device,
                                                              engine="torch")))
        with tempfile.TemporaryDirectory(prefix="weightlapse-capture-") as tmp:
            capture = capture_run(dataset_dir, name, args.epochs, device.type, Path(tmp) / "run")
            rates["capture"].append(capture["steps_per_s"])
            rates["heldout"].append(capture_run(dataset_dir, name, args.epochs, device.type, Path(tmp) / "scored",
                                                heldout_every=100)["steps_per_s"])
            compact = capture_run(dataset_dir, name, args.epochs, device.type, Path(tmp) / "compact", codec="compact")
            rates["compact"].append(compact["steps_per_s"])
    sweep = sweep_throughput(dataset_dir, name, args.sweep_runs, args.epochs, device.type, args.repeats) \
        if args.sweep_runs else None
    peers = None if args.no_peers else peers_in_subprocess(dataset_dir, args.epochs, args.repeats, args.device)
    short = capture_in_subprocess(dataset_dir, name, 1, device.type)
    long = capture_in_subprocess(dataset_dir, name, args.memory_epochs, device.type)

    median = {key: statistics.median(values) if values else None for key, values in rates.items()}
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                   f"torch {torch.__version__}",
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "engine": engine,
        "dataset": name,
        "epochs": args.epochs,
        "repeats": args.repeats,
        "notebook_steps_per_s": median["notebook"],
        "no_capture_steps_per_s": median["no_capture"],
        "capture_steps_per_s": median["capture"],
        "autograd_no_capture_steps_per_s": median["autograd"],
        "capture_with_heldout_every_100_steps_per_s": median["heldout"],
        "compact_capture_steps_per_s": median["compact"],
        "all_runs_steps_per_s": {key: [round(v) for v in values] for key, values in rates.items()},
        "bytes_per_step": capture["bytes_per_step"],
        "compact_bytes_per_step": compact["bytes_per_step"],
        "raw_bytes_per_step": RAW_BYTES_PER_STEP,
        "peak_rss_mb": short["peak_rss_mb"],
        f"peak_rss_mb_{args.memory_epochs}_epochs": long["peak_rss_mb"],
        "writer_peak_rss_mb": short["writer_peak_rss_mb"],
        f"writer_peak_rss_mb_{args.memory_epochs}_epochs": long["writer_peak_rss_mb"],
        "memory_epochs_steps_per_s": long["steps_per_s"],
        "sweep": sweep,
        "peers": peers,
    }
    results["capture_vs_notebook"] = results["capture_steps_per_s"] / results["notebook_steps_per_s"]
    results["capture_vs_no_capture"] = results["capture_steps_per_s"] / results["no_capture_steps_per_s"]
    results["compression"] = RAW_BYTES_PER_STEP / results["bytes_per_step"]
    results["compact_compression"] = RAW_BYTES_PER_STEP / results["compact_bytes_per_step"]
    results["compact_capture_vs_notebook"] = results["compact_capture_steps_per_s"] / results["notebook_steps_per_s"]
    print(json.dumps(results, indent=2))
    print(f"(a) notebook {results['notebook_steps_per_s']:,.0f} steps/s, (b) no capture "
          f"{results['no_capture_steps_per_s']:,.0f} ({engine} engine), (c) capture "
          f"{results['capture_steps_per_s']:,.0f}: (c)/(a) {results['capture_vs_notebook']:.2f} "
          f"(target >= {10 if device.type == 'cuda' else 4}), "
          f"(c)/(b) {results['capture_vs_no_capture']:.2f} (target >= 0.90)")
    print(f"compact codec: (c) {results['compact_capture_steps_per_s']:,.0f} steps/s, (c)/(a) "
          f"{results['compact_capture_vs_notebook']:.2f} (target >= 4), {results['compact_bytes_per_step']:,.0f} bytes "
          f"per step ({results['compact_compression']:.2f}x, target >= 1.8x)")
    print(f"{results['bytes_per_step']:,.0f} bytes per step on disk ({results['compression']:.2f}x, target >= 1.3x); "
          f"peak memory {short['peak_rss_mb']:.0f} MB for 1 epoch, {long['peak_rss_mb']:.0f} MB for "
          f"{args.memory_epochs} epochs (store writer process: {short['writer_peak_rss_mb']:.0f} and "
          f"{long['writer_peak_rss_mb']:.0f} MB, mostly pages shared with training)")
    if sweep:
        stacked = "" if sweep["stacked_run_steps_per_s"] is None else \
            f"{sweep['stacked_run_steps_per_s']:,.0f} as one stack ({sweep['stacked_vs_sequential']:.2f}x), "
        print(f"sweep of {sweep['runs']} runs, run-steps/s: {sweep['sequential_run_steps_per_s']:,.0f} one after "
              f"another, {stacked}{sweep['sweep_command_run_steps_per_s']:,.0f} by pipeline.sweep in "
              f"{sweep['sweep_command_on']} ({sweep['sweep_command_vs_sequential']:.2f}x)")
    if peers:
        missing = f" (not installed: {', '.join(peers['not_installed'])})" if peers["not_installed"] else ""
        print("notebook's loop observed by each peer" + missing + ": " + ", ".join(
            f"{key} {row['steps_per_s']:,.0f} steps/s ({row['vs_bare_loop']:.2f}x, {row['bytes_per_step']:,.0f} B/step, "
            f"keeps {row['keeps']})" for key, row in peers["peers"].items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def steps_per_s(steps_and_seconds: tuple[int, float]) -> float:
    steps, seconds = steps_and_seconds
    return steps / seconds


if __name__ == "__main__":
    sys.exit(main())
