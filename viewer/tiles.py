"""The tile grid: the ten class images of what the state asks for (weights, a diff, a statistic).

:func:`tile_view` is the whole decision, a function of the state and the data store: a
:class:`~weightlapse.viewer.plots.TileView` to draw, or a sentence saying which input is
missing (then no picture is shown, never the previous one).
"""

from __future__ import annotations

import html
import time
import weakref
from typing import Any

import holoviews as hv
import numpy as np
import panel as pn
import param
from holoviews.plotting.util import process_cmap

from weightlapse.pipeline.store import TrajectoryError
from weightlapse.viewer.analysis.frames import centred, diff_summary
from weightlapse.viewer.analysis.network import NetworkRun
from weightlapse.viewer.analysis.run import Run
from weightlapse.viewer.analysis.stats import STATISTICS, top_pixels
from weightlapse.viewer.data import DataStore
from weightlapse.viewer.plots import TileView, grid_tile_px, class_labels, pixel_map, tile_image, tile_picture
from weightlapse.viewer.state import ViewState

READ_ERRORS = (TrajectoryError, OSError, ValueError, IndexError)
# While playing, a chart's step marker moves at most this often: each move repaints a chart
# of thousands of points in the browser, which took playback from 30 to 18 frames a second.
PLAYING_MARKER_S = 0.5


class StepMarkers:
    """Step markers drawn in each page (captured by a hook), moved to the state's step: at once
    when paused, at most every PLAYING_MARKER_S while playing (and where playback stops)."""

    def __init__(self, state: ViewState) -> None:
        self.state = state
        self.plots: dict[int, Any] = {}
        self._moved_at = -float("inf")
        state.param.watch(lambda event: self.move(), ["step", "playing"])

    def capture(self, plot, element) -> None:
        self.plots[id(plot)] = plot
        plot.handles["glyph"].location = self.state.step

    def move(self) -> None:
        now = time.monotonic()
        if self.state.playing and now - self._moved_at < PLAYING_MARKER_S:
            return
        self._moved_at = now
        for plot in self.plots.values():
            plot.handles["glyph"].location = self.state.step

    def clear(self) -> None:
        self.plots.clear()


def weakly(method):
    """``method``, called through a weak reference. Hooks and periodic callbacks outlive a page
    (HoloViews caches option lookups, hooks included, for the life of the process), and a
    bound method there would keep every closed page's components alive."""
    reference = weakref.WeakMethod(method)

    def call(*args, **kwargs):
        target = reference()
        return None if target is None else target(*args, **kwargs)

    return call


def with_document_lock(callback) -> None:
    """Run ``callback`` now, or on the page's next tick when served: HoloViews stream events
    and code after an ``await`` run without the document lock, which Bokeh model updates need."""
    document = pn.state.curdoc
    if document is None or document.session_context is None:
        callback()
    else:
        document.add_next_tick_callback(callback)


def open_run(store: DataStore, name: str) -> Run | str:
    """The softmax-regression run ``name``, or why there is none to draw here (a network run
    is drawn by viewer/network_view.py)."""
    if not name:
        return "Choose a run (left)."
    try:
        run = store.open(name)
    except READ_ERRORS as error:
        return f"Cannot open run {name}: {error}"
    if isinstance(run, NetworkRun):
        return (f"{name} records a network: its layers are shown in Replay, Side by side, Step vs step, Run vs run and "
                "Statistics; this view shows softmax-regression runs.")
    return run


def is_network(store: DataStore, name: str) -> bool:
    """Whether ``name`` is a network run (drawn by the network view, not the tile grid)."""
    try:
        return bool(name) and isinstance(store.open(name), NetworkRun)
    except READ_ERRORS:
        return False


