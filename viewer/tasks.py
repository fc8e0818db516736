"""The viewer's slow work: statistics and exports, on a worker thread with a progress bar.

Each panel shows only its own outcome (a result, or why it failed) and forgets it as soon
as what it was computed for changes.
"""

from __future__ import annotations

import asyncio
import html
import io

import panel as pn
import param

import numpy as np

from weightlapse.viewer.analysis.export import (
    animation_steps,
    layer_pictures,
    network_runs,
    png_bytes,
    shared_layer,
    side_by_side,
)
from weightlapse.viewer.analysis.frames import centred, colour_map
from weightlapse.viewer.analysis.spacing import combined
from weightlapse.viewer.analysis.network import NetworkRun
from weightlapse.viewer.analysis.renderers import write_animation, write_picture_animation
from weightlapse.viewer.data import DataStore
from weightlapse.viewer.analysis.layouts import layer_layout
from weightlapse.viewer.network_view import chosen_layer, on_scale
from weightlapse.viewer.plots import TileView, tile_picture
from weightlapse.viewer.side_by_side import side_by_side_view
from weightlapse.viewer.state import ViewState
from weightlapse.viewer.tiles import READ_ERRORS, is_network, tile_view, with_document_lock

ANIMATION_MAX_FRAMES = 300     # frames in a page export; the headless API allows more
DEFAULT_RANGE_STEPS = 3000     # a run's default step range: its first 3,000 steps


async def in_worker(button, progress, work):
    """``work(report)`` on a worker thread, ``button`` disabled and ``progress`` shown meanwhile."""
    button.disabled = True
    progress.visible, progress.value = True, 0

    def report(fraction: float) -> None:
        progress.value = min(100, int(fraction * 100))

    try:
        return await asyncio.get_running_loop().run_in_executor(None, lambda: work(report))
    finally:
        button.disabled = False
        progress.visible = False


class StatisticsPanel(pn.viewable.Viewer):
    state = param.ClassSelector(class_=ViewState)
    store = param.ClassSelector(class_=DataStore)

    def __init__(self, **params) -> None:
        super().__init__(**params)
        self.statistic = pn.widgets.Select.from_param(self.state.param.statistic, label="Statistic", width=220)
        self.compute_button = pn.widgets.Button(label="Compute statistics", color="primary", width=180)
        self.progress = pn.indicators.Progress(value=0, max=100, visible=False, width=200)
        self.outcome = pn.pane.HTML("", css_classes=["wl-outcome"])
        self.compute_button.on_click(self.compute)
        self.state.param.watch(lambda *events: setattr(self.outcome, "object", ""),
                               ["run", "range_start", "range_stop", "weights", "revision", "layer"])
        self._layout = pn.Row(self.statistic, self.compute_button, self.progress, self.outcome,
                              visible=self.state.mode == "statistics")
        self.state.param.watch(lambda event: setattr(self._layout, "visible", event.new == "statistics"), "mode")

    def __panel__(self):
        return self._layout

    async def compute(self, event=None) -> None:
        state = self.state
        name, start, stop, centre = state.run, state.range_start, state.range_stop, state.weights == "centred"
        if not name:
            return
        try:
            run = self.store.open(name)
            if isinstance(run, NetworkRun):  # the statistics of the layer shown
                layer = chosen_layer(state, run)

                def work(report):
                    return self.store.networks.compute_statistics(run, layer, start, stop, progress=report)
            else:
                def work(report):
                    return self.store.compute_statistics(run, start, stop, centre=centre, progress=report)
            await in_worker(self.compute_button, self.progress, work)
        except READ_ERRORS as error:
            self.outcome.object = f"<span class='wl-error'>Statistics failed: {html.escape(str(error))}</span>"
            return
        with_document_lock(lambda: setattr(state, "revision", state.revision + 1))


