"""How one step of a network's parameter is laid out as a picture: numpy only, no plotting.

:func:`layer_layout` decides, from a parameter's shape alone, what one step of it looks like:

- ``units``: a 2-d weight whose inputs are the 784 pixels, one 28x28 image per unit (its
  row), in a grid titled by unit index;
- ``matrix``: any other 2-d matrix, a heatmap of units (out, down) by inputs (in, across);
- ``vector``: a 1-d parameter (a bias, a norm's scale) or a scalar, a one-row strip;
- ``kernels``: a 4-d convolution (out, in, kh, kw), one small image per kernel, units down
  and input channels across;
- ``flattened``: any other shape, as a matrix of its first axis by the rest, and says so.

A layout is an index map: each picture pixel holds the flat index of the weight it shows
(-1 between tiles), so a step's picture is one gather, and a click maps back to a weight.
Large parameters are cut to their first units and inputs, and the layout says how many
are shown; the browser is never sent more than about a million values a frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

IMAGE_SIDE = 28
N_PIXELS = IMAGE_SIDE * IMAGE_SIDE
HEADER = 5           # blank rows above each row of unit images, where the unit indices go
UNIT_COLUMNS = 8     # unit images per row of the grid
MAX_UNITS = 64       # unit images drawn (the first ones)
MAX_ROWS, MAX_COLUMNS = 512, 2048   # a heatmap's rows (units) and columns (inputs) drawn
MAX_KERNEL_UNITS, MAX_KERNEL_INPUTS = 32, 16
MAX_PICTURE_PX, MAX_HEIGHT_PX, MAX_CELL_PX, MIN_STRIP_PX, MIN_WIDTH_PX = 820, 620, 40, 48, 420


@dataclass(frozen=True)
class LayerLayout:
    """Where each weight of a parameter is drawn."""

    kind: str                 # units | matrix | vector | kernels | flattened
    shape: tuple[int, ...]    # the parameter's
    index: np.ndarray         # (rows, columns) int64: the flat weight index each picture pixel shows, -1 none
    labels: tuple[tuple[float, float, str], ...]  # (x, y, text) titles: the unit indices of a grid
    description: str          # what the picture shows, in words, including how much of it
    axes: bool                # a heatmap with out/in axes (row 0 on top) rather than an image grid

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def picture(self, values: np.ndarray) -> np.ndarray:
        """One step's values of the parameter as this layout's picture (row 0 on top, NaN between tiles)."""
        flat = np.asarray(values, dtype=np.float32).ravel()
        return np.where(self.index >= 0, flat[np.maximum(self.index, 0)], np.float32(np.nan))

    def weight_at(self, row: int, column: int) -> int | None:
        """The flat index of the weight drawn at picture ``row``, ``column``; None between tiles."""
        height, width = self.index.shape
        if not (0 <= row < height and 0 <= column < width):
            return None
        flat = int(self.index[row, column])
        return flat if flat >= 0 else None

    def clicked(self, x: float, y: float) -> int | None:
        """The weight under a click at (x, y) of :func:`layer_image` (x across, y up from the bottom)."""
        height = self.index.shape[0]
        if self.axes:  # cells centred on their indices (layer_image)
            return self.weight_at(math.floor(y + 0.5), math.floor(x + 0.5))
        return self.weight_at(int(height - y), int(x))


def layer_layout(shape: tuple[int, ...]) -> LayerLayout:
    """How a parameter of ``shape`` (one step's) is drawn (the module docstring lists the kinds)."""
    shape = tuple(int(n) for n in shape)
    if len(shape) == 2 and shape[1] == N_PIXELS:
        return _units(shape)
    if len(shape) == 4:
        return _kernels(shape)
    if len(shape) <= 1:
        size = shape[0] if shape else 1
        shown = min(size, MAX_COLUMNS)
        return LayerLayout("vector", shape, np.arange(shown, dtype=np.int64)[None, :], (),
                           f"{size:,} values" + _cut(shown, size, "values"), True)
    rows, columns = shape[0], math.prod(shape[1:])
    kind = "matrix" if len(shape) == 2 else "flattened"
    shown_rows, shown_columns = min(rows, MAX_ROWS), min(columns, MAX_COLUMNS)
    index = np.arange(shown_rows, dtype=np.int64)[:, None] * columns + np.arange(shown_columns, dtype=np.int64)
    what = (f"{rows:,} units (out, down) by {columns:,} inputs (in, across)" if kind == "matrix" else
            f"shape {shape} flattened to {rows:,} rows (first axis) by {columns:,} columns (the other axes)")
    return LayerLayout(kind, shape, index, (), what + _cut(shown_rows, rows, "rows")
                       + _cut(shown_columns, columns, "columns"), True)


def _cut(shown: int, total: int, what: str) -> str:
    return f"; the first {shown:,} of {total:,} {what} shown" if shown < total else ""


def _units(shape: tuple[int, ...]) -> LayerLayout:
    units = shape[0]
    shown = min(units, MAX_UNITS)
    columns = min(shown, UNIT_COLUMNS)
    grid_rows = -(-shown // columns)
    pitch_rows, pitch_columns = IMAGE_SIDE + HEADER, IMAGE_SIDE + 1
    index = np.full((grid_rows * pitch_rows, columns * pitch_columns - 1), -1, np.int64)
    pixels = np.arange(N_PIXELS, dtype=np.int64).reshape(IMAGE_SIDE, IMAGE_SIDE)
    height, labels = index.shape[0], []
    for unit in range(shown):
        grid_row, grid_column = divmod(unit, columns)
        top, left = grid_row * pitch_rows + HEADER, grid_column * pitch_columns
        index[top:top + IMAGE_SIDE, left:left + IMAGE_SIDE] = unit * N_PIXELS + pixels
        labels.append((left + IMAGE_SIDE / 2, height - top + HEADER / 2, f"unit {unit}"))
    return LayerLayout("units", shape, index, tuple(labels),
                       f"{units:,} units, each one's 784 input weights as a 28x28 image" + _cut(shown, units, "units"),
                       False)


def _kernels(shape: tuple[int, ...]) -> LayerLayout:
    """Each unit's kernels side by side (one per input channel), the units in a grid: a row of
    units when they have few inputs (a first layer's one or three channels), else one a row."""
    units, inputs, kh, kw = shape
    shown_units, shown_inputs = min(units, MAX_KERNEL_UNITS), min(inputs, MAX_KERNEL_INPUTS)
    block_columns = max(1, min(shown_units, UNIT_COLUMNS // shown_inputs))
    block_rows = -(-shown_units // block_columns)
    block_width = shown_inputs * (kw + 1) + 1  # a wider gap between units than between their kernels
    index = np.full((block_rows * (kh + 1) - 1, block_columns * block_width - 2), -1, np.int64)
    kernel = np.arange(kh * kw, dtype=np.int64).reshape(kh, kw)
    for unit in range(shown_units):
        block_row, block_column = divmod(unit, block_columns)
        for channel in range(shown_inputs):
            top, left = block_row * (kh + 1), block_column * block_width + channel * (kw + 1)
            index[top:top + kh, left:left + kw] = (unit * inputs + channel) * kh * kw + kernel
    arrangement = ("units across" if block_rows == 1 else
                   "units down" if block_columns == 1 else f"units {block_columns} a row")
    return LayerLayout("kernels", shape, index, (),
                       f"{units:,} units ({arrangement}), each with its {inputs:,} input channels' {kh}x{kw} kernels "
                       "side by side" + _cut(shown_units, units, "units") + _cut(shown_inputs, inputs, "input channels"),
                       False)


def picture_size(layout: LayerLayout, max_width: int = MAX_PICTURE_PX) -> tuple[int, int]:
    """(frame width, frame height) in screen pixels: square cells, at most ``max_width`` wide and
    MAX_HEIGHT_PX high, at most MAX_CELL_PX a cell (a strip at least MIN_STRIP_PX high)."""
    height, width = layout.index.shape
    cell = min(max_width / width, MAX_HEIGHT_PX / height, MAX_CELL_PX)
    # At least MIN_WIDTH_PX wide, so the title fits: a tiny parameter's cells are then wider than high.
    return max(MIN_WIDTH_PX, round(width * cell)), max(MIN_STRIP_PX, round(height * cell))