def tile_view(state: ViewState, store: DataStore) -> TileView | str:
    """What the grid shows for ``state``, or why it shows nothing."""
    if state.mode == "compare":
        return "Compare runs shows charts, not tiles."
    if state.mode == "side-by-side":
        return "Side by side shows a grid per run (viewer/side_by_side.py)."
    run = open_run(store, state.run)
    if isinstance(run, str):
        return run
    if run.last_step < 0:
        return f"{run.name} has no step written yet."
    step = min(state.step, run.last_step)
    per_class = state.scale == "class"
    centre = state.weights == "centred"
    kind = " (centred)" if centre else ""
    try:
        if state.mode == "replay":
            limit = store.colour_limit(run, centre=centre) if state.scale == "run" else None
            return TileView(weights_shown(state, run, step), "centred weight" if centre else "weight", True,
                            per_class, f"{run.name}: {'centred ' if centre else ''}weights after step {step:,}",
                            limit)
        whole_run = state.scale == "run"
        if state.mode == "step-diff":
            earlier = min(state.from_step, run.last_step)
            limit = store.change_limit(run, earlier, centre=centre) if whole_run else None
            return TileView(weights_shown(state, run, step) - weights_shown(state, run, earlier), "change", True,
                            per_class, f"{run.name}: step {step:,} minus step {earlier:,}{kind}", limit)
        if state.mode == "run-diff":
            other = diff_partner(state, store)
            if isinstance(other, str):
                return other
            limit = store.difference_limit(run, other, centre=centre) if whole_run else None
            return TileView(weights_shown(state, other, step) - weights_shown(state, run, step), "difference",
                            True, per_class, f"{other.name} minus {run.name}, step {step:,}{kind}", limit)
        stats = store.statistics(run, state.range_start, state.range_stop, centre=centre)
        if stats is None:
            return (f"Press “Compute statistics” for steps {state.range_start:,}..{state.range_stop:,} "
                    f"of {run.name}{kind}.")
        statistic = STATISTICS[state.statistic]
        label = statistic.title(stats.attrs["settle_fraction"])
        return TileView(stats[state.statistic].values, label, statistic.diverging, per_class,
                        f"{run.name}: {label}, steps {stats.attrs['first_step']:,}..{stats.attrs['last_step']:,}"
                        f"{kind}")
    except READ_ERRORS as error:
        return f"{run.name}: {error}"


def weights_shown(state: ViewState, run: Run, step: int) -> np.ndarray:
    """A step's weights (class, pixel) as the state asks: raw, or centred (the class-mean removed)."""
    weights = run.weights_at(step)
    return centred(weights) if state.weights == "centred" else weights


def diff_partner(state: ViewState, store: DataStore) -> Run | str:
    """The run of Run vs run, or why there is none."""
    if not state.compare:
        return "Run vs run: choose a run to compare with (left)."
    other = open_run(store, state.compare)
    if isinstance(other, str):
        return other
    run = store.open(state.run)
    if other.n_classes != run.n_classes:
        return f"{run.name} and {other.name} have different numbers of classes and cannot be compared."
    if state.step > other.last_step:
        return f"{other.name} has only {other.last_step + 1:,} steps; pick a step up to {other.last_step:,}."
    return other


def summary_html(state: ViewState, store: DataStore) -> str:
    """The numbers beside the grid: distances of a diff, the top-changing pixels of a statistic."""
    view = tile_view(state, store)
    if isinstance(view, str):
        return ""
    run = store.open(state.run)
    step = min(state.step, run.last_step)
    kind = ", centred" if state.weights == "centred" else ""
    if state.mode == "step-diff":
        earlier = min(state.from_step, run.last_step)
        return diff_table(diff_summary(weights_shown(state, run, earlier), weights_shown(state, run, step)),
                          run.class_names, f"step {earlier:,} vs step {step:,}{kind}")
    if state.mode == "run-diff":
        other = diff_partner(state, store)
        return diff_table(diff_summary(weights_shown(state, run, step), weights_shown(state, other, step)),
                          run.class_names, f"{run.name} vs {other.name} at step {step:,}{kind}")
    if state.mode == "statistics":
        stats = store.statistics(run, state.range_start, state.range_stop, centre=state.weights == "centred")
        rows = "".join(f"<tr><td>{rank}</td><td>{entry['row']}</td><td>{entry['col']}</td>"
                       f"<td>{entry['value']:.4g}</td></tr>"
                       for rank, entry in enumerate(top_pixels(stats, state.statistic, 10), 1))
        return ("<b>Top-changing pixels</b> (over all classes)<table class='wl-top'><tr><th>#</th><th>row</th>"
                f"<th>column</th><th>value</th></tr>{rows}</table>")
    return ""


