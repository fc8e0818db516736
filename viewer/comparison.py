"""Compare runs: a group of runs (e.g. a sweep's seeds) side by side.

Pick a group from the runs index (runs that differ only in seed; the selected run's group
is chosen for you) or runs by hand; the comparison (viewer/analysis/compare.py) is computed
on a worker thread, with a progress bar, and drawn: distance from the first run over steps,
spread across the runs over steps and per pixel, the similarity matrix, and the
trajectories in a shared PCA basis beside what the same analysis makes of a random walk;
then, in function space, their predictions on the held-out images (viewer/predictions.py).
Network runs are compared with their hidden units matched to the reference run's first
(viewer/analysis/network_compare.py), the distances as recorded drawn beside. A drawn
comparison is always of the runs chosen now (as stored now), or nothing.
"""

from __future__ import annotations

import html
import math

import numpy as np
import panel as pn
import param

from weightlapse.viewer.analysis.network import NetworkRun, layout_problem
from weightlapse.viewer.analysis.runs import RunInfo
from weightlapse.viewer.data import DataStore
from weightlapse.viewer.picker import text_options
from weightlapse.viewer.plots import (
    distance_curves,
    pca_paths,
    pixel_map,
    random_walk_paths,
    run_curves,
    similarity_heatmap,
    spread_curve,
    variance_bars,
)
from weightlapse.viewer.predictions import Predictions
from weightlapse.viewer.state import ViewState
from weightlapse.viewer.tasks import in_worker
from weightlapse.viewer.tiles import READ_ERRORS, with_document_lock

BY_HAND = "(choose runs below)"
# Shared steps drawn per run by default: plenty for the pictures, and a 12-run sweep of
# 3,000-step runs compares in seconds. "Every" = 1 uses every step.
DEFAULT_POINTS = 500
NOTE_CSS = """
table.wl-matching { border-collapse: collapse; font-size: 13px; }
table.wl-matching th, table.wl-matching td { padding: 2px 10px; border-bottom: 1px solid rgba(128,128,128,.35); }
table.wl-matching td + td { text-align: right; }
"""


