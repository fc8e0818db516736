"""The network view: a network run's layers, one parameter at a time, replayed by the player.

:func:`layer_view` is the whole decision, a function of the state and the data store: a
:class:`LayerView` to draw (the chosen parameter at the state's step, a change, a
difference from another run, or a statistic), or a sentence saying what is missing;
:func:`side_layer_views` the same for Side by side (the layer of each run shown, on one
colour scale). How each shape is laid out (unit images, heatmaps, strips, kernels) is
viewer/analysis/layouts.py, how it is drawn viewer/network_plots.py; the weight inspector below the picture is viewer/network_inspector.py.
"""

from __future__ import annotations

import asyncio
import html
from collections.abc import Callable

import numpy as np
import panel as pn
import param

from weightlapse.viewer.analysis.network import NetworkRun, layout_problem
from weightlapse.viewer.analysis.scales import largest_magnitude
from weightlapse.viewer.analysis.stats import STATISTICS
from weightlapse.viewer.data import DataStore
from weightlapse.viewer.layer_picture import LayerPicture, LayerView, picture_width, side_columns, side_picture_width
from weightlapse.viewer.analysis.layouts import layer_layout
from weightlapse.viewer.network_plots import distance_lines
from weightlapse.viewer.state import MAX_BESIDE, ViewState
from weightlapse.viewer.tiles import READ_ERRORS, weakly, with_document_lock

NETWORK_MODES = ("replay", "side-by-side", "step-diff", "run-diff", "statistics")
# Every how many steps the per-layer distances between two runs are computed.
DISTANCE_POINTS = 2000


def chosen_layer(state: ViewState, run: NetworkRun) -> str:
    """The state's layer if the run has it, else the run's first parameter (the model's order)."""
    return state.layer if state.layer in run.names else run.names[0]


def network_run(store: DataStore, name: str) -> NetworkRun | None:
    try:
        return store.networks.network(name) if name else None
    except READ_ERRORS:
        return None


def layer_view(state: ViewState, store: DataStore) -> LayerView | str:
    """What the network view shows for ``state``, or why it shows nothing."""
    run = network_run(store, state.run)
    if run is None:
        return "Choose a network run (left)."
    if state.mode not in NETWORK_MODES:
        return f"{run.name} records a network: choose Replay, Side by side, Step vs step, Run vs run or Statistics."
    if state.mode == "side-by-side":
        return "Side by side shows a picture per run (side_layer_views)."
    if run.last_step < 0:
        return f"{run.name} has no step written yet."
    layer = chosen_layer(state, run)
    spec = run.spec(layer)
    layout = layer_layout(spec.shape)
    step = min(state.step, run.last_step)
    what = layer  # its shape is in the layer selector and the description: a long title runs into the toolbar
    try:
        if state.mode == "replay":
            values = run.values_at(layer, step)
            shown, label, limit = on_scale(values, spec.role, state.scale,
                                           lambda: store.networks.colour_limit(run, layer))
            return LayerView(layout, shown, label, True, f"{run.name}: {what} after step {step:,}", limit,
                             norms_text(values))
        if state.mode == "step-diff":
            earlier = min(state.from_step, run.last_step)
            change = run.values_at(layer, step) - run.values_at(layer, earlier)
            values, label, limit = on_scale(change, "change", state.scale,
                                            lambda: store.networks.change_limit(run, layer, earlier))
            return LayerView(layout, values, label, True, f"{run.name}: {what}, step {step:,} minus step {earlier:,}",
                             limit, summary=f"L2 norm of the change: {np.linalg.norm(change):.4g}")
        if state.mode == "run-diff":
            other = diff_network(state, store, run)
            if isinstance(other, str):
                return other
            difference = other.values_at(layer, step) - run.values_at(layer, step)
            values, label, limit = on_scale(difference, "difference", state.scale,
                                            lambda: store.networks.difference_limit(run, other, layer))
            return LayerView(layout, values, label, True, f"{other.name} minus {run.name}: {what}, step {step:,}",
                             limit, summary=f"L2 distance of {layer}: {np.linalg.norm(difference):.4g}")
        stats = store.networks.statistics(run, layer, state.range_start, state.range_stop)
        if stats is None:
            return (f"Press “Compute statistics” for {layer}, steps {state.range_start:,}..{state.range_stop:,} "
                    f"of {run.name}.")
        statistic = STATISTICS[state.statistic]
        label = statistic.title(stats.attrs["settle_fraction"])
        return LayerView(layout, stats[state.statistic].values.astype(np.float32), label, statistic.diverging,
                         f"{run.name}: {what}, {label}, steps {stats.attrs['first_step']:,}..{stats.attrs['last_step']:,}")
    except READ_ERRORS as error:
        return f"{run.name}: {error}"


