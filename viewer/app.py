"""The weightlapse viewer: the app shell that wires one page's view state to its components.

Served by ``panel serve viewer/`` (viewer/main.py) in a FastListTemplate. The parts:

- viewer/state.py: the view state (what is shown) and the URL values it reads back, checked;
- viewer/data.py: the data store (runs and everything derived, shared by pages);
- components rendering from the state: run picker (picker.py), player and keys (player.py),
  tile grid (tiles.py), pixel inspector (inspector.py), curves (curves.py), statistics and export (tasks.py), Compare runs
  (comparison.py).

The page polls the runs every second: new runs appear, states refresh, a run retrained or
extended is shown as it is now, and follow mode keeps the newest step.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import panel as pn

from weightlapse.viewer.comparison import Comparison
from weightlapse.viewer.curves import Curves
from weightlapse.viewer.data import DataStore, preferred_runs, shared_store
from weightlapse.viewer.inspector import PixelInspector
from weightlapse.viewer.network_inspector import NetworkInspector
from weightlapse.viewer.network_view import NetworkView
from weightlapse.viewer.picker import RunPicker, escape, runs_table_html
from weightlapse.viewer.player import Player
from weightlapse.viewer.side_by_side import SideBySide
from weightlapse.viewer.state import LIST_KEYS, URL_KEYS, ViewState, read_query
from weightlapse.viewer.tasks import DEFAULT_RANGE_STEPS, ExportPanel, StatisticsPanel
from weightlapse.viewer.tiles import READ_ERRORS, TileGrid, is_network, weakly

log = logging.getLogger(__name__)

POLL_MS = 1000   # how often a page looks for new runs, new steps and new stores
URL_PARAMS = ("run", "compare", "mode", "step", "from_step", "range_start", "range_stop", "statistic", "scale",
              "weights", "follow", "compare_runs", "pixel", "pixel_class", "side_runs", "spacing", "layer",
              "weight_index", "compare_every", "match_units")
HELP = """
**Keys**: space plays or pauses; ← → step one; shift + ← → jump 100 steps; Home / End: first / last step.

**Modes**: *Replay* the weights; *Side by side*: up to four runs at the same step, on one scale;
*Step vs step* (minus "From step"); *Run vs run* (minus the run to compare with); *Statistics* of
the step range; *Compare runs* of a group (e.g. seeds).

**Colour scale**: *Whole run* keeps one scale over all steps, so growth shows, differences too
(Step vs step: the largest change from "From step"; Run vs run: the largest difference of the two
runs), taken from steps sampled across the run and widened by any frame that goes past it;
*This step* fits each frame; *Per class* fits each tile. Exports use the scale shown.

**Weights**: *Raw* as stored; *Centred* with each pixel's mean over the ten classes removed.
Adding one vector to every class's weights changes no prediction, so the centred weights are
the part that decides what the model computes; diffs, statistics and comparisons use the choice.

**Pixel inspector**: click a pixel of a class image to plot that weight over all steps (thick),
with the same pixel of every other class (thin); hover for a value.

**Frame spacing** of animations: *Logarithmic* (every step at first, then further apart), *Even*,
or *By distance travelled* (a frame per equal change of the weights).