class Comparison(pn.viewable.Viewer):
    state = param.ClassSelector(class_=ViewState)
    store = param.ClassSelector(class_=DataStore)

    def __init__(self, **params) -> None:
        super().__init__(**params)
        self.group_select = pn.widgets.Select(label="Group (runs differing only in seed)", options=[BY_HAND],
                                              width=360)
        self.runs_choice = pn.widgets.MultiChoice(label="Runs to compare (the first is the reference)", options={},
                                                  sizing_mode="stretch_width")
        self.every_input = pn.widgets.IntInput.from_param(self.state.param.compare_every,
                                                          label="Every N-th step (0: auto)", width=170)
        self.match_box = pn.widgets.Checkbox.from_param(self.state.param.match_units,
                                                        label="Match hidden units (network runs)", width=260,
                                                        visible=False, align="end")
        self.compare_button = pn.widgets.Button(label="Compute comparison", color="primary", width=180)
        self.progress = pn.indicators.Progress(value=0, max=100, visible=False, width=300)
        self.notice = pn.pane.Alert("", alert_type="info", visible=False, sizing_mode="stretch_width")
        self.caveat = pn.pane.HTML("", sizing_mode="stretch_width", css_classes=["wl-caveat"])
        self.gauge = pn.pane.HTML("", sizing_mode="stretch_width", css_classes=["wl-gauge"], stylesheets=[NOTE_CSS])
        self.plots = pn.Column(sizing_mode="stretch_width", css_classes=["wl-comparison"])
        self._groups: dict[str, list[str]] = {}
        self.group_select.param.watch(lambda event: self._pick_group(event.new), "value")
        self.runs_choice.param.watch(lambda event: setattr(self.state, "compare_runs", list(event.new)), "value")
        self.compare_button.on_click(self.compute)
        self.state.param.watch(lambda event: self._follow_run(), "run")
        self.state.param.watch(lambda event: self._show_choice(), "compare_runs")
        self.state.param.watch(lambda *events: self.render(),
                               ["compare_runs", "mode", "weights", "revision", "compare_every", "match_units"])
        self.predictions = Predictions(state=self.state, store=self.store, every=self.every)
        self.state.param.watch(lambda event: self.predictions.render(), "compare_every")
        self._layout = pn.Column(
            pn.Row(self.group_select, self.every_input, self.match_box), self.runs_choice,
            pn.pane.HTML("<h3>Weights</h3>"), pn.Row(self.compare_button, self.progress),
            self.notice, self.gauge, self.plots, self.caveat, self.predictions, sizing_mode="stretch_width",
            # hidden from the start outside Compare runs: a run in no group changes nothing that would render it
            visible=self.state.mode == "compare")
        self.refresh(self.store.runs())

    def __panel__(self):
        return self._layout

    def refresh(self, infos: list[RunInfo]) -> None:
        """New run list: the groups and the choosable runs."""
        readable = [info.name for info in infos if info.readable]
        index = self.store.catalog.index(infos)
        index = index[index.index.isin(readable)]
        self._groups = {group: list(members.index) for group, members in index.groupby("group", sort=True)
                        if group and len(members) >= 2}
        options = text_options(readable)
        if self.runs_choice.options != options:
            self.runs_choice.options = options
        if list(self.group_select.options) != [BY_HAND, *self._groups]:
            self.group_select.options = [BY_HAND, *self._groups]
        if not self.state.compare_runs:
            self._follow_run()
        self._show_choice()

    def _group_of(self, name: str) -> str | None:
        return next((group for group, members in self._groups.items() if name in members), None)

    def _follow_run(self) -> None:
        """The selected run's group becomes the comparison (when it has one)."""
        group = self._group_of(self.state.run)
        if group is not None:
            self.state.compare_runs = list(self._groups[group])

    def _pick_group(self, group: str) -> None:
        if group in self._groups:
            self.state.compare_runs = list(self._groups[group])

    def _show_choice(self) -> None:
        chosen = [name for name in self.state.compare_runs if name in self.runs_choice.options.values()]
        if list(self.runs_choice.value) != chosen:
            self.runs_choice.value = chosen
        group = next((group for group, members in self._groups.items() if members == chosen), BY_HAND)
        if self.group_select.value != group:
            self.group_select.value = group

    def every(self, names: list[str]) -> int:
        if self.state.compare_every:
            return self.state.compare_every
        shortest = min(self.store.open(name).last_step + 1 for name in names)
        return max(1, math.ceil(shortest / DEFAULT_POINTS))

    def networks(self, names: list[str]) -> list[NetworkRun] | None:
        """The runs ``names`` when they all record networks, None when none does; a ValueError
        naming one of each when they are mixed."""
        runs = [self.store.networks.network(name) for name in names]
        networks = [run for run in runs if run is not None]
        if not networks:
            return None
        if len(networks) < len(runs):
            matrix = next(name for name, run in zip(names, runs) if run is None)
            raise ValueError(f"{networks[0].name} records a network and {matrix} softmax regression: compare runs "
                             "of one model")
        problem = next(filter(None, (layout_problem(networks[0], run) for run in networks[1:])), None)
        if problem:
            raise ValueError(problem)
        return networks

    async def compute(self, event=None) -> None:
        names = list(self.state.compare_runs)
        if len(names) < 2:
            self.notice.object, self.notice.visible = "Compare runs: choose a group, or at least two runs.", True
            return
        try:
            every = self.every(names)
            networks = self.networks(names)
            centre, match = self.state.weights == "centred", self.state.match_units
            if networks is None:
                work = lambda report: self.store.compute_comparison(names, every, centre=centre, progress=report)  # noqa: E731
            else:
                work = lambda report: self.store.networks.compute_comparison(networks, every, match,  # noqa: E731
                                                                             progress=report)
            await in_worker(self.compare_button, self.progress, work)
        except READ_ERRORS as error:  # ClusterError is an OSError
            self.notice.object = html.escape(f"Comparison failed: {error}")
            self.notice.alert_type, self.notice.visible = "danger", True
            return
        with_document_lock(lambda: setattr(self.state, "revision", self.state.revision + 1))

    def result(self):
        """The comparison of the runs chosen now, if computed."""
        names = list(self.state.compare_runs)
        if len(names) < 2:
            return None
        try:
            networks = self.networks(names)
            if networks is not None:
                return self.store.networks.comparison(networks, self.every(names), self.state.match_units)
            return self.store.comparison(names, self.every(names), centre=self.state.weights == "centred")
        except READ_ERRORS:
            return None

    def render(self) -> None:
        self._layout.visible = self.state.mode == "compare"
        if not self._layout.visible:
            return
        result = self.result()
        self.notice.alert_type = "info"
        names = list(self.state.compare_runs)
        try:
            networks = self.networks(names)
        except READ_ERRORS as error:
            networks = error
        self.match_box.visible = isinstance(networks, list)
        if result is None:
            if len(names) < 2:
                text = "Compare runs: choose a group, or at least two runs."
            elif isinstance(networks, Exception):
                text = html.escape(f"These runs cannot be compared: {networks}")
                self.notice.alert_type = "warning"
            elif networks is not None:
                matched = "hidden units matched" if self.state.match_units else "hidden units as recorded"
                text = f"Press “Compute comparison” to compare these network runs ({matched})."
            else:
                weights = "centred weights" if self.state.weights == "centred" else "raw weights"
                text = f"Press “Compute comparison” to compare these runs ({weights})."
            self.notice.object = text
            self.notice.visible = True
            self.plots[:] = []
            self.caveat.object = self.gauge.object = ""
            return
        self.notice.visible = False
        self.show(result)

    def show(self, result) -> None:
        """Draw a comparison (compare.compare_runs' or network_compare.compare_networks' Dataset)."""
        if "unmatched_distance" in result:
            self.show_networks(result)
            return
        reference = result.attrs["reference_run"]
        spread_map = pixel_map(result.spread_over_classes.values, label="std across runs", diverging=False,
                               title=f"Spread at step {result.attrs['spread_step']:,}, over classes")

        def pane(element):
            return pn.pane.HoloViews(element, linked_axes=False)

        self.plots[:] = [
            pn.FlexBox(pane(distance_curves(result.distance_to_reference, reference)),
                       pane(spread_curve(result.step.values, result.mean_spread.values)),
                       pane(spread_map), pane(similarity_heatmap(result.cosine)),
                       pane(pca_paths(result.pca_path)),
                       pane(variance_bars(result.explained_variance_ratio, result.random_walk_ratio)),
                       pane(random_walk_paths()), sizing_mode="stretch_width"),
        ]
        self.gauge.object = gauge_note(result)
        self.caveat.object = pca_caveat(result)

    def show_networks(self, result) -> None:
        """Draw a comparison of network runs (network_compare.compare_networks' Dataset)."""
        reference = result.attrs["reference_run"]

        def pane(element):
            return pn.pane.HoloViews(element, linked_axes=False)

        distances = (run_curves(result.distance_to_reference, x="step", label="L2 distance",
                                title=f"Distance from {reference}", dashed=result.unmatched_distance,
                                solid_suffix=", units matched", dashed_suffix=", as recorded")
                     if result.attrs["matched"] else distance_curves(result.unmatched_distance, reference))
        self.plots[:] = [
            pn.FlexBox(pane(distances), pane(spread_curve(result.step.values, result.mean_spread.values)),
                       pane(similarity_heatmap(result.cosine)), pane(pca_paths(result.pca_path)),
                       pane(variance_bars(result.explained_variance_ratio, result.random_walk_ratio)),
                       pane(random_walk_paths()), sizing_mode="stretch_width"),
        ]
        self.gauge.object = matching_note(result)
        self.caveat.object = pca_caveat(result)


