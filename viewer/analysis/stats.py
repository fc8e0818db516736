"""Per-pixel change statistics over a step range, computed with dask straight from the store.

    weightlapse stats runs/original --start 0 --stop 3000 --out original-stats.zarr
    weightlapse stats runs/original --centred --out centred-stats.zarr  # class-mean removed
    weightlapse stats runs/mlp-32 --out mlp-stats.zarr                  # a network: a group per parameter

Headless use, for research scripts::

    from weightlapse.pipeline.store import open_run
    from weightlapse.viewer.analysis.stats import change_statistics, parameter_statistics
    stats = change_statistics(open_run("runs/original").weights.sel(step=slice(0, 3000)))
    stats.path_length_over_classes.values.reshape(28, 28)
    layer = parameter_statistics(open_run("runs/mlp-32")["hidden1.weight"])  # in the layer's shape

For the weights w[t] of steps t = a..b of one (class, pixel):

- ``net_change``   w[b] - w[a]
- ``path_length``  sum over t of |w[t] - w[t-1]|
- ``straightness`` |net_change| / path_length: 1 for a straight move, near 0 for wandering
  (NaN for a weight that never moved)
- ``std``          standard deviation of w[a..b] (population, ddof 0)
- ``reversals``    steps whose change has the opposite sign to the previous step's change
  (a step without change counts as neither)
- ``settle_step``  the first step t by which the weight had travelled ``settle_fraction``
  (default 90%) of its path; ``a`` for a weight that never moved

Each statistic is one entry of the registry :data:`STATISTICS` (how it is derived from
the two passes below, its label, its colour rule), with its numpy reference in
tests/test_stats.py. Each has an ``*_over_classes`` variant, one value per pixel over all ten classes: path length,
|net change| and reversals summed, straightness as their ratio, std as the root of the summed
variances, and the settle step of the summed path.

Memory stays bounded whatever the range: the data are read twice, chunk by chunk (the
settle step needs the total path before it can be found), never held whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
import xarray as xr

from weightlapse.pipeline.cluster import client_for, compute
from weightlapse.pipeline.store import IMAGE_SIDE, pixel_coords


@dataclass(frozen=True)
class Passes:
    """What the two passes over a step range measure, per weight (class, pixel) unless named
    ``*_over_classes`` (pixel,): every statistic is derived from these."""

    net: np.ndarray                     # last row minus first, float64
    path: np.ndarray                    # sum of |change|
    reversals: np.ndarray               # sign flips between consecutive changes
    std: np.ndarray                     # population std over the rows
    settle: np.ndarray                  # step by which settle_fraction of the path was travelled
    settle_over_classes: np.ndarray     # the same for the path summed over classes


@dataclass(frozen=True)
class Statistic:
    """One per-pixel statistic: how to derive it, what to call it and how to colour it.

    ``derive(passes)`` returns (per class (class, pixel), over classes (pixel,)). ``label``
    may name ``{fraction}`` (the settle fraction). ``diverging``: signed values, drawn on a
    colour map centred on zero; otherwise sequential. Each entry has a numpy reference in
    tests/test_stats.py.
    """

    name: str
    label: str
    description: str
    diverging: bool
    derive: Callable[[Passes], tuple[np.ndarray, np.ndarray]]
    integer: bool = False

    def title(self, settle_fraction: float = 0.9) -> str:
        return self.label.format(fraction=settle_fraction)


def _ratio_of(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)


_REGISTERED = (
    Statistic("path_length", "path length", "sum of |change| between consecutive steps", False,
              lambda p: (p.path, p.path.sum(axis=0))),
    Statistic("net_change", "net change", "last step minus first (over classes: the sum of |net change|)", True,
              lambda p: (p.net, np.abs(p.net).sum(axis=0))),
    Statistic("straightness", "straightness", "|net change| / path length: 1 straight, near 0 wandering", False,
              lambda p: (_ratio_of(np.abs(p.net), p.path), _ratio_of(np.abs(p.net).sum(axis=0), p.path.sum(axis=0)))),
    Statistic("std", "standard deviation", "standard deviation over the steps", False,
              lambda p: (p.std, np.sqrt((p.std ** 2).sum(axis=0)))),
    Statistic("reversals", "direction reversals", "changes opposite in sign to the previous one", False,
              lambda p: (p.reversals, p.reversals.sum(axis=0)), integer=True),
    Statistic("settle_step", "settle step ({fraction:.0%} of path)",
              "when the weight had travelled that fraction of its path", False,
              lambda p: (p.settle, p.settle_over_classes), integer=True),
)
# The registry: name -> Statistic, in the order the viewer lists them.
STATISTICS: dict[str, Statistic] = {statistic.name: statistic for statistic in _REGISTERED}
# Steps per dask block: few enough blocks that scheduling is cheap, small enough
# (about 16 MB of float32 per block) that memory stays low on any machine.
BLOCK_STEPS = 512
# A step range up to this size is read once and kept in memory for both passes
# (decompression is about half the time of a 3,000-step window); longer ones are read twice.
IN_MEMORY_BYTES = 512 * 2**20


def _as_dask(weights) -> tuple[da.Array, int]:
    """(step, class, pixel) weights as a dask array, and the first step's label."""
    first_step = 0
    if isinstance(weights, xr.DataArray):
        if weights.dims != ("step", "class", "pixel"):
            raise ValueError(f"weights must have dims (step, class, pixel), got {weights.dims}")
        if "step" in weights.coords and weights.sizes["step"]:
            first_step = int(weights["step"][0])
        weights = weights.data
    # name=False: no hashing of the whole array to name it (a tenth of a second per 100 MB)
    array = weights if isinstance(weights, da.Array) else da.from_array(np.asarray(weights), name=False)
    if array.ndim != 3:
        raise ValueError(f"weights must be 3-d (step, class, pixel), got shape {array.shape}")
    if array.shape[0] < 1:
        raise ValueError("the step range is empty: give at least one step")
    return array, first_step


