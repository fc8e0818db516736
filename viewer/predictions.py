"""Compare runs, in function space: whether the chosen runs predict alike on the held-out images.

Beside the weight-space comparison (viewer/comparison.py), on the same runs: how often each
run predicts the reference run's class, the symmetrised KL divergence between their
predictive distributions, each run's held-out accuracy, and the reference run's confusion
matrix at the page's step (viewer/analysis/function_space.py computes them, from the stored
weights). Runs far apart in weight space can predict alike; this is what tells.
"""

from __future__ import annotations

import html

import holoviews as hv
import numpy as np
import panel as pn
import param

from weightlapse.pipeline.datasets import DatasetError
from weightlapse.viewer.data import DataStore
from weightlapse.viewer.plots import accuracy_curves, confusion_heatmap, pair_curves, run_curves
from weightlapse.viewer.state import ViewState
from weightlapse.viewer.tasks import in_worker
from weightlapse.viewer.tiles import READ_ERRORS, with_document_lock

PREDICTION_ERRORS = (*READ_ERRORS, DatasetError)


class Predictions(pn.viewable.Viewer):
    """The function-space part of Compare runs; ``every`` gives the comparison's step spacing."""

    state = param.ClassSelector(class_=ViewState)
    store = param.ClassSelector(class_=DataStore)
    every = param.Callable(doc="names -> every how many steps the comparison uses")

    def __init__(self, **params) -> None:
        super().__init__(**params)
        self.compute_button = pn.widgets.Button(label="Compare predictions on held-out images", color="primary",
                                                width=300)
        self.progress = pn.indicators.Progress(value=0, max=100, visible=False, width=300)
        self.notice = pn.pane.Alert("", alert_type="info", visible=False, sizing_mode="stretch_width")
        self.plots = pn.Column(sizing_mode="stretch_width", css_classes=["wl-predictions"])
        self.confusion = pn.Column(sizing_mode="stretch_width")
        self.summary = pn.pane.HTML("", sizing_mode="stretch_width")
        self.compute_button.on_click(self.compute)
        self.state.param.watch(lambda *events: self.render(), ["compare_runs", "mode", "revision"])
        self.state.param.watch(lambda *events: self.render_confusion(), ["compare_runs", "mode", "step", "revision"])
        self._layout = pn.Column(pn.pane.HTML("<h3>Predictions on the held-out images</h3>"),
                                 pn.Row(self.compute_button, self.progress), self.notice, self.plots, self.summary, self.confusion,
                                 sizing_mode="stretch_width")
        self.render()
        self.render_confusion()

    def __panel__(self):
        return self._layout

    def say(self, text: str, kind: str = "info") -> None:
        self.notice.object, self.notice.alert_type, self.notice.visible = html.escape(text), kind, bool(text)

    async def compute(self, event=None) -> None:
        names = list(self.state.compare_runs)
        if len(names) < 2:
            self.say("Choose a group, or at least two runs, to compare their predictions.")
            return
        try:
            every = self.every(names)
            await in_worker(self.compute_button, self.progress,
                            lambda report: self.store.compute_predictions(names, every, progress=report))
        except PREDICTION_ERRORS as error:
            self.say(f"Predictions cannot be compared: {error}", "danger")
            return
        with_document_lock(lambda: setattr(self.state, "revision", self.state.revision + 1))

    def result(self):
        names = list(self.state.compare_runs)
        if len(names) < 2:
            return None
        try:
            return self.store.predictions(names, self.every(names))
        except READ_ERRORS:
            return None

    def render(self) -> None:
        if self.state.mode != "compare":  # hidden with Compare runs' own layout
            return
        result = self.result()
        if result is None:
            self.plots[:] = []
            self.summary.object = ""
            self.say("" if len(self.state.compare_runs) < 2 else
                     "Press “Compare predictions” to see how often these runs predict the same class.")
            return
        self.say("")
        reference = str(result.run.values[0])
        last = int(result.step.values[-1])
        agreement = result.agreement.isel(step=-1)
        mean = float(agreement.mean()) if agreement.size else float("nan")
        # One under the other: in a FlexBox nested this deep, Bokeh drew these plots zero pixels wide.
        self.plots[:] = [
            pn.Column(pn.pane.HoloViews(pair_curves(result.agreement, reference, label="same class predicted",
                                                     title=f"Agreement with {reference}"), linked_axes=False),
                       pn.pane.HoloViews(pair_curves(result.symmetric_kl, reference, label="symmetric KL (nats)",
                                                     title=f"Divergence from {reference}'s predictions"),
                                         linked_axes=False),
                       pn.pane.HoloViews(accuracy_curves(result.accuracy), linked_axes=False),
                       *([pn.pane.HoloViews(line_curves(result), linked_axes=False)] if "line_loss" in result else [])),
        ]
        self.summary.object = (f"<p>On {result.attrs['n_images']:,} held-out {html.escape(result.attrs['dataset'])} images "
                         f"at step {last:,}: the pairs of runs predict the same class for {100 * mean:.1f}% of the "
                         "images on average (over all pairs).</p>" + line_note(result))

    def render_confusion(self) -> None:
        if self.state.mode != "compare" or not self.state.compare_runs:
            self.confusion[:] = []
            return
        reference = self.state.compare_runs[0]
        try:
            run = self.store.open(reference)
            step = min(self.state.step, run.last_step)
            counts = self.store.confusion(reference, step)
        except PREDICTION_ERRORS as error:
            self.confusion[:] = [pn.pane.HTML(f"<p>No confusion matrix of {html.escape(reference)}: "
                                              f"{html.escape(str(error))}</p>", sizing_mode="stretch_width")]
            return
        accuracy = counts.values.trace() / max(int(counts.values.sum()), 1)
        # The run's name above the matrix, where a long one wraps: the matrix's own title is as
        # narrow as the matrix.
        self.confusion[:] = [
            pn.pane.HTML(f"<h4>Confusion matrix of {html.escape(reference)}</h4>", sizing_mode="stretch_width"),
            pn.pane.HoloViews(confusion_heatmap(
                counts, run.class_names or [str(index) for index in range(counts.sizes["true"])],
                title=f"Step {step:,}: {100 * accuracy:.1f}% right"), linked_axes=False)]


