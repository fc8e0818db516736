"""The pixel inspector: click a pixel of a class image to follow that weight over every step.

The chosen class's weight is drawn thick and the same pixel of every other class thin, over
all of the run's steps, with the current step marked (the marker moves with the player
without reading anything again); hovering shows a step's stored value, a click on the curve
jumps there. The weights come from the run's pixel history when it has one (a few
milliseconds on a 300,000-step run; pipeline.store.history), else from the store itself.
"""

from __future__ import annotations

import html
import time

import holoviews as hv
import panel as pn
import param

from weightlapse.pipeline.store import IMAGE_SIDE
from weightlapse.viewer.analysis.frames import centred, grid_shape, mosaic_pixel
from weightlapse.viewer.data import DataStore
from weightlapse.viewer.plots import HEADER, PIXEL_POINTS, pixel_curves, step_marker
from weightlapse.viewer.state import ViewState
from weightlapse.viewer.tiles import READ_ERRORS, StepMarkers, is_network, open_run, weakly, with_document_lock

HINT = "Click a pixel of a class image to follow that weight over all steps."
# Without a pixel history, steps read from the store at most for one curve (about 0.5 s here);
# more would hold the page for seconds to minutes (300,000 steps: docs/benchmarks.md).
MAX_STORE_STEPS = 20_000


def clicked_pixel(x: float, y: float, n_classes: int) -> tuple[int, int] | None:
    """The (class, pixel) under a click at (x, y) of the tile image (plots.tile_image: x the
    mosaic's column, y its row counted from the bottom); None between tiles."""
    height = grid_shape(n_classes)[0] * (IMAGE_SIDE + HEADER)
    row, col = int(height - y), int(x)
    if not (0 <= row < height and col >= 0):
        return None
    return mosaic_pixel(row, col, n_classes, header=HEADER)