def change_statistics(weights, *, first_step: int | None = None, settle_fraction: float = 0.9,
                      progress: Callable[[float], None] | None = None, scheduler=None) -> xr.Dataset:
    """Per-pixel change statistics of ``weights`` (step, class, pixel) over all its steps.

    ``weights`` is an xarray DataArray (e.g. ``open_run(...).weights.sel(step=slice(a, b))``),
    a dask array or a numpy array. Step labels come from its ``step`` coordinate, else from
    ``first_step`` (default 0). ``progress`` is called with the fraction done (0..1).
    ``scheduler`` is passed to ``dask.compute`` (default: dask's current scheduler).
    """
    if not 0 < settle_fraction <= 1:
        raise ValueError(f"settle_fraction must be in (0, 1], got {settle_fraction}")
    w, coord_first = _as_dask(weights)
    first = coord_first if first_step is None else int(first_step)
    n_rows, n_classes, n_pixels = w.shape

    def pass_progress(index: int) -> Callable[[float], None] | None:
        return None if progress is None else (lambda fraction: progress((index + fraction) / 2))
    starts = list(range(0, n_rows, BLOCK_STEPS))

    def with_context(start: int, context: int) -> tuple[da.Array, int]:
        # A block's rows plus up to ``context`` rows before it: the changes into the block
        # and the direction of the change before that (for reversals) cross block edges.
        lead = min(context, start)
        return w[start - lead:min(start + BLOCK_STEPS, n_rows)], lead

    # Pass 1: one look at each block gives path, reversals and the moments for std.
    # A short range comes back whole from this same pass (read once, decompressed while
    # other blocks compute) and pass 2 reuses it; a long one is read again in pass 2.
    # (Not on a cluster: the rows would travel to this process and back.)
    keep = w.nbytes <= IN_MEMORY_BYTES and client_for(scheduler) is None
    blocks = [with_context(start, 2) for start in starts]
    summarize = dask.delayed(_block_summary, pure=False, nout=2)
    first_row, last_row = compute([w[0], w[-1]], scheduler=scheduler)
    results = compute([summarize(rows, lead, keep) for rows, lead in blocks], scheduler=scheduler,
                      progress=pass_progress(0))
    partials = [partial for partial, _ in results]
    kept = [rows for _, rows in results] if keep else []
    net = last_row.astype(np.float64) - first_row.astype(np.float64)
    block_paths = np.stack([partial.path for partial in partials])      # (block, class, pixel)
    path = block_paths.sum(axis=0)
    reversals = sum(partial.reversals for partial in partials)
    std = np.sqrt(_merge_moments(partials) / n_rows)

    # Pass 2: the settle step, now that each weight's total path is known. The per-block
    # paths of pass 1 already say in which block each weight crosses the threshold, so
    # each block only scans the weights that settle inside it.
    path_over_classes = path.sum(axis=0)
    flat_blocks = block_paths.reshape(len(starts), -1)
    thresholds = settle_fraction * np.concatenate([path.ravel(), path_over_classes])
    after_block = np.cumsum(np.concatenate([flat_blocks, flat_blocks.reshape(len(starts), n_classes, -1)
                                            .sum(axis=1)], axis=1), axis=0)           # (block, column)
    settle_block = np.minimum((after_block < thresholds).sum(axis=0), len(starts) - 1)
    tasks, columns_of = [], []
    for index, start in enumerate(starts):
        columns = np.flatnonzero((settle_block == index) & (thresholds > 0))
        if columns.size:
            before = after_block[index - 1, columns] if index else np.zeros(columns.size)
            if kept:  # drop the second row of context pass 1 needed
                rows = kept[index][1:] if blocks[index][1] == 2 else kept[index]
                context = (rows, min(1, start))
            else:
                context = with_context(start, 1)
            tasks.append(dask.delayed(_block_settle_rows, pure=False)(*context, columns, before,
                                                                      thresholds[columns]))
            columns_of.append((columns, max(start, 1)))
    found = compute(tasks, scheduler=scheduler, progress=pass_progress(1))
    settle_all = np.zeros(thresholds.size, dtype=np.int64)   # row index; 0 for weights that never moved
    for (columns, first_change), below in zip(columns_of, found):
        settle_all[columns] = np.minimum(first_change + below, n_rows - 1)
    settle = first + settle_all[:n_classes * n_pixels].reshape(n_classes, n_pixels)
    settle_over_classes = first + settle_all[n_classes * n_pixels:]
    if progress:
        progress(1.0)

    passes = Passes(net=net, path=path, reversals=reversals.astype(np.int64), std=std,
                    settle=settle.astype(np.int64), settle_over_classes=settle_over_classes.astype(np.int64))
    variables = {}
    for name, statistic in STATISTICS.items():
        per_class, over_classes = statistic.derive(passes)
        dtype = np.int64 if statistic.integer else np.float64
        label = statistic.title(settle_fraction)
        variables[name] = xr.Variable(("class", "pixel"), np.asarray(per_class, dtype), {"long_name": label})
        variables[f"{name}_over_classes"] = xr.Variable(("pixel",), np.asarray(over_classes, dtype),
                                                        {"long_name": f"{label}, over all classes"})
    stats = xr.Dataset(variables, coords={"class": np.arange(n_classes), **pixel_coords(n_pixels)},
                       attrs={"first_step": first, "last_step": first + n_rows - 1,
                              "settle_fraction": settle_fraction})
    return stats


