"""Cross-run analytics: how the weight trajectories of several runs differ and agree.

    python -m weightlapse.viewer.analysis.compare runs --group "mnist adam lr=0.001 ..." --out comparison.zarr
    python -m weightlapse.viewer.analysis.compare s3://bucket/runs --runs a b c \
        --scheduler tcp://10.0.0.5:8786 --out ...

The command compares network runs too (:mod:`~weightlapse.viewer.analysis.network_compare`:
their hidden units matched to the first run's, or as recorded with ``--unmatched``).

Headless use, for research scripts::

    from weightlapse.viewer.analysis.runs import RunCatalog
    from weightlapse.viewer.analysis import compare
    catalog = RunCatalog("runs")                      # or "s3://bucket/runs"
    index = catalog.index()                           # one row per run: params, metrics, state
    seeds = index[index.group == index.group["adam-lr0.001-b20-seed0"]].index
    runs = compare.open_trajectories(catalog, seeds)  # name -> lazy (step, class, pixel) weights
    compare.distance_over_steps(runs[seeds[0]], runs[seeds[1]]).distance.plot()
    compare.spread_summary(runs).mean_spread          # per-pixel spread across the runs, per step
    compare.similarity_matrix(runs).cosine            # (run, other) at the last shared step
    compare.trajectory_pca(runs).path                 # (run, step, component), one shared basis
    centred = {name: compare.centred(w) for name, w in runs.items()}  # the same, on what predicts

Raw or centred weights. Softmax regression predicts the same for W and W + 1v^T (one vector
added to every class's weights), and the gradient of the cross-entropy sums to zero over the
classes, so under plain SGD the class-mean of the weights never leaves its random initial
value. Raw distances between runs therefore keep a part that only measures their
initialisations. :func:`centred` removes the class-mean (per pixel, per step): what is left
is exactly the part that changes predictions, and every function here takes it as well as
the raw weights. :func:`distance_over_steps` reports the split: the raw distance squared is
the centred distance squared plus the class-mean part's squared.

Every function compares the runs over the steps they all have (0 .. the shortest run's
last valid step), reads the stores chunk by chunk through dask (never whole), and takes
``scheduler`` (None: threads here; a Dask scheduler address or Client: that cluster) and
``progress`` (called with the fraction done).

A caveat for the PCA: projections of high-dimensional random walks onto their first
principal components look like smooth Lissajous curves too, with the k-th component
explaining about 6/(pi^2 k^2) of the variance (61% for the first). So a smooth, curved
path in PC space is not by itself evidence of structure; compare the explained variance
with the random walk's (Antognini & Sohl-Dickstein, "PCA of high dimensional random walks
with comparison to neural network training", NeurIPS 2018).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Iterable, Mapping

import dask.array as da
import numpy as np
import xarray as xr

from weightlapse.pipeline.cluster import compute
from weightlapse.pipeline.locations import OUTPUT_MARK, check_output_target
from weightlapse.pipeline.store import open_run, pixel_coords
from weightlapse.viewer.analysis.frames import centred, class_mean_fraction
from weightlapse.viewer.analysis.geometry import (
    PCA_CAVEAT,
    Progress,
    compared_steps,
    fitted_components,
    pairwise_similarity,
    random_walk_variance_ratio,
    shared_pca,
)
from weightlapse.viewer.analysis.network import NetworkRun
from weightlapse.viewer.analysis.network_compare import compare_networks

log = logging.getLogger(__name__)


def open_trajectories(catalog, names: Iterable[str]) -> dict[str, xr.DataArray]:
    """The weights of the listed runs ``names`` of ``catalog`` (a RunCatalog), lazily, by name."""
    return {name: open_run(catalog.location(name), matrix_for="comparisons cover").weights for name in names}


def _check_runs(runs: Mapping[str, xr.DataArray], least: int) -> tuple[list[str], int]:
    """Run names and the number of steps they all have."""
    if len(runs) < least:
        raise ValueError(f"give at least {least} runs to compare, got {len(runs)}")
    shapes = {name: weights.shape for name, weights in runs.items()}
    layouts = {shape[1:] for shape in shapes.values()}
    if len(layouts) > 1:
        raise ValueError(f"the runs' weights have different shapes ({shapes}); compare runs of one model")
    n_steps = min(shape[0] for shape in shapes.values())
    if n_steps < 1:
        empty = [name for name, shape in shapes.items() if shape[0] == 0]
        raise ValueError(f"run {empty[0]!r} has no valid step yet; compare runs once they have steps")
    return list(runs), n_steps


def _rows(weights: xr.DataArray, steps: np.ndarray) -> da.Array:
    data = weights.data if isinstance(weights.data, da.Array) else da.from_array(np.asarray(weights), name=False)
    if len(steps) == steps[-1] + 1:
        return data[:len(steps)]
    return data[steps]


def distance_over_steps(a: xr.DataArray, b: xr.DataArray, *, every: int = 1, scheduler=None,
                        progress: Progress = None) -> xr.Dataset:
    """How far apart two runs are at each shared step.

    ``distance``: L2 norm of the weight difference (all classes); ``distance_per_class``:
    per class; ``cosine``: cosine similarity of the flattened weights. The distance splits
    into ``centred_distance`` (the class-mean removed from both: the part that changes
    predictions) and ``class_mean_distance`` (the part predictions ignore), with
    distance² = centred_distance² + class_mean_distance². Sums in float64.
    """
    _, n_steps = _check_runs({"a": a, "b": b}, 2)
    steps = compared_steps(n_steps, every)
    wa, wb = _rows(a, steps).astype(np.float64), _rows(b, steps).astype(np.float64)
    n_classes = wa.shape[1]
    per_class, dot, norm_a, norm_b, mean_part = compute(
        [((wa - wb) ** 2).sum(axis=2), (wa * wb).sum(axis=(1, 2)), (wa ** 2).sum(axis=(1, 2)),
         (wb ** 2).sum(axis=(1, 2)), n_classes * ((wa - wb).mean(axis=1) ** 2).sum(axis=1)],
        scheduler=scheduler, progress=progress)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = dot / np.sqrt(norm_a * norm_b)
    squared = per_class.sum(axis=1)
    return xr.Dataset(
        {"distance": ("step", np.sqrt(squared)),
         "distance_per_class": (("step", "class"), np.sqrt(per_class)),
         "centred_distance": ("step", np.sqrt(np.maximum(squared - mean_part, 0.0))),
         "class_mean_distance": ("step", np.sqrt(mean_part)),
         "cosine": ("step", cosine)},
        coords={"step": steps, "class": np.arange(per_class.shape[1])},
        attrs={"run_a": str(a.name or ""), "run_b": str(b.name or "")})


def spread_across_runs(runs: Mapping[str, xr.DataArray], *, every: int = 1) -> xr.DataArray:
    """Per-weight standard deviation across the runs at each shared step (sample std, ddof 1),
    lazily: (step, class, pixel). Across seeds it shows where training agrees and where not.

    One task per block of steps reads that block of every run and reduces it at once
    (rather than dask's generic moment reductions, which were four times slower here)."""
    names, n_steps = _check_runs(runs, 2)
    steps = compared_steps(n_steps, every)
    blocks = [_rows(runs[name], steps) for name in names]
    blocks = [block.rechunk(blocks[0].chunks) for block in blocks]  # runs may be chunked differently
    spread = da.map_blocks(_std_over_runs, *blocks, dtype=np.float64)
    n_pixels = blocks[0].shape[2]
    return xr.DataArray(spread, dims=("step", "class", "pixel"),
                        coords={"step": steps, "class": np.arange(blocks[0].shape[1]), **pixel_coords(n_pixels)},
                        name="spread", attrs={"runs": names})


def _std_over_runs(*blocks: np.ndarray) -> np.ndarray:
    stacked = np.stack(blocks).astype(np.float64)
    return stacked.std(axis=0, ddof=1)


def spread_summary(runs: Mapping[str, xr.DataArray], *, every: int = 1, step: int | None = None, scheduler=None,
                   progress: Progress = None) -> xr.Dataset:
    """The spread across runs, computed: ``mean_spread`` (step) averaged over all weights, and
    ``spread`` (class, pixel) and ``spread_over_classes`` (pixel, root of summed variances)
    at ``step`` (default: the last shared step)."""
    spread = spread_across_runs(runs, every=every)
    last = int(spread.step[-1])
    at = last if step is None else int(step)
    if not 0 <= at <= last:
        raise ValueError(f"step {at} is outside the steps all runs have, 0..{last}")
    picture = spread_across_runs(runs).isel(step=at)  # every=1: step index = step
    mean_spread, at_step = compute([spread.data.mean(axis=(1, 2)), picture.data], scheduler=scheduler,
                                   progress=progress)
    return xr.Dataset(
        {"mean_spread": ("step", mean_spread),
         "spread": (("class", "pixel"), at_step),
         "spread_over_classes": ("pixel", np.sqrt((at_step ** 2).sum(axis=0)))},
        coords={"step": spread.step.values, "class": spread["class"].values, **pixel_coords(at_step.shape[1])},
        attrs={"runs": list(runs), "spread_step": at})


def similarity_matrix(runs: Mapping[str, xr.DataArray], *, step: int | None = None, scheduler=None,
                      progress: Progress = None) -> xr.Dataset:
    """Cosine similarity and L2 distance between every pair of runs' weights at ``step``
    (default: the last step they all have): (run, other) matrices."""
    names, n_steps = _check_runs(runs, 1)
    at = n_steps - 1 if step is None else int(step)
    if not 0 <= at < n_steps:
        raise ValueError(f"step {at} is outside the steps all runs have, 0..{n_steps - 1}")
    rows = compute([_rows(runs[name], np.arange(at + 1))[at] for name in names], scheduler=scheduler,
                   progress=progress)
    cosine, distance = pairwise_similarity(np.stack([row.ravel() for row in rows]))
    return xr.Dataset({"cosine": (("run", "other"), cosine), "distance": (("run", "other"), distance)},
                      coords={"run": names, "other": names}, attrs={"step": at})


def trajectory_pca(runs: Mapping[str, xr.DataArray], *, n_components: int = 2, every: int = 1, seed: int = 0,
                   scheduler=None, progress: Progress = None) -> xr.Dataset:
    """Principal components of the runs' trajectories in one shared basis, out of core.

    The shared steps of every run are stacked into one tall (rows, weights) matrix,
    centred on its mean, and decomposed with dask's randomized SVD (``svd_compressed``:
    two power iterations, so a handful of passes over the data, block by block). Each
    run's steps are then projected onto the first ``n_components`` components.

    Returns ``path`` (run, step, component), ``explained_variance_ratio`` (fitted
    component, up to 10) beside ``random_walk_ratio`` (the same for a random walk, the
    caveat in ``attrs["caveat"]``), ``components`` (component, class, pixel) and ``mean``.
    """
    names, n_steps = _check_runs(runs, 1)
    steps = compared_steps(n_steps, every)
    first = runs[names[0]]
    n_classes, n_pixels = first.shape[1], first.shape[2]
    n_weights = n_classes * n_pixels
    fitted = fitted_components(len(names) * len(steps), n_weights, n_components)
    flat = [_rows(runs[name], steps).reshape(len(steps), n_weights) for name in names]
    path, ratio, basis, mean = shared_pca(flat, n_components=n_components, fitted=fitted, seed=seed,
                                          scheduler=scheduler, progress=progress)
    return xr.Dataset(
        {"path": (("run", "step", "component"), path),
         "explained_variance_ratio": ("fitted", ratio),
         "random_walk_ratio": ("fitted", random_walk_variance_ratio(fitted)),
         "components": (("component", "class", "pixel"), basis[:n_components].reshape(n_components, n_classes,
                                                                                     n_pixels)),
         "mean": (("class", "pixel"), mean.reshape(n_classes, n_pixels))},
        coords={"run": names, "step": steps, "component": np.arange(1, n_components + 1),
                "fitted": np.arange(1, fitted + 1), "class": np.arange(n_classes), **pixel_coords(n_pixels)},
        attrs={"caveat": PCA_CAVEAT, "seed": seed, "every": every})


def compare_runs(runs: Mapping[str, xr.DataArray], *, every: int = 1, n_components: int = 2,
                 centre: bool = False, scheduler=None, progress: Progress = None) -> xr.Dataset:
    """All of the above for one group of runs, in one Dataset (what the command writes):
    distance of each run to the first, the spread, the similarity matrix and the PCA, of the
    raw weights or, with ``centre``, of the centred ones (:func:`centred`). The distance's
    class-mean part is reported either way (``class_mean_distance_to_reference``), and so is
    the class-mean part's share of each run's squared weights at the similarity step
    (``class_mean_fraction``)."""
    names, n_steps = _check_runs(runs, 2)
    runs = {name: runs[name].isel(step=slice(0, n_steps)) for name in names}  # the steps the whole group has
    n_parts = len(names) + 2

    def part(index: int) -> Progress:
        return None if progress is None else (lambda fraction: progress((index + fraction) / n_parts))

    reference = names[0]
    # of the raw weights: each distance splits into its centred and class-mean parts
    distances = [distance_over_steps(runs[reference], runs[name], every=every, scheduler=scheduler,
                                     progress=part(index)) for index, name in enumerate(names[1:])]
    raw = runs
    if centre:
        runs = {name: centred(weights) for name, weights in runs.items()}
    spread = spread_summary(runs, every=every, scheduler=scheduler, progress=part(len(names) - 1))
    similarity = similarity_matrix(runs, scheduler=scheduler)
    pca = trajectory_pca(runs, n_components=n_components, every=every, scheduler=scheduler,
                         progress=part(len(names) + 1))

    # How big the prediction-irrelevant part is, in each run's own weights at the compared step
    step = similarity.attrs["step"]
    mean_share = [class_mean_fraction(raw[name].isel(step=step).values) for name in names]

    def by_other_run(variable: str) -> xr.DataArray:
        return xr.concat([d[variable] for d in distances], dim="other_run").assign_coords(other_run=names[1:])

    result = xr.Dataset(
        {"distance_to_reference": by_other_run("centred_distance" if centre else "distance"),
         "class_mean_distance_to_reference": by_other_run("class_mean_distance"),
         "mean_spread": spread.mean_spread, "spread": spread.spread, "spread_over_classes": spread.spread_over_classes,
         "class_mean_fraction": ("run", np.array(mean_share)),
         "cosine": similarity.cosine, "distance": similarity.distance,
         "pca_path": pca.path, "explained_variance_ratio": pca.explained_variance_ratio,
         "random_walk_ratio": pca.random_walk_ratio, "pca_components": pca.components},
        coords={"run": np.array(names, dtype=object), "other": np.array(names, dtype=object),
                "other_run": np.array(names[1:], dtype=object)},
        attrs={"reference_run": reference, "runs": names, "similarity_step": similarity.attrs["step"],
               "spread_step": spread.attrs["spread_step"], "caveat": PCA_CAVEAT,
               "weights": "centred (class-mean removed)" if centre else "raw"})
    if progress:
        progress(1.0)
    return result


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    from tqdm import tqdm

    from weightlapse.pipeline.cluster import ClusterError
    from weightlapse.pipeline.store import TrajectoryError
    from weightlapse.viewer.analysis.runs import RunCatalog, RunNotFoundError

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", help="runs location: a directory or an fsspec URL (s3://bucket/runs)")
    chosen = parser.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--runs", nargs="+", help="run names to compare (the first is the reference)")
    chosen.add_argument("--group", help="compare the runs of this group of the runs index (runs differing in seed)")
    parser.add_argument("--every", type=int, default=1, help="use every N-th shared step (default 1: all)")
    parser.add_argument("--components", type=int, default=2, help="PCA components to project onto")
    parser.add_argument("--centred", action="store_true",
                        help="compare the weights less their class-mean, the part that changes predictions")
    parser.add_argument("--unmatched", action="store_true",
                        help="network runs: compare their hidden units as recorded, not matched to the first run's")
    parser.add_argument("--scheduler", default=None, help="Dask scheduler address (default: threads here)")
    parser.add_argument("--out", required=True, help="Zarr store to write (xarray.open_zarr reads it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_output_target(args.out, inputs=[args.runs_dir], kind="comparison")
        catalog = RunCatalog(args.runs_dir)
        names = list(dict.fromkeys(args.runs if args.group is None else catalog.group_members(args.group, least=2)))
        if len(names) < 2:
            raise ValueError(f"give at least 2 different runs to compare, got {', '.join(names)}")
        networks = {name: run for name in names if isinstance(run := catalog.open(name), NetworkRun)}
        if networks and len(networks) < len(names):
            matrix = next(name for name in names if name not in networks)
            raise ValueError(f"{next(iter(networks))} records a network and {matrix} softmax regression: compare "
                             "runs of one model")
        if networks and args.centred:
            raise ValueError("--centred removes softmax regression's class-mean, which a network does not have: "
                             "network runs are compared with their hidden units matched (--unmatched: as recorded)")
        with tqdm(total=100, unit="%", desc="comparing") as bar:
            report = lambda fraction: bar.update(round(fraction * 100) - bar.n)  # noqa: E731
            if networks:
                result = compare_networks(networks, every=args.every, match=not args.unmatched,
                                          n_components=args.components, scheduler=args.scheduler, progress=report)
            else:
                result = compare_runs(open_trajectories(catalog, names), every=args.every,
                                      n_components=args.components, centre=args.centred, scheduler=args.scheduler,
                                      progress=report)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            result.attrs[OUTPUT_MARK] = "comparison"
            result.to_zarr(args.out, mode="w", zarr_format=3)
    except (TrajectoryError, RunNotFoundError, ClusterError, ValueError, OSError) as error:
        log.error("%s", error)
        return 1
    ratio = result.explained_variance_ratio.values
    log.info("%d runs compared -> %s; PCA explains %.1f%% + %.1f%% (a random walk: 60.8%% + 15.2%%)",
             len(names), args.out, 100 * ratio[0], 100 * ratio[1] if len(ratio) > 1 else 0.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
