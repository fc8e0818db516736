"""Summary stage: every run's curves and the sweep's results as long-format CSVs for `dvc plots`.

    python -m weightlapse.pipeline.summary --manifests manifests --runs runs --out summary

DVC draws one panel per file and cannot overlay the runs of many files in one, so this
stage writes one file per plot, one row per (run, step), which dvc.yaml's top-level
``plots`` draw with the templates in .dvc/plots/ (a line per run, or per optimizer and
dataset):

- ``loss.csv`` (run, step, loss): each run's training loss, averaged over bins of
  consecutive steps so that a run gives at most ``MAX_POINTS`` points (a per-batch loss is
  noise at any other scale, and a browser draws 13 runs of 3,000 steps slowly);
- ``accuracy.csv`` (run, step, heldout_accuracy): each held-out evaluation;
- ``sweep.csv`` (series, dataset, optimizer, batch_size, lr, heldout_accuracy, seeds): the
  sweep's final held-out accuracy, the mean over seeds, against learning rate;
- ``metrics.json``: for each (dataset, optimizer, batch size) of the sweep, the best lr
  and its accuracy: a handful of columns for `dvc exp show`, where every run's metrics
  would be a hundred.

The runs are those the train and sweep stages list in their manifests (``--manifests``),
written by :func:`write_manifest`: DVC cannot name each run of a sweep stage as its own
output (no list expands inside a stage), so a stage's manifest, its runs' params and
metrics, is its tracked record, and it changes whenever any of its runs' results change.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from collections import defaultdict
from pathlib import Path
from statistics import fmean

from weightlapse.pipeline.params import Params
from weightlapse.pipeline.run_files import write_text_atomic

log = logging.getLogger(__name__)

MAX_POINTS = 300  # loss points per run


class SummaryError(ValueError):
    """A manifest or a run's history cannot be read."""


def write_manifest(path: Path, params: Params, metrics: dict[str, dict]) -> None:
    """Record runs (name -> its metrics.json) as a stage's manifest: each run's kind (a sweep
    point or a listed run), dataset, optimizer, lr, batch size, seed and metrics."""
    runs = {}
    for name in sorted(metrics):
        config = params.run(name)
        runs[name] = {"kind": "sweep" if name in params.sweep_runs else "run", "dataset": params.dataset_of(name).name,
                      "optimizer": config.optimizer, "lr": config.lr, "batch_size": config.batch_size,
                      "seed": config.seed, **metrics[name]}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(runs, indent=2) + "\n")


def read_manifests(directory: Path) -> dict[str, dict]:
    """Run name -> its manifest entry (dataset, params, metrics), from every ``*.json`` in ``directory``."""
    runs: dict[str, dict] = {}
    for path in sorted(directory.glob("*.json")):
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise SummaryError(f"{path}: not a readable manifest ({error}); run `dvc repro` to write it again") from None
        if not isinstance(entries, dict):
            raise SummaryError(f"{path}: expected a mapping of run names to entries")
        runs.update(entries)
    return runs


def binned_losses(steps: list[int], losses: list[float], max_points: int = MAX_POINTS) -> list[tuple[int, float]]:
    """(last step of the bin, mean loss) for bins of consecutive steps, at most ``max_points`` of them."""
    size = max(1, math.ceil(len(steps) / max_points))
    return [(steps[min(start + size, len(steps)) - 1], fmean(losses[start:start + size]))
            for start in range(0, len(steps), size)]


def _history(path: Path, columns: tuple[str, ...]) -> list[tuple]:
    try:
        with open(path, newline="") as stream:
            rows = list(csv.DictReader(stream))
        return [(int(row["step"]), *(float(row[column]) for column in columns)) for row in rows]
    except (OSError, KeyError, ValueError) as error:
        raise SummaryError(f"{path}: cannot read its {', '.join(columns)} history ({error}); "
                           "train the run again (`dvc repro`)") from None


def sweep_rows(runs: dict[str, dict]) -> list[dict]:
    """The sweep's final held-out accuracy against lr, the mean over seeds, one series per
    optimizer, dataset and batch size."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for entry in runs.values():
        if entry.get("kind") == "sweep":
            key = (entry["dataset"], entry["optimizer"], entry["batch_size"], float(entry["lr"]))
            groups[key].append(float(entry["heldout_accuracy"]))
    batch_sizes = {key[2] for key in groups}
    return [{"series": f"{optimizer} on {dataset}" + (f" (b{batch_size})" if len(batch_sizes) > 1 else ""),
             "dataset": dataset, "optimizer": optimizer, "batch_size": batch_size, "lr": lr,
             "heldout_accuracy": fmean(accuracies), "seeds": len(accuracies)}
            for (dataset, optimizer, batch_size, lr), accuracies in sorted(groups.items())]


def write_summary(runs: dict[str, dict], runs_dir: Path, out_dir: Path) -> None:
    loss_rows, accuracy_rows = [], []
    for name in sorted(runs):
        history = _history(runs_dir / name / "loss.csv", ("loss",))
        loss_rows += [{"run": name, "step": step, "loss": f"{loss:.6g}"}
                      for step, loss in binned_losses([row[0] for row in history], [row[1] for row in history])]
        accuracy_rows += [{"run": name, "step": step, "heldout_accuracy": f"{accuracy:.6f}"}
                          for step, accuracy in _history(runs_dir / name / "accuracy.csv", ("heldout_accuracy",))]
    out_dir.mkdir(parents=True, exist_ok=True)
    for file_name, rows, columns in (
            ("loss.csv", loss_rows, ("run", "step", "loss")),
            ("accuracy.csv", accuracy_rows, ("run", "step", "heldout_accuracy")),
            ("sweep.csv", sweep_rows(runs), ("series", "dataset", "optimizer", "batch_size", "lr",
                                             "heldout_accuracy", "seeds"))):
        write_text_atomic(out_dir / file_name, _csv_text(rows, columns))
    write_text_atomic(out_dir / "metrics.json", json.dumps(best_lrs(sweep_rows(runs)), indent=2) + "\n")


def best_lrs(rows: list[dict]) -> dict[str, dict]:
    """``<dataset>-<optimizer>-b<batch size>`` -> the lr with the best mean accuracy over seeds, and that accuracy."""
    best: dict[str, dict] = {}
    for row in rows:
        key = f"{row['dataset']}-{row['optimizer']}-b{row['batch_size']}"
        if key not in best or row["heldout_accuracy"] > best[key]["heldout_accuracy"]:
            best[key] = {"best_lr": row["lr"], "heldout_accuracy": round(row["heldout_accuracy"], 6)}
    return best


def _csv_text(rows: list[dict], columns: tuple[str, ...]) -> str:
    lines = [",".join(columns)]
    lines += [",".join(_cell(row[column]) for column in columns) for row in rows]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    return f'"{text}"' if any(c in text for c in ',"\n') else text


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifests", required=True, help="the train and sweep stages' manifests")
    parser.add_argument("--runs", required=True, help="the runs directory")
    parser.add_argument("--out", required=True, help="directory for loss.csv, accuracy.csv and sweep.csv")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        runs = read_manifests(Path(args.manifests))
        write_summary(runs, Path(args.runs), Path(args.out))
    except SummaryError as error:
        log.error("%s", error)
        return 1
    log.info("%d runs summarised into %s", len(runs), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