def side_layer_views(state: ViewState, store: DataStore) -> tuple[list[LayerView], str] | str:
    """The layer shown, of the run and of each network run beside it, at the state's step on one
    colour scale (Whole run: the largest of the runs' limits; This step: of the frames shown;
    Per class: each unit its own), and what the page says; or why there is nothing to show.
    A run that ends sooner is shown at its own last step, and its title says so."""
    runs: list[NetworkRun] = []
    for name in state.shown_runs():
        run = network_run(store, name)
        if run is None:
            return (f"{name} is not a network run: a network run is shown beside other network runs "
                    "(a softmax run beside softmax runs).")
        if run.last_step < 0:
            return f"{run.name} has no step written yet."
        runs.append(run)
    first = runs[0]
    layer = chosen_layer(state, first)
    shape = first.spec(layer).shape
    for run in runs[1:]:
        if layer not in run.names or run.spec(layer).shape != shape:
            return f"{run.name} has no parameter {layer} of shape {shape}, so it cannot be shown beside {first.name}."
    steps = [min(state.step, run.last_step) for run in runs]
    try:
        values = [run.values_at(layer, step) for run, step in zip(runs, steps)]
        whole_run = max(store.networks.colour_limit(run, layer) for run in runs) if state.scale == "run" else 0.0
    except READ_ERRORS as error:
        return f"Side by side: {error}"
    shown = [on_scale(each, first.spec(layer).role, state.scale, lambda: whole_run) for each in values]
    if state.scale != "class":  # one range for all, widened to every frame shown, so none is clipped
        common = max([whole_run, *(largest_magnitude(each) for each, _, _ in shown)]) or 1.0
        shown = [(each, label, common) for each, label, _ in shown]
    layout, views, notes = layer_layout(shape), [], []
    for run, step, (each, label, limit) in zip(runs, steps, shown):
        ended = step < state.step
        views.append(LayerView(layout, each, label, True,
                               f"{run.name}: {layer} after step {step:,}" + (" (its last)" if ended else ""), limit))
        if ended:
            notes.append(f"{run.name} ends at step {run.last_step:,}: it is shown at that step.")
    if len(runs) == 1:
        notes.append(f"Choose up to {MAX_BESIDE} network runs to show beside {first.name} (above).")
    return views, " ".join(notes)


def on_scale(values: np.ndarray, label: str, scale: str,
             whole_run_limit: Callable[[], float]) -> tuple[np.ndarray, str, float | None]:
    """(values drawn, colour bar label, ±limit) on the colour scale chosen: "run" the whole
    run's limit (``whole_run_limit()``), "step" the values' own range (no limit), "class"
    each unit divided by its own largest |value|."""
    if scale == "class":
        return per_unit(values), f"{label} / unit max |{label}|", 1.0
    return values, label, whole_run_limit() if scale == "run" else None


def per_unit(values: np.ndarray) -> np.ndarray:
    """Each unit (first axis) divided by its own largest |value|: every unit spans [-1, 1]."""
    values = np.asarray(values, dtype=np.float32)
    rows = values.reshape(values.shape[0], -1) if values.ndim >= 2 else values.reshape(1, -1)
    limits = np.abs(np.where(np.isfinite(rows), rows, 0)).max(axis=1, keepdims=True)
    return (rows / np.where(limits > 0, limits, 1)).reshape(values.shape)


def norms_text(values: np.ndarray) -> str:
    finite = values[np.isfinite(values)]
    if not finite.size:
        return "No finite values at this step."
    return (f"L2 norm {np.linalg.norm(finite):.4g}; values from {finite.min():.4g} to {finite.max():.4g}, "
            f"mean |value| {np.abs(finite).mean():.4g}")


