"""The viewer's "Compare runs" mode: a group of runs (e.g. a sweep's seeds) side by side.

Pick a group from the runs index (runs that differ only in seed) or runs by hand; the
comparison (viewer/analysis/compare.py) is computed on a worker thread, with a progress bar, and
shown as pictures: distance from the first run over steps, spread across the runs over
steps and per pixel, the similarity matrix, and the trajectories in a shared PCA basis
beside what the same analysis makes of a random walk.
"""

from __future__ import annotations

import asyncio
import html
import math
from collections.abc import Callable

import numpy as np
import panel as pn

from weightlapse.pipeline.store import TrajectoryError
from weightlapse.viewer.analysis import compare
from weightlapse.viewer.plots import (
    distance_curves,
    pca_paths,
    pixel_map,
    random_walk_paths,
    similarity_heatmap,
    spread_curve,
    variance_bars,
)
from weightlapse.viewer.analysis.runs import RunCatalog, RunInfo

BY_HAND = "(choose runs below)"
# Shared steps drawn per run by default: plenty for the pictures, and a 12-run sweep of
# 3,000-step runs compares in seconds. "Every" = 1 uses every step.
DEFAULT_POINTS = 500


def text_options(names: list[str]) -> dict[str, str]:
    """MultiChoice options that show each name as text: {label: name}.

    Bokeh's MultiChoice draws its labels with Choices.js, which renders them as HTML, so a
    run named ``<img src=x onerror=...>`` would run its script; an escaped label reads as
    the name itself. The widget's value stays the names.
    """
    return {html.escape(name): name for name in names}


class RunComparison(pn.viewable.Viewer):
    """Widgets and pictures of one comparison; ``say`` shows messages in the app."""

    def __init__(self, catalog: RunCatalog, say: Callable[[str, str], None], *, scheduler=None) -> None:
        super().__init__()
        self.catalog = catalog
        self.scheduler = scheduler
        self.say = say
        self.result = None
        self.group_select = pn.widgets.Select(label="Group (runs differing only in seed)", options=[BY_HAND],
                                              width=360)
        self.runs_choice = pn.widgets.MultiChoice(label="Runs to compare (the first is the reference)", options=[],
                                                  width=520)
        self.every_input = pn.widgets.IntInput(label="Every N-th step (0: auto)", value=0, start=0, width=170)
        self.compare_button = pn.widgets.Button(label="Compute comparison", color="primary", width=180)
        self.progress = pn.indicators.Progress(value=0, max=100, visible=False, width=300)
        self.caveat = pn.pane.HTML("", sizing_mode="stretch_width", css_classes=["wl-caveat"])
        self.plots = pn.Column(sizing_mode="stretch_width", css_classes=["wl-comparison"])
        self.group_select.param.watch(lambda event: self._pick_group(event.new), "value")
        self.compare_button.on_click(self._compare_clicked)
        self._groups: dict[str, list[str]] = {}
        self._layout = pn.Column(
            pn.Row(self.group_select, self.every_input), self.runs_choice, pn.Row(self.compare_button, self.progress),
            self.plots, self.caveat, sizing_mode="stretch_width")

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout

    def set_visible(self, visible: bool) -> None:
        self._layout.visible = visible

    def update_runs(self, infos: list[RunInfo], selected: str | None = None) -> None:
        """New run list (after a rescan): refresh the groups, and preselect the selected run's group."""
        readable = [info.name for info in infos if info.readable]
        index = self.catalog.index(infos)
        index = index[index.index.isin(readable)]
        self._groups = {group: list(members.index) for group, members in index.groupby("group", sort=True)
                        if group and len(members) >= 2}
        self.runs_choice.options = text_options(readable)
        self.group_select.options = [BY_HAND, *self._groups]
        if selected is not None and not self.runs_choice.value:
            for group, members in self._groups.items():
                if selected in members:
                    self.group_select.value = group
                    break

    def _pick_group(self, group: str) -> None:
        if group in self._groups:
            self.runs_choice.value = list(self._groups[group])

    async def _compare_clicked(self, event=None) -> None:
        names = list(self.runs_choice.value)
        if len(names) < 2:
            self.say("Compare runs: choose a group, or at least two runs.", "info")
            return
        self.compare_button.disabled = True
        self.progress.visible, self.progress.value = True, 0

        def report(fraction: float) -> None:
            self.progress.value = min(100, int(fraction * 100))

        try:
            result = await asyncio.get_running_loop().run_in_executor(None, lambda: self.compute(names, report))
        except (TrajectoryError, OSError, ValueError) as error:  # ClusterError is an OSError
            self.say(f"Comparison failed: {error}", "error")
            return
        finally:
            self.compare_button.disabled = False
            self.progress.visible = False
        self.say("", "info")
        self.show(result)

    def compute(self, names: list[str], progress=None):
        runs = compare.open_trajectories(self.catalog, names)
        every = self.every_input.value or max(1, math.ceil(min(w.sizes["step"] for w in runs.values())
                                                           / DEFAULT_POINTS))
        self.result = compare.compare_runs(runs, every=every, progress=progress, scheduler=self.scheduler)
        return self.result

    def show(self, result) -> None:
        """Draw a comparison (compare.compare_runs' Dataset)."""
        reference = result.attrs["reference_run"]
        spread_step = result.attrs["spread_step"]
        distance = distance_curves(result.distance_to_reference, reference)
        spread = spread_curve(result.step.values, result.mean_spread.values)
        spread_map = pixel_map(result.spread_over_classes.values, label="std across runs", diverging=False,
                               title=f"Spread at step {spread_step:,}, over classes")
        ratio = result.explained_variance_ratio.values
        walk = result.random_walk_ratio.values
        self.plots[:] = [
            pn.Row(pn.pane.HoloViews(distance, linked_axes=False), pn.pane.HoloViews(spread, linked_axes=False)),
            pn.Row(pn.pane.HoloViews(spread_map, linked_axes=False),
                   pn.pane.HoloViews(similarity_heatmap(result.cosine), linked_axes=False)),
            pn.Row(pn.pane.HoloViews(pca_paths(result.pca_path), linked_axes=False),
                   pn.Column(pn.pane.HoloViews(variance_bars(result.explained_variance_ratio, result.random_walk_ratio),
                                               linked_axes=False),
                             pn.pane.HoloViews(random_walk_paths(), linked_axes=False))),
        ]
        self.caveat.object = (
            f"<p><b>Read the PCA with care.</b> The first two components explain {100 * ratio[0]:.1f}% and "
            f"{100 * ratio[1]:.1f}% of the variance of these trajectories; for a random walk they would explain "
            f"{100 * walk[0]:.1f}% and {100 * walk[1]:.1f}%, and its path (grey, dashed) is a smooth curve too. "
            "Smooth, curved paths in PC space are not evidence of structure by themselves (Antognini &amp; "
            "Sohl-Dickstein, <i>PCA of high dimensional random walks with comparison to neural network "
            "training</i>, NeurIPS 2018).</p>"
            f"<p>Similarity at step {result.attrs['similarity_step']:,}, the last step all {len(result.run)} runs have; "
            f"steps used: every {int(np.diff(result.step.values[:2])[0]) if len(result.step) > 1 else 1}.</p>")

