"""Crash trials: kill the train stage with SIGKILL at random moments and check what it left.

    python benchmarks/crash_trials.py [--trials 50] [--dataset-dir DIR] [--epochs 3] [--json FILE]

First trains the run once without interruption: the reference (training is bitwise
deterministic). Then, for each trial, starts the same train stage in a fresh process and
kills it with SIGKILL: one trial in five at a random moment of start-up (imports, store
creation), the others at a random moment after the store appeared. Then it opens what the
stage left, read-only, as a reader would. A trial passes when:

- ``open_run`` reads the store without error, and every committed row (up to the progress
  marker) equals the reference run's row bit for bit: no zero, NaN or stale row;
- the run is not reported as finished, and the viewer's catalog says "unfinished" at once
  (the writer lock died with the process);
- or, when the kill came before the store existed, there is no store or ``open_run`` says
  clearly that it is still being created;
- or, when the kill came after the store was complete (while the process wrote its
  metrics or exited, or after it had exited), the whole run is there and marked finished;
- and (unless --no-resume) the stage run again with ``--resume`` ends with every row of
  the reference, bit for bit.

Prints a summary and, with --json, the per-trial figures recorded in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from capture import find_dataset  # the benchmarks' shared data lookup (this folder is on sys.path)

from weightlapse.pipeline.store import STORE_NAME, TrajectoryError, open_run, read_progress
from weightlapse.viewer.analysis.runs import RunCatalog


def train_command(workdir: Path, data_dir: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "weightlapse.pipeline.train", "--params", str(workdir / "params.yaml"),
            "--run", "trial",
            "--data", str(data_dir), "--out", str(out)]


def write_params(workdir: Path, dataset: str, epochs: int) -> None:
    (workdir / "params.yaml").write_text(
        f"data: {{dataset: {dataset}}}\n"
        f"train: {{epochs: {epochs}, eval_every: 500, device: cpu}}\n"
        "runs: {trial: {}}\n")


# Share of kills aimed at start-up (imports, store creation) rather than at training.
STARTUP_KILLS = 0.2


def time_reference_run(command: list[str], store: Path) -> tuple[float, float]:
    """Run ``command`` to the end: seconds until ``store`` appeared, and from then until exit."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(store / "zarr.json", process)
    created = time.perf_counter()
    if process.wait() != 0:
        raise SystemExit("the uninterrupted reference run failed: run the train stage by hand to see why")
    return created - started, time.perf_counter() - created


def wait_for(path: Path, process: subprocess.Popen) -> None:
    while not path.exists() and process.poll() is None:
        time.sleep(0.005)


def check_killed_run(out: Path, reference: np.ndarray, *, finished: bool = False) -> dict:
    """What a reader finds in the run directory a killed train stage left.

    ``finished``: the stage exited by itself before the kill; then the whole run must be there.
    """
    store = out / STORE_NAME
    result = {"store": store.exists()}
    try:
        progress = read_progress(store)
        ds = open_run(store)
    except TrajectoryError as error:
        # Killed while creating the store: acceptable only as a clear "not there yet".
        result.update(steps_done=None, error=str(error),
                      ok=not store.exists() or "still being created" in str(error) or "no trajectory" in str(error))
        return result
    steps_done = progress["steps_done"]
    # Every committed row, read with zarr directly (fast), and the last one through the
    # xarray API as well: both must equal the uninterrupted run's rows bit for bit.
    committed = zarr.open_array(store / "weights", mode="r")[:steps_done + 1]
    last = ds.weights.isel(step=-1).values if steps_done >= 0 else reference[:0]
    matches = ds.sizes["step"] == steps_done + 1 and np.array_equal(
        committed.view(np.int32), reference[:steps_done + 1].view(np.int32)) and (
        steps_done < 0 or np.array_equal(last.view(np.int32), reference[steps_done].view(np.int32)))
    info = RunCatalog(out.parent).describe(out.name)
    partial_files = len(list(store.rglob("*.partial")))
    result.update(steps_done=steps_done, finished=bool(progress["finished"]), rows_match_reference=bool(matches),
                  catalog_state=info.state, leftover_partial_files=partial_files,
                  ok=bool(matches) and (
                      # killed after the store was complete (or never killed): the whole run, finished
                      (progress["finished"] and info.state == "finished" and steps_done == len(reference) - 1)
                      or (not finished and not progress["finished"] and info.state == "unfinished")))
    return result


