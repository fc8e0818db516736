"""One network parameter's picture in the page: what to draw (:class:`LayerView`), its drawing
(:class:`LayerPicture`), and how wide pictures may be beside the sidebar: the single picture
of the network view, and Side by side's."""

from __future__ import annotations

from dataclasses import dataclass

import holoviews as hv
import numpy as np
import panel as pn

from weightlapse.viewer.analysis.layouts import MIN_WIDTH_PX, LayerLayout
from weightlapse.viewer.network_plots import (
    bokeh_image,
    colour_limits,
    layer_image,
    unit_labels,
)
from weightlapse.viewer.plots import COLOURBAR_PX, PAGE_MARGINS_PX, SIDEBAR_PX
from weightlapse.viewer.tiles import weakly


@dataclass(frozen=True)
class LayerView:
    """What the network view draws: one parameter's values (its own shape) and how to colour them."""

    layout: LayerLayout
    values: np.ndarray
    label: str                   # what a value is, for the colour bar
    diverging: bool = True
    title: str = ""
    limit: float | None = None   # a diverging scale's ±limit (the run's largest |value|); None: these values'
    summary: str = ""            # plain text below the picture


def picture_width(window_width: int) -> int:
    """Screen pixels the picture may take beside the sidebar and its colour bar."""
    if window_width <= 0:
        return 820
    return int(min(max(window_width - SIDEBAR_PX - PAGE_MARGINS_PX - COLOURBAR_PX, 480), 1400))


def side_columns(window_width: int) -> int:
    """Pictures a row in Side by side: two where both fit beside the sidebar with their colour
    bars (a picture is at least MIN_WIDTH_PX wide, for its title), else one."""
    main = window_width - SIDEBAR_PX - PAGE_MARGINS_PX
    return 2 if window_width <= 0 or main >= 2 * (MIN_WIDTH_PX + COLOURBAR_PX + 20) else 1


def side_picture_width(window_width: int) -> int:
    """Screen pixels each picture of Side by side may take, with its colour bar beside it."""
    if window_width <= 0:
        return 400
    if side_columns(window_width) == 1:
        return picture_width(window_width)
    return int((window_width - SIDEBAR_PX - PAGE_MARGINS_PX) // 2 - COLOURBAR_PX - 20)


class LayerPicture:
    """One parameter's picture in the page, drawn once per layer, shape and colour map; a new
    step swaps its values, colour range and title into the plots drawn in each browser page
    (as tiles.py does for the softmax grid). ``on_click(x, y)``, if given, hears its taps."""

    def __init__(self, *, css_class: str, on_click=None, name: str = "") -> None:
        self._on_click, self.name = on_click, name
        self._pipe = hv.streams.Pipe(data=None)
        self._drawn_key: tuple | None = None
        self._plots: dict = {}  # captured by a hook, per browser page
        self.tap = None
        self.pane = pn.pane.HoloViews(None, linked_axes=False, css_classes=[css_class])

    def draw(self, view: LayerView, max_width: int) -> None:
        picture = view.layout.picture(view.values)
        clim, cmap = colour_limits(picture, diverging=view.diverging, limit=view.limit)
        key = (view.layout.shape, view.layout.kind, cmap, view.label, max_width)
        data = (picture, view.title, clim)
        if key == self._drawn_key:
            # The same picture's shape and colour map: HoloViews' full re-render cost 35 ms a
            # frame, and 150 in Run vs run, whose range (each frame's own) moved at every step.
            if not self._plots:
                self._pipe.send(data)
                return
            image = bokeh_image(view.layout, picture)
            for plot in self._plots.values():
                source = plot.handles["source"]
                source.data = {**source.data, "image": [image]}
                plot.handles["color_mapper"].update(low=clim[0], high=clim[1])
                plot.handles["plot"].title.text = view.title
            self._pipe.update(data=data)  # a later full redraw starts from this frame
            return
        # A new layer, shape or colour map: a new plot (a DynamicMap keeps its first frame's size).
        layout, label = view.layout, view.label
        self._plots.clear()
        self._pipe = hv.streams.Pipe(data=data)
        hooks = (weakly(self._capture),)
        image_map = hv.DynamicMap(lambda data: layer_image(layout, data[0], label=label, title=data[1],
                                                           clim=data[2], cmap=cmap, max_width=max_width, hooks=hooks),
                                  streams=[self._pipe])
        if self._on_click is not None:
            self.tap = hv.streams.Tap(source=image_map)
            self.tap.add_subscriber(self._on_click)
        self.pane.object = image_map * unit_labels(layout) if layout.labels else image_map
        self._drawn_key = key

    def _capture(self, plot, element) -> None:
        self._plots[id(plot)] = plot
        if self.name:  # so that a page (and its tests) can tell the pictures apart
            plot.handles["glyph_renderer"].name = self.name

    def release(self) -> None:
        self._plots.clear()
