"""HoloViews elements for the viewer: arrays in, elements out, no state.

The weight grid is one image (a mosaic of the ten 28x28 tiles with one blank pixel
between them, as the original notebook drew it), so a new step is one array sent to the
browser rather than ten plots redrawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import holoviews as hv
import holoviews.plotting.bokeh  # noqa: F401 - element options need a plotting backend loaded
import numpy as np
from bokeh.models import HoverTool

from weightlapse.viewer.analysis.frames import (
    DIVERGING_CMAP,
    IMAGE_SIDE,
    SEQUENTIAL_CMAP,
    downsample_curve,
    extreme_points,
    mosaic,
    scale_per_class,
    symmetric_limit,
    tile_origin,
)

TILE_PX = 128  # screen pixels per 28-pixel tile, until the page knows its window's width
MIN_TILE_PX, MAX_TILE_PX = 96, 200
SIDEBAR_PX, PAGE_MARGINS_PX, COLOURBAR_PX = 320, 90, 130  # the template's sidebar, paddings; the colour bar
HEADER = 5    # blank image rows above each row of tiles, where the class names go
CURVE_POINTS = 600  # bins of a long curve on screen: its mean line and min-max band
PIXEL_POINTS = 2000  # samples of a pixel's curve on screen: each bin's lowest and highest (frames.extreme_points)
CLASS_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf")  # Category10


@dataclass(frozen=True)
class TileView:
    """What the weight grid shows: (tile, pixel) values and how to colour them."""

    tiles: np.ndarray            # (class, pixel)
    label: str = "weight"        # what a value is, for the colour bar and hover
    diverging: bool = True       # centred on zero (weights, changes) or sequential (statistics)
    per_class: bool = False      # each tile scaled to its own largest |value|
    title: str = ""
    limit: float | None = None   # a diverging scale's ±limit (e.g. the run's largest |weight|); None: these values'


@dataclass(frozen=True)
class TilePicture:
    """A TileView made drawable: the mosaic and its colour mapping."""

    picture: np.ndarray          # frames.mosaic of the tiles: row 0 at the top, NaN between tiles
    clim: tuple[float, float]
    cmap: str
    label: str


def tile_picture(view: TileView) -> TilePicture:
    tiles = np.asarray(view.tiles, dtype=np.float32)
    label = view.label
    if view.per_class:
        tiles = scale_per_class(tiles)
        label = f"{label} / class max |{label}|"
    picture = mosaic(tiles, header=HEADER)
    return TilePicture(picture, *colour_mapping(picture, diverging=view.diverging, scaled=view.per_class,
                                                limit=view.limit), label)


def colour_mapping(picture: np.ndarray, *, diverging: bool, scaled: bool = False,
                   limit: float | None = None) -> tuple[tuple[float, float], str]:
    """(colour limits, colour map): centred on zero for diverging values (±1 once scaled per
    class; ±``limit`` when given, widened if the values go past it so nothing is clipped),
    else the values' own range."""
    if diverging:
        own = symmetric_limit(picture)
        limit = 1.0 if scaled else own if limit is None else max(limit, own)
        return (-limit, limit), DIVERGING_CMAP
    finite = picture[np.isfinite(picture)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    return (low, high if high > low else low + 1), SEQUENTIAL_CMAP


def literal(title: str) -> str:
    """``title`` as HoloViews shows it: it formats titles (``{label}``), so a run named ``{x}``
    would fail to draw, or lose its braces, unless they are doubled."""
    return str(title).replace("{", "{{").replace("}", "}}")


def grid_tile_px(window_width: int) -> int:
    """Screen pixels per tile of the page's grid for a browser window ``window_width`` CSS
    pixels wide (0: not known yet): the grid and its colour bar fill the main column beside
    the sidebar, between a size that still shows single weights and one that fits a screen's
    height."""
    if window_width <= 0:
        return TILE_PX
    main = window_width - SIDEBAR_PX - PAGE_MARGINS_PX - COLOURBAR_PX
    return int(min(max(main // 5, MIN_TILE_PX), MAX_TILE_PX))


def tile_image(view: TileView, *, hooks: tuple = (), tile_px: int = TILE_PX) -> hv.Image:
    """The mosaic of ``view.tiles`` as an image whose pixel (x, y) is tile column x, row y from
    the top; ``tile_px``: screen pixels per tile."""
    drawn = tile_picture(view)
    height, width = drawn.picture.shape
    image = hv.Image(drawn.picture, bounds=(0, 0, width, height), kdims=["x", "y"],
                     vdims=[hv.Dimension("value", label=drawn.label)])
    # A fixed size: a responsive grid (Bokeh's aspect-scaled width) loses its aspect when the
    # layout around it changes, which would draw the tiles squashed.
    return image.opts(cmap=drawn.cmap, clim=drawn.clim, colorbar=True, title=literal(view.title),
                      tools=["hover", "tap"], frame_width=5 * tile_px, frame_height=round(5 * tile_px * height / width),
                      xaxis=None, yaxis=None,
                      toolbar="above", clipping_colors={"NaN": "#ffffff"}, hooks=list(hooks))


def class_labels(class_names: list[str], *, font_size: str = "9pt") -> hv.Labels:
    """Each class's name just above its tile."""
    n_classes = len(class_names)
    height = tile_origin(n_classes - 1, header=HEADER)[0] + IMAGE_SIDE
    points = []
    for index, name in enumerate(class_names):
        top, left = tile_origin(index, header=HEADER)
        points.append((left + IMAGE_SIDE / 2, height - top + HEADER / 2, str(name)[:24]))
    return hv.Labels(points, kdims=["x", "y"], vdims=["text"]).opts(
        text_font_size=font_size, text_color="#222222", text_baseline="middle")


def pixel_map(values: np.ndarray, *, label: str, diverging: bool, title: str) -> hv.Image:
    """One 28x28 map (pixel,) such as a statistic summed over classes."""
    picture = np.asarray(values, dtype=np.float32).reshape(IMAGE_SIDE, IMAGE_SIDE)
    clim, cmap = colour_mapping(picture, diverging=diverging)
    image = hv.Image(picture, bounds=(0, 0, IMAGE_SIDE, IMAGE_SIDE), kdims=["x", "y"],
                     vdims=[hv.Dimension("value", label=label)])
    return image.opts(cmap=cmap, clim=clim, colorbar=True, title=literal(title), tools=["hover"],
                      frame_width=3 * TILE_PX, frame_height=3 * TILE_PX, xaxis=None, yaxis=None,
                      toolbar="above")


def history_curve(steps: np.ndarray, values: np.ndarray, *, label: str, title: str) -> hv.Curve:
    """A per-step curve, binned for display when long: the mean of each bin."""
    x, mean, _, _ = downsample_curve(steps, values, CURVE_POINTS)
    return hv.Curve((x, mean), kdims=[hv.Dimension("step")], vdims=[hv.Dimension("value", label=label)]).opts(
        color="#1f77b4", line_width=1.5, title=literal(title), responsive=True, height=220, tools=["tap"],
        toolbar="above", framewise=True)


def history_band(steps: np.ndarray, values: np.ndarray, *, label: str) -> hv.Area:
    """The min-max band of the same bins, drawn under the curve so the spread stays visible."""
    x, _, low, high = downsample_curve(steps, values, CURVE_POINTS)
    return hv.Area((x, low, high), kdims=[hv.Dimension("step")],
                   vdims=[hv.Dimension("value", label=label), "high"]).opts(color="#9ecae1", alpha=0.5, line_alpha=0,
                                                                    framewise=True)


def step_marker(step: int, *, hooks: tuple = ()) -> hv.VLine:
    return hv.VLine(step).opts(color="#d62728", line_width=1.5, hooks=list(hooks))


def pixel_curves(steps: np.ndarray, values: np.ndarray, class_names: list[str], chosen: int, *, title: str,
                 marker: hv.Element | None = None) -> hv.Overlay:
    """One pixel's weight over the steps in every class, (class, step) ``values``: the chosen
    class thick and on top, the others thin. A long curve is drawn through each bin's lowest
    and highest stored values (frames.extreme_points), so spikes keep their height; hovering
    the chosen class shows the step and the value stored there. ``marker``: drawn on top (the
    current step's line)."""
    hover = HoverTool(mode="vline", tooltips=[("step", "@step{0,0}"), ("weight", "@weight{0.0000000}")])
    curves = []
    for index in [index for index in range(len(values)) if index != chosen] + [chosen]:
        picked = extreme_points(values[index], PIXEL_POINTS)
        highlighted = index == chosen
        name = str(class_names[index])[:24] if index < len(class_names) else str(index)
        curve = hv.Curve((steps[picked], values[index][picked]), kdims=[hv.Dimension("step")],
                         vdims=[hv.Dimension("weight")], label=f"{index}: {name}")
        curves.append(curve.opts(color=CLASS_COLOURS[index % len(CLASS_COLOURS)], line_width=3 if highlighted else 1,
                                 alpha=1.0 if highlighted else 0.45, tools=[hover] if highlighted else []))
    # The marker inside the overlay: multiplying an overlay makes a new one, without these options.
    return hv.Overlay(curves + ([marker] if marker is not None else [])).opts(
        hv.opts.Curve(responsive=True, height=300, framewise=True),
        # The legend below the chart, in rows: beside a chart that stretches, Bokeh drew it over
        # the chart's right end and its toolbar.
        hv.opts.Overlay(title=literal(title), legend_position="bottom", legend_cols=5,
                        legend_opts={"click_policy": "hide"}, toolbar="above", responsive=True, height=360,
                        show_grid=True))


# -- cross-run comparisons (viewer/analysis/compare.py's results) ------------------------------------------
COMPARE_WIDTH = 360
COMPARE_HEIGHT = 220


def distance_curves(distances, reference: str) -> hv.Overlay:
    """L2 distance of each run from the reference run over the shared steps: (other_run, step)."""
    curves = [hv.Curve((distances.step.values, distances.sel(other_run=name).values), "step",
                       hv.Dimension("distance", label="L2 distance"), label=str(name))
              for name in distances.other_run.values]
    return hv.Overlay(curves).opts(
        hv.opts.Curve(frame_width=COMPARE_WIDTH, frame_height=COMPARE_HEIGHT, line_width=1.5, tools=["hover"]),
        hv.opts.Overlay(title=literal(f"Distance from {reference}"), legend_position="right",
                        show_legend=len(curves) <= 12))


def run_curves(values, *, x: str, label: str, title: str, dashed=None, solid_suffix: str = "",
               dashed_suffix: str = "") -> hv.Overlay:
    """A line per other run of the (other_run, x) ``values``; with ``dashed`` (the same
    dimensions), a dashed line of the same colour beside each (e.g. network runs as recorded
    beside the same runs with their hidden units matched)."""
    curves = []
    for index, name in enumerate(values.other_run.values):
        colour = CLASS_COLOURS[index % len(CLASS_COLOURS)]
        lines = [(values, "solid", solid_suffix)] + ([] if dashed is None else [(dashed, "dashed", dashed_suffix)])
        for data, dash, suffix in lines:
            curves.append(hv.Curve((data[x].values, data.sel(other_run=name).values), x,
                                   hv.Dimension("value", label=label), label=f"{name}{suffix}"
                                   ).opts(color=colour, line_dash=dash))
    return hv.Overlay(curves).opts(
        hv.opts.Curve(frame_width=COMPARE_WIDTH, frame_height=COMPARE_HEIGHT, line_width=1.5, tools=["hover"]),
        hv.opts.Overlay(title=literal(title), legend_position="right", show_legend=len(curves) <= 12))


def spread_curve(steps: np.ndarray, mean_spread: np.ndarray) -> hv.Curve:
    """Mean per-weight spread (std across the runs) over the shared steps."""
    return hv.Curve((steps, mean_spread), "step", hv.Dimension("spread", label="mean std across runs")).opts(
        color="#1f4e79", line_width=1.5, frame_width=COMPARE_WIDTH, frame_height=COMPARE_HEIGHT,
        title="Spread across runs (mean over weights)", tools=["hover"])


def similarity_heatmap(cosine) -> hv.HeatMap:
    """Cosine similarity of every pair of runs' weights: (run, other)."""
    names = [str(name) for name in cosine.run.values]
    cells = [(a, b, float(cosine.values[i, j])) for i, a in enumerate(names) for j, b in enumerate(names)]
    size = max(COMPARE_HEIGHT, 22 * len(names))
    values = np.asarray(cosine.values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    # the colours span the values there are (e.g. 0.96..1.0), not the -1..1 a cosine could take
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    clim = (low, high) if high > low else (low - 1e-6, high + 1e-6)
    return hv.HeatMap(cells, kdims=["run", "other"], vdims=[hv.Dimension("cosine")]).opts(
        cmap="viridis", colorbar=True, clim=clim, frame_width=size, frame_height=size, xrotation=60, tools=["hover"],
        title="Cosine similarity of the weights", toolbar="above")


def pca_paths(path) -> hv.Overlay:
    """Each run's trajectory through the first two shared principal components, its start marked."""
    elements = []
    for name in path.run.values:
        xy = path.sel(run=name).values
        elements.append(hv.Curve((xy[:, 0], xy[:, 1]), "PC1", "PC2", label=str(name)))
    starts = hv.Scatter([(float(path.sel(run=name).values[0, 0]), float(path.sel(run=name).values[0, 1]))
                         for name in path.run.values], "PC1", "PC2", label="start").opts(color="black", size=6)
    return hv.Overlay([*elements, starts]).opts(
        hv.opts.Curve(frame_width=COMPARE_WIDTH, frame_height=COMPARE_WIDTH, line_width=1.5, tools=["hover"]),
        hv.opts.Overlay(title="Trajectories in a shared PCA basis", legend_position="right",
                        show_legend=len(elements) <= 12))


def random_walk_paths(n_points: int = 200) -> hv.Curve:
    """What PCA makes of a random walk (Antognini & Sohl-Dickstein, 2018): projections on the
    first two components are close to cos(pi t) and cos(2 pi t), scaled by their variance."""
    t = np.linspace(0, 1, n_points)
    scale = np.sqrt(6 / np.pi ** 2 / np.array([1, 4]))
    return hv.Curve((scale[0] * np.cos(np.pi * t), scale[1] * np.cos(2 * np.pi * t)), "PC1", "PC2").opts(
        color="#7f7f7f", line_dash="dashed", line_width=1.5, frame_width=COMPARE_WIDTH, frame_height=COMPARE_HEIGHT,
        title="A random walk, same PCA", xlabel="PC1", ylabel="PC2", padding=0.05)


def variance_bars(explained, random_walk) -> hv.Bars:
    """Explained variance of each fitted component beside a random walk's 6/(pi^2 k^2)."""
    rows = [(f"PC{k}", source, float(value)) for k, ours, walk in zip(explained.fitted.values, explained.values,
                                                                       random_walk.values)
            for source, value in (("these runs", ours), ("random walk", walk))]
    return hv.Bars(rows, kdims=["component", "source"], vdims=[hv.Dimension("ratio", label="variance explained")]
                   ).opts(frame_width=COMPARE_WIDTH, frame_height=COMPARE_HEIGHT, multi_level=False,
                          cmap={"these runs": "#1f77b4", "random walk": "#bbbbbb"}, show_legend=True,
                          legend_position="right", title="Variance explained", tools=["hover"], xrotation=45)


# -- predictions on the held-out images (viewer/analysis/function_space.py's results) ----------------------
def pair_curves(values, reference: str, *, label: str, title: str) -> hv.Overlay:
    """A (pair, step) measure for each pair of the reference run with another run: one line each."""
    prefix = f"{reference} | "
    pairs = [str(pair) for pair in values.pair.values if str(pair).startswith(prefix)]
    curves = [hv.Curve((values.step.values, values.sel(pair=pair).values), "step", hv.Dimension("value", label=label),
                       label=pair[len(prefix):]) for pair in pairs]
    return hv.Overlay(curves).opts(
        hv.opts.Curve(frame_width=COMPARE_WIDTH, frame_height=COMPARE_HEIGHT, line_width=1.5, tools=["hover"]),
        hv.opts.Overlay(title=literal(title), legend_position="right", show_legend=len(curves) <= 12))


def accuracy_curves(accuracy) -> hv.Overlay:
    """Each run's held-out accuracy over the shared steps: (run, step)."""
    curves = [hv.Curve((accuracy.step.values, accuracy.sel(run=name).values), "step",
                       hv.Dimension("accuracy", label="held-out accuracy"), label=str(name))
              for name in accuracy.run.values]
    return hv.Overlay(curves).opts(
        hv.opts.Curve(frame_width=COMPARE_WIDTH, frame_height=COMPARE_HEIGHT, line_width=1.5, tools=["hover"]),
        hv.opts.Overlay(title="Held-out accuracy", legend_position="right", show_legend=len(curves) <= 12))


def confusion_heatmap(confusion, class_names: list[str], *, title: str) -> hv.HeatMap:
    """(true, predicted) counts as a heatmap: true classes down, predicted across, counts on hover."""
    names = [str(name) for name in class_names]
    counts = np.asarray(confusion.values)
    cells = [(names[p], names[t], int(counts[t, p])) for t in range(len(names)) for p in range(len(names))]
    size = max(COMPARE_HEIGHT, 24 * len(names))
    return hv.HeatMap(cells, kdims=[hv.Dimension("predicted"), hv.Dimension("true")],
                      vdims=[hv.Dimension("images")]).opts(
        cmap="Blues", colorbar=True, frame_width=size, frame_height=size, xrotation=45, tools=["hover"],
        invert_yaxis=True, title=literal(title), toolbar="above")