def pca_caveat(result) -> str:
    """How to read the PCA against a random walk's, and which steps the comparison used."""
    ratio, walk = result.explained_variance_ratio.values, result.random_walk_ratio.values
    second, second_walk = (100 * ratio[1], 100 * walk[1]) if len(ratio) > 1 else (0.0, 0.0)
    return (f"<p><b>Read the PCA with care.</b> The first two components explain {100 * ratio[0]:.1f}% and "
            f"{second:.1f}% of the variance of these trajectories; for a random walk they would explain "
            f"{100 * walk[0]:.1f}% and {second_walk:.1f}%, and its path (grey, dashed) is a smooth curve too. "
            "Smooth, curved paths in PC space are not evidence of structure by themselves (Antognini &amp; "
            "Sohl-Dickstein, <i>PCA of high dimensional random walks with comparison to neural network "
            "training</i>, NeurIPS 2018).</p>"
            f"<p>Similarity at step {result.attrs['similarity_step']:,}, the last step all {len(result.run)} runs have; "
            f"steps used: every {int(np.diff(result.step.values[:2])[0]) if len(result.step) > 1 else 1}.</p>")


def matching_note(result) -> str:
    """What matching the hidden units did to each run's distance from the reference, in words."""
    reference = html.escape(result.attrs["reference_run"])
    step = result.attrs["similarity_step"]
    if not result.attrs["matched"]:
        how = html.escape(result.attrs["matching"])
        return ("<p><b>Hidden units as recorded</b> (" + how + "). A network computes the same function with "
                "the units of a hidden layer in any order, and runs from different seeds learn similar units in "
                "different orders, so these distances include that order, which no prediction depends on. "
                "Tick <i>Match hidden units</i> to compare the runs with their units matched.</p>")
    units = result.attrs["hidden_units"]
    rows = []
    for name in result.other_run.values:
        before = float(result.unmatched_distance.sel(other_run=name).isel(step=-1))
        after = float(result.distance_to_reference.sel(other_run=name).isel(step=-1))
        less = 100 * (1 - after / before) if before > 0 else 0.0
        moved = int(result.moved_units.sel(other_run=name))
        rows.append(f"<tr><td>{html.escape(str(name))}</td><td>{moved} of {units}</td><td>{before:.4g}</td>"
                    f"<td>{after:.4g}</td><td>{less:.0f}%</td></tr>")
    return ("<p><b>Hidden units matched.</b> A network computes the same function with the units of a hidden "
            "layer in any order, and runs from different seeds learn similar units in different orders. So each "
            f"run's hidden units were relabelled to be closest to {reference}'s at step {step:,} (weight matching: "
            "Ainsworth, Hayase &amp; Srinivasa, <i>Git Re-Basin</i>, ICLR 2023) before every chart here; a "
            "relabelled run is the same network, step by step. Dashed lines: the distances as recorded.</p>"
            f"<table class='wl-matching'><tr><th>run</th><th>units relabelled</th><th>distance at step {step:,}, "
            "as recorded</th><th>matched</th><th>less</th></tr>" + "".join(rows) + "</table>")


