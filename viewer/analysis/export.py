"""Pictures and movies of weights for papers and talks: PNG, animated GIF, MP4.

Headless use::

    from weightlapse.viewer.analysis.export import save_png, save_animation
    from weightlapse.viewer.analysis.runs import RunCatalog
    run = RunCatalog("runs").open("original")
    save_png("step-500.png", run.weights_at(500), class_names=run.class_names, title="original, step 500")
    save_animation("first-epoch.mp4", run, start=0, stop=3000, fps=25)          # dense early (log)
    save_animation("by-change.mp4", run, stop=3000, spacing="distance")         # a frame per equal change
    save_animation("adam-vs-sgd.mp4", [run, catalog.open("sgd")], stop=3000)   # side by side
    save_animation("units.mp4", catalog.open("mlp-32"), layer="hidden1.weight")  # a network's layer

Frames are drawn as the viewer shows them (viewer/analysis/renderers.py): a softmax
regression's ten 28x28 tiles in a 2x5 grid per run, or a network layer laid out as the
viewer lays it out, a picture per run; up to four runs, two a row, on one colour scale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from weightlapse.viewer.analysis.frames import DIVERGING_CMAP, centred, scale_per_class
from weightlapse.viewer.analysis.layouts import MAX_PICTURE_PX, layer_layout, picture_size
from weightlapse.viewer.analysis.network import NetworkRun
from weightlapse.viewer.analysis.renderers import GridRenderer, group_shape, write_animation, write_picture_animation
from weightlapse.viewer.analysis.spacing import (
    DEFAULT_SPACING,
    Travelled,
    combined,
    spaced_steps,
    travelled_along,
    travelled_by,
)

MAX_ANIMATION_FRAMES = 1000
ANIMATION_SUFFIXES = (".gif", ".mp4")
SIDE_PICTURE_PX = 560  # screen pixels across each network run's picture, side by side


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


def run_titles(runs: Sequence) -> Callable[[int], list[str]]:
    """Each run's title at a step of an animation of ``runs`` side by side: its name, and once
    it has ended, the step it is shown at."""
    def titles(step: int) -> list[str]:
        return [run.name if step <= run.last_step else f"{run.name} (ended at step {run.last_step:,})"
                for run in runs]
    return titles


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
    return frame_at, run_titles(runs)


def network_runs(runs: Sequence) -> list[NetworkRun]:
    """The network runs of ``runs``: all of them, or none (softmax regression); a ValueError
    naming one of each when they are mixed, as no picture shows both side by side."""
    networks = [run for run in runs if isinstance(run, NetworkRun)]
    if networks and len(networks) < len(runs):
        matrix = next(run for run in runs if not isinstance(run, NetworkRun))
        raise ValueError(f"{networks[0].name} records a network and {matrix.name} softmax regression: animate runs "
                         "of one model side by side")
    return networks


def layer_pictures(runs: Sequence[NetworkRun], layer: str, picture: Callable[[NetworkRun, int], np.ndarray]):
    """(picture_at, groups, size_px, title) for write_picture_animation of ``layer`` of one
    network run, or of several side by side; ``picture(run, step)``: the run's picture at the
    step (its last, once it has ended)."""
    layout = layer_layout(runs[0].spec(layer).shape)
    if len(runs) == 1:
        return ((lambda step: picture(runs[0], step)), None, picture_size(layout, MAX_PICTURE_PX),
                lambda step: f"{runs[0].name}: {layer} after step {step:,}")
    return ((lambda step: [picture(run, step) for run in runs]), run_titles(runs), picture_size(layout, SIDE_PICTURE_PX),
            lambda step: f"{layer} after step {step:,}")


def shared_layer(runs: Sequence[NetworkRun], layer: str | None) -> str:
    """``layer`` (default: the first run's first parameter), checked to be a parameter of one
    shape in every run; a ValueError naming the run that lacks it."""
    layer = runs[0].names[0] if layer is None else layer
    for run in runs:
        if layer not in run.names:
            raise ValueError(f"{run.name} has no parameter {layer!r}; its parameters: {', '.join(run.names)}")
        if run.spec(layer).shape != runs[0].spec(layer).shape:
            raise ValueError(f"{layer} is {runs[0].spec(layer).shape} in {runs[0].name} but {run.spec(layer).shape} "
                             f"in {run.name}: animate runs of one model side by side")
    return layer


def save_animation(path: str | Path, run, *, start: int = 0, stop: int | None = None, fps: float = 10,
                   max_frames: int = MAX_ANIMATION_FRAMES, spacing: str = DEFAULT_SPACING,
                   progress: Callable[[float], None] | None = None, scheduler=None, layer: str | None = None) -> Path:
    """Write steps start..stop of ``run`` (a viewer.analysis.run.Run or a NetworkRun, or a list
    of up to four runs of one kind to show side by side on one colour scale) as an animated GIF
    or an MP4, by suffix.

    ``spacing``: which steps become frames (up to ``max_frames``): "log" (the default: every
    step at first, then ever further apart), "even", or "distance" (a frame per equal distance
    travelled in weight space, summed over the runs; measured with dask on ``scheduler``).
    ``stop`` defaults to the last step of the longest run. Network runs: ``layer`` is the
    parameter drawn (default: the first), laid out as the viewer draws it
    (viewer/analysis/layouts.py), on one colour range over the whole animation.
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if f".{fmt}" not in ANIMATION_SUFFIXES:
        raise ValueError(f"{path}: choose a .gif or .mp4 file name")
    runs = list(run) if isinstance(run, (list, tuple)) else [run]
    group_shape(len(runs))
    networks = network_runs(runs)
    if layer is not None and not networks:
        raise ValueError(f"layer= is a network run's parameter; {runs[0].name} records softmax regression")
    longest = max(runs, key=lambda each: each.last_step)
    stop = longest.last_step if stop is None else stop
    longest.check_step(start)
    longest.check_step(stop)
    if networks:
        layer = shared_layer(networks, layer)

        def travelled(each) -> Travelled:
            return travelled_along(lambda first, last: each.values(layer, first, last), each.last_step, start, stop,
                                   scheduler=scheduler)
    else:
        def travelled(each) -> Travelled:
            return travelled_by(each, start, stop, scheduler=scheduler)
    steps = animation_steps(start, stop, max_frames=max_frames, spacing=spacing,
                            travelled=lambda: combined([travelled(each) for each in runs]))
    if networks:
        _write_layers(path, steps, networks, layer, fmt=fmt, fps=fps, progress=progress)
    elif len(runs) == 1:
        write_animation(path, steps, runs[0].weights_at, fmt=fmt, class_names=runs[0].class_names,
                        title=lambda step: f"{runs[0].name}: step {step:,}", fps=fps, progress=progress)
    else:
        frame_at, groups = side_by_side(runs)
        write_animation(path, steps, frame_at, fmt=fmt, class_names=runs[0].class_names,
                        title=lambda step: f"step {step:,}", fps=fps, progress=progress, groups=groups)
    return path


def _write_layers(path: Path, steps: np.ndarray, runs: Sequence[NetworkRun], layer: str, *, fmt: str, fps: float,
                  progress: Callable[[float], None] | None) -> None:
    """The animation of ``layer`` of network ``runs``, one picture a run, as the viewer lays it out."""
    layout = layer_layout(runs[0].spec(layer).shape)
    picture_at, groups, size, title = layer_pictures(
        runs, layer, lambda run, step: layout.picture(run.values_at(layer, min(step, run.last_step))))
    write_picture_animation(path, steps, picture_at, fmt=fmt, fps=fps, progress=progress, title=title, size_px=size,
                            colorbar_label=runs[0].spec(layer).role, caption=layout.description,
                            labels=layout.labels, groups=groups)