@dataclass(frozen=True)
class _BlockSummary:
    path: np.ndarray       # (class, pixel) sum of |change| into this block's rows
    reversals: np.ndarray  # (class, pixel) sign flips between consecutive changes into its rows
    count: int             # rows of the block
    mean: np.ndarray       # (class, pixel) mean of its rows
    m2: np.ndarray         # (class, pixel) sum of squared deviations from that mean


def _block_summary(rows: np.ndarray, lead: int, keep: bool = False) -> tuple[_BlockSummary, np.ndarray | None]:
    """Pass 1 on one block; ``rows`` starts with ``lead`` (0..2) rows of the block before.
    Returns the summary, and ``rows`` when ``keep`` (for pass 2 to reuse).

    Differences are taken in float32, the stored precision: the difference of two nearby
    float32 values is exact (Sterbenz), and otherwise within float32 rounding; every sum
    accumulates in float64. This halves the memory traffic, which bounds the speed here.
    """
    change = np.diff(rows, axis=0)                       # (step, class, pixel) float32
    own = change[max(lead - 1, 0):]                      # the changes that end on this block's rows
    # A reversal is a pair of consecutive changes of opposite sign, counted on the block
    # holding the second one (so the pair across the edge with the block before is ours).
    direction = np.sign(change[max(lead - 2, 0):])
    flips = np.count_nonzero(direction[1:] * direction[:-1] < 0, axis=0)
    block = rows[lead:]
    # Moments about the block's first row, where float32 keeps the deviations precise.
    shifted = block - block[0]
    count = len(block)
    total = shifted.sum(axis=0, dtype=np.float64)
    squares = np.square(shifted).sum(axis=0, dtype=np.float64)
    m2 = np.maximum(squares - total * total / count, 0.0)
    mean = block[0].astype(np.float64) + total / count
    summary = _BlockSummary(np.abs(own).sum(axis=0, dtype=np.float64), flips, count, mean, m2)
    return summary, (rows if keep else None)


