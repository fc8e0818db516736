"""Frames drawn with matplotlib (Agg) and encoded as GIF or MP4: the drawing behind export.py.

:class:`GridRenderer` draws softmax-regression weights as the viewer shows them: ten 28x28
tiles in a 2x5 grid per run (up to four runs, two grids a row), a diverging colour map
centred on zero, one colour bar for all of them. :class:`PictureRenderer` draws one picture
per run (up to four, two a row): a network layer as the viewer lays it out
(viewer/analysis/layouts.py). Each figure is made once and redrawn by swapping its image
data; :func:`write_animation` and :func:`write_picture_animation` encode a frame a step on
one colour range.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # never open a window: exports run in servers and scripts

import matplotlib.pyplot as plt
import numpy as np

from weightlapse.viewer.analysis.frames import DIVERGING_CMAP, IMAGE_SIDE, grid_shape, symmetric_limit

# MP4 encoders want frame sizes divisible by 16; 960 x 448 pixels fits one run's 2x5 grid.
FIGURE_SIZE_PX = (960, 448)
DPI = 96
MAX_GROUPS = 4       # runs in one picture, side by side
GROUP_COLUMNS = 2    # grids per row of the picture
MIN_COLORBAR_PX = 160  # a layer's picture at least this high has its colour bar beside it, else below


def group_shape(n_groups: int) -> tuple[int, int]:
    """(rows, columns) of run grids in a picture of ``n_groups`` runs: 1x1, 1x2, 2x2."""
    if not 1 <= n_groups <= MAX_GROUPS:
        raise ValueError(f"a picture shows 1 to {MAX_GROUPS} runs, not {n_groups}")
    columns = min(n_groups, GROUP_COLUMNS)
    return -(-n_groups // columns), columns


class _Figure:
    """A reusable matplotlib figure, read out as pixels (a movie's frame) or as a PNG."""

    figure: plt.Figure

    def rgb(self) -> np.ndarray:
        """The figure as an (height, width, 3) uint8 array."""
        self.figure.canvas.draw()
        return np.asarray(self.figure.canvas.buffer_rgba())[..., :3].copy()

    def png(self) -> bytes:
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=DPI)
        return buffer.getvalue()

    def close(self) -> None:
        plt.close(self.figure)


