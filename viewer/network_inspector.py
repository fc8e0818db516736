"""The weight inspector of a network run: click any weight of the layer's picture to follow it
over every step.

The weight is read lazily (one column of each chunk of that parameter, through dask), the
current step is marked and moves with the player without reading again; hovering shows a
step's stored value, a click on the curve jumps there.
"""

from __future__ import annotations

import html

import holoviews as hv
import numpy as np
import panel as pn
import param

from weightlapse.viewer.data import DataStore
from weightlapse.viewer.network_view import NETWORK_MODES, chosen_layer, network_run
from weightlapse.viewer.plots import PIXEL_POINTS, pixel_curves, step_marker
from weightlapse.viewer.state import ViewState
from weightlapse.viewer.tiles import READ_ERRORS, StepMarkers, weakly, with_document_lock

HINT = "Click a weight of the picture (a unit's pixel, a heatmap cell) to follow it over all steps."


def weight_name(shape: tuple[int, ...], index: int) -> str:
    """A flat index in words: ``unit 3, pixel (row 4, column 5)`` for a unit image, ``[3, 7]`` otherwise."""
    where = np.unravel_index(index, shape) if shape else ()
    if len(shape) == 2 and shape[1] == 784:
        row, column = divmod(int(where[1]), 28)
        return f"unit {int(where[0])}, pixel (row {row}, column {column})"
    return "[" + ", ".join(str(int(i)) for i in where) + "]"


class NetworkInspector(pn.viewable.Viewer):
    """The chosen weight's value over every step, or a sentence saying what to do."""

    state = param.ClassSelector(class_=ViewState)
    store = param.ClassSelector(class_=DataStore)

    def __init__(self, **params) -> None:
        super().__init__(**params)
        self._markers = StepMarkers(self.state)
        self._drawn: tuple | None = None
        self._curve_taps: list = []
        self.notice = pn.pane.Alert(HINT, alert_type="light", css_classes=["wl-weight-notice"],
                                    sizing_mode="stretch_width", margin=(5, 10))
        self.pane = pn.pane.HoloViews(None, linked_axes=False, sizing_mode="stretch_width",
                                      css_classes=["wl-weight-inspector"])
        self.plot_box = pn.Column(self.pane, visible=False, sizing_mode="stretch_width", margin=0)
        self._layout = pn.Column(pn.pane.HTML("<b>Weight inspector</b>", margin=(10, 10, 0, 10)), self.notice,
                                 self.plot_box, sizing_mode="stretch_width", visible=False)
        self.state.param.watch(lambda *events: self.render(), ["run", "revision", "layer", "weight_index", "mode"])
        self.render()

    def __panel__(self):
        return self._layout

    def release(self) -> None:
        self._markers.clear()

    def data(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(steps, values) drawn now, or None."""
        return self._drawn[1] if self._drawn else None

    def render(self) -> None:
        run = network_run(self.store, self.state.run)
        # its clicks come from the single picture, not Side by side's
        self._layout.visible = run is not None and self.state.mode in NETWORK_MODES and self.state.mode != "side-by-side"
        if not self._layout.visible:
            return
        index = self.state.weight_index
        if index is None:
            self._show(HINT)
            return
        layer = chosen_layer(self.state, run)
        spec = run.spec(layer)
        if not 0 <= index < spec.size:
            self._show(f"{layer} has {spec.size:,} weights; click one of them.")
            return
        key = (run.identity, run.last_step, layer, index)
        if self._drawn is not None and self._drawn[0] == key and self.plot_box.visible:
            return
        try:
            steps, values = self.store.networks.weight_history(run, layer, index)
        except READ_ERRORS as error:
            self._show(f"{run.name}: {error}")
            return
        title = f"{run.name}: {layer} {weight_name(spec.shape, index)}, over all steps"
        self._markers.clear()
        self._curve_taps.clear()
        marker = step_marker(self.state.step, hooks=(weakly(self._markers.capture),))
        curves = pixel_curves(steps, values[None, :], [f"{layer} {weight_name(spec.shape, index)}"], 0, title=title,
                              marker=marker)
        tap = hv.streams.Tap(source=curves)
        tap.add_subscriber(weakly(self._curve_clicked))
        self._curve_taps.append(tap)
        self.pane.object = curves
        self._drawn = (key, (steps, values))
        binned = steps.size > PIXEL_POINTS
        total = run.last_step + 1
        sampled = (f"{steps.size:,} of its {total:,} steps (a weight's steps are stored with its whole layer's, so "
                   "only evenly spaced blocks of steps are read, and the newest), " if steps.size < total
                   else f"{steps.size:,} steps, ")
        self.notice.object = html.escape(
            f"{sampled}read from the store. "
            + ("The line passes through the lowest and the highest stored value of every "
               f"{-(-steps.size // (PIXEL_POINTS // 2)):,} steps, so no spike is hidden. " if binned else "")
            + "Hover for a step's value; click the curve to go to that step.")
        self.notice.visible, self.plot_box.visible = True, True

    def _show(self, message: str) -> None:
        self.notice.object, self.notice.visible = html.escape(message), True
        self.plot_box.visible, self._drawn = False, None

    def _curve_clicked(self, x=None, y=None) -> None:
        if x is None or self._drawn is None:
            return
        last = int(self._drawn[1][0][-1])
        with_document_lock(lambda: setattr(self.state, "step", int(min(max(round(x), 0), last))))
