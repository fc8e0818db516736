"""Pure computations behind what the viewer draws: arrays in, arrays and numbers out.

Nothing here reads files or knows about Panel, so every picture the viewer shows can be
checked against numpy in a test, and research scripts can reuse the same functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from weightlapse.pipeline.store import IMAGE_SIDE
from weightlapse.viewer.analysis.scales import largest_magnitude

GRID_COLUMNS = 5  # ten classes as 2 rows x 5 columns, as the original notebook drew them
GAP = 1           # one blank (NaN) pixel between tiles, as in the notebook's 29-pixel pitch
DIVERGING_CMAP = "RdBu_r"    # weights and changes: blue negative, white zero, red positive
SEQUENTIAL_CMAP = "viridis"  # statistics that are never negative


def colour_map(*, diverging: bool) -> str:
    return DIVERGING_CMAP if diverging else SEQUENTIAL_CMAP


def grid_shape(n_classes: int, *, columns: int = GRID_COLUMNS) -> tuple[int, int]:
    rows = -(-n_classes // columns)
    return rows, min(columns, n_classes)


def tile_origin(class_index: int, *, columns: int = GRID_COLUMNS, header: int = GAP) -> tuple[int, int]:
    """(row, column) of the top-left pixel of a class's tile in the mosaic."""
    grid_row, grid_col = divmod(class_index, columns)
    return grid_row * (IMAGE_SIDE + header) + header, grid_col * (IMAGE_SIDE + GAP)


def mosaic_pixel(row: int, col: int, n_classes: int, *, columns: int = GRID_COLUMNS,
                 header: int = GAP) -> tuple[int, int] | None:
    """The (class, pixel) that :func:`mosaic` draws at its row ``row``, column ``col`` (row 0 on
    top); None between tiles or outside them. Pixel p is image row p // 28, column p % 28."""
    for index in range(n_classes):
        top, left = tile_origin(index, columns=columns, header=header)
        if top <= row < top + IMAGE_SIDE and left <= col < left + IMAGE_SIDE:
            return index, (row - top) * IMAGE_SIDE + (col - left)
    return None


def mosaic(frames: np.ndarray, *, columns: int = GRID_COLUMNS, header: int = GAP) -> np.ndarray:
    """Tile per-class images into one picture: (class, pixel) -> (rows*(28+header), columns*29-1).

    Row 0 of the result is the top of the picture. Each row of tiles has ``header`` blank
    rows above it (room for the class names) and one blank column between tiles. Blanks
    are NaN so that they draw as background, never as a weight of zero.
    """
    frames = np.asarray(frames)
    n_classes = frames.shape[0]
    images = frames.reshape(n_classes, IMAGE_SIDE, IMAGE_SIDE)
    grid_rows, grid_cols = grid_shape(n_classes, columns=columns)
    out = np.full((grid_rows * (IMAGE_SIDE + header), grid_cols * (IMAGE_SIDE + GAP) - GAP), np.nan,
                  dtype=np.float32)
    for index in range(n_classes):
        top, left = tile_origin(index, columns=columns, header=header)
        out[top:top + IMAGE_SIDE, left:left + IMAGE_SIDE] = images[index]
    return out


WEIGHT_CHOICES = ("raw", "centred")


def centred(weights):
    """The weights (..., class, pixel) less their mean over the classes, per pixel (and step).

    Softmax regression predicts the same for W and W + 1v^T (one vector added to every
    class's weights), and the cross-entropy's gradient sums to zero over the classes, so
    the class-mean is the part of the weights that no prediction depends on: under plain
    SGD it never leaves its random initial value. What is left is the part that changes
    predictions. numpy and dask arrays stay what they are; an xarray DataArray stays lazy,
    with ``attrs["centred"]`` set.
    """
    if hasattr(weights, "dims"):  # xarray
        result = weights - weights.mean("class")
        result.name = weights.name
        result.attrs = {**weights.attrs, "centred": "class-mean removed"}
        return result
    return weights - weights.mean(axis=-2, keepdims=True)


def class_mean_fraction(weights: np.ndarray) -> float:
    """The share of the squared weights (class, pixel) that is their class-mean part (0..1):
    ||W||^2 = ||centred(W)||^2 + n_classes * ||mean over classes||^2."""
    weights = np.asarray(weights, dtype=np.float64)
    total = float((weights ** 2).sum())
    mean_part = weights.shape[-2] * float((weights.mean(axis=-2) ** 2).sum())
    return mean_part / total if total > 0 else 0.0


def symmetric_limit(values: np.ndarray) -> float:
    """The largest |value| (ignoring NaN), so a colour map can be centred on zero; 1 if all zero."""
    return largest_magnitude(values) or 1.0


