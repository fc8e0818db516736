"""The weightlapse viewer app: one Panel component over a runs directory.

Served by ``panel serve viewer/`` (see viewer/main.py). The state a user can bookmark
(runs, mode, steps, range, statistic, scale) lives in the URL query; every value read
from the URL is checked here and never used as a path.
"""

from __future__ import annotations

import asyncio
import html
import io
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import holoviews as hv
import numpy as np
import panel as pn
import param

from weightlapse.pipeline.locations import is_url
from weightlapse.pipeline.trajectory import TrajectoryError
from weightlapse.viewer.compare_view import RunComparison
from weightlapse.viewer.analysis.export import animation_steps, png_bytes, write_animation
from weightlapse.viewer.analysis.frames import clamp_step, colour_map, diff_summary
from weightlapse.viewer.plots import (
    TileView,
    class_labels,
    history_band,
    history_curve,
    pixel_map,
    step_marker,
    tile_image,
    tile_picture,
)
from weightlapse.viewer.analysis.runs import Run, RunCatalog, RunInfo
from weightlapse.viewer.analysis.stats import STATISTICS, change_statistics, top_pixels

log = logging.getLogger(__name__)

MODES = {"Replay": "replay", "Step vs step": "step-diff", "Run vs run": "run-diff", "Statistics": "statistics",
         "Compare runs": "compare"}
SPEEDS = {"1 step/frame": 1, "10 steps/frame": 10, "100 steps/frame": 100, "1000 steps/frame": 1000}
FRAME_RATES = {"2 fps": 500, "5 fps": 200, "10 fps": 100, "20 fps": 50}
NO_RUN = "(none)"
DEFAULT_STATS_STEPS = 3000     # default statistics range: the first 3,000 steps
ANIMATION_MAX_FRAMES = 300     # frames in a UI export; the headless API allows more
POLL_MS = 1000                 # live follow: how often a run being written is re-read
STATS_CACHE_SIZE = 16

_stats_cache: OrderedDict[tuple, Any] = OrderedDict()
_stats_lock = threading.Lock()
_catalogs: dict[Path | str, RunCatalog] = {}


def _weakly(method: Callable) -> Callable:
    """``method``, called through a weak reference: the callable does not keep its viewer alive.

    Hooks and periodic callbacks outlive a page: HoloViews caches option lookups, hooks
    included, in a class-level dict for the life of the process, and Panel keeps periodic
    callbacks per document. Bound methods there kept every closed page's viewer, about
    1.4 MB each.
    """
    reference = weakref.WeakMethod(method)

    def call(*args) -> None:
        target = reference()
        if target is not None:
            target(*args)

    return call


_open_sessions = 0
_sessions_lock = threading.Lock()


def track_session(viewer: WeightViewer) -> None:
    """Count open pages and release a page's viewer when Bokeh discards its session (tab closed).

    Runs, chunk caches and statistics are shared between pages (shared_catalog), so each
    page holds only its own plots and widgets, about 5 MB, and gives them back when its tab
    closes: nothing global refers to a viewer but weakly (see _weakly; measured in
    docs/reliability.md).
    """
    global _open_sessions
    with _sessions_lock:
        _open_sessions += 1
        count = _open_sessions
    log.info("viewer page opened (%d open)", count)

    def closed(session_context) -> None:
        global _open_sessions
        viewer.close()
        with _sessions_lock:
            _open_sessions -= 1
            remaining = _open_sessions
        log.info("viewer page closed (%d open)", remaining)

    pn.state.on_session_destroyed(closed)


def shared_catalog(runs_dir: str | Path) -> RunCatalog:
    """One catalog per runs location for the whole server, so browser tabs share open runs and caches.

    ``runs_dir``: a local directory or an fsspec URL (``s3://bucket/runs``); credentials and
    endpoints come from the environment (AWS_* variables, FSSPEC_S3_ENDPOINT_URL, ...).
    """
    key = str(runs_dir) if is_url(runs_dir) else Path(runs_dir).expanduser().absolute()
    if key not in _catalogs:
        _catalogs[key] = RunCatalog(key)
    return _catalogs[key]


def _escape(value: object) -> str:
    return html.escape(str(value), quote=True)


