"""Function-space comparisons: whether runs compute the same thing, not only where their weights are.

    weightlapse function-space runs --group "mnist adam lr=0.001 ..." --out predictions.zarr
    weightlapse function-space runs --runs a b --data data/mnist --every 10 --out predictions.zarr

Two runs can sit far apart in weight space and predict alike (softmax regression ignores
the part of the weights shared by every class), or sit close and disagree on the images
near a decision boundary. These measures compare what the models compute, on the
held-out split, from the stored weights::

    from weightlapse.viewer.analysis import function_space
    from weightlapse.viewer.analysis.runs import RunCatalog
    heldout = function_space.load_heldout("data/mnist", "mnist")     # the test images and labels
    models = function_space.open_models(RunCatalog("runs"), ["adam-lr0.001-b20-seed0", "adam-lr0.001-b20-seed1"])
    result = function_space.agreement_over_steps(models, heldout, every=10)
    result.agreement      # (pair, step): fraction of held-out images both runs put in the same class
    result.symmetric_kl   # (pair, step): mean over images of (KL(p_a||p_b) + KL(p_b||p_a)) / 2, in nats
    result.accuracy       # (run, step): each run's held-out accuracy, as the train stage scores it
    function_space.confusion_at(models["adam-lr0.001-b20-seed0"], heldout, step=3000)  # (true, predicted)
    line = function_space.loss_along_line(models, heldout)  # at the last shared step
    line.loss             # (other_run, alpha): held-out loss on the line from the first run's weights to each other's

A network run of the train stage (``train.hidden``) is compared the same way, its
predictions computed from its stored layers and activation; so is any run recorded as a
chain of linear layers with a dataset and an activation recorded.

Steps are those all the runs have (0 .. the shortest run's last valid step), every
``every``-th and always the last. The stores are read a block of steps at a time through
dask, and ``scheduler`` (None: threads here; an address or Client: that cluster) and
``progress`` work as in :mod:`weightlapse.viewer.analysis.compare`.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
import xarray as xr

from weightlapse.pipeline.cluster import compute
from weightlapse.pipeline.datasets import (
    DATASETS,
    TEST_IMAGES,
    TEST_LABELS,
    DatasetError,
    DatasetSpec,
    check_dataset_name,
    declared_dataset,
    load_dataset,
)
from weightlapse.pipeline.locations import OUTPUT_MARK, check_output_target
from weightlapse.pipeline.safe_yaml import UnsafeYamlError, load_yaml, read_bounded
from weightlapse.pipeline.store import N_CLASSES, RunMetadata, open_run
from weightlapse.viewer.analysis.classifiers import (
    Classifier,
    classifier,
    layers_at,
    network_log_probabilities,
    steps_per_task,
)
from weightlapse.viewer.analysis.network import LinearLayer
from weightlapse.viewer.analysis.network_compare import chain_to_match, match_units, relabelled, relabelling

log = logging.getLogger(__name__)

MAX_PARAMS_BYTES = 1 << 20
# Points on the line between two runs' weights (loss_along_line): alpha = 0, 0.05, ..., 1.
LINE_POINTS = 21

Progress = Callable[[float], None] | None


@dataclass(frozen=True)
class HeldOut:
    """The held-out split the train stage scores: images (image, pixel) float32 in [0, 1]."""

    images: np.ndarray
    labels: np.ndarray
    dataset: str
    files: Mapping[str, str]  # the held-out files' checksums ("sha256:...")


def load_heldout(data_dir, dataset: str, *, spec: DatasetSpec | None = None) -> HeldOut:
    """The held-out split of ``dataset`` from the data stage's directory (checked as training
    reads it); ``spec``: a declared dataset's (:func:`declared_spec`), else the built-in one's."""
    loaded = load_dataset(data_dir, dataset, spec=spec)
    files = {name: loaded.file_checksums[name] for name in (TEST_IMAGES, TEST_LABELS)}
    return HeldOut(loaded.test.images, loaded.test.labels.astype(np.int64), dataset, files)


def declared_spec(dataset: str, params_file) -> DatasetSpec | None:
    """The spec of ``dataset``: None for a built-in one, else its declaration in ``params_file``
    (a params.yaml), checked as the data stage checks it (DatasetError if it is not there)."""
    if dataset in DATASETS:
        return None
    try:
        raw = load_yaml(read_bounded(params_file, MAX_PARAMS_BYTES), source=str(params_file))
    except (OSError, UnsafeYamlError) as error:
        raise DatasetError(f"{dataset} is not a built-in dataset and its declaration cannot be read: {error}") from None
    declared = raw.get("datasets") if isinstance(raw, dict) else None
    if not isinstance(declared, dict) or dataset not in declared:
        raise DatasetError(f"{dataset} is not a built-in dataset and {params_file} does not declare it under "
                           "datasets; give the params file that trained the runs")
    return declared_dataset(dataset, declared[dataset])


def check_trained_on(models: Mapping[str, xr.Dataset], heldout: HeldOut) -> None:
    """Refuse runs whose store records other held-out files than ``heldout``'s (ValueError)."""
    for name, model in models.items():
        meta = RunMetadata.parse(model.attrs.get("weightlapse"))
        recorded = {file: meta.dataset_files.get(file) for file in heldout.files}
        if meta.dataset != heldout.dataset or recorded != dict(heldout.files):
            raise ValueError(f"run {name!r} was scored on {meta.dataset or 'unknown data'} with other held-out files "
                             f"than the {heldout.dataset} files given; pass --data with the directory its data "
                             "stage wrote")