def scale_per_class(frames: np.ndarray) -> np.ndarray:
    """Each class divided by its own largest |weight|: every tile spans [-1, 1]."""
    frames = np.asarray(frames, dtype=np.float32)
    limits = np.array([symmetric_limit(row) for row in frames], dtype=np.float32)
    return frames / limits[:, None]


@dataclass(frozen=True)
class DiffSummary:
    """How far apart two weight matrices (class, pixel) are."""

    l2: float                  # ||b - a|| over all weights
    cosine: float              # cosine similarity of a and b as flat vectors (NaN if one is zero)
    l2_per_class: np.ndarray   # (class,)
    cosine_per_class: np.ndarray


def _cosine(a: np.ndarray, b: np.ndarray, axis=None) -> np.ndarray:
    norms = np.linalg.norm(a, axis=axis) * np.linalg.norm(b, axis=axis)
    dots = np.sum(a * b, axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, dots / np.where(norms > 0, norms, 1), np.nan)


def diff_summary(a: np.ndarray, b: np.ndarray) -> DiffSummary:
    """Distance and similarity between weights ``a`` and ``b`` (both (class, pixel))."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare weights of shape {a.shape} with {b.shape}")
    delta = b - a
    return DiffSummary(
        l2=float(np.linalg.norm(delta)),
        cosine=float(_cosine(a, b)),
        l2_per_class=np.linalg.norm(delta, axis=1),
        cosine_per_class=_cosine(a, b, axis=1),
    )


def downsample_curve(steps: np.ndarray, values: np.ndarray, max_points: int = 2000):
    """Bin a long per-step curve for display: (bin step, mean, min, max), at most ``max_points`` bins.

    A 300,000-step loss curve drawn point by point is slow and unreadable; the mean shows
    the trend and the min/max band keeps the spread visible. Bins are labelled by their
    first step. Short curves come back unchanged (min = max = value).
    """
    steps = np.asarray(steps)
    values = np.asarray(values, dtype=np.float64)
    if len(steps) <= max_points:
        return steps, values, values, values
    # max_points < len(steps), so every bin holds at least one step
    edges = np.linspace(0, len(steps), max_points + 1).astype(np.int64)
    starts = edges[:-1]
    with np.errstate(invalid="ignore"):
        sums = np.add.reduceat(np.nan_to_num(values), starts)
        valid = np.add.reduceat(np.isfinite(values).astype(np.int64), starts)
        mean = np.where(valid > 0, sums / np.maximum(valid, 1), np.nan)
    filled_low = np.where(np.isfinite(values), values, np.inf)
    filled_high = np.where(np.isfinite(values), values, -np.inf)
    low = np.minimum.reduceat(filled_low, starts)
    high = np.maximum.reduceat(filled_high, starts)
    low = np.where(np.isfinite(low), low, np.nan)
    high = np.where(np.isfinite(high), high, np.nan)
    return steps[starts], mean, low, high


def extreme_points(values: np.ndarray, max_points: int = 2000) -> np.ndarray:
    """Indices of the samples of a long curve to draw: in each of ``max_points // 2`` equal
    bins of steps, the lowest and the highest value (in step order), and the last sample.

    Unlike bin means, every drawn point is a stored value at its own step, and a line through
    them spans each bin's whole range, so a one-step spike is drawn as tall as it is. A curve
    of at most ``max_points`` samples comes back whole.
    """
    values = np.asarray(values)
    n = len(values)
    if n <= max_points:
        return np.arange(n)
    bins = max(1, max_points // 2)
    width = -(-n // bins)
    padded = np.full(bins * width, np.nan, dtype=np.float64)
    padded[:n] = values
    padded = padded.reshape(bins, width)
    finite = np.isfinite(padded)
    low = np.where(finite, padded, np.inf).argmin(axis=1)
    high = np.where(finite, padded, -np.inf).argmax(axis=1)
    starts = np.arange(bins) * width
    picked = np.concatenate([starts + low, starts + high, [0, n - 1]])
    return np.unique(picked[picked < n])


def clamp_step(step: object, last_step: int) -> tuple[int, str]:
    """A usable step from untrusted input (URL, text box), and a message when it had to change."""
    try:
        value = int(step)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return max(last_step, 0), f"step {str(step)[:40]!r} is not a number; showing step {max(last_step, 0)}"
    if value < 0:
        return 0, f"step {value} is before the first step; showing step 0"
    if value > last_step:
        return max(last_step, 0), f"step {value} is past this run's last step {last_step}; showing it"
    return value, ""
