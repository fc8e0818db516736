"""Training loss and held-out accuracy of the state's run, with the current step marked; a click jumps there."""

from __future__ import annotations

from typing import Any

import holoviews as hv
import numpy as np
import panel as pn
import param

from weightlapse.viewer.data import DataStore
from weightlapse.viewer.plots import history_band, history_curve, step_marker
from weightlapse.viewer.state import ViewState
from weightlapse.viewer.tiles import READ_ERRORS, weakly, with_document_lock

EMPTY = (np.zeros(1), np.full(1, np.nan))


class Curves(pn.viewable.Viewer):
    state = param.ClassSelector(class_=ViewState)
    store = param.ClassSelector(class_=DataStore)

    def __init__(self, **params) -> None:
        super().__init__(**params)
        self._pipes = {"loss": hv.streams.Pipe(data=EMPTY), "accuracy": hv.streams.Pipe(data=EMPTY)}
        self._markers: dict[int, Any] = {}
        marker = step_marker(0, hooks=(weakly(self._capture_marker),))
        panes = []
        for key, label, title in (("loss", "batch loss", "Training loss"), ("accuracy", "accuracy",
                                                                            "Held-out accuracy")):
            pipe = self._pipes[key]
            curve = hv.DynamicMap(lambda data, label=label, title=title: history_curve(
                *data, label=label, title=f"{title} (click to jump)"), streams=[pipe])
            band = hv.DynamicMap(lambda data, label=label: history_band(*data, label=label), streams=[pipe])
            # Clicks reach the stream only from a DynamicMap that returns a single element
            # (not an overlay), and only if the overlay below is not re-styled with .opts().
            hv.streams.Tap(source=curve).add_subscriber(weakly(self._tapped))
            panes.append(pn.pane.HoloViews(band * curve * marker, linked_axes=False, sizing_mode="stretch_width",
                                           css_classes=[f"wl-{key}-curve"]))
        self._layout = pn.Row(*panes, sizing_mode="stretch_width")
        self.state.param.watch(lambda *events: self.render(), ["run", "revision"])
        self.state.param.watch(lambda event: self._move_markers(), "step")
        self.render()

    def __panel__(self):
        return self._layout

    def release(self) -> None:
        self._markers.clear()

    def render(self) -> None:
        curves = None
        if self.state.run:
            try:
                curves = self.store.curves(self.store.open(self.state.run))
            except READ_ERRORS:
                curves = None  # the tile grid says why
        loss = (curves.loss_steps, curves.loss) if curves is not None and len(curves.loss_steps) else EMPTY
        accuracy = ((curves.eval_steps, curves.accuracy) if curves is not None and len(curves.eval_steps)
                    else EMPTY)
        self._pipes["loss"].send(loss)
        self._pipes["accuracy"].send(accuracy)
        self._layout.visible = curves is not None
        self._move_markers()  # redrawing the curves redraws their markers at step 0

    def _capture_marker(self, plot, element) -> None:
        self._markers[id(plot)] = plot
        plot.handles["glyph"].location = self.state.step

    def _move_markers(self) -> None:
        for plot in self._markers.values():
            plot.handles["glyph"].location = self.state.step

    def _tapped(self, x=None, y=None) -> None:
        if x is None or not self.state.run:
            return

        def jump() -> None:
            try:
                last = self.store.open(self.state.run).last_step
            except READ_ERRORS:
                return
            self.state.step = int(min(max(round(x), 0), max(last, 0)))

        with_document_lock(jump)