def diff_network(state: ViewState, store: DataStore, run: NetworkRun) -> NetworkRun | str:
    """The network run of Run vs run, or why there is none, in one line."""
    if not state.compare:
        return "Run vs run: choose a network run to compare with (left)."
    other = network_run(store, state.compare)
    if other is None:
        return f"{state.compare} is not a network run: a network run is compared with another network run."
    problem = layout_problem(run, other)
    if problem:
        return f"{run.name} and {other.name} cannot be compared: {problem}."
    if min(state.step, run.last_step) > other.last_step:
        return f"{other.name} has only {other.last_step + 1:,} steps; pick a step up to {other.last_step:,}."
    return other


def layer_distances_now(run: NetworkRun, other: NetworkRun, step: int) -> list[tuple[str, float]]:
    """(parameter, L2 distance between the two runs) at ``step``, every parameter in the model's order."""
    return [(name, float(np.linalg.norm(other.values_at(name, step).astype(np.float64)
                                        - run.values_at(name, step).astype(np.float64)))) for name in run.names]


class NetworkView(pn.viewable.Viewer):
    """The layer selector, the chosen parameter's picture, its numbers and, in Run vs run, the
    distances of every layer between the two runs."""

    state = param.ClassSelector(class_=ViewState)
    store = param.ClassSelector(class_=DataStore)

    def __init__(self, **params) -> None:
        super().__init__(**params)
        self.layer_select = pn.widgets.Select(label="Layer", options={}, width=360, css_classes=["wl-layer"])
        self.layer_select.param.watch(self._picked, "value")
        self.notice = pn.pane.Alert("", alert_type="info", visible=False, css_classes=["wl-network-notice"],
                                    sizing_mode="stretch_width")
        self.description = pn.pane.HTML("", css_classes=["wl-layer-description"], margin=(0, 10))
        # the picture a click on chooses the inspected weight
        self.picture = LayerPicture(css_class="wl-network", on_click=weakly(self._clicked))
        self.picture_box = pn.Column(self.picture.pane, visible=False, margin=0)
        # Side by side: the layer of each run shown, two a row
        self.side_pictures: list[LayerPicture] = []
        self.side_box = pn.GridBox(ncols=2, css_classes=["wl-network-side"], visible=False)
        self.summary = pn.pane.HTML("", css_classes=["wl-network-summary"], sizing_mode="stretch_width")
        self.distance_button = pn.widgets.Button(label="Distances of every layer over all steps", width=320)
        self.distance_button.on_click(self.compute_distances)
        self.distance_pane = pn.pane.HoloViews(None, linked_axes=False, sizing_mode="stretch_width",
                                               css_classes=["wl-layer-distances"])
        self.comparison_box = pn.Column(self.distance_button, self.distance_pane, visible=False,
                                        sizing_mode="stretch_width")
        self.shown: LayerView | None = None
        self._layout = pn.Column(self.layer_select, self.notice, self.description, self.picture_box, self.side_box,
                                 self.summary, self.comparison_box, sizing_mode="stretch_width", visible=False)
        self.state.param.watch(lambda event: self._forget_layer(), "run")
        self.state.param.watch(lambda *events: self.render(), ["run", "compare", "mode", "step", "from_step",
                                                             "range_start", "range_stop", "statistic", "scale",
                                                             "layer", "revision", "window_width", "weights",
                                                             "side_runs"])
        self.render()

    def __panel__(self):
        return self._layout

    def _picked(self, event) -> None:
        run = network_run(self.store, self.state.run)
        if run is not None and event.new and event.new != chosen_layer(self.state, run):  # not the one shown
            # A weight index belongs to its layer: the same number in another layer is another weight.
            self.state.param.update(layer=event.new, weight_index=None)

    def _forget_layer(self) -> None:
        """Another run: a layer it lacks, or a weight past the layer's end, leaves the state (and the link)."""
        run = network_run(self.store, self.state.run)
        names = run.names if run is not None else []
        layer = self.state.layer if self.state.layer in names else ""
        index = self.state.weight_index
        if index is not None and (run is None or index >= run.spec(layer or names[0]).size):
            index = None
        if (layer, index) != (self.state.layer, self.state.weight_index):
            self.state.param.update(layer=layer, weight_index=index)

    def _sync_layers(self, run: NetworkRun) -> None:
        options = {f"{spec.name}  {spec.shape}  {spec.role}": spec.name for spec in run.parameters}
        value = chosen_layer(self.state, run)
        if self.layer_select.options != options:
            self.layer_select.param.update(options=options, value=value)
        elif self.layer_select.value != value:
            self.layer_select.value = value

    def render(self) -> None:
        run = network_run(self.store, self.state.run)
        self._layout.visible = run is not None and self.state.mode in NETWORK_MODES
        if not self._layout.visible:
            self.shown = None
            return
        self._sync_layers(run)
        if self.state.mode == "side-by-side":
            self._render_side_by_side()
            return
        self.side_box.visible = False
        view = layer_view(self.state, self.store)
        self.comparison_box.visible = self.state.mode == "run-diff" and not isinstance(view, str)
        if isinstance(view, str):
            self._say(view)
            return
        self.notice.visible = False
        self.shown = view
        self.description.object = f"<small>{html.escape(view.layout.description)}</small>"
        self.picture.draw(view, picture_width(self.state.window_width))
        self.picture_box.visible = True
        self.summary.object = self._summary_html(run, view)

    def _say(self, message: str) -> None:
        """No picture, and why."""
        self.notice.object, self.notice.visible = html.escape(message), True
        self.picture_box.visible = self.side_box.visible = False
        self.summary.object = self.description.object = ""
        self.shown = None

    def _render_side_by_side(self) -> None:
        self.picture_box.visible = self.comparison_box.visible = False
        shown = side_layer_views(self.state, self.store)
        if isinstance(shown, str):
            self.side_box.objects = []  # nothing stale: no picture rather than an old one
            self._say(shown)
            return
        views, note = shown
        self.notice.object, self.notice.visible = html.escape(note), bool(note)
        self.shown = views[0]
        self.description.object = f"<small>{html.escape(views[0].layout.description)}</small>"
        while len(self.side_pictures) < len(views):
            self.side_pictures.append(LayerPicture(css_class="wl-network-side-picture",
                                                   name=f"wl-network-side-{len(self.side_pictures)}"))
        width = side_picture_width(self.state.window_width)
        self.side_box.ncols = side_columns(self.state.window_width)
        for picture, view in zip(self.side_pictures, views):
            picture.draw(view, width)
        panes = [picture.pane for picture in self.side_pictures[:len(views)]]
        if self.side_box.objects != panes:
            for picture in self.side_pictures[len(views):]:
                picture.release()  # its plots leave the page; shown again, it is drawn afresh
            self.side_box.objects = panes
        self.side_box.visible = True
        self.summary.object = ""

    def release(self) -> None:
        for picture in [self.picture, *self.side_pictures]:
            picture.release()

    def _clicked(self, x=None, y=None) -> None:
        view = self.shown
        if x is None or y is None or view is None:
            return
        index = view.layout.clicked(x, y)
        if index is not None:
            with_document_lock(lambda: setattr(self.state, "weight_index", index))

    def _summary_html(self, run: NetworkRun, view: LayerView) -> str:
        text = html.escape(view.summary)
        if self.state.weights == "centred":  # the class-mean is a softmax regression's; a layer has none
            text += " (Centred weights are a softmax-regression run's; a network's values are shown as stored.)"
        if self.state.mode != "run-diff":
            return f"<small>{text}</small>"
        other = self.store.networks.network(self.state.compare)
        step = min(self.state.step, run.last_step)
        rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{distance:.4g}</td></tr>"
                       for name, distance in layer_distances_now(run, other, step))
        return (f"<small>{text}</small><br><b>Distance of every layer at step {step:,}</b>"
                f"<table class='wl-layer-table'><tr><th>parameter</th><th>L2 distance</th></tr>{rows}</table>")

    async def compute_distances(self, event=None) -> None:
        """The per-layer distances of the two runs over their shared steps, computed on a worker
        thread (the page stays live), drawn below."""
        run, other = network_run(self.store, self.state.run), network_run(self.store, self.state.compare)
        if run is None or other is None:
            return
        every = max(1, -(-(min(run.last_step, other.last_step) + 1) // DISTANCE_POINTS))
        self.distance_button.disabled = True
        try:
            distances = await asyncio.get_running_loop().run_in_executor(
                None, lambda: self.store.networks.compute_distances(run, other, every))
        except READ_ERRORS as error:
            message = html.escape(f"Distances failed: {error}")
            with_document_lock(lambda: self.notice.param.update(object=message, visible=True))
            return
        finally:
            self.distance_button.disabled = False
        self.distances = distances
        chart = distance_lines(distances, title=f"{other.name} vs {run.name}: L2 distance per layer")
        with_document_lock(lambda: setattr(self.distance_pane, "object", chart))