def line_curves(result):
    """The held-out loss on the line from the first run's weights to each other run's."""
    title = "Held-out loss on the line between runs"
    axis = "alpha, from the first run (0) to each run (1)"
    if result.attrs["line_matched"]:
        curves = run_curves(result.line_matched_loss, x="alpha", label="held-out loss (nats)", title=title,
                            dashed=result.line_loss, solid_suffix=", units matched", dashed_suffix=", as recorded")
    else:
        curves = run_curves(result.line_loss, x="alpha", label="held-out loss (nats)", title=title)
    return curves.opts(hv.opts.Curve(xlabel=axis))


def barrier(loss: np.ndarray) -> float:
    """How far the loss on the line rises above the straight line between its two ends (nats)."""
    ends = loss[0] + (loss[-1] - loss[0]) * np.linspace(0.0, 1.0, len(loss))
    return float(np.max(loss - ends))


def line_note(result) -> str:
    """The barrier on each line, as recorded and matched, in words (or why there is no line)."""
    if "line_loss" not in result:
        problem = result.attrs.get("line_problem")
        return "" if problem is None else f"<p>No line between the runs: {html.escape(problem)}.</p>"
    reference = html.escape(result.attrs["line_reference_run"])
    parts = []
    for name in result.other_run.values:
        recorded = barrier(result.line_loss.sel(other_run=name).values)
        text = f"{html.escape(str(name))}: {recorded:.3g} nats"
        if result.attrs["line_matched"]:
            text += f" as recorded, {barrier(result.line_matched_loss.sel(other_run=name).values):.3g} with units matched"
        parts.append(text)
    matched = ("" if not result.attrs["line_matched"] else
               " With hidden units matched (the same networks, their units relabelled), a barrier that was only the "
               "units' order goes (Ainsworth et al., <i>Git Re-Basin</i>, ICLR 2023).")
    return (f"<p><b>Between the runs.</b> The held-out loss at the weights (1 − α) · {reference} + α · run, at step "
            f"{result.attrs['line_step']:,}: a rise above the straight line between the ends (a barrier) says the runs "
            "lie in different basins of the loss, none that they are linearly connected (Frankle et al., ICML 2020)."
            f"{matched} Barrier: {'; '.join(parts)}.</p>")
