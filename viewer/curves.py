"""Training loss and held-out accuracy of the state's run, with the current step marked; a click jumps there."""

from __future__ import annotations

import holoviews as hv
import numpy as np
import panel as pn
import param

from weightlapse.viewer.data import DataStore
from weightlapse.viewer.plots import history_band, history_curve, step_marker
from weightlapse.viewer.state import ViewState
from weightlapse.viewer.tiles import READ_ERRORS, StepMarkers, is_network, weakly, with_document_lock

EMPTY = (np.zeros(1), np.full(1, np.nan))


class Curves(pn.viewable.Viewer):
    state = param.ClassSelector(class_=ViewState)
    store = param.ClassSelector(class_=DataStore)

    def __init__(self, **params) -> None:
        super().__init__(**params)
        self._data = {"loss": EMPTY, "accuracy": EMPTY}
        self._markers = StepMarkers(self.state)
        self._taps: list = []
        self._panes = {key: pn.pane.HoloViews(None, linked_axes=False, sizing_mode="stretch_width",
                                              css_classes=[f"wl-{key}-curve"]) for key in self._data}
        # Shown and hidden through boxes, as tiles.py does: a HoloViews pane's own `visible` fails in a template.
        self._boxes = {key: pn.Column(pane, sizing_mode="stretch_width", margin=0) for key, pane in self._panes.items()}
        self._layout = pn.Row(*self._boxes.values(), sizing_mode="stretch_width")
        self.state.param.watch(lambda *events: self.render(), ["run", "revision", "mode"])
        self.render()

    def __panel__(self):
        return self._layout

    def data(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) drawn as ``key`` ("loss" or "accuracy")."""
        return self._data[key]

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
        self._layout.visible = curves is not None and self.state.mode != "compare"
        # A recorded network has no held-out evaluations unless the pipeline trained it: no empty chart.
        self._boxes["accuracy"].visible = bool(curves is not None and len(curves.eval_steps)
                                               or not is_network(self.store, self.state.run))
        unchanged = all(np.array_equal(new, old, equal_nan=True) for pair_new, pair_old in
                        ((loss, self._data["loss"]), (accuracy, self._data["accuracy"]))
                        for new, old in zip(pair_new, pair_old, strict=True))
        if unchanged and self._panes["loss"].object is not None:
            return
        self._data = {"loss": loss, "accuracy": accuracy}
        # New elements rather than streamed data: each new run or step range gets its own axes.
        self._markers.clear()
        self._taps.clear()
        for key, label, title in (("loss", "batch loss", "Training loss"),
                                  ("accuracy", "accuracy", "Held-out accuracy")):
            steps, values = self._data[key]
            curve = history_curve(steps, values, label=label, title=f"{title} (click to jump)")
            tap = hv.streams.Tap(source=curve)
            tap.add_subscriber(weakly(self._tapped))
            self._taps.append(tap)
            marker = step_marker(self.state.step, hooks=(weakly(self._markers.capture),))
            self._panes[key].object = history_band(steps, values, label=label) * curve * marker
        self._markers.move()  # redrawing the curves redraws their markers at step 0

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
