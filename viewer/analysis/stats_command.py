"""``weightlapse stats``: the per-weight change statistics of a run's step range, as a Zarr store.

    weightlapse stats runs/original --start 0 --stop 3000 --out original-stats.zarr
    weightlapse stats runs/original --centred --out centred-stats.zarr   # class-mean removed
    weightlapse stats runs/mlp-32 --out mlp-stats.zarr                   # every parameter of a network
    weightlapse stats runs/mlp-32 --parameter hidden1.weight --out hidden-stats.zarr

A softmax-regression run's statistics are one Dataset (``xarray.open_zarr(out)``), per
(class, pixel) and per pixel over the classes. A network run's are one group per parameter,
each statistic in the parameter's own shape (``xarray.open_datatree(out, engine="zarr")``,
or ``xarray.open_zarr(out, group="hidden1.weight")``). The statistics are defined in
viewer/analysis/stats.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

import numpy as np
import xarray as xr

from weightlapse.pipeline.cluster import ClusterError
from weightlapse.pipeline.locations import OUTPUT_MARK, check_output_target
from weightlapse.pipeline.store import IMAGE_SIDE, TrajectoryError, open_run
from weightlapse.viewer.analysis.frames import centred
from weightlapse.viewer.analysis.stats import change_statistics, parameter_statistics, top_pixels

log = logging.getLogger(__name__)
MARK = "change-statistics"


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run directory (runs/<run>) or its trajectory.zarr, or an fsspec URL of one")
    parser.add_argument("--start", type=int, default=0, help="first step (default 0)")
    parser.add_argument("--stop", type=int, default=None, help="last step, inclusive (default: the last valid step)")
    parser.add_argument("--settle-fraction", type=float, default=0.9, help="fraction of the path for settle_step")
    parser.add_argument("--out", required=True, help="Zarr store to write the statistics to (xarray.open_zarr reads it)")
    parser.add_argument("--top", type=int, default=10, help="log this many top-changing pixels or weights "
                                                            "(by path length)")
    parser.add_argument("--centred", action="store_true",
                        help="softmax regression: of the centred weights, each pixel's mean over the classes removed "
                             "(the part that changes predictions)")
    parser.add_argument("--parameter", action="append", default=None, metavar="NAME",
                        help="network runs: only this parameter (repeat for several; default: every parameter)")
    parser.add_argument("--scheduler", default=None,
                        help="Dask scheduler address to compute on (default: threads in this process)")
    return parser


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    from tqdm import tqdm

    args = parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_output_target(args.out, inputs=[args.run], kind=MARK)
        ds = open_run(args.run)
        last = ds.sizes["step"] - 1
        stop = last if args.stop is None else args.stop
        if not 0 <= args.start <= stop <= last:
            raise ValueError(f"step range {args.start}..{stop} is not inside the run's valid steps 0..{last}")
        network = "weights" not in ds
        if network and args.centred:
            raise ValueError("--centred removes softmax regression's class-mean, which a network does not have: "
                             "leave it out for a network run")
        if not network and args.parameter:
            raise ValueError("--parameter chooses a network run's parameters; this run records softmax regression")
        steps = slice(args.start, stop + 1)
        with tqdm(total=100, unit="%", desc="statistics") as bar:
            def report(fraction: float) -> None:
                bar.update(round(fraction * 100) - bar.n)
            if network:
                tree = network_statistics(ds, args.parameter, steps, settle_fraction=args.settle_fraction,
                                          progress=report, scheduler=args.scheduler)
            else:
                weights = ds.weights.isel(step=steps)
                stats = change_statistics(centred(weights) if args.centred else weights,
                                          settle_fraction=args.settle_fraction, progress=report,
                                          scheduler=args.scheduler)
        run = {"run": str(args.run), OUTPUT_MARK: MARK}
        with warnings.catch_warnings():
            # Consolidated metadata (one file listing all arrays) is what lets a plain
            # xarray.open_zarr(path) open it without a warning; zarr notes it is not in the v3 spec yet.
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            if network:
                tree.attrs.update(run)
                tree.to_zarr(args.out, mode="w", zarr_format=3)
            else:
                stats.attrs.update(run, weights="centred (class-mean removed)" if args.centred else "raw")
                stats.to_zarr(args.out, mode="w", zarr_format=3)
    except (TrajectoryError, ClusterError, ValueError, OSError) as error:
        log.error("%s", error)
        return 1
    log.info("steps %d..%d of %s -> %s", args.start, stop, args.run, args.out)
    if network:
        for name, node in tree.children.items():
            path = node.to_dataset().path_length
            for rank, (index, value) in enumerate(top_weights(path, args.top), 1):
                log.info("%s #%d weight %s%s: path length %.4g", name, rank, index, pixel_note(path.shape, index),
                         value)
    else:
        for rank, entry in enumerate(top_pixels(stats, "path_length", args.top), 1):
            log.info("#%d pixel (row %d, col %d): path length %.4g", rank, entry["row"], entry["col"], entry["value"])
    return 0


def network_statistics(ds: xr.Dataset, chosen: list[str] | None, steps: slice, **options) -> xr.DataTree:
    """Each chosen parameter's statistics over ``steps``, a group each (named as the parameter)."""
    parameters = [entry["name"] for entry in ds.attrs["weightlapse"]["parameters"]]  # the model's order, as stored
    unknown = [name for name in chosen or () if name not in parameters]
    if unknown:
        raise ValueError(f"this run has no parameter {unknown[0]!r}; its parameters: {', '.join(parameters)}")
    names = list(dict.fromkeys(chosen or parameters))
    progress = options.pop("progress", None)
    groups = {}
    for index, name in enumerate(names):
        report = None if progress is None else (lambda fraction, index=index: progress((index + fraction) / len(names)))
        groups[name] = parameter_statistics(ds[name].isel(step=steps), progress=report, **options)
    return xr.DataTree.from_dict({"/": xr.Dataset(attrs={"parameters": names}), **groups})


def pixel_note(shape: tuple[int, ...], index: tuple[int, ...]) -> str:
    """Where a weight of a layer on the 784 pixels looks: " (pixel row R, col C)"; else ""."""
    if len(shape) == 2 and shape[1] == IMAGE_SIDE * IMAGE_SIDE:
        row, column = divmod(index[1], IMAGE_SIDE)
        return f" (pixel row {row}, col {column})"
    return ""


def top_weights(values: xr.DataArray, n: int) -> list[tuple[tuple[int, ...], float]]:
    """The ``n`` weights with the largest values (NaN last): (index in the parameter, value)."""
    flat = values.values.astype(np.float64).ravel()
    order = np.argsort(np.where(np.isfinite(flat), -flat, np.inf), kind="stable")[:n]
    return [(tuple(int(i) for i in np.unravel_index(position, values.shape)), float(flat[position]))
            for position in order]


if __name__ == "__main__":
    sys.exit(main())