def runs_table_html(infos: list[RunInfo]) -> str:
    """The run picker's table. Every value is escaped: run names and attributes are untrusted."""
    if not infos:
        return ""
    head = "".join(f"<th>{title}</th>" for title in
                   ("run", "state", "dataset", "optimizer", "lr", "seed", "steps", "accuracy", "final loss"))
    rows = []
    for info in infos:
        params = info.params
        accuracy = info.metrics.get("heldout_accuracy")
        loss = info.metrics.get("final_train_loss")
        steps = f"{info.steps_done} / {info.n_steps}" if info.n_steps else ""
        state = info.state + (f": {info.message}" if info.message else "")
        cells = [info.name, state, info.dataset, params.get("optimizer", ""), params.get("lr", ""),
                 params.get("seed", ""), steps,
                 f"{accuracy:.4f}" if isinstance(accuracy, (int, float)) else "",
                 f"{loss:.4f}" if isinstance(loss, (int, float)) else ""]
        rows.append(f'<tr class="run-{_escape(info.state.replace(" ", "-"))}">'
                    + "".join(f"<td>{_escape(cell)[:300]}</td>" for cell in cells) + "</tr>")
    return (f'<table class="wl-runs"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')


TABLE_CSS = """
table.wl-runs { border-collapse: collapse; font-size: 12px; }
table.wl-runs th, table.wl-runs td { padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: left; }
table.wl-runs tr.run-broken td, table.wl-runs tr.run-failed td { color: #a00; }
table.wl-runs tr.run-being-written td { color: #06c; }
"""