**Network runs** (hidden layers from `train.hidden`, or recorded with `weightlapse.Recorder`): choose a *Layer*. A layer whose inputs
are the 784 pixels shows one 28x28 image per unit; other matrices a heatmap (units down, inputs
across); biases a strip; convolutions their kernels. Replay, Side by side (the layer of up to
four network runs, on one scale), Step vs step, Run vs run (another network of the same layers;
with every layer's distance) and Statistics work on the layer shown; click a weight to follow it over all steps. *Per class* scales each unit on its own.
The animation of the step range is of the layer shown. *Compare runs* matches the runs' hidden
units first (a network computes the same with its units in any order), and draws the distances
as recorded dashed.

Click a curve to jump to its step. The link in the address bar restores this view.
"""
__all__ = ["WeightViewer", "runs_table_html", "track_session"]


# Panel's Fast design fetches a web font from Google: the viewer's page uses the system's
# fonts instead, so that it loads without outside requests (offline machines, privacy).
pn.theme.Fast._resources = {key: value for key, value in pn.theme.Fast._resources.items() if key != "font"}


class WeightViewer(pn.viewable.Viewer):
    """One page: its state, the shared data store, and the components drawn from them."""

    def __init__(self, runs_dir: str | Path, *, scheduler: str | None = None, data_dir: str | Path | None = None,
                 query: dict[str, str] | None = None) -> None:
        """``runs_dir``: a directory or an fsspec URL; ``scheduler``: a Dask scheduler address for
        statistics and comparisons (default: threads here); ``data_dir``: the data stage's
        directories, for predictions on held-out images (default: ``data`` beside the runs);
        ``query``: URL values to restore."""
        super().__init__()
        self.store: DataStore = shared_store(runs_dir, scheduler=scheduler, data_dir=data_dir)
        self.state = ViewState()
        self.message = pn.pane.Alert("", alert_type="warning", visible=False, sizing_mode="stretch_width",
                                     css_classes=["wl-message"])
        self.store.runs(fresh=True)  # a run written a moment ago is one the link may name
        components = {"state": self.state, "store": self.store}
        self.picker = RunPicker(**components)
        self.player = Player(**components)
        self.tiles = TileGrid(**components)
        self.inspector = PixelInspector(tiles=self.tiles.tiles_map, **components)
        self.network = NetworkView(**components)
        self.network_inspector = NetworkInspector(**components)
        self.side = SideBySide(**components)
        self.curves = Curves(**components)
        self.statistics = StatisticsPanel(**components)
        self.export = ExportPanel(**components)
        self.comparison = Comparison(**components)
        self.mode_buttons = pn.widgets.RadioButtonGroup.from_param(self.state.param.mode, label="Mode",
                                                                   color="primary", variant="outline")
        self.scale_buttons = pn.widgets.RadioButtonGroup.from_param(self.state.param.scale, label="Colour scale",
                                                                    color="primary", variant="outline")
        self.weights_buttons = pn.widgets.RadioButtonGroup.from_param(self.state.param.weights, label="Weights",
                                                                      color="primary", variant="outline")
        # Centring removes the mean over a softmax regression's ten classes; a network has no such mean.
        self.weights_box = pn.Column(pn.pane.HTML("<b>Weights</b>", margin=(10, 10, 0, 10)), self.weights_buttons,
                                     margin=0)
        self._shown: dict[str, tuple] = {}
        self._loaded = False
        self.state.param.watch(lambda event: self._on_run(), "run")
        self.state.param.watch(lambda *events: self._show_run_controls(), ["run", "revision"])  # revision: a store created anew
        self.state.param.watch(self._sync_url, [*URL_PARAMS, "playing"])
        self.open(query if query is not None else session_query())
        self._main = pn.Column(self.message, self.picker.problem, self.mode_buttons, self.player, self.statistics,
                               self.tiles, self.side, self.network, self.inspector, self.network_inspector,
                               self.curves, self.comparison,
                               pn.pane.HTML("<b>Runs</b>"),
                               self.picker.table, sizing_mode="stretch_width")
        if pn.state.curdoc is not None:
            pn.state.onload(self._on_load)

    def __panel__(self):
        return self._main

    def sidebar(self) -> list:
        return [self.picker, pn.pane.HTML("<b>Colour scale</b>", margin=(10, 10, 0, 10)), self.scale_buttons,
                self.weights_box, self.player.follow, pn.layout.Divider(), self.export, pn.layout.Divider(),
                pn.pane.Markdown(HELP, disable_math=True, css_classes=["wl-help"]),
                pn.pane.HTML(f"<small>runs in <code>{escape(self.store.runs_dir)}</code></small>")]

    def template(self) -> pn.template.FastListTemplate:
        """The page: this viewer in a template with a sidebar, a header and a light/dark theme."""
        return pn.template.FastListTemplate(title="weightlapse", sidebar=self.sidebar(), main=[self],
                                            theme_toggle=True, sidebar_width=320, accent="#1f77b4",
                                            main_layout=None,
                                            font="system-ui, 'Segoe UI', Roboto, 'Helvetica Neue', sans-serif")

    # -- opening a page -------------------------------------------------------------------------
    def open(self, query: dict[str, str]) -> None:
        """Restore the view from URL values; without a run, the first of params.yaml's runs (or the
        newest), at its last step."""
        readable = self.store.readable()
        values, problems = read_query(query, names=readable, last_step=self._last_step,
                                      default_run=self.store.default_run(preferred_runs(self.store.runs_dir)),
                                      parameters=self.store.networks.parameter_sizes)
        last = self._last_step(values["run"])
        if "step" not in values or values.get("follow"):
            values["step"] = max(last, 0)
        values.setdefault("range_stop", max(min(last, DEFAULT_RANGE_STEPS), 0))
        chosen = values.pop("compare_runs", None)
        self.state.param.update(**values)
        if chosen is not None:  # after the run, whose group would be chosen otherwise
            self.state.compare_runs = chosen
        self._remember_shown()
        self._show_run_controls()
        if problems:
            self.say("Some of the link's settings could not be used: " + "; ".join(problems) + ".")

    def say(self, text: str) -> None:
        self.message.object, self.message.visible = escape(text), bool(text)

    def _last_step(self, name: str) -> int:
        try:
            return self.store.open(name).last_step if name else -1
        except READ_ERRORS:
            return -1

    def _show_run_controls(self) -> None:
        self.weights_box.visible = not is_network(self.store, self.state.run)

    def _on_run(self) -> None:
        last = self._last_step(self.state.run)
        if last < 0:
            return
        updates = {name: min(getattr(self.state, name), last)
                   for name in ("step", "from_step", "range_start", "range_stop")}
        if self.state.follow:
            updates["step"] = last
        if updates["range_stop"] == 0:
            updates["range_stop"] = min(last, DEFAULT_RANGE_STEPS)
        self.state.param.update(**updates)

    def _on_load(self) -> None:
        self.player.go_live()
        self._loaded = True
        self._sync_url()  # the link shows the whole view from the start, bad values corrected
        self._poller = pn.state.add_periodic_callback(weakly(self.poll), period=POLL_MS)

    def _sync_url(self, *events) -> None:
        if self.state.playing and events and all(event.name == "step" for event in events):
            return  # written when playback pauses: a URL update per frame costs the browser a frame
        if events and self.message.visible:
            self.say("")  # the link the message was about is gone
        if self._loaded and pn.state.location is not None:
            self._linked = self.state.query()
            pn.state.location.update_query(**self._linked)

    # -- live -------------------------------------------------------------------------------------
    def _remember_shown(self) -> bool:
        """Note what this page shows of each run; True if that changed since last noted."""
        shown = {}
        for name in self._names_shown():
            try:
                run = self.store.open(name)
            except READ_ERRORS:
                continue
            shown[name] = (run.identity, run.last_step, run.progress)
        changed = shown != self._shown
        self._shown = shown
        return changed

    def _names_shown(self) -> set[str]:
        beside = self.state.shown_runs() if self.state.mode == "side-by-side" else []
        return {self.state.run, self.state.compare, *beside} - {""}

    def poll(self) -> None:
        """New runs, new steps, new stores: show the runs as they are now."""
        infos = self.store.runs()
        self.picker.refresh(infos)
        self.comparison.refresh(infos)
        self.side.refresh(infos)
        if self.state.run not in [info.name for info in infos]:  # its directory is gone
            self.state.run = self.store.default_run(preferred_runs(self.store.runs_dir))
        for name in self._names_shown():
            try:
                self.store.refresh(name)
            except READ_ERRORS as error:
                log.info("run %r cannot be refreshed: %s", name[:80], error)
        if self._remember_shown():
            self.player.update_bounds()
            self.state.revision += 1
        last = self._last_step(self.state.run)
        if self.state.follow and last >= 0 and self.state.step != last:
            self.state.step = last
        if getattr(self, "_linked", None) != self.state.query():
            self._sync_url()  # while playing, the link follows once a poll

    def close(self) -> None:
        """Let go of what this page held: its tab is gone."""
        poller = getattr(self, "_poller", None)  # set once the page has loaded
        if poller is not None:
            poller.stop()
        self.tiles.release()
        self.inspector.release()
        self.network_inspector.release()
        self.network.release()
        self.side.release()
        self.curves.release()


def session_query() -> dict[str, str]:
    """The page's URL query values (each cut short; a list of runs may be long)."""
    if pn.state.curdoc is None or not pn.state.session_args:
        return {}
    query = {}
    for key in URL_KEYS:
        values = pn.state.session_args.get(key)
        if values:
            query[key] = values[0].decode("utf-8", errors="replace")[:20_000 if key in LIST_KEYS else 300]
    return query


_open_sessions = 0
_sessions_lock = threading.Lock()


def track_session(viewer: WeightViewer) -> None:
    """Count open pages and release a page's components when Bokeh discards its session.

    Runs, caches and statistics live in the shared data store, so each page holds only its
    own plots and widgets and gives them back when its tab closes: nothing global refers to
    a page but weakly (tiles.weakly; measured in docs/reliability.md).
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
