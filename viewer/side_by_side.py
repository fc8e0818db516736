"""Side by side: up to four runs (e.g. Adam vs SGD, two seeds) replayed in sync at one step.

One tile grid per run, all on one colour scale, at the state's step. A run that ends
sooner is shown at its own last step, and the page says so: no grid ever shows a step
other than the one its title names. :func:`side_by_side_view` is the whole decision, a
function of the state and the data store; :class:`SideBySide` draws it, swapping each
grid's data in place as the tile grid does.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import holoviews as hv
import numpy as np
import panel as pn
import param

from weightlapse.viewer.analysis.frames import symmetric_limit
from weightlapse.viewer.analysis.run import Run
from weightlapse.viewer.analysis.runs import RunInfo
from weightlapse.viewer.data import DataStore
from weightlapse.viewer.picker import text_options
from weightlapse.viewer.plots import TileView, class_labels, tile_image
from weightlapse.viewer.state import MAX_BESIDE, ViewState
from weightlapse.viewer.tiles import (
    READ_ERRORS,
    draw_in_place,
    is_network,
    label_colorbar,
    open_run,
    weakly,
    weights_shown,
)

SLOT_TILE_PX = 68   # screen pixels per tile: two grids and their colour bars fit a 1280-pixel window


@dataclass(frozen=True)
class SideBySideView:
    """What Side by side shows: a grid per run (same colour limits), and what the page says."""

    names: tuple[str, ...]
    steps: tuple[int, ...]         # the step each grid shows
    views: tuple[TileView, ...]
    class_names: tuple[tuple[str, ...], ...]
    note: str = ""                 # which runs ended before the step, or how to add runs


def side_by_side_view(state: ViewState, store: DataStore) -> SideBySideView | str:
    """The grids for ``state`` (the run and the runs beside it, at the state's step), or why there are none.

    One colour scale over all of them: "run" is the largest of the runs' whole-run limits
    (widened to the frames shown, so nothing is clipped), "step" the largest |weight| of
    the frames shown, "class" each tile's own.
    """
    runs: list[Run] = []
    for name in state.shown_runs() or [""]:
        run = open_run(store, name)
        if isinstance(run, str):
            return run
        if run.last_step < 0:
            return f"{run.name} has no step written yet."
        if run.n_classes != (runs[0] if runs else run).n_classes:
            return f"{runs[0].name} and {run.name} have different numbers of classes and cannot be shown side by side."
        runs.append(run)
    steps = [min(state.step, run.last_step) for run in runs]
    try:
        centre = state.weights == "centred"
        frames = [weights_shown(state, run, step) for run, step in zip(runs, steps)]
        limit = max(store.colour_limit(run, centre=centre) for run in runs) if state.scale == "run" else 0.0
    except READ_ERRORS as error:
        return f"Side by side: {error}"
    if state.scale != "class":
        limit = max([limit, *(symmetric_limit(frame) for frame in frames)])
    views, notes = [], []
    for run, step, frame in zip(runs, steps, frames):
        ended = step < state.step
        title = (f"{run.name}: {'centred weights, ' if centre else ''}step {step:,}"
                 + (" (its last)" if ended else ""))
        views.append(TileView(frame, "weight", True, state.scale == "class", title,
                              None if state.scale == "class" else limit))
        if ended:
            notes.append(f"{run.name} ends at step {run.last_step:,}: it is shown at that step.")
    if len(runs) == 1:
        notes.append(f"Choose up to {MAX_BESIDE} runs to show beside {runs[0].name} (above).")
    return SideBySideView(tuple(run.name for run in runs), tuple(steps), tuple(views),
                          tuple(tuple(run.class_names) for run in runs), " ".join(notes))


class Slot:
    """One run's grid: a tile image and its class names, drawn once and swapped in place."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.plots: dict[int, Any] = {}
        self.tiles_pipe = hv.streams.Pipe(data=TileView(np.zeros((10, 784), np.float32)))
        self.labels_pipe = hv.streams.Pipe(data=[str(index) for index in range(10)])
        tiles = hv.DynamicMap(lambda data: tile_image(data, hooks=(weakly(self._capture),), tile_px=SLOT_TILE_PX),
                              streams=[self.tiles_pipe])
        labels = hv.DynamicMap(lambda data: class_labels(data, font_size="8pt"), streams=[self.labels_pipe])
        self.pane = pn.pane.HoloViews(tiles * labels, linked_axes=False, css_classes=["wl-side-grid"])

    def _capture(self, plot, element) -> None:
        self.plots[id(plot)] = plot
        # named, so that a page (and its tests) can tell the runs' grids apart
        plot.handles["glyph_renderer"].name = f"wl-side-{self.index}"
        label_colorbar(plot, element)

    def draw(self, view: TileView, class_names: list[str]) -> None:
        if self.labels_pipe.data != class_names:
            self.labels_pipe.send(class_names)
        draw_in_place(self.plots, self.tiles_pipe, view)


class SideBySide(pn.viewable.Viewer):
    """The runs' choice, what the page says about them, and a grid per run."""

    state = param.ClassSelector(class_=ViewState)
    store = param.ClassSelector(class_=DataStore)

    def __init__(self, **params) -> None:
        super().__init__(**params)
        self.choice = pn.widgets.MultiChoice(label=f"Runs beside the selected run (up to {MAX_BESIDE})", options={},
                                             max_items=MAX_BESIDE, sizing_mode="stretch_width")
        self.notice = pn.pane.Alert("", alert_type="info", visible=False, sizing_mode="stretch_width",
                                    css_classes=["wl-side-notice"])
        self.slots: list[Slot] = []   # made when first shown: a page that never shows them pays nothing
        # two grids a row, as the exports draw them (four runs: 2x2)
        self.grids = pn.GridBox(ncols=2, css_classes=["wl-side"])
        self._layout = pn.Column(self.choice, self.notice, self.grids, sizing_mode="stretch_width",
                                 visible=False)
        self.choice.param.watch(lambda event: self._choose(event.new), "value")
        self.state.param.watch(lambda event: self.refresh(self.store.runs()), "run")
        self.state.param.watch(lambda event: self._show_choice(), "side_runs")
        self.state.param.watch(lambda *events: self.render(), ["run", "side_runs", "mode", "step", "scale",
                                                             "weights", "revision"])
        self.refresh(self.store.runs())
        self.render()

    def __panel__(self):
        return self._layout

    def refresh(self, infos: list[RunInfo]) -> None:
        """The runs that can be chosen, as listed now (the selected run is always shown)."""
        names = [info.name for info in infos if info.readable and info.name != self.state.run]
        options = text_options(names)
        if options != self.choice.options:
            self.choice.options = options
        self._show_choice()

    def _choose(self, names: list[str]) -> None:
        if list(names) != self.state.side_runs:
            self.state.side_runs = list(names)[:MAX_BESIDE]

    def _show_choice(self) -> None:
        # the runs beside it that can be chosen now (the selected run itself is not one of them)
        value = [name for name in self.state.side_runs if name in self.choice.options.values()]
        if self.choice.value != value:
            self.choice.value = value

    def render(self) -> None:
        shown = self.state.mode == "side-by-side"
        self._layout.visible = shown
        if not shown:
            return
        if is_network(self.store, self.state.run):  # its layers are drawn by the network view; the choice is here
            self.notice.visible = False
            self.grids.objects = []
            return
        view = side_by_side_view(self.state, self.store)
        if isinstance(view, str):
            self.notice.object, self.notice.visible = html.escape(view), True
            self.grids.objects = []  # nothing stale: no grid rather than an old one
            return
        self.notice.object, self.notice.visible = html.escape(view.note), bool(view.note)
        while len(self.slots) < len(view.views):
            self.slots.append(Slot(len(self.slots)))
        for slot, tiles, class_names in zip(self.slots, view.views, view.class_names):
            slot.draw(tiles, list(class_names))
        panes = [slot.pane for slot in self.slots[:len(view.views)]]
        if self.grids.objects != panes:
            for slot in self.slots[len(view.views):]:
                slot.plots.clear()  # its plots leave the page; shown again, it is drawn afresh
            self.grids.objects = panes

    def release(self) -> None:
        for slot in self.slots:
            slot.plots.clear()