class ExportPanel(pn.viewable.Viewer):
    """A PNG of the grid as shown (same colour scale), and an animation of the step range; of
    every run shown in Side by side, in one picture on one colour scale; of a network run, the
    layer shown (its PNG is the save tool's, above the picture)."""

    state = param.ClassSelector(class_=ViewState)
    store = param.ClassSelector(class_=DataStore)

    def __init__(self, **params) -> None:
        super().__init__(**params)
        self.png_download = pn.widgets.FileDownload(callback=self.png_file, filename="weightlapse.png",
                                                    label="Download PNG of this view", sizing_mode="stretch_width")
        self.animation_format = pn.widgets.RadioButtonGroup(options=["gif", "mp4"], value="gif", width=100)
        self.spacing = pn.widgets.Select.from_param(self.state.param.spacing, label="Frame spacing",
                                                    sizing_mode="stretch_width")
        self.animation_button = pn.widgets.Button(label="Render animation of the step range",
                                                  sizing_mode="stretch_width")
        self.progress = pn.indicators.Progress(value=0, max=100, visible=False, sizing_mode="stretch_width")
        self.animation_download = pn.widgets.FileDownload(file=None, filename="weightlapse.gif", visible=False,
                                                          label="Download animation", sizing_mode="stretch_width")
        self.outcome = pn.pane.HTML("", css_classes=["wl-outcome"])
        # Of a softmax run's tile grid (runs side by side in Side by side), or of a network's layer shown.
        self.animation_box = pn.Column("Animation of the step range:", self.animation_format, self.spacing,
                                       self.animation_button, self.progress, self.animation_download,
                                       margin=0, sizing_mode="stretch_width")
        self.animation_button.on_click(self.render_animation)
        self.state.param.watch(lambda *events: self._forget(), ["run", "range_start", "range_stop", "scale", "spacing",
                                                              "mode", "side_runs", "weights"])
        self.state.param.watch(lambda *events: self._show_png(), ["run", "mode", "revision", "compare", "side_runs"])
        self._show_png()

    def __panel__(self):
        return pn.Column(self.png_download, self.animation_box, self.outcome, sizing_mode="stretch_width")

    def _forget(self) -> None:
        self.animation_download.visible = False
        self.outcome.object = ""

    def _view(self) -> tuple[TileView, list[str], list[str]] | None:
        """(the tiles shown, one run's after another's; their class names; the runs' titles), or None."""
        if self.state.mode == "side-by-side":
            shown = side_by_side_view(self.state, self.store)
            if isinstance(shown, str):
                return None
            first = shown.views[0]
            tiles = np.concatenate([view.tiles for view in shown.views])
            return (TileView(tiles, first.label, first.diverging, first.per_class, f"step {self.state.step:,}",
                             first.limit), list(shown.class_names[0]), [view.title for view in shown.views])
        view = tile_view(self.state, self.store)
        if isinstance(view, str):
            return None
        return view, self.store.open(self.state.run).class_names, [""]

    def _show_png(self) -> None:
        view = self._view()
        # Compare runs draws charts: each has its own save tool; nothing here would be truthful.
        self.png_download.disabled = view is None
        if view is not None:
            self.png_download.label = "Download PNG of this view"
        elif is_network(self.store, self.state.run) and self.state.mode != "compare":
            self.png_download.label = ("PNG: the save tool above each picture" if self.state.mode == "side-by-side"
                                       else "PNG: the save tool above the picture")
        else:
            self.png_download.label = "PNG: nothing to export in this view"

    def png_file(self) -> io.BytesIO | None:
        shown = self._view()
        if shown is None:
            return None
        view, class_names, groups = shown
        clim = tile_picture(view).clim   # the page's colour range (Side by side: all grids share it)
        self.png_download.filename = f"weightlapse-{self.state.mode}-{self.state.step}.png"
        return io.BytesIO(png_bytes(view.tiles, tile_titles=class_names, title=view.title if len(groups) == 1 else "",
                                    per_class=view.per_class, colorbar_label=view.label,
                                    cmap=colour_map(diverging=view.diverging), clim=clim, groups=groups))

    async def render_animation(self, event=None) -> None:
        state = self.state
        if not state.run:
            return
        fmt = self.animation_format.value
        names = state.shown_runs() if state.mode == "side-by-side" else [state.run]
        buffer = io.BytesIO()
        try:
            runs = [self.store.open(name) for name in names]
            networks = network_runs(runs)
            start, stop = state.range_start, min(state.range_stop, max(run.last_step for run in runs))
            if networks:
                steps, render = self._layer_animation(networks, start, stop, buffer, fmt)
            else:
                steps, render = self._grid_animation(runs, start, stop, buffer, fmt)
            await in_worker(self.animation_button, self.progress, render)
        except READ_ERRORS as error:
            self.outcome.object = f"<span class='wl-error'>Animation failed: {html.escape(str(error))}</span>"
            return
        buffer.seek(0)
        self.animation_download.filename = f"weightlapse-{start}-{stop}.{fmt}"
        self.animation_download.file = buffer
        self.animation_download.visible = True
        self.outcome.object = (f"{len(steps)} frames (steps {start:,}..{stop:,}, {html.escape(state.spacing)} "
                               "spacing) ready to download.")

    def _grid_animation(self, runs: list, start: int, stop: int, buffer, fmt: str):
        """(steps, render(report)) of softmax-regression runs' tile grids, side by side if several."""
        state = self.state
        steps = animation_steps(start, stop, max_frames=ANIMATION_MAX_FRAMES, spacing=state.spacing,
                                travelled=lambda: combined([self.store.travelled(run, start, stop) for run in runs]))
        centre = state.weights == "centred"  # the choice made when the button was pressed
        limit = max(self.store.colour_limit(run, centre=centre) for run in runs) if state.scale == "run" else None
        what = "centred weights, " if centre else ""
        if len(runs) == 1:
            run = runs[0]

            def frame_at(step: int):
                weights = run.weights_at(step)
                return centred(weights) if centre else weights
            groups, title = None, lambda step: f"{run.name}: {what}step {step:,}"
        else:
            (frame_at, groups), title = side_by_side(runs, centre=centre), lambda step: f"{what}step {step:,}"

        def render(report) -> None:
            write_animation(buffer, steps, frame_at, fmt=fmt, class_names=runs[0].class_names, title=title,
                            fps=10, progress=report, limit=limit, groups=groups)
        return steps, render

    def _layer_animation(self, runs: list[NetworkRun], start: int, stop: int, buffer, fmt: str):
        """(steps, render(report)) of the network layer shown, of one run or of the runs side by
        side, laid out as the page draws it, on the page's colour scale (Whole run: the largest
        of the runs' limits; Per class: each unit on its own)."""
        state, networks = self.state, self.store.networks
        layer = shared_layer(runs, chosen_layer(state, runs[0]))
        spec = runs[0].spec(layer)
        layout = layer_layout(spec.shape)
        steps = animation_steps(start, stop, max_frames=ANIMATION_MAX_FRAMES, spacing=state.spacing,
                                travelled=lambda: combined([networks.travelled(run, layer, start, stop)
                                                            for run in runs]))
        scale = state.scale  # the choice made when the button was pressed
        _, label, limit = on_scale(runs[0].values_at(layer, start), spec.role, scale,
                                   lambda: max(networks.colour_limit(run, layer) for run in runs))

        def picture(run: NetworkRun, step: int) -> np.ndarray:
            values = run.values_at(layer, min(step, run.last_step))
            return layout.picture(on_scale(values, spec.role, scale, lambda: limit)[0])
        picture_at, groups, size, title = layer_pictures(runs, layer, picture)

        def render(report) -> None:
            write_picture_animation(buffer, steps, picture_at, fmt=fmt, size_px=size, fps=10, title=title,
                                    progress=report, limit=limit, colorbar_label=label, caption=layout.description,
                                    labels=layout.labels, groups=groups)
        return steps, render