def _merge_moments(partials: list[_BlockSummary]) -> np.ndarray:
    """Total sum of squared deviations from per-block moments (Chan et al.'s parallel update)."""
    count, mean, m2 = 0, 0.0, 0.0
    for partial in partials:
        total = count + partial.count
        delta = partial.mean - mean
        mean = mean + delta * (partial.count / total)
        m2 = m2 + partial.m2 + delta ** 2 * (count * partial.count / total)
        count = total
    return m2


def _block_settle_rows(rows: np.ndarray, lead: int, columns: np.ndarray, travelled_before: np.ndarray,
                       threshold: np.ndarray) -> np.ndarray:
    """Pass 2 on one block, for the ``columns`` that settle in it: how many of the block's
    changes end with the cumulative path still below the threshold.

    Columns index the flattened (class, pixel) weights, then the pixels summed over classes.
    """
    n_rows, n_classes, n_pixels = rows.shape
    n_weights = n_classes * n_pixels
    flat = rows.reshape(n_rows, n_weights)
    per_weight = columns < n_weights
    moved = np.empty((n_rows - 1, columns.size))
    # Only the columns that settle here are differenced: about 1/blocks of the data.
    # Differences in float32, as in pass 1, so both passes measure the same path.
    moved[:, per_weight] = np.abs(np.diff(flat[:, columns[per_weight]], axis=0))
    pixels = columns[~per_weight] - n_weights
    if pixels.size:
        moved[:, ~per_weight] = np.abs(np.diff(rows[:, :, pixels], axis=0)).sum(axis=1, dtype=np.float64)
    travelled = travelled_before + np.cumsum(moved, axis=0)
    return (travelled < threshold).sum(axis=0)


def parameter_statistics(values: xr.DataArray, *, settle_fraction: float = 0.9,
                         progress: Callable[[float], None] | None = None, scheduler=None) -> xr.Dataset:
    """The per-weight statistics of ``values`` (step, ...): one parameter of a network over a
    step range (``open_run(...)["fc1.weight"].sel(step=slice(a, b))``), each statistic in the
    parameter's own dimensions. Its first axis (the units) stands for the classes and the
    rest for the pixels; the ``*_over_classes`` variants, which sum over units, are left out."""
    if not values.dims or values.dims[0] != "step":
        raise ValueError(f"values must have dims (step, ...), got {values.dims}")
    shape = values.shape[1:]
    rows = shape[0] if shape else 1
    matrix = values.data.reshape(values.shape[0], rows, -1)
    first = int(values["step"][0]) if "step" in values.coords and values.sizes["step"] else 0
    stats = change_statistics(matrix, first_step=first, settle_fraction=settle_fraction, progress=progress,
                              scheduler=scheduler)
    shaped = {key: xr.Variable(values.dims[1:], np.asarray(stats[key].values).reshape(shape), stats[key].attrs)
              for key in stats.data_vars if not key.endswith("_over_classes")}
    return xr.Dataset(shaped, attrs={**stats.attrs, "parameter": str(values.name)})


def top_pixels(stats: xr.Dataset, statistic: str = "path_length", n: int = 10) -> list[dict]:
    """The ``n`` pixels with the largest ``statistic`` over classes: [{pixel, row, col, value}]."""
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}; choose one of {', '.join(STATISTICS)}")
    values = stats[f"{statistic}_over_classes"].values.astype(np.float64)
    order = np.argsort(np.where(np.isfinite(values), -values, np.inf), kind="stable")[:n]
    return [{"pixel": int(p), "row": int(p // IMAGE_SIDE), "col": int(p % IMAGE_SIDE), "value": float(values[p])}
            for p in order]