class GridRenderer(_Figure):
    """One reusable figure of (class, pixel) tiles, one 2x5 grid per group (a run shown side by
    side, with its title above it); redrawing only swaps the image data."""

    def __init__(self, n_tiles: int, *, tile_titles: Sequence[str], cmap: str = DIVERGING_CMAP,
                 colorbar_label: str = "weight", groups: Sequence[str] = ("",)) -> None:
        """``n_tiles`` tiles per group; ``groups``: each group's title (one untitled group by default)."""
        rows, cols = grid_shape(n_tiles)
        group_rows, group_cols = group_shape(len(groups))
        self.n_tiles = n_tiles
        self.figure = plt.figure(figsize=(FIGURE_SIZE_PX[0] * group_cols / DPI, FIGURE_SIZE_PX[1] * group_rows / DPI),
                                 dpi=DPI)
        titled = any(groups)
        outer = self.figure.add_gridspec(group_rows, group_cols, left=0.01 / group_cols,
                                         right=1 - 0.12 / group_cols, top=(0.80 if titled else 0.86) ** (1 / group_rows),
                                         bottom=0.02, wspace=0.06, hspace=0.25 if titled else 0.1)
        blank = np.zeros((IMAGE_SIDE, IMAGE_SIDE))
        self.images, self.group_titles = [], []
        for group in range(len(groups)):
            cell = outer[divmod(group, group_cols)]
            inner = cell.subgridspec(rows, cols, wspace=0.05, hspace=0.2)
            for index in range(rows * cols):
                ax = self.figure.add_subplot(inner[divmod(index, cols)])
                ax.set_xticks([])
                ax.set_yticks([])
                if index < n_tiles:
                    self.images.append(ax.imshow(blank, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest"))
                    # Names are text, never math: a run or class named "$x$" must not become a formula.
                    ax.set_title(str(tile_titles[index])[:40], fontsize=9, parse_math=False)
                else:
                    ax.set_visible(False)
            box = cell.get_position(self.figure)
            self.group_titles.append(self.figure.text((box.x0 + box.x1) / 2, box.y1 + 0.07 / group_rows,
                                                      str(groups[group])[:80], ha="center", va="bottom",
                                                      fontsize=11, fontweight="bold", parse_math=False))
        colorbar_axes = self.figure.add_axes((1 - 0.09 / group_cols, 0.1, 0.015 / group_cols, 0.7))
        self.colorbar = self.figure.colorbar(self.images[0], cax=colorbar_axes)
        self.colorbar.set_label(colorbar_label)
        self.title = self.figure.suptitle("", fontsize=11, parse_math=False, y=0.995)

    def draw(self, tiles: np.ndarray, *, title: str = "", limit: float | None = None,
             clim: tuple[float, float] | None = None, group_titles: Sequence[str] | None = None) -> None:
        """Show ``tiles`` (group * tile, pixel) with colours from ``clim``, else from -limit to
        +limit (default: their max |value|); ``group_titles`` replaces the groups' titles."""
        if clim is None:
            limit = symmetric_limit(tiles) if limit is None else limit
            clim = (-limit, limit)
        for image, tile in zip(self.images, np.asarray(tiles)):
            image.set_data(tile.reshape(IMAGE_SIDE, IMAGE_SIDE))
            image.set_clim(*clim)
        self.title.set_text(title)
        for text, group_title in zip(self.group_titles, group_titles or ()):
            text.set_text(str(group_title)[:80])


class PictureRenderer(_Figure):
    """One reusable figure of a picture per group (a run shown side by side, up to four, two a
    row, each titled above it): a network parameter as the viewer lays it out (unit images, a
    heatmap, a strip; NaN between tiles, drawn white), ``size_px`` (width, height) screen
    pixels each, as the page draws it, with one colour bar, a title, a ``caption`` under it
    (what the pictures show) and ``labels`` ((x, y, text): x across from the left, y up from
    the bottom, in picture cells) on each, such as each unit's name. The figure's sides are
    multiples of 16 pixels, as MP4 encoders want them."""

    def __init__(self, shape: tuple[int, int], *, size_px: tuple[int, int], cmap: str = DIVERGING_CMAP,
                 colorbar_label: str = "weight", caption: str = "",
                 labels: Sequence[tuple[float, float, str]] = (), groups: Sequence[str] = ("",)) -> None:
        width, height = size_px
        rows, columns = shape
        group_rows, group_columns = group_shape(len(groups))
        titled = any(groups)
        title_px = 22 if titled else 0     # each picture's own title, above it
        gap = 16                           # between pictures
        beside = height >= MIN_COLORBAR_PX  # a strip's colour bar goes below it, where it is long enough to read
        across = group_columns * width + (group_columns - 1) * gap
        down = group_rows * (title_px + height) + (group_rows - 1) * gap
        figure_width = _multiple_of_16(across + 32 + (120 if beside else 0))
        figure_height = _multiple_of_16(down + 64 + (0 if beside else 64))
        self.figure = plt.figure(figsize=(figure_width / DPI, figure_height / DPI), dpi=DPI)
        bottom = 16 if beside else 72
        colours = plt.get_cmap(cmap).with_extremes(bad="#ffffff")
        self.images, self.group_titles = [], []
        for group in range(len(groups)):
            row, column = divmod(group, group_columns)
            left = 16 + column * (width + gap)
            low = bottom + (group_rows - 1 - row) * (title_px + height + gap)
            axes = self.figure.add_axes((left / figure_width, low / figure_height, width / figure_width,
                                         height / figure_height))
            axes.set_xticks([])
            axes.set_yticks([])
            self.images.append(axes.imshow(np.zeros(shape), cmap=colours, vmin=-1, vmax=1, interpolation="nearest",
                                           aspect="auto", extent=(0, columns, 0, rows)))
            for x, y, text in labels:
                axes.text(x, y, str(text)[:24], ha="center", va="center", fontsize=7, color="#222222",
                          parse_math=False)
            self.group_titles.append(self.figure.text((left + width / 2) / figure_width, (low + height + 4) / figure_height,
                                                      str(groups[group])[:80], ha="center", va="bottom", fontsize=10,
                                                      fontweight="bold", parse_math=False))
        if beside:
            colorbar_axes = self.figure.add_axes(((across + 32) / figure_width, bottom / figure_height,
                                                  14 / figure_width, (down - title_px) / figure_height))
        else:
            colorbar_axes = self.figure.add_axes((16 / figure_width, 24 / figure_height, across / figure_width,
                                                  12 / figure_height))
        self.colorbar = self.figure.colorbar(self.images[0], cax=colorbar_axes,
                                             orientation="vertical" if beside else "horizontal")
        self.colorbar.set_label(str(colorbar_label)[:60])
        self.title = self.figure.suptitle("", fontsize=11, parse_math=False, y=1 - 6 / figure_height, va="top")
        self.figure.text(0.5, 1 - 26 / figure_height, str(caption)[:140], ha="center", va="top", fontsize=8,
                         color="#444444", parse_math=False)

    def draw(self, pictures, *, title: str, clim: tuple[float, float],
             group_titles: Sequence[str] | None = None) -> None:
        """Show ``pictures`` (one 2-D array, or one per group) on colours ``clim``; ``group_titles``
        replaces the groups' titles."""
        for image, picture in zip(self.images, [pictures] if np.ndim(pictures) == 2 else pictures):
            image.set_data(picture)
            image.set_clim(*clim)
        self.title.set_text(str(title)[:120])
        for text, group_title in zip(self.group_titles, group_titles or ()):
            text.set_text(str(group_title)[:80])


def _multiple_of_16(pixels: int) -> int:
    return -(-int(pixels) // 16) * 16



def write_animation(target, steps: Sequence[int], frame_at: Callable[[int], np.ndarray], *, fmt: str,
                    class_names: Sequence[str], title: Callable[[int], str], fps: float = 10,
                    progress: Callable[[float], None] | None = None, limit: float | None = None,
                    groups: Callable[[int], Sequence[str]] | None = None) -> None:
    """Encode the frames of ``steps`` as ``fmt`` ("gif" or "mp4") into ``target`` (a path or a binary file).

    ``frame_at(step)``: (group * class, pixel), one run's tiles after another's when
    ``groups(step)`` names several (runs side by side, titled per frame). The colour range
    is fixed over the whole animation and all its runs: ±``limit`` (e.g. the run's largest
    |weight|, as the viewer shows it), widened to the largest |weight| of its frames if they
    go past it, so colours mean the same thing in every frame and every grid.
    """
    _check_format(fmt)
    limit = max([symmetric_limit(frame_at(step)) for step in steps] + ([limit] if limit else []))
    names = list(groups(steps[0])) if groups else [""]
    renderer = GridRenderer(len(frame_at(steps[0])) // len(names), tile_titles=class_names, groups=names)

    def frame(step: int) -> np.ndarray:
        renderer.draw(frame_at(step), title=title(step), limit=limit, group_titles=groups(step) if groups else None)
        return renderer.rgb()
    try:
        _encode(target, steps, frame, fmt=fmt, fps=fps, progress=progress)
    finally:
        renderer.close()


def write_picture_animation(target, steps: Sequence[int], picture_at: Callable[[int], np.ndarray], *, fmt: str,
                            title: Callable[[int], str], size_px: tuple[int, int], fps: float = 10,
                            progress: Callable[[float], None] | None = None, limit: float | None = None,
                            colorbar_label: str = "weight", caption: str = "",
                            labels: Sequence[tuple[float, float, str]] = (),
                            groups: Callable[[int], Sequence[str]] | None = None) -> None:
    """Encode one picture a step (``picture_at(step)``, 2-D, e.g. a network layer as the viewer
    lays it out; :class:`PictureRenderer`), or one per run when ``groups(step)`` names several
    (a list of pictures of one shape, runs side by side, titled per frame), as ``fmt`` into
    ``target``, on one colour range fixed over the animation and its runs as
    :func:`write_animation`'s: ±``limit``, widened to its frames."""
    _check_format(fmt)
    limit = max([symmetric_limit(np.asarray(picture_at(step))) for step in steps] + ([limit] if limit else []))
    names = list(groups(steps[0])) if groups else [""]
    first = picture_at(steps[0])
    renderer = PictureRenderer(np.shape(first if groups is None else first[0]), size_px=size_px,
                               colorbar_label=colorbar_label, caption=caption, labels=labels, groups=names)

    def frame(step: int) -> np.ndarray:
        renderer.draw(picture_at(step), title=title(step), clim=(-limit, limit),
                      group_titles=groups(step) if groups else None)
        return renderer.rgb()
    try:
        _encode(target, steps, frame, fmt=fmt, fps=fps, progress=progress)
    finally:
        renderer.close()


def _check_format(fmt: str) -> None:
    if fmt not in ("gif", "mp4"):
        raise ValueError(f"unknown animation format {fmt!r}; use gif or mp4")


def _encode(target, steps: Sequence[int], frame: Callable[[int], np.ndarray], *, fmt: str, fps: float,
            progress: Callable[[float], None] | None) -> None:
    """Write ``frame(step)`` (an RGB array) of each step as a GIF or MP4 into ``target``."""
    import imageio.v2 as imageio

    if fmt == "mp4" and hasattr(target, "write"):
        # ffmpeg writes MP4 to a file (it seeks back to finish the header), not to a stream.
        with tempfile.TemporaryDirectory(prefix="weightlapse-") as directory:
            path = Path(directory) / "animation.mp4"
            _encode(path, steps, frame, fmt=fmt, fps=fps, progress=progress)
            target.write(path.read_bytes())
        return
    if fmt == "gif":
        writer = imageio.get_writer(target, format="GIF", mode="I", duration=1000 / fps, loop=0)
    else:
        writer = imageio.get_writer(target, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                    quality=8, pixelformat="yuv420p", macro_block_size=16)
    try:
        for index, step in enumerate(steps):
            writer.append_data(frame(step))
            if progress:
                progress((index + 1) / len(steps))
    finally:
        writer.close()