def _fits(heldout: HeldOut) -> dict[str, int]:
    return {"pixels": heldout.images.shape[1], "classes": N_CLASSES}


def open_models(catalog, names: Iterable[str]) -> dict[str, xr.Dataset]:
    """The listed runs of ``catalog`` (a RunCatalog) as lazy Datasets: a softmax run's weights
    (and bias), a network run's parameters (:func:`classifier` says whether they predict)."""
    models = {name: open_run(catalog.location(name)) for name in names}
    for name, model in models.items():
        classifier(name, model)
    return models


def _shared_steps(classifiers: Mapping[str, Classifier], every: int, least: int) -> np.ndarray:
    if len(classifiers) < least:
        raise ValueError(f"give at least {least} runs to compare, got {len(classifiers)}")
    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}")
    shapes = {name: model.shapes for name, model in classifiers.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"the runs' layers have different shapes ({shapes}); compare runs of one model")
    n_steps = min(model.n_steps for model in classifiers.values())
    if n_steps < 1:
        raise ValueError("a run has no valid step yet; compare runs once they have steps")
    steps = np.arange(0, n_steps, every)
    return steps if steps[-1] == n_steps - 1 else np.append(steps, n_steps - 1)


def _block_measures(layers: list[list[tuple[np.ndarray, np.ndarray | None]]], activations: list[str | None],
                    images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For a block of steps: agreement and symmetric KL per pair (pair, step), accuracy per run (run, step)."""
    log_p = [network_log_probabilities(run_layers, activation, images)
             for run_layers, activation in zip(layers, activations)]
    predicted = [lp.argmax(axis=2) for lp in log_p]
    # A step whose weights have overflowed (NaN outputs) predicts nothing: argmax would call it class 0.
    defined = [~np.isnan(lp).any(axis=(1, 2)) for lp in log_p]
    accuracy = np.stack([np.where(ok, (p == labels).mean(axis=1), np.nan) for p, ok in zip(predicted, defined)])
    agreement, kl = [], []
    for a, b in itertools.combinations(range(len(log_p)), 2):
        agreement.append(np.where(defined[a] & defined[b], (predicted[a] == predicted[b]).mean(axis=1), np.nan))
        difference = log_p[a] - log_p[b]
        # (KL(a||b) + KL(b||a)) / 2 = sum_c (p_a - p_b)(log p_a - log p_b) / 2
        kl.append(((np.exp(log_p[a]) - np.exp(log_p[b])) * difference).sum(axis=2).mean(axis=1) / 2)
    width = layers[0][0][0].shape[0]
    empty = np.zeros((0, width))
    return (np.stack(agreement) if agreement else empty, np.stack(kl) if kl else empty, accuracy)


def agreement_over_steps(models: Mapping[str, xr.Dataset], heldout: HeldOut, *, every: int = 1,
                         scheduler=None, progress: Progress = None) -> xr.Dataset:
    """How alike the runs' predictions are on the held-out images, step by step.

    ``agreement`` (pair, step): the fraction of images both runs of the pair classify the
    same; ``symmetric_kl`` (pair, step): the mean over images of the symmetrised KL
    divergence between their predictive distributions, in nats; ``accuracy`` (run, step):
    each run's held-out accuracy. Pairs are named ``"a | b"`` in the order given.
    """
    names = list(models)
    classifiers = {name: classifier(name, model, **_fits(heldout)) for name, model in models.items()}
    steps = _shared_steps(classifiers, every, 1)
    first = classifiers[names[0]]
    images = dask.delayed(heldout.images, pure=True)
    labels = dask.delayed(heldout.labels, pure=True)
    per_task = steps_per_task(first, len(heldout.labels))
    tasks = []
    for start in range(0, len(steps), per_task):
        block = steps[start:start + per_task]
        layers = [layers_at(classifiers[name], block) for name in names]
        tasks.append(dask.delayed(_block_measures)(layers, [classifiers[name].activation for name in names], images,
                                                   labels))
    blocks = compute(tasks, scheduler=scheduler, progress=progress)
    pairs = [f"{a} | {b}" for a, b in itertools.combinations(names, 2)]
    return xr.Dataset(
        {"agreement": (("pair", "step"), np.concatenate([block[0] for block in blocks], axis=1)),
         "symmetric_kl": (("pair", "step"), np.concatenate([block[1] for block in blocks], axis=1)),
         "accuracy": (("run", "step"), np.concatenate([block[2] for block in blocks], axis=1))},
        # object arrays: stored as Zarr v3 variable-length strings, which every reader knows
        coords={"pair": np.array(pairs, dtype=object), "run": np.array(names, dtype=object), "step": steps},
        attrs={"dataset": heldout.dataset, "n_images": len(heldout.labels),
               "symmetric_kl_units": "nats"})


def loss_along_line(models: Mapping[str, xr.Dataset], heldout: HeldOut, *, step: int | None = None,
                    points: int = LINE_POINTS, match: bool = True, progress: Progress = None) -> xr.Dataset:
    """Held-out loss and accuracy on the straight line in weight space from the first run to
    each other run at ``step`` (default: the last step they all have): the weights
    (1 - alpha) * first + alpha * other for ``points`` values of alpha from 0 to 1.

    A bump in the loss above the line between the two ends (a barrier) says the two runs lie
    in different basins of the loss; none says they are linearly connected (Frankle et al.,
    "Linear mode connectivity and the lottery ticket hypothesis", ICML 2020). For network runs,
    ``matched_loss`` and ``matched_accuracy`` are along the line to the other run with its hidden
    units matched to the first's (:mod:`~weightlapse.viewer.analysis.network_compare`): a barrier
    that was only the units' order is gone there (Ainsworth et al., "Git Re-Basin", ICLR 2023).
    ``attrs["matching"]`` says whether units were matched, or why not."""
    names = list(models)
    classifiers = {name: classifier(name, model, **_fits(heldout)) for name, model in models.items()}
    last = int(_shared_steps(classifiers, 1, 2)[-1])
    at = last if step is None else int(step)
    if not 0 <= at <= last:
        raise ValueError(f"step {at} is outside the steps all runs have, 0..{last}")
    if points < 2:
        raise ValueError(f"points must be at least 2, got {points}")
    first = classifiers[names[0]]
    activations = {model.activation for model in classifiers.values()}
    if len(activations) > 1:
        raise ValueError(f"the runs differ in activation ({', '.join(sorted(map(str, activations)))}): the line "
                         "between two runs is of one model's weights")
    values = {name: [(np.asarray(weight.data[at]), None if bias is None else np.asarray(bias.data[at]))
                     for weight, bias in model.layers] for name, model in classifiers.items()}
    for name, layers in values.items():
        if not all(np.isfinite(array).all() for layer in layers for array in layer if array is not None):
            raise ValueError(f"{name}'s weights at step {at:,} are not finite (the run diverged): the line to it "
                             "is undefined")
    alphas = np.linspace(0.0, 1.0, points)
    if first.chain is None or len(first.chain) <= 1:
        chain = "the model has no hidden layer"
    elif not match:
        chain = "not asked for"
    else:
        chain = chain_to_match(first.chain, {name: _by_parameter(first.chain, layers)
                                             for name, layers in values.items()}, at)
    matching = (f"hidden units matched to {names[0]}'s at step {at:,}" if not isinstance(chain, str) else
                "units not matched: " + chain)
    measures: dict[str, list] = {"loss": [], "accuracy": [], "matched_loss": [], "matched_accuracy": []}
    reference = None if isinstance(chain, str) else _by_parameter(chain, values[names[0]])
    for index, name in enumerate(names[1:]):
        other = values[name]
        loss, accuracy = _along(values[names[0]], other, alphas, first, heldout)
        measures["loss"].append(loss)
        measures["accuracy"].append(accuracy)
        if reference is not None:
            orders = relabelling(chain, match_units(reference, _by_parameter(chain, other), chain))
            other = [(relabelled(weight[None], orders[layer.weight])[0],
                      None if bias is None else relabelled(bias[None], orders[layer.bias])[0])
                     for layer, (weight, bias) in zip(chain, other)]
            loss, accuracy = _along(values[names[0]], other, alphas, first, heldout)
        measures["matched_loss"].append(loss)
        measures["matched_accuracy"].append(accuracy)
        if progress:
            progress((index + 1) / (len(names) - 1))
    return xr.Dataset({key: (("other_run", "alpha"), np.array(rows)) for key, rows in measures.items()},
                      coords={"other_run": np.array(names[1:], dtype=object), "alpha": alphas},
                      attrs={"reference_run": names[0], "step": at, "matched": int(not isinstance(chain, str)),
                             "matching": matching, "dataset": heldout.dataset})


def compare_predictions(models: Mapping[str, xr.Dataset], heldout: HeldOut, *, every: int = 1, scheduler=None,
                        progress: Progress = None) -> xr.Dataset:
    """:func:`agreement_over_steps` and, for two runs or more, :func:`loss_along_line` at the
    last shared step, in one Dataset: the line's variables and attributes named ``line_...``
    (or, where the line cannot be drawn, ``attrs["line_problem"]`` says why)."""
    def part(share: float, start: float) -> Progress:
        return None if progress is None else (lambda fraction: progress(start + share * fraction))

    result = agreement_over_steps(models, heldout, every=every, scheduler=scheduler, progress=part(0.8, 0.0))
    if len(models) >= 2:
        try:
            line = loss_along_line(models, heldout, progress=part(0.2, 0.8))
        except ValueError as error:  # e.g. runs of two activations: their agreement still holds
            result.attrs["line_problem"] = str(error)
            return result
        result = result.assign({f"line_{key}": value for key, value in line.data_vars.items()})
        result.attrs.update({f"line_{key}": value for key, value in line.attrs.items() if key != "dataset"})
    return result


def _by_parameter(chain: tuple[LinearLayer, ...], layers: list[tuple]) -> dict[str, np.ndarray]:
    values = {}
    for layer, (weight, bias) in zip(chain, layers):
        values[layer.weight] = weight
        if layer.bias is not None:
            values[layer.bias] = bias
    return values


def _along(start: list[tuple], end: list[tuple], alphas: np.ndarray, model: Classifier,
           heldout: HeldOut) -> tuple[np.ndarray, np.ndarray]:
    """Held-out loss (mean cross-entropy, nats) and accuracy at each point of the line from ``start`` to ``end``."""
    losses, accuracies = [], []
    per_task = steps_per_task(model, len(heldout.labels))
    for first in range(0, len(alphas), per_task):
        alpha = alphas[first:first + per_task]

        def mix(a, b):
            shape = (len(alpha),) + (1,) * a.ndim
            return ((1 - alpha).reshape(shape) * a.astype(np.float64) + alpha.reshape(shape) * b).astype(np.float32)

        # a layer without a bias is one with a bias of zeros (runs of softmax regression may differ in it)
        layers = [(mix(wa, wb), None if ba is None and bb is None else
                   mix(np.zeros_like(bb) if ba is None else ba, np.zeros_like(ba) if bb is None else bb))
                  for (wa, ba), (wb, bb) in zip(start, end)]
        log_p = network_log_probabilities(layers, model.activation, heldout.images)
        picked = np.take_along_axis(log_p, heldout.labels[None, :, None], axis=2)[..., 0]
        losses.append(-picked.mean(axis=1))
        accuracies.append(np.where(np.isnan(log_p).any(axis=(1, 2)), np.nan,
                                   (log_p.argmax(axis=2) == heldout.labels).mean(axis=1)))
    return np.concatenate(losses), np.concatenate(accuracies)


def confusion_at(model: xr.Dataset, heldout: HeldOut, *, step: int) -> xr.DataArray:
    """(true, predicted) counts of the held-out images at ``step``: rows sum to each class's images."""
    name = str(model.attrs.get("weightlapse", {}).get("run", "")) or "the run"
    layers = classifier(name, model, **_fits(heldout))
    n_steps = layers.n_steps
    if not 0 <= step < n_steps:
        raise ValueError(f"step {step} is outside the run's valid steps 0..{n_steps - 1}")
    values = [(np.asarray(weight.data[step:step + 1]), None if bias is None else np.asarray(bias.data[step:step + 1]))
              for weight, bias in layers.layers]
    log_p = network_log_probabilities(values, layers.activation, heldout.images)[0]
    if np.isnan(log_p).any():
        raise ValueError(f"{name}'s weights at step {step:,} are not finite (the run diverged): its "
                         "predictions there are undefined")
    predicted = log_p.argmax(axis=1)
    n_classes = values[-1][0].shape[1]
    counts = np.bincount(heldout.labels * n_classes + predicted, minlength=n_classes * n_classes)
    classes = np.arange(n_classes)
    return xr.DataArray(counts.reshape(n_classes, n_classes), dims=("true", "predicted"),
                        coords={"true": classes, "predicted": classes}, name="confusion",
                        attrs={"step": step, "dataset": heldout.dataset})


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    from tqdm import tqdm

    from weightlapse.pipeline.cluster import ClusterError
    from weightlapse.pipeline.store import TrajectoryError
    from weightlapse.viewer.analysis.runs import RunCatalog, RunNotFoundError

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", help="runs location: a directory or an fsspec URL (s3://bucket/runs)")
    chosen = parser.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--runs", nargs="+", help="run names to compare")
    chosen.add_argument("--group", help="compare the runs of this group of the runs index (runs differing in seed)")
    parser.add_argument("--data", help="the data stage's directory of the runs' dataset (default: data/<dataset>)")
    parser.add_argument("--params", default="params.yaml",
                        help="the params file declaring the runs' dataset, if it is not built in (default params.yaml)")
    parser.add_argument("--every", type=int, default=1, help="use every N-th shared step (default 1: all)")
    parser.add_argument("--scheduler", default=None, help="Dask scheduler address (default: threads here)")
    parser.add_argument("--out", required=True, help="Zarr store to write (xarray.open_zarr reads it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        catalog = RunCatalog(args.runs_dir)
        names = list(dict.fromkeys(args.runs if args.group is None else catalog.group_members(args.group)))
        models = open_models(catalog, names)
        datasets = {RunMetadata.parse(model.attrs.get("weightlapse")).dataset for model in models.values()}
        if len(datasets) != 1 or not next(iter(datasets)):
            raise ValueError(f"the runs were trained on {', '.join(sorted(datasets)) or 'unrecorded data'}; "
                             "compare predictions of runs on one dataset")
        dataset = check_dataset_name(datasets.pop())  # a store's name: never a path of its own
        data_dir = Path(args.data) if args.data else Path("data") / dataset
        check_output_target(args.out, inputs=[args.runs_dir, data_dir], kind="function-space")
        heldout = load_heldout(data_dir, dataset, spec=declared_spec(dataset, args.params))
        check_trained_on(models, heldout)
        with tqdm(total=100, unit="%", desc="predicting") as bar:
            result = compare_predictions(models, heldout, every=args.every, scheduler=args.scheduler,
                                         progress=lambda fraction: bar.update(round(fraction * 100) - bar.n))
        last = int(result.step[-1])
        result["confusion"] = xr.concat([confusion_at(models[name], heldout, step=last) for name in names],
                                        dim="run").assign_coords(run=np.array(names, dtype=object))
        result.attrs.update({OUTPUT_MARK: "function-space", "confusion_step": last})
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            result.to_zarr(args.out, mode="w", zarr_format=3)
    except (TrajectoryError, RunNotFoundError, ClusterError, DatasetError, ValueError, OSError) as error:
        log.error("%s", error)
        return 1
    log.info("%d runs compared on %d held-out images -> %s", len(names), len(heldout.labels), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