class WeightViewer(pn.viewable.Viewer):
    """Replay, diff and per-pixel statistics of the runs in one runs directory."""

    mode = param.Selector(objects=list(MODES.values()), default="replay")
    step = param.Integer(default=0)
    from_step = param.Integer(default=0, doc="the earlier step of a step-vs-step diff")
    per_class = param.Boolean(default=False, doc="scale each class's tile to its own range")
    follow = param.Boolean(default=False, doc="keep showing the newest step of a run being written")
    statistic = param.Selector(objects=list(STATISTICS), default="path_length")
    range_start = param.Integer(default=0)
    range_stop = param.Integer(default=0)

    def __init__(self, runs_dir: str | Path, *, scheduler: str | None = None, **params) -> None:
        """``runs_dir``: a directory or an fsspec URL; ``scheduler``: a Dask scheduler address to
        compute statistics and comparisons on (default: threads in the server's process)."""
        super().__init__(**params)
        self.catalog = shared_catalog(runs_dir)
        self.scheduler = scheduler
        self.run: Run | None = None
        self.compare: Run | None = None
        self._known_last = {}
        self._stats = None
        self._updating = False
        # Panel's Player sets its slider's value before its maximum, so a browser clamps a
        # first value above 100 (an HTML range input's default maximum). Its value is held at
        # 0 until the page has loaded, then set (see _on_load).
        self._player_live = pn.state.curdoc is None

        # -- widgets ----------------------------------------------------------------------
        self.message = pn.pane.HTML("", sizing_mode="stretch_width", css_classes=["wl-message"])
        self.run_select = pn.widgets.Select(label="Run", options=[], width=220)
        self.compare_select = pn.widgets.Select(label="Compare with (run vs run)", options=[NO_RUN], width=220)
        self.refresh_button = pn.widgets.Button(label="Rescan runs", width=220)
        self.runs_table = pn.pane.HTML("", stylesheets=[TABLE_CSS], sizing_mode="stretch_width")
        self.mode_buttons = pn.widgets.RadioButtonGroup(label="Mode", options=MODES, value=self.mode)
        self.player = pn.widgets.Player(label="Player", start=0, end=1, value=0, loop_policy="once",
                                        interval=100, show_loop_controls=True, width=420, show_value=False)
        self.speed = pn.widgets.Select(label="Speed", options=SPEEDS, value=1, width=140)
        self.frame_rate = pn.widgets.Select(label="Frame rate", options=FRAME_RATES, value=100, width=100)
        self.step_slider = pn.widgets.IntSlider(label="Step", start=0, end=1, value=0, sizing_mode="stretch_width")
        self.step_input = pn.widgets.IntInput(label="Step", value=0, start=0, width=120)
        self.from_input = pn.widgets.IntInput(label="From step", value=0, start=0, width=120)
        self.scale_toggle = pn.widgets.Checkbox(label="Per-class colour scale", value=self.per_class)
        self.follow_toggle = pn.widgets.Toggle(label="Follow newest step", value=False, width=220)
        self.state_text = pn.pane.HTML("", css_classes=["wl-state"])
        self.stat_select = pn.widgets.Select(label="Statistic", options={v.title(0.9): k for k, v in STATISTICS.items()},
                                             value=self.statistic, width=200)
        self.start_input = pn.widgets.IntInput(label="First step", value=0, start=0, width=120)
        self.stop_input = pn.widgets.IntInput(label="Last step", value=0, start=0, width=120)
        self.compute_button = pn.widgets.Button(label="Compute statistics", color="primary", width=180)
        self.progress = pn.indicators.Progress(value=0, max=100, visible=False, width=300)
        self.summary = pn.pane.HTML("", sizing_mode="stretch_width", css_classes=["wl-summary"])
        self.png_download = pn.widgets.FileDownload(callback=self._png_file, filename="weightlapse.png",
                                                    label="Download PNG of this view", width=220)
        self.animation_format = pn.widgets.RadioButtonGroup(options=["gif", "mp4"], value="gif", width=100)
        self.animation_button = pn.widgets.Button(label="Render animation of the range", width=220)
        self.animation_download = pn.widgets.FileDownload(file=None, filename="weightlapse.gif", visible=False,
                                                          label="Download animation", width=220)

        # -- plots --------------------------------------------------------------------------
        self._tiles_pipe = hv.streams.Pipe(data=TileView(np.zeros((10, 784), np.float32)))
        self._labels_pipe = hv.streams.Pipe(data=[str(index) for index in range(10)])
        self._map_pipe = hv.streams.Pipe(data=None)
        self._loss_pipe = hv.streams.Pipe(data=(np.arange(1), np.zeros(1)))
        self._accuracy_pipe = hv.streams.Pipe(data=(np.arange(1), np.zeros(1)))
        # Plots as drawn in the browser (one per open page), captured by hooks so that a step
        # change can update their data in place: HoloViews' full re-render costs ~40 ms.
        self._tile_plots: dict[int, Any] = {}
        self._marker_plots: dict[int, Any] = {}
        self._drawn_signature = None
        tiles = hv.DynamicMap(lambda data: tile_image(data, hooks=(_weakly(self._capture_tiles),)),
                              streams=[self._tiles_pipe])
        labels = hv.DynamicMap(lambda data: class_labels(data), streams=[self._labels_pipe])
        self.tiles_pane = pn.pane.HoloViews(tiles * labels, linked_axes=False, css_classes=["wl-tiles"])
        pixel_maps = hv.DynamicMap(lambda data: self._pixel_map(data), streams=[self._map_pipe])
        self.map_pane = pn.pane.HoloViews(pixel_maps, visible=False, linked_axes=False)
        marker = step_marker(0, hooks=(_weakly(self._capture_marker),))
        panes = []
        for pipe, label, title in ((self._loss_pipe, "batch loss", "Training loss"),
                                   (self._accuracy_pipe, "accuracy", "Held-out accuracy")):
            curve = hv.DynamicMap(lambda data, label=label, title=title: history_curve(
                *data, label=label, title=f"{title} (click to jump)"), streams=[pipe])
            band = hv.DynamicMap(lambda data, label=label: history_band(*data, label=label), streams=[pipe])
            # Clicks reach the stream only from a DynamicMap that returns a single element
            # (not an overlay), and only if the overlay below is not re-styled with .opts().
            hv.streams.Tap(source=curve).add_subscriber(self._jump_to_tap)
            panes.append(pn.pane.HoloViews(band * curve * marker, linked_axes=False,
                                           css_classes=[f"wl-{label.split()[-1]}-curve"]))
        self.curves = pn.Row(*panes)

        # -- wiring ---------------------------------------------------------------------------
        self.run_select.param.watch(lambda event: self._select_run(event.new), "value")
        self.compare_select.param.watch(lambda event: self._select_compare(event.new), "value")
        self.refresh_button.on_click(lambda event: self.rescan())
        self.mode_buttons.link(self, value="mode")
        self.player.param.watch(lambda event: self._set_step(event.new), "value")
        self.step_slider.param.watch(lambda event: self._set_step(event.new), "value_throttled")
        self.step_input.param.watch(lambda event: self._set_step(event.new), "value")
        self.from_input.param.watch(lambda event: self._set_from(event.new), "value")
        self.speed.param.watch(lambda event: setattr(self.player, "step", event.new), "value")
        self.frame_rate.param.watch(lambda event: setattr(self.player, "interval", event.new), "value")
        self.scale_toggle.link(self, value="per_class")
        self.follow_toggle.link(self, value="follow")
        self.stat_select.link(self, value="statistic")
        self.start_input.param.watch(lambda event: self._set_range(event.new, None), "value")
        self.stop_input.param.watch(lambda event: self._set_range(None, event.new), "value")
        self.compute_button.on_click(self._compute_clicked)
        self.animation_button.on_click(self._animation_clicked)

        self.comparison = RunComparison(self.catalog, self.say, scheduler=scheduler)
        self.comparison.runs_choice.param.watch(lambda event: self._sync_url(), "value")

        self.rescan()
        self._apply_query()
        self._layout = self._build_layout()
        if pn.state.curdoc is not None:
            pn.state.onload(self._on_load)

    # -- layout ------------------------------------------------------------------------------
    def _build_layout(self) -> pn.viewable.Viewable:
        header = pn.pane.HTML(
            f"<h2 style='margin:4px 0'>weightlapse</h2><div>runs in <code>{_escape(self.catalog.runs_dir)}</code>"
            "</div>", sizing_mode="stretch_width")
        sidebar = pn.Column(self.run_select, self.compare_select, self.refresh_button, self.follow_toggle,
                            self.state_text, self.scale_toggle, pn.layout.Divider(), self.png_download,
                            "Animation of the step range:", self.animation_format, self.animation_button,
                            self.animation_download, width=260)
        player_row = pn.Row(self.player, self.speed, self.frame_rate, self.step_input)
        diff_row = pn.Row(self.from_input, visible=False)
        stats_row = pn.Row(self.stat_select, self.compute_button, visible=False)
        # The step range serves the statistics and the animation export, so it is always shown.
        range_row = pn.Row(pn.pane.HTML("<b>Step range</b><br><small>statistics, animation</small>", width=110),
                           self.start_input, self.stop_input, self.progress)
        self._diff_row, self._stats_row = diff_row, stats_row
        self._step_views = pn.Column(player_row, self.step_slider, diff_row, range_row, stats_row,
                                     pn.Row(self.tiles_pane, self.map_pane), self.summary, self.curves,
                                     sizing_mode="stretch_width")
        self._refresh_visibility()
        main = pn.Column(self.mode_buttons, self._step_views, self.comparison, sizing_mode="stretch_width")
        return pn.Column(header, self.message, pn.Row(sidebar, main), pn.pane.HTML("<b>Runs</b>"),
                         self.runs_table, sizing_mode="stretch_width")

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout

    # -- messages ------------------------------------------------------------------------------
    def say(self, text: str, kind: str = "warning") -> None:
        """Show ``text`` (escaped: it may quote a run name) above the app; empty clears it."""
        colours = {"warning": "#fff3cd", "error": "#f8d7da", "info": "#d1ecf1"}
        self.message.object = (f'<div class="wl-{kind}" style="background:{colours[kind]};padding:6px 10px;'
                               f'border-radius:4px">{_escape(text)}</div>') if text else ""

    # -- runs ---------------------------------------------------------------------------------
    def rescan(self) -> None:
        infos = self.catalog.list()
        self.runs_table.object = runs_table_html(infos)
        readable = [info.name for info in infos if info.readable]
        if not self.catalog.runs_dir.is_dir():
            self.say(f"No runs directory at {self.catalog.runs_dir}. Train runs with `dvc repro`, or point the "
                     "viewer at another directory: panel serve viewer/ --args --runs DIR (or WEIGHTLAPSE_RUNS=DIR).")
        elif not infos:
            self.say(f"No runs in {self.catalog.runs_dir} yet. Train some with `dvc repro`.")
        elif not readable:
            self.say("None of the runs can be opened yet; the table below says why.")
        current = self.run_select.value
        self.run_select.options = readable
        self.compare_select.options = [NO_RUN, *readable]
        if readable and current not in readable:
            self.run_select.value = readable[0]
        elif readable and self.run is None:
            self._select_run(self.run_select.value)
        self.comparison.update_runs(infos, self.run_select.value)

    def _open(self, name: str | None) -> Run | None:
        if not name or name == NO_RUN:
            return None
        try:
            return self.catalog.open(name)
        except (TrajectoryError, OSError, ValueError) as error:
            self.say(f"Cannot open run {name}: {error}", "error")
            return None

    def _select_run(self, name: str | None) -> None:
        run = self._open(name)
        self.run = run
        if run is None:
            return
        self.say("")
        self._known_last[run.name] = run.last_step
        self._labels_pipe.send(run.class_names)
        self._update_bounds()
        self._update_curves()
        self.step = min(self.step, run.last_step) if not self.follow else run.last_step
        self._sync_url()
        self._render()

    def _select_compare(self, name: str | None) -> None:
        self.compare = self._open(name)
        if self.compare is not None:
            self._known_last[self.compare.name] = self.compare.last_step
            if self.compare.n_classes != (self.run.n_classes if self.run else self.compare.n_classes):
                self.say("These two runs have different numbers of classes and cannot be compared.", "error")
                self.compare = None
        self._sync_url()
        self._render()

    def _update_bounds(self) -> None:
        last = max(self.run.last_step, 0) if self.run else 0
        self._updating = True
        try:
            for widget in (self.player, self.step_slider):
                widget.end = max(last, 1)  # a slider needs end > start, even for a one-step run
            for widget in (self.step_input, self.from_input, self.start_input, self.stop_input):
                widget.end = last
        finally:
            self._updating = False
        finished = self.run.finished if self.run else False
        state = "finished" if finished else "not finished (being written, or stopped)" if self.run else ""
        self.state_text.object = (f"<small>{self.run.last_step + 1:,} steps recorded, {_escape(state)}</small>"
                                  if self.run else "")
        if self.range_stop == 0 and last > 0:
            self.range_stop = min(last, DEFAULT_STATS_STEPS)

    def _update_curves(self) -> None:
        if self.run is None:
            return
        steps, loss = self.run.loss()
        self._loss_pipe.send((steps, loss) if len(steps) else (np.zeros(1), np.full(1, np.nan)))
        steps, accuracy = self.run.accuracy()
        self._accuracy_pipe.send((steps, accuracy) if len(steps) else (np.zeros(1), np.full(1, np.nan)))
        self._move_markers()  # redrawing the curves redraws their markers at step 0

    # -- steps ----------------------------------------------------------------------------------
    def _set_step(self, value: Any) -> None:
        if self._updating or self.run is None:
            return
        step, problem = clamp_step(value, self.run.last_step)
        if problem:
            self.say(problem)
        self.step = step

    def _set_from(self, value: Any) -> None:
        if self.run is not None and not self._updating:
            self.from_step, problem = clamp_step(value, self.run.last_step)
            if problem:
                self.say(problem)

    def _set_range(self, start: Any, stop: Any) -> None:
        if self.run is None or self._updating:
            return
        if start is not None:
            self.range_start, problem = clamp_step(start, self.run.last_step)
        else:
            self.range_stop, problem = clamp_step(stop, self.run.last_step)
        if problem:
            self.say(problem)
        self._sync_url()

    def _jump_to_tap(self, x=None, y=None) -> None:
        if x is not None and self.run is not None:
            step = round(x)
            _with_document_lock(lambda: self._set_step(step))

    @param.depends("step", watch=True)
    def _on_step(self) -> None:
        self._updating = True
        try:
            if self._player_live:
                self.player.value = self.step
            self.step_slider.value = self.step
            self.step_input.value = self.step
        finally:
            self._updating = False
        self._move_markers()
        self._render()
        self._sync_url()

    @param.depends("from_step", "range_start", "range_stop", watch=True)
    def _sync_step_inputs(self) -> None:
        self._updating = True
        try:
            self.from_input.value = self.from_step
            self.start_input.value = self.range_start
            self.stop_input.value = self.range_stop
        finally:
            self._updating = False

    @param.depends("mode", "from_step", "per_class", "statistic", watch=True)
    def _on_view_change(self) -> None:
        for widget, value in ((self.mode_buttons, self.mode), (self.stat_select, self.statistic),
                              (self.scale_toggle, self.per_class)):
            if widget.value != value:
                widget.value = value
        self._refresh_visibility()
        self._render()
        self._sync_url()

    def _refresh_visibility(self) -> None:
        if not hasattr(self, "_diff_row"):
            return
        self._diff_row.visible = self.mode == "step-diff"
        self._stats_row.visible = self.mode == "statistics"
        self.map_pane.visible = self.mode == "statistics"
        self._step_views.visible = self.mode != "compare"
        self.comparison.set_visible(self.mode == "compare")

    # -- drawing ---------------------------------------------------------------------------------
    def current_view(self) -> TileView | None:
        """What the weight grid shows now, or None with a message when it cannot be shown."""
        run = self.run
        if run is None or run.last_step < 0 or self.mode == "compare":
            return None
        step = min(self.step, run.last_step)
        try:
            if self.mode == "replay":
                return TileView(run.weights_at(step), "weight", True, self.per_class,
                                f"{run.name}: weights after step {step:,}")
            if self.mode in ("step-diff", "run-diff"):
                operands = self._diff_operands()
                if operands is None:
                    return None
                before, after, label, title, _ = operands
                return TileView(after - before, label, True, self.per_class, title)
            if self.mode == "statistics":
                return self._statistics_view()
        except (TrajectoryError, IndexError) as error:
            self.say(str(error), "error")
        return None

    def _diff_operands(self) -> tuple[np.ndarray, np.ndarray, str, str, str] | None:
        """(weights before, weights after, label, tile title, summary caption) of the current
        diff mode, or None with a message when there is nothing to compare."""
        run, step = self.run, min(self.step, self.run.last_step)
        if self.mode == "step-diff":
            earlier = min(self.from_step, run.last_step)
            return (run.weights_at(earlier), run.weights_at(step), "change",
                    f"{run.name}: step {step:,} minus step {earlier:,}", f"step {earlier:,} vs step {step:,}")
        if self.compare is None:
            self.say("Run vs run: choose a run to compare with (left).", "info")
            return None
        if step > self.compare.last_step:
            self.say(f"{self.compare.name} has only {self.compare.last_step + 1:,} steps; "
                     f"pick a step up to {self.compare.last_step:,}.")
            return None
        return (run.weights_at(step), self.compare.weights_at(step), "difference",
                f"{self.compare.name} minus {run.name}, step {step:,}",
                f"{run.name} vs {self.compare.name} at step {step:,}")

    def close(self) -> None:
        """Let go of what this page held (plots, runs, statistics): its tab is gone."""
        # Stop polling the runs for a page nobody sees.
        poller = getattr(self, "_poller", None)  # set once the page has loaded
        if poller is not None:
            poller.stop()
        self._tile_plots.clear()
        self._marker_plots.clear()
        self.run = self.compare = None
        self._stats = None

    def _capture_tiles(self, plot, element) -> None:
        self._tile_plots[id(plot)] = plot
        _label_colorbar(plot, element)

    def _capture_marker(self, plot, element) -> None:
        self._marker_plots[id(plot)] = plot
        plot.handles["glyph"].location = self.step

    def _move_markers(self) -> None:
        for plot in self._marker_plots.values():
            plot.handles["glyph"].location = self.step

    def _render(self) -> None:
        view = self.current_view()
        if view is None:
            self.summary.object = ""
            return
        signature = (self.mode, view.label, view.diverging, view.per_class)
        if signature == self._drawn_signature and self._tile_plots:
            # Same kind of picture, new values: swap the image data and colour range in place.
            drawn = tile_picture(view)
            flipped = np.flipud(drawn.picture)  # Bokeh draws row 0 at the bottom
            for plot in self._tile_plots.values():
                source = plot.handles["source"]
                source.data = {**source.data, "image": [flipped]}
                plot.handles["color_mapper"].update(low=drawn.clim[0], high=drawn.clim[1])
                plot.handles["plot"].title.text = view.title
            self._tiles_pipe.update(data=view)  # a later full redraw starts from this view
        else:
            self._tiles_pipe.send(view)
            self._drawn_signature = signature
        self.summary.object = self._summary_html()

    def _summary_html(self) -> str:
        if self.mode in ("step-diff", "run-diff"):
            operands = self._diff_operands()
            if operands is None:
                return ""
            before, after, _, _, caption = operands
            return _diff_table(diff_summary(before, after), self.run.class_names, caption)
        if self.mode == "statistics" and self._stats is not None:
            rows = "".join(f"<tr><td>{rank}</td><td>{entry['row']}</td><td>{entry['col']}</td>"
                           f"<td>{entry['value']:.4g}</td></tr>"
                           for rank, entry in enumerate(top_pixels(self._stats, self.statistic, 10), 1))
            return ("<b>Top-changing pixels</b> (over all classes)<table class='wl-top'><tr><th>#</th><th>row</th>"
                    f"<th>column</th><th>value</th></tr>{rows}</table>")
        return ""

    def _pixel_map(self, data):
        values, label, title = data if data is not None else (np.zeros(784), "value", "All classes")
        return pixel_map(values, label=label, diverging=False, title=title).opts(hooks=[_label_colorbar])

    # -- statistics ------------------------------------------------------------------------------
    def _stats_key(self) -> tuple:
        # The store's identity, not its name: statistics of a retrained run are not the old ones.
        return (self.run.identity, self.range_start, self.range_stop)

    def _statistics_view(self) -> TileView | None:
        with _stats_lock:
            self._stats = _stats_cache.get(self._stats_key())
        if self._stats is None:
            self.say(f"Press “Compute statistics” for steps {self.range_start:,}..{self.range_stop:,}.", "info")
            return None
        stats, name = self._stats, self.statistic
        label = STATISTICS[name].title(stats.attrs["settle_fraction"])
        span = f"steps {stats.attrs['first_step']:,}..{stats.attrs['last_step']:,}"
        self._map_pipe.send((stats[f"{name}_over_classes"].values, label, f"All classes: {label}"))
        return TileView(stats[name].values, label, name == "net_change", self.per_class,
                        f"{self.run.name}: {label}, {span}")

    async def _compute_clicked(self, event=None) -> None:
        run = self.run
        if run is None:
            return
        start, stop = self.range_start, self.range_stop
        if not 0 <= start <= stop <= run.last_step:
            self.say(f"Choose a step range inside 0..{run.last_step:,} with the first step before the last.")
            return
        key = self._stats_key()
        stats = await self._run_with_progress(
            self.compute_button, "Statistics failed",
            lambda report: change_statistics(run.weights(start, stop), first_step=start, progress=report,
                                             scheduler=self.scheduler))
        if stats is None:
            return
        with _stats_lock:
            _stats_cache[key] = stats
            while len(_stats_cache) > STATS_CACHE_SIZE:
                _stats_cache.popitem(last=False)
        self.say("")
        _with_document_lock(self._render)

    async def _run_with_progress(self, button, failure: str, work):
        """``work(report)`` on a worker thread, with the progress bar shown and ``button``
        disabled meanwhile; its result, or None after saying why it failed."""
        button.disabled = True
        self.progress.visible, self.progress.value = True, 0

        def report(fraction: float) -> None:
            self.progress.value = int(fraction * 100)

        try:
            return await asyncio.get_running_loop().run_in_executor(None, lambda: work(report))
        except (TrajectoryError, OSError, ValueError, IndexError) as error:
            self.say(f"{failure}: {error}", "error")
            return None
        finally:
            button.disabled = False
            self.progress.visible = False

    # -- export ----------------------------------------------------------------------------------
    def _png_file(self) -> io.BytesIO:
        view = self.current_view()
        if view is None:
            self.say("Nothing to export: choose a run (and compute statistics in that mode) first.")
            return io.BytesIO(b"")
        names = self.run.class_names
        self.png_download.filename = f"weightlapse-{self.mode}-{self.step}.png"
        return io.BytesIO(png_bytes(view.tiles, tile_titles=names, title=view.title, per_class=view.per_class,
                                    colorbar_label=view.label, cmap=colour_map(diverging=view.diverging)))

    async def _animation_clicked(self, event=None) -> None:
        run = self.run
        if run is None:
            return
        start, stop = self.range_start, min(self.range_stop, run.last_step)
        if not 0 <= start <= stop:
            self.say("Choose a step range (First step / Last step) for the animation.")
            return
        fmt = self.animation_format.value
        steps = animation_steps(start, stop, max_frames=ANIMATION_MAX_FRAMES)
        buffer = io.BytesIO()

        def render(report) -> bool:
            write_animation(buffer, steps, run.weights_at, fmt=fmt, class_names=run.class_names,
                            title=lambda step: f"{run.name}: step {step:,}", fps=10, progress=report)
            return True

        if not await self._run_with_progress(self.animation_button, "Animation failed", render):
            return
        buffer.seek(0)
        self.animation_download.filename = f"weightlapse-{start}-{stop}.{fmt}"
        self.animation_download.file = buffer
        self.animation_download.visible = True
        self.say(f"Animation of {len(steps)} frames (steps {start:,}..{stop:,}) is ready to download.", "info")

    # -- live follow -----------------------------------------------------------------------------
    def _on_load(self) -> None:
        self._updating = True
        try:
            self._player_live = True
            self.player.value = self.step
        finally:
            self._updating = False
        self._sync_url()  # the link shows the whole view from the start, bad values corrected
        self._poller = pn.state.add_periodic_callback(_weakly(self.poll), period=POLL_MS)

    def poll(self) -> None:
        """Pick up new steps of runs being written; with follow on, jump to the newest."""
        for run in (self.run, self.compare):
            if run is None:
                continue
            generation = run.generation
            try:
                # Finished runs too: a run retrained under the server is a new store.
                run.refresh()
            except (TrajectoryError, OSError, ValueError) as error:
                self.say(f"{run.name}: {error}", "error")
                continue
            if run.generation != generation:  # everything shown of it is stale: show the new store
                self.runs_table.object = runs_table_html(self.catalog.list())
                if run is self.run:
                    self._select_run(run.name)
                else:
                    self._select_compare(run.name)
                continue
            if run.last_step != self._known_last.get(run.name):
                self._known_last[run.name] = run.last_step
                if run is self.run:
                    self._update_bounds()
                    self._update_curves()
        if self.follow and self.run is not None and self.step != self.run.last_step:
            self.step = self.run.last_step

    @param.depends("follow", watch=True)
    def _on_follow(self) -> None:
        if self.follow_toggle.value != self.follow:
            self.follow_toggle.value = self.follow
        if self.follow:
            self.poll()
        self._sync_url()

    # -- URL state -------------------------------------------------------------------------------
    URL_KEYS = ("run", "compare", "mode", "step", "from", "start", "stop", "stat", "scale", "follow", "runs")

    def state(self) -> dict[str, str]:
        """The view as URL query values."""
        return {
            "run": self.run.name if self.run else "",
            "compare": self.compare.name if self.compare else "",
            "mode": self.mode,
            "step": str(self.step),
            "from": str(self.from_step),
            "start": str(self.range_start),
            "stop": str(self.range_stop),
            "stat": self.statistic,
            "scale": "class" if self.per_class else "shared",
            "follow": "1" if self.follow else "0",
            "runs": ",".join(self.comparison.runs_choice.value),  # the runs compared in "Compare runs"
        }

    def apply_state(self, query: dict[str, str]) -> None:
        """Restore a view from URL query values; anything unusable is reported and ignored."""
        problems = []
        names = self.run_select.options
        if query.get("run"):
            if query["run"] in names:
                self.run_select.value = query["run"]
            else:
                problems.append(f"no readable run named {query['run'][:80]!r} here")
        if query.get("compare"):
            if query["compare"] in names:
                self.compare_select.value = query["compare"]
            else:
                problems.append(f"no readable run named {query['compare'][:80]!r} to compare with")
        if "mode" in query:
            if query["mode"] in MODES.values():
                self.mode = query["mode"]
            else:
                problems.append(f"unknown mode {query['mode'][:40]!r}")
        if "stat" in query:
            if query["stat"] in STATISTICS:
                self.statistic = query["stat"]
            else:
                problems.append(f"unknown statistic {query['stat'][:40]!r}")
        if query.get("scale") in ("class", "shared"):
            self.per_class = query["scale"] == "class"
            self.scale_toggle.value = self.per_class
        last = self.run.last_step if self.run else 0
        for key, setter in (("from", self._set_from), ("start", lambda v: self._set_range(v, None)),
                            ("stop", lambda v: self._set_range(None, v))):
            if key in query:
                setter(query[key])
        if "step" in query and self.run is not None:
            step, problem = clamp_step(query["step"], last)
            if problem:
                problems.append(problem)
            self.step = step
        if query.get("follow") == "1":
            self.follow = True
        if query.get("runs"):
            chosen = [name for name in query["runs"].split(",") if name]
            unknown = [name for name in chosen if name not in names]
            if unknown:
                problems.append(f"no readable run named {unknown[0][:80]!r} to compare")
            self.comparison.runs_choice.value = [name for name in chosen if name in names]
        if problems:
            self.say("Some of the link's settings could not be used: " + "; ".join(problems) + ".")

    def _apply_query(self) -> None:
        if pn.state.curdoc is None or not pn.state.session_args:
            return
        query = {}
        for key in self.URL_KEYS:
            values = pn.state.session_args.get(key)
            if values:
                # a list of runs may be long; one value is not
                query[key] = values[0].decode("utf-8", errors="replace")[:20_000 if key == "runs" else 300]
        self.apply_state(query)

    def _sync_url(self) -> None:
        if pn.state.location is not None and hasattr(self, "_layout"):
            pn.state.location.update_query(**self.state())