class PixelInspector(pn.viewable.Viewer):
    """The chosen pixel's weights over every step, or a sentence saying what to do."""

    state = param.ClassSelector(class_=ViewState)
    store = param.ClassSelector(class_=DataStore)
    tiles = param.Parameter(doc="the tile grid's image (a DynamicMap) whose clicks choose the pixel")

    def __init__(self, **params) -> None:
        super().__init__(**params)
        self._markers = StepMarkers(self.state)
        self._drawn: tuple | None = None
        self._tap = hv.streams.Tap(source=self.tiles)
        self._tap.add_subscriber(weakly(self._clicked))
        self._curve_taps: list = []
        self.notice = pn.pane.Alert(HINT, alert_type="light", css_classes=["wl-inspector-notice"],
                                    sizing_mode="stretch_width", margin=(5, 10))
        self.pane = pn.pane.HoloViews(None, linked_axes=False, sizing_mode="stretch_width",
                                      css_classes=["wl-inspector"])
        # Shown and hidden through a box, as tiles.py does: a HoloViews pane's own `visible`
        # fails in a template.
        self.plot_box = pn.Column(self.pane, visible=False, sizing_mode="stretch_width", margin=0)
        self.caption = pn.pane.HTML("", sizing_mode="stretch_width", css_classes=["wl-inspector-caption"],
                                    margin=(0, 10))
        self._layout = pn.Column(pn.pane.HTML("<b>Pixel inspector</b>", margin=(10, 10, 0, 10)), self.notice,
                                 self.plot_box, self.caption, sizing_mode="stretch_width")
        self.state.param.watch(lambda *events: self.render(), ["run", "revision", "pixel", "pixel_class", "mode",
                                                             "weights"])
        self.render()

    def __panel__(self):
        return self._layout

    def release(self) -> None:
        self._markers.clear()

    def data(self):
        """The PixelTrace drawn now, or None."""
        return self._drawn[1] if self._drawn else None

    def render(self) -> None:
        # Compare runs draws charts, Side by side grids of its own: clicks there choose no pixel;
        # a network run has its own inspector (viewer/network_view.py).
        self._layout.visible = (self.state.mode not in ("compare", "side-by-side")
                                and not is_network(self.store, self.state.run))
        message, trace, seconds = self._trace()
        if message:
            self._show(message)
            return
        run = self.store.open(self.state.run)
        centre = self.state.weights == "centred"
        key = (run.identity, run.last_step, self.state.pixel, self.state.pixel_class, centre)
        if self._drawn is not None and self._drawn[0] == key and self.plot_box.visible:
            return
        row, col = divmod(self.state.pixel, IMAGE_SIDE)
        names = run.class_names
        chosen = min(self.state.pixel_class, len(names) - 1)
        title = (f"{run.name}: {'centred weight of ' if centre else ''}pixel (row {row}, column {col}), "
                 f"class {chosen} ({names[chosen]}), over all steps")
        # The centred weight (the pixel's mean over the classes removed) needs only this pixel's classes.
        values = centred(trace.values) if centre else trace.values  # (class, step): the mean over classes
        self._markers.clear()
        self._curve_taps.clear()
        marker = step_marker(self.state.step, hooks=(weakly(self._markers.capture),))
        curves = pixel_curves(trace.steps, values, names, chosen, title=title, marker=marker)
        tap = hv.streams.Tap(source=curves)
        tap.add_subscriber(weakly(self._curve_clicked))
        self._curve_taps.append(tap)
        self.pane.object = curves
        self._drawn = (key, trace)
        self.notice.visible, self.plot_box.visible = False, True
        binned = trace.steps.size > PIXEL_POINTS
        source = (f"{trace.from_copy:,} from the pixel history, {trace.steps.size - trace.from_copy:,} from the store"
                  if trace.from_copy else "all from the store (no pixel history)")
        self.caption.object = html.escape(
            f"{trace.steps.size:,} steps ({source}"
            + (f"; read in {seconds * 1000:.0f} ms). " if seconds >= 0.001 else "). ")
            + ("Each line passes through the lowest and the highest stored value of every "
               f"{-(-trace.steps.size // (PIXEL_POINTS // 2)):,} steps, so no spike is hidden. " if binned else "")
            + "Hover for a step's value; click the curve to go to that step; click a legend entry to hide a class.")

    def _trace(self):
        """(message, trace, seconds read): a message when there is nothing to draw."""
        if self.state.pixel is None:
            return HINT, None, 0.0
        run = open_run(self.store, self.state.run)
        if isinstance(run, str):
            return run, None, 0.0
        if run.last_step < 0:
            return f"{run.name} has no step written yet.", None, 0.0
        try:
            from_store = run.last_step + 1 - run.history_steps()
            if from_store > MAX_STORE_STEPS:
                return (f"{run.name} has no pixel history for {from_store:,} of its steps: reading one weight over "
                        f"them from the store would take long. Build it with `weightlapse index` on the run's "
                        "directory (the train stage builds it when a run finishes)."), None, 0.0
            started = time.perf_counter()
            trace = self.store.pixel_history(run, self.state.pixel)
            return "", trace, time.perf_counter() - started
        except READ_ERRORS as error:
            return f"{run.name}: {error}", None, 0.0

    def _show(self, message: str) -> None:
        self.notice.object, self.notice.visible = html.escape(message), True
        self.plot_box.visible, self.caption.object, self._drawn = False, "", None

    def _clicked(self, x=None, y=None) -> None:
        if x is None or y is None or not self.state.run:
            return
        try:
            n_classes = self.store.open(self.state.run).n_classes
        except READ_ERRORS:
            return
        hit = clicked_pixel(x, y, n_classes)
        if hit is not None:
            with_document_lock(lambda: self.state.param.update(pixel_class=hit[0], pixel=hit[1]))

    def _curve_clicked(self, x=None, y=None) -> None:
        if x is None or self._drawn is None:
            return
        last = int(self._drawn[1].steps[-1])
        with_document_lock(lambda: setattr(self.state, "step", int(min(max(round(x), 0), last))))
