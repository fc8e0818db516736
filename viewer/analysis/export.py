"""Pictures and movies of weights for papers and talks: PNG, animated GIF, MP4.

Headless use::

    from weightlapse.viewer.analysis.export import save_png, save_animation
    from weightlapse.viewer.analysis.runs import RunCatalog
    run = RunCatalog("runs").open("original")
    save_png("step-500.png", run.weights_at(500), class_names=run.class_names, title="original, step 500")
    save_animation("first-epoch.mp4", run, start=0, stop=3000, fps=25)          # dense early (log)
    save_animation("by-change.mp4", run, stop=3000, spacing="distance")         # a frame per equal change
    save_animation("adam-vs-sgd.mp4", [run, catalog.open("sgd")], stop=3000)   # side by side

Frames are drawn with matplotlib (Agg) as the viewer shows them: ten 28x28 tiles in a
2x5 grid per run (up to four runs, two grids a row), a diverging colour map centred on
zero, one colour bar for all of them; or one picture a frame (:func:`write_picture_animation`),
a network layer as the viewer lays it out.
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

from weightlapse.viewer.analysis.frames import (
    DIVERGING_CMAP,
    IMAGE_SIDE,
    centred,
    grid_shape,
    scale_per_class,
    symmetric_limit,
)
from weightlapse.viewer.analysis.spacing import DEFAULT_SPACING, Travelled, combined, spaced_steps

# MP4 encoders want frame sizes divisible by 16; 960 x 448 pixels fits one run's 2x5 grid.
FIGURE_SIZE_PX = (960, 448)
DPI = 96
MAX_ANIMATION_FRAMES = 1000
ANIMATION_SUFFIXES = (".gif", ".mp4")
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
    """One reusable figure of one picture: a network parameter as the viewer lays it out (unit
    images, a heatmap, a strip; NaN between tiles, drawn white), ``size_px`` (width, height)
    screen pixels as the page draws it, with its colour bar, a title, a ``caption`` under it
    (what the picture shows) and ``labels`` ((x, y, text): x across from the left, y up from
    the bottom, in picture cells), such as each unit's name. The figure's sides are
    multiples of 16 pixels, as MP4 encoders want them."""

    def __init__(self, shape: tuple[int, int], *, size_px: tuple[int, int], cmap: str = DIVERGING_CMAP,
                 colorbar_label: str = "weight", caption: str = "",
                 labels: Sequence[tuple[float, float, str]] = ()) -> None:
        width, height = size_px
        rows, columns = shape
        beside = height >= MIN_COLORBAR_PX  # a strip's colour bar goes below it, where it is long enough to read
        figure_width = _multiple_of_16(width + 32 + (120 if beside else 0))
        figure_height = _multiple_of_16(height + 64 + (0 if beside else 64))
        self.figure = plt.figure(figsize=(figure_width / DPI, figure_height / DPI), dpi=DPI)
        bottom = 16 if beside else 72
        axes = self.figure.add_axes((16 / figure_width, bottom / figure_height, width / figure_width,
                                     height / figure_height))
        axes.set_xticks([])
        axes.set_yticks([])
        colours = plt.get_cmap(cmap).with_extremes(bad="#ffffff")
        self.image = axes.imshow(np.zeros(shape), cmap=colours, vmin=-1, vmax=1, interpolation="nearest",
                                 aspect="auto", extent=(0, columns, 0, rows))
        for x, y, text in labels:
            axes.text(x, y, str(text)[:24], ha="center", va="center", fontsize=7, color="#222222", parse_math=False)
        if beside:
            colorbar_axes = self.figure.add_axes(((width + 32) / figure_width, bottom / figure_height,
                                                  14 / figure_width, height / figure_height))
        else:
            colorbar_axes = self.figure.add_axes((16 / figure_width, 24 / figure_height, width / figure_width,
                                                  12 / figure_height))
        self.colorbar = self.figure.colorbar(self.image, cax=colorbar_axes,
                                             orientation="vertical" if beside else "horizontal")
        self.colorbar.set_label(str(colorbar_label)[:60])
        self.title = self.figure.suptitle("", fontsize=11, parse_math=False, y=1 - 6 / figure_height, va="top")
        self.figure.text(0.5, 1 - 26 / figure_height, str(caption)[:140], ha="center", va="top", fontsize=8,
                         color="#444444", parse_math=False)

    def draw(self, picture: np.ndarray, *, title: str, clim: tuple[float, float]) -> None:
        self.image.set_data(picture)
        self.image.set_clim(*clim)
        self.title.set_text(str(title)[:120])


def _multiple_of_16(pixels: int) -> int:
    return -(-int(pixels) // 16) * 16


def png_bytes(tiles: np.ndarray, *, tile_titles: Sequence[str], title: str = "", per_class: bool = False,
              colorbar_label: str = "weight", cmap: str = DIVERGING_CMAP,
              clim: tuple[float, float] | None = None, groups: Sequence[str] = ("",)) -> bytes:
    """A PNG of ``tiles`` (group * tile, pixel) as a grid per group (``groups``: their titles,
    e.g. runs side by side), colour scale shared or per class; ``clim``: the colour range
    (default: centred on zero, to the tiles' largest |value|), e.g. the viewer's, so that the
    picture is coloured as the page shows it."""
    tiles = np.asarray(tiles, dtype=np.float32)
    if per_class:
        tiles = scale_per_class(tiles)
        colorbar_label = f"{colorbar_label} / largest |{colorbar_label}| of its class"
    renderer = GridRenderer(len(tiles) // len(groups), tile_titles=tile_titles, cmap=cmap,
                            colorbar_label=colorbar_label, groups=groups)
    try:
        renderer.draw(tiles, title=title, limit=1.0 if per_class else None, clim=None if per_class else clim)
        return renderer.png()
    finally:
        renderer.close()


def save_png(path: str | Path, tiles: np.ndarray, *, class_names: Sequence[str], title: str = "",
             per_class: bool = False) -> Path:
    path = Path(path)
    path.write_bytes(png_bytes(tiles, tile_titles=class_names, title=title, per_class=per_class))
    return path


def animation_steps(start: int, stop: int, *, max_frames: int = MAX_ANIMATION_FRAMES, spacing: str = DEFAULT_SPACING,
                    travelled: Callable[[], Travelled] | None = None) -> np.ndarray:
    """Up to ``max_frames`` steps of start..stop (inclusive), both ends kept, spaced by ``spacing``
    (spacing.SPACINGS: "log", the default, dense early; "even"; "distance", which asks
    ``travelled()`` for the distance travelled)."""
    return spaced_steps(spacing, start, stop, max_frames, travelled)


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
                            labels: Sequence[tuple[float, float, str]] = ()) -> None:
    """Encode one picture a step (``picture_at(step)``, 2-D, e.g. a network layer as the viewer
    lays it out; :class:`PictureRenderer`) as ``fmt`` into ``target``, on one colour range
    fixed over the animation as :func:`write_animation`'s: ±``limit``, widened to its frames."""
    _check_format(fmt)
    limit = max([symmetric_limit(picture_at(step)) for step in steps] + ([limit] if limit else []))
    renderer = PictureRenderer(np.shape(picture_at(steps[0])), size_px=size_px, colorbar_label=colorbar_label,
                               caption=caption, labels=labels)

    def frame(step: int) -> np.ndarray:
        renderer.draw(picture_at(step), title=title(step), clim=(-limit, limit))
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


def side_by_side(runs: Sequence, *, centre: bool = False) -> tuple[Callable[[int], np.ndarray],
                                                                  Callable[[int], list[str]]]:
    """(frame_at, groups) for write_animation of ``runs`` side by side: each run at the step
    asked, or at its last step once it has ended (its title then says so); ``centre``: each
    run's centred weights (frames.centred)."""
    def weights(run, step: int) -> np.ndarray:
        rows = run.weights_at(min(step, run.last_step))
        return centred(rows) if centre else rows

    def frame_at(step: int) -> np.ndarray:
        return np.concatenate([weights(run, step) for run in runs])

    def groups(step: int) -> list[str]:
        return [run.name if step <= run.last_step else f"{run.name} (ended at step {run.last_step:,})"
                for run in runs]
    return frame_at, groups


def save_animation(path: str | Path, run, *, start: int = 0, stop: int | None = None, fps: float = 10,
                   max_frames: int = MAX_ANIMATION_FRAMES, spacing: str = DEFAULT_SPACING,
                   progress: Callable[[float], None] | None = None, scheduler=None) -> Path:
    """Write steps start..stop of ``run`` (a viewer.analysis.run.Run, or a list of up to four
    runs to show side by side on one colour scale) as an animated GIF or an MP4, by suffix.

    ``spacing``: which steps become frames (up to ``max_frames``): "log" (the default: every
    step at first, then ever further apart), "even", or "distance" (a frame per equal distance
    travelled in weight space, summed over the runs; measured with dask on ``scheduler``).
    ``stop`` defaults to the last step of the longest run.
    """
    from weightlapse.viewer.analysis.spacing import travelled_by

    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if f".{fmt}" not in ANIMATION_SUFFIXES:
        raise ValueError(f"{path}: choose a .gif or .mp4 file name")
    runs = list(run) if isinstance(run, (list, tuple)) else [run]
    group_shape(len(runs))
    longest = max(runs, key=lambda each: each.last_step)
    stop = longest.last_step if stop is None else stop
    longest.check_step(start)
    longest.check_step(stop)
    steps = animation_steps(start, stop, max_frames=max_frames, spacing=spacing,
                            travelled=lambda: combined([travelled_by(each, start, stop, scheduler=scheduler)
                                                        for each in runs]))
    if len(runs) == 1:
        write_animation(path, steps, runs[0].weights_at, fmt=fmt, class_names=runs[0].class_names, title=lambda step: f"{runs[0].name}: step {step}",
                        fps=fps, progress=progress)
        return path
    frame_at, groups = side_by_side(runs)
    write_animation(path, steps, frame_at, fmt=fmt, class_names=runs[0].class_names,
                    title=lambda step: f"step {step:,}", fps=fps, progress=progress, groups=groups)
    return path
