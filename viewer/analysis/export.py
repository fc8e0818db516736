"""Pictures and movies of weights for papers and talks: PNG, animated GIF, MP4.

Headless use::

    from weightlapse.viewer.analysis.export import save_png, save_animation
    from weightlapse.viewer.analysis.runs import RunCatalog
    run = RunCatalog("runs").open("original")
    save_png("step-500.png", run.weights_at(500), class_names=run.class_names, title="original, step 500")
    save_animation("first-epoch.mp4", run, start=0, stop=3000, fps=25)

Frames are drawn with matplotlib (Agg) as the viewer shows them: ten 28x28 tiles in a
2x5 grid, a diverging colour map centred on zero, one colour bar.
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

from weightlapse.viewer.analysis.frames import DIVERGING_CMAP, IMAGE_SIDE, grid_shape, scale_per_class, symmetric_limit

# MP4 encoders want frame sizes divisible by 16; 960 x 448 pixels fits the 2x5 grid.
FIGURE_SIZE_PX = (960, 448)
DPI = 96
MAX_ANIMATION_FRAMES = 1000
ANIMATION_SUFFIXES = (".gif", ".mp4")


class GridRenderer:
    """One reusable figure of (class, pixel) tiles; redrawing only swaps the image data."""

    def __init__(self, n_tiles: int, *, tile_titles: Sequence[str], cmap: str = DIVERGING_CMAP,
                 colorbar_label: str = "weight") -> None:
        rows, cols = grid_shape(n_tiles)
        self.figure = plt.figure(figsize=(FIGURE_SIZE_PX[0] / DPI, FIGURE_SIZE_PX[1] / DPI), dpi=DPI)
        axes = self.figure.subplots(rows, cols, squeeze=False)
        blank = np.zeros((IMAGE_SIDE, IMAGE_SIDE))
        self.images = []
        for index, ax in enumerate(axes.flat):
            ax.set_xticks([])
            ax.set_yticks([])
            if index < n_tiles:
                self.images.append(ax.imshow(blank, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest"))
                # Names are text, never math: a run or class named "$x$" must not become a formula.
                ax.set_title(str(tile_titles[index])[:40], fontsize=9, parse_math=False)
            else:
                ax.set_visible(False)
        self.figure.subplots_adjust(left=0.01, right=0.88, top=0.86, bottom=0.02, wspace=0.05, hspace=0.2)
        colorbar_axes = self.figure.add_axes((0.9, 0.1, 0.015, 0.7))
        self.colorbar = self.figure.colorbar(self.images[0], cax=colorbar_axes)
        self.colorbar.set_label(colorbar_label)
        self.title = self.figure.suptitle("", fontsize=11, parse_math=False)

    def draw(self, tiles: np.ndarray, *, title: str = "", limit: float | None = None,
             clim: tuple[float, float] | None = None) -> None:
        """Show ``tiles`` (tile, pixel) with colours from ``clim``, else from -limit to +limit
        (default: their max |value|)."""
        if clim is None:
            limit = symmetric_limit(tiles) if limit is None else limit
            clim = (-limit, limit)
        for image, tile in zip(self.images, np.asarray(tiles)):
            image.set_data(tile.reshape(IMAGE_SIDE, IMAGE_SIDE))
            image.set_clim(*clim)
        self.title.set_text(title)

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


def png_bytes(tiles: np.ndarray, *, tile_titles: Sequence[str], title: str = "", per_class: bool = False,
              colorbar_label: str = "weight", cmap: str = DIVERGING_CMAP,
              clim: tuple[float, float] | None = None) -> bytes:
    """A PNG of ``tiles`` (tile, pixel) as a grid, colour scale shared or per class; ``clim``:
    the colour range (default: centred on zero, to the tiles' largest |value|), e.g. the
    viewer's, so that the picture is coloured as the page shows it."""
    tiles = np.asarray(tiles, dtype=np.float32)
    if per_class:
        tiles = scale_per_class(tiles)
        colorbar_label = f"{colorbar_label} / largest |{colorbar_label}| of its class"
    renderer = GridRenderer(len(tiles), tile_titles=tile_titles, cmap=cmap, colorbar_label=colorbar_label)
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


def animation_steps(start: int, stop: int, *, max_frames: int = MAX_ANIMATION_FRAMES) -> np.ndarray:
    """Steps start..stop (inclusive) thinned evenly to at most ``max_frames``, always keeping both ends."""
    if stop < start:
        raise ValueError(f"step range {start}..{stop} is empty: the first step must not be after the last")
    count = min(stop - start + 1, max_frames)
    return np.unique(np.linspace(start, stop, count).round().astype(np.int64))


def write_animation(target, steps: Sequence[int], frame_at: Callable[[int], np.ndarray], *, fmt: str,
                    class_names: Sequence[str], title: Callable[[int], str], fps: float = 10,
                    progress: Callable[[float], None] | None = None, limit: float | None = None) -> None:
    """Encode the frames of ``steps`` as ``fmt`` ("gif" or "mp4") into ``target`` (a path or a binary file).

    The colour range is fixed over the whole animation: ±``limit`` (e.g. the run's largest
    |weight|, as the viewer shows it), widened to the largest |weight| of its frames if they
    go past it, so colours mean the same thing in every frame.
    """
    import imageio.v2 as imageio

    if fmt not in ("gif", "mp4"):
        raise ValueError(f"unknown animation format {fmt!r}; use gif or mp4")
    if fmt == "mp4" and hasattr(target, "write"):
        # ffmpeg writes MP4 to a file (it seeks back to finish the header), not to a stream.
        with tempfile.TemporaryDirectory(prefix="weightlapse-") as directory:
            path = Path(directory) / "animation.mp4"
            write_animation(path, steps, frame_at, fmt=fmt, class_names=class_names, title=title, fps=fps,
                            progress=progress, limit=limit)
            target.write(path.read_bytes())
        return
    limit = max([symmetric_limit(frame_at(step)) for step in steps] + ([limit] if limit else []))
    renderer = GridRenderer(len(frame_at(steps[0])), tile_titles=class_names)
    if fmt == "gif":
        writer = imageio.get_writer(target, format="GIF", mode="I", duration=1000 / fps, loop=0)
    else:
        writer = imageio.get_writer(target, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                    quality=8, pixelformat="yuv420p", macro_block_size=16)
    try:
        for index, step in enumerate(steps):
            renderer.draw(frame_at(step), title=title(step), limit=limit)
            writer.append_data(renderer.rgb())
            if progress:
                progress((index + 1) / len(steps))
    finally:
        writer.close()
        renderer.close()


def save_animation(path: str | Path, run, *, start: int = 0, stop: int | None = None, fps: float = 10,
                   max_frames: int = MAX_ANIMATION_FRAMES,
                   progress: Callable[[float], None] | None = None) -> Path:
    """Write steps start..stop of ``run`` (a viewer.runs.Run) as an animated GIF or an MP4, by suffix."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if f".{fmt}" not in ANIMATION_SUFFIXES:
        raise ValueError(f"{path}: choose a .gif or .mp4 file name")
    stop = run.last_step if stop is None else stop
    run.check_step(start)
    run.check_step(stop)
    steps = animation_steps(start, stop, max_frames=max_frames)
    write_animation(path, steps, run.weights_at, fmt=fmt, class_names=run.class_names,
                    title=lambda step: f"{run.name}: step {step}", fps=fps, progress=progress)
    return path