def _with_document_lock(callback) -> None:
    """Run ``callback`` now, or on the page's next tick when served.

    HoloViews stream events and code after an ``await`` run without the page's document
    lock, and Bokeh refuses the direct model updates of the fast redraw then; a next-tick
    callback holds the lock.
    """
    document = pn.state.curdoc
    if document is None or document.session_context is None:
        callback()
    else:
        document.add_next_tick_callback(callback)


def _label_colorbar(plot, element) -> None:
    # HoloViews titles a colour bar once, when the plot is first drawn; the viewer reuses
    # one plot for weights, changes and statistics, so the title follows the element.
    colorbar = plot.handles.get("colorbar")
    if colorbar is not None:
        colorbar.title = element.vdims[0].pprint_label


def _diff_table(summary, class_names: list[str], caption: str) -> str:
    cells = "".join(f"<tr><td>{_escape(name)}</td><td>{l2:.4g}</td><td>{cosine:.4f}</td></tr>"
                    for name, l2, cosine in zip(class_names, summary.l2_per_class, summary.cosine_per_class))
    return (f"<b>{_escape(caption)}</b>: L2 distance {summary.l2:.4g}, cosine similarity {summary.cosine:.4f}"
            f"<table class='wl-diff'><tr><th>class</th><th>L2 distance</th><th>cosine similarity</th></tr>"
            f"{cells}</table>")
