"""How a network's parameter is drawn: a layout's picture in, HoloViews elements out, no state.

The layouts themselves (which weight each picture pixel shows) are viewer/analysis/layouts.py's.
"""

from __future__ import annotations

import holoviews as hv
import holoviews.plotting.bokeh  # noqa: F401 - element options need a plotting backend loaded
import numpy as np
from bokeh.models import HoverTool

from weightlapse.viewer.analysis.frames import DIVERGING_CMAP, SEQUENTIAL_CMAP, symmetric_limit
from weightlapse.viewer.analysis.layouts import MAX_PICTURE_PX, LayerLayout, picture_size
from weightlapse.viewer.plots import literal


def colour_limits(picture: np.ndarray, *, diverging: bool, limit: float | None = None) -> tuple[tuple[float, float], str]:
    """(colour limits, colour map): diverging values centred on zero (±``limit`` when given,
    widened if the picture goes past it, so nothing is clipped); sequential ones their range."""
    if diverging:
        own = symmetric_limit(picture)
        bound = own if limit is None else max(limit, own)
        return (-bound, bound), DIVERGING_CMAP
    finite = picture[np.isfinite(picture)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    return (low, high if high > low else low + 1), SEQUENTIAL_CMAP


def layer_image(layout: LayerLayout, picture: np.ndarray, *, label: str, title: str, clim: tuple[float, float],
                cmap: str, max_width: int = MAX_PICTURE_PX, hooks: tuple = ()) -> hv.Image:
    """The picture as an image: a grid of tiles (x across, y up, no axes) or a heatmap with its
    out (down, row 0 on top) and in (across) axes; a colour bar titled ``label``."""
    height, width = picture.shape
    frame_width, frame_height = picture_size(layout, max_width)
    dimension = hv.Dimension("value", label=label)
    if layout.axes:
        # Rows counted down from the top, as a matrix is written: flipped here, the y axis inverted;
        # each cell centred on its index, so the ticks and the hover name rows and columns.
        image = hv.Image(np.flipud(picture), bounds=(-0.5, -0.5, width - 0.5, height - 0.5), kdims=["in", "out"],
                         vdims=[dimension])
        vector = layout.kind == "vector"
        options = {"invert_yaxis": True, "xlabel": "index" if vector else "in (input)", "ylabel": "out (unit)",
                   "yaxis": None if vector else "left",
                   # a strip's colour bar below it: beside a strip it would be too short to read
                   "colorbar_position": "bottom" if vector else "right"}
    else:
        image = hv.Image(picture, bounds=(0, 0, width, height), kdims=["x", "y"], vdims=[dimension])
        options = {"xaxis": None, "yaxis": None}
    # Few tools (zoom, reset, save): the full toolbar above the picture would run into a long title.
    # The hover names the cell of a heatmap (cells are centred on their indices); on an image grid its
    # coordinates would be the mosaic's, not a weight's, so it shows the value only.
    where = [("out", "$y{0}"), ("in", "$x{0}")] if layout.axes and layout.kind != "vector" else \
        [("index", "$x{0}")] if layout.axes else []
    hover = HoverTool(tooltips=[*where, (str(label)[:60], "@image{0.0000000}")])
    return image.opts(cmap=cmap, clim=clim, colorbar=True, title=literal(title), tools=[hover, "tap"],
                      default_tools=["box_zoom", "reset", "save"],
                      frame_width=frame_width, frame_height=frame_height, toolbar="above",
                      clipping_colors={"NaN": "#ffffff"}, framewise=True, hooks=list(hooks), **options)


def bokeh_image(layout: LayerLayout, picture: np.ndarray) -> np.ndarray:
    """The array Bokeh holds for :func:`layer_image`'s picture (its row 0 drawn at the lowest y)."""
    return picture if layout.axes else np.flipud(picture)


def unit_labels(layout: LayerLayout) -> hv.Labels:
    """Each unit's index just above its image (empty for layouts without a grid of units)."""
    return hv.Labels(list(layout.labels), kdims=["x", "y"], vdims=["text"]).opts(
        text_font_size="8pt", text_color="#222222", text_baseline="middle", default_tools=["box_zoom", "reset", "save"])


def distance_lines(distances, *, title: str) -> hv.Overlay:
    """One line per parameter: the L2 distance between two runs' values over the shared steps."""
    curves = [hv.Curve((distances.step.values, distances.sel(parameter=name).values), "step",
                       hv.Dimension("distance", label="L2 distance"), label=str(name)[:40])
              for name in distances.parameter.values]
    return hv.Overlay(curves).opts(
        hv.opts.Curve(line_width=1.5, tools=["hover"]),
        hv.opts.Overlay(title=literal(title), legend_position="right", responsive=True, height=300,
                        show_legend=len(curves) <= 16, toolbar="above"))