def gauge_note(result) -> str:
    """Why raw and centred weights differ, with the class-mean part's measured size, in words."""
    reference = result.attrs["reference_run"]
    step = result.attrs["similarity_step"]
    share = float(result.class_mean_fraction.sel(run=reference))
    mean_part = result.class_mean_distance_to_reference.isel(step=-1)
    shown = result.distance_to_reference.isel(step=-1)
    centred = result.attrs["weights"].startswith("centred")
    if centred:
        raw_squared = shown ** 2 + mean_part ** 2
    else:
        raw_squared = shown ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        distance_share = float(np.nanmax(np.where(raw_squared > 0, mean_part ** 2 / raw_squared, np.nan)))
    last = int(result.step.values[-1])
    distance_text = ("" if not np.isfinite(distance_share) else
                     f" and up to {100 * distance_share:.1f}% of a run's squared distance to {html.escape(reference)} "
                     f"at step {last:,}")
    choice = ("These charts use the <b>centred</b> weights (the class-mean removed)." if centred else
              "These charts use the <b>raw</b> weights; choose <i>Centred</i> (left) to leave the class-mean out.")
    return (f"<p><b>Raw or centred.</b> Softmax regression predicts the same when one vector is added to every "
            "class's weights, so each pixel's mean over the classes is a part of the weights that no prediction "
            "depends on (under plain SGD it never leaves its random initial value). Here it is "
            f"{100 * share:.1f}% of the squared weights of {html.escape(reference)} at step {step:,}"
            f"{distance_text}. {choice}</p>")