def diff_table(summary, class_names: list[str], caption: str) -> str:
    escape = html.escape
    cells = "".join(f"<tr><td>{escape(name)}</td><td>{l2:.4g}</td><td>{cosine:.4f}</td></tr>"
                    for name, l2, cosine in zip(class_names, summary.l2_per_class, summary.cosine_per_class))
    return (f"<b>{escape(caption)}</b>: L2 distance {summary.l2:.4g}, cosine similarity {summary.cosine:.4f}"
            "<table class='wl-diff'><tr><th>class</th><th>L2 distance</th><th>cosine similarity</th></tr>"
            f"{cells}</table>")


def label_colorbar(plot, element) -> None:
    # HoloViews titles a colour bar once, when first drawn; one plot shows weights, changes
    # and statistics, so the title follows the element.
    colorbar = plot.handles.get("colorbar")
    if colorbar is not None:
        colorbar.title = element.vdims[0].pprint_label


class TileGrid(pn.viewable.Viewer):
    """The grid, the statistic's over-classes map and the summary, drawn from the state."""

    state = param.ClassSelector(class_=ViewState)
    store = param.ClassSelector(class_=DataStore)

    def __init__(self, **params) -> None:
        super().__init__(**params)
        self._tiles_pipe = hv.streams.Pipe(data=TileView(np.zeros((10, 784), np.float32)))
        self._labels_pipe = hv.streams.Pipe(data=[str(index) for index in range(10)])
        self._map_pipe = hv.streams.Pipe(data=(np.zeros(784), "value", "All classes"))
        # Plots as drawn in each browser page, captured by a hook, so a new step swaps their
        # image data in place: HoloViews' full re-render costs ~40 ms.
        self._plots: dict[int, Any] = {}
        self._tile_px = grid_tile_px(self.state.window_width)
        tiles = hv.DynamicMap(lambda data: tile_image(data, hooks=(weakly(self._capture),), tile_px=self._tile_px),
                              streams=[self._tiles_pipe])
        labels = hv.DynamicMap(lambda data: class_labels(data), streams=[self._labels_pipe])
        self.tiles_map = tiles  # the image a click on chooses the pixel inspector's pixel (viewer/inspector.py)
        # Its own fixed size (plots.tile_image): stretched to the column, the plot would widen its
        # frame and draw the tiles as rectangles, clipped at the right.
        self.tiles_pane = pn.pane.HoloViews(tiles * labels, linked_axes=False, css_classes=["wl-tiles"])
        maps = hv.DynamicMap(lambda data: pixel_map(data[0], label=data[1], diverging=False, title=data[2])
                             .opts(hooks=[label_colorbar]), streams=[self._map_pipe])
        self.map_pane = pn.pane.HoloViews(maps, linked_axes=False)
        # Shown and hidden through boxes: a HoloViews pane's own `visible` fails in a template
        # (Panel passes the design's stylesheets on as the wrong type).
        self.grid_box = pn.Column(self.tiles_pane, sizing_mode="stretch_width", margin=0)
        self.map_box = pn.Column(self.map_pane, visible=False, margin=0)
        self.notice = pn.pane.Alert("", alert_type="info", visible=False, css_classes=["wl-notice"],
                                    sizing_mode="stretch_width")
        self.summary = pn.pane.HTML("", sizing_mode="stretch_width", css_classes=["wl-summary"])
        # The map and the numbers go below the grid: a neighbour appearing beside the
        # responsive grid would squeeze it.
        self._layout = pn.Column(self.notice, self.grid_box, pn.Row(self.map_box, self.summary,
                                                                    sizing_mode="stretch_width"),
                                 sizing_mode="stretch_width")
        self.state.param.watch(lambda *events: self.render(), ["run", "compare", "mode", "step", "from_step",
                                                             "range_start", "range_stop", "statistic", "scale",
                                                             "weights", "revision"])
        self.state.param.watch(lambda event: self._resize(), "window_width")
        self.render()

    def __panel__(self):
        return self._layout

    def _capture(self, plot, element) -> None:
        self._plots[id(plot)] = plot
        label_colorbar(plot, element)

    def _resize(self) -> None:
        """The window's width changed: the drawn grids take the tile size for it, in place."""
        tile_px = grid_tile_px(self.state.window_width)
        if tile_px == self._tile_px:
            return
        self._tile_px = tile_px
        for plot in self._plots.values():
            figure = plot.handles["plot"]
            ratio = figure.frame_height / figure.frame_width  # the mosaic's shape, kept
            figure.update(frame_width=5 * tile_px, frame_height=round(5 * tile_px * ratio))

    def release(self) -> None:
        self._plots.clear()

    def render(self) -> None:
        # Compare runs draws its own charts, Side by side its own grids, the network view a network's layers
        self._layout.visible = (self.state.mode not in ("compare", "side-by-side")
                                and not is_network(self.store, self.state.run))
        if not self._layout.visible:
            return
        view = tile_view(self.state, self.store)
        if isinstance(view, str):
            self.notice.object, self.notice.visible = html.escape(view), True
            # A blank grid, not a hidden one: nothing stale is shown, and the responsive plot
            # keeps its size (one shown again after hiding is drawn zero pixels high).
            blank = np.full((len(self._labels_pipe.data), 784), np.nan, np.float32)
            # A title all the same: a plot first drawn with an empty title leaves it no room, and
            # the browser then never shows the titles that follow.
            self._draw(TileView(blank, "weight", True, False, "Nothing to show in this view yet"))
            self.map_box.visible = False
            self.summary.object = ""
            return
        self.notice.object, self.notice.visible = "", False
        run = self.store.open(self.state.run)
        if self._labels_pipe.data != run.class_names:
            self._labels_pipe.send(run.class_names)
        self._draw(view)
        statistics = self.state.mode == "statistics"
        if statistics:
            stats = self.store.statistics(run, self.state.range_start, self.state.range_stop,
                                          centre=self.state.weights == "centred")
            label = STATISTICS[self.state.statistic].title(stats.attrs["settle_fraction"])
            self._map_pipe.send((stats[f"{self.state.statistic}_over_classes"].values, label,
                                 f"All classes: {label}"))
        self.map_box.visible = statistics
        self.summary.object = summary_html(self.state, self.store)

    def _draw(self, view: TileView) -> None:
        draw_in_place(self._plots, self._tiles_pipe, view)


def draw_in_place(plots: dict[int, Any], pipe: hv.streams.Pipe, view: TileView) -> None:
    """Show ``view`` in the tile images drawn in each page (``plots``, captured by a hook).

    Swaps the data, colours and titles of the drawn plots in place: HoloViews' full re-render
    of ``pipe``'s DynamicMap costs ~40 ms, and loses the responsive grid's height in a template.
    """
    if not plots:  # not drawn in a page yet: the page's first draw starts from this view
        pipe.send(view)
        return
    drawn = tile_picture(view)
    flipped = np.flipud(drawn.picture)  # Bokeh draws row 0 at the bottom
    palette = process_cmap(drawn.cmap, ncolors=256)
    for plot in plots.values():
        source = plot.handles["source"]
        source.data = {**source.data, "image": [flipped]}
        mapper = plot.handles["color_mapper"]
        mapper.update(low=drawn.clim[0], high=drawn.clim[1])
        if list(mapper.palette) != palette:
            mapper.palette = palette
        plot.handles["plot"].title.text = view.title
        colorbar = plot.handles.get("colorbar")
        if colorbar is not None and colorbar.title != drawn.label:
            colorbar.title = drawn.label
    pipe.update(data=view)  # a later full redraw starts from this view