def check_resume(command: list[str], out: Path, reference: np.ndarray) -> bool:
    """Run the stage again with --resume: the finished store must equal the reference, every row."""
    if subprocess.run([*command, "--resume"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                      check=False).returncode:
        return False
    store = out / STORE_NAME
    weights = zarr.open_array(store / "weights", mode="r")[:]
    return bool(read_progress(store)["finished"] and np.array_equal(weights.view(np.int32), reference.view(np.int32)))


def run_trials(n_trials: int, dataset_dir: Path, dataset: str, epochs: int, *, seed: int = 0, resume: bool = True,
               log=print) -> dict:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="weightlapse-crash-") as tmp:
        workdir = Path(tmp)
        write_params(workdir, dataset, epochs)
        startup_s, training_s = time_reference_run(train_command(workdir, dataset_dir, workdir / "reference"),
                                                   workdir / "reference" / STORE_NAME)
        reference = zarr.open_array(workdir / "reference" / STORE_NAME / "weights", mode="r")[:]
        log(f"reference: {len(reference) - 1} steps; store created {startup_s:.1f} s after start, "
            f"then {training_s:.1f} s until the process exited")
        trials = []
        for index in range(n_trials):
            out = workdir / f"trial-{index}"
            process = subprocess.Popen(train_command(workdir, dataset_dir, out), stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
            started = time.perf_counter()
            if rng.random() < STARTUP_KILLS:  # while starting up or creating the store
                time.sleep(rng.uniform(0.0, startup_s))
            else:  # while training and writing: once the store exists, at a random point of the run
                wait_for(out / STORE_NAME / "zarr.json", process)
                time.sleep(rng.uniform(0.0, training_s))
            delay = time.perf_counter() - started
            finished_first = process.poll() is not None  # it was faster this time: nothing to kill
            process.send_signal(signal.SIGKILL)
            process.wait()
            time.sleep(0.2)  # the store writer process is killed with it: let it go
            result = {"trial": index, "killed_after_s": round(delay, 3), "finished_before_the_kill": finished_first,
                      **check_killed_run(out, reference, finished=finished_first)}
            if resume:
                result["resumed_exactly"] = check_resume(train_command(workdir, dataset_dir, out), out, reference)
                result["ok"] = result["ok"] and result["resumed_exactly"]
            trials.append(result)
            log(f"trial {index}: killed after {delay:.2f} s, committed step {result.get('steps_done')}, "
                f"{'ok' if result['ok'] else 'FAILED'}")
    with_store = [t for t in trials if t.get("steps_done") is not None]
    return {
        "trials": n_trials,
        "passed": sum(t["ok"] for t in trials),
        "killed_before_the_store_existed": n_trials - len(with_store),
        "finished_before_the_kill": sum(t["finished_before_the_kill"] for t in trials),
        "killed_after_the_store_was_complete": sum(bool(t.get("finished")) for t in trials),
        "killed_with_rows_committed": sum(1 for t in with_store if t["steps_done"] >= 0),
        "rows_checked_against_reference": sum(t["steps_done"] + 1 for t in with_store),
        "leftover_partial_files": sum(t.get("leftover_partial_files", 0) for t in trials),
        "resumed_exactly": sum(bool(t.get("resumed_exactly")) for t in trials) if resume else None,
        "reference_steps": int(len(reference) - 1),
        "details": trials,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--dataset-dir", help="directory with the four IDX files")
    parser.add_argument("--dataset", choices=["mnist", "fashion-mnist"], help="default: guessed from the path")
    parser.add_argument("--epochs", type=int, default=3, help="length of the run being killed (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--no-resume", action="store_true", help="skip resuming each killed run")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    dataset_dir, guessed = find_dataset(args.dataset_dir)
    summary = run_trials(args.trials, dataset_dir, args.dataset or guessed, args.epochs, seed=args.seed,
                         resume=not args.no_resume)
    print(f"{summary['passed']} of {summary['trials']} trials passed; {summary['killed_with_rows_committed']} "
          f"killed with rows committed, {summary['finished_before_the_kill']} finished before the kill, {summary['rows_checked_against_reference']:,} committed rows checked "
          f"bit for bit, {summary['killed_before_the_store_existed']} killed before the store existed, "
          f"{summary['leftover_partial_files']} leftover .partial files; "
          f"{summary['resumed_exactly']} resumed to the uninterrupted trajectory, bit for bit")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["passed"] == summary["trials"] else 1


if __name__ == "__main__":
    sys.exit(main())
