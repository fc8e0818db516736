"""The run picker: which run (and which to compare with), the runs table and the run's state.

Run names, params and messages come from disk: every one is escaped before it reaches an
HTML pane, and the selects show them as option text.
"""

from __future__ import annotations

import html

import panel as pn
import param

from weightlapse.viewer.analysis.runs import RunInfo
from weightlapse.viewer.data import DataStore
from weightlapse.viewer.state import ViewState
from weightlapse.viewer.tiles import READ_ERRORS

NO_RUN = "(none)"
TABLE_CSS = """
table.wl-runs { border-collapse: collapse; font-size: 12px; }
table.wl-runs th, table.wl-runs td { padding: 2px 8px; border-bottom: 1px solid rgba(128,128,128,.35);
  text-align: left; }
table.wl-runs tr.run-broken td, table.wl-runs tr.run-failed td { color: #d33; }
table.wl-runs tr.run-being-written td { color: #3a8ee6; }
"""


def text_options(names: list[str]) -> dict[str, str]:
    """MultiChoice options that show each name as text: {label: name}.

    Bokeh's MultiChoice draws its labels with Choices.js, which renders them as HTML, so a
    run named ``<img src=x onerror=...>`` would run its script; an escaped label reads as
    the name itself. The widget's value stays the names.
    """
    return {html.escape(name): name for name in names}


def escape(value: object) -> str:
    return html.escape(str(value), quote=True)


def runs_table_html(infos: list[RunInfo]) -> str:
    """The runs table. Every value is escaped: run names and attributes are untrusted."""
    if not infos:
        return ""
    head = "".join(f"<th>{title}</th>" for title in
                   ("run", "state", "dataset", "optimizer", "lr", "seed", "steps", "accuracy", "final loss"))
    rows = []
    for info in infos:
        params = info.params
        accuracy = info.metrics.get("heldout_accuracy")
        loss = info.metrics.get("final_train_loss")
        steps = f"{info.steps_done:,} / {info.n_steps:,}" if info.n_steps else ""
        state = info.state + (f": {info.message}" if info.message else "")
        cells = [info.name, state, info.dataset, params.get("optimizer", ""), params.get("lr", ""),
                 params.get("seed", ""), steps,
                 f"{accuracy:.4f}" if isinstance(accuracy, (int, float)) else "",
                 f"{loss:.4f}" if isinstance(loss, (int, float)) else ""]
        rows.append(f'<tr class="run-{escape(info.state.replace(" ", "-"))}">'
                    + "".join(f"<td>{escape(cell)[:300]}</td>" for cell in cells) + "</tr>")
    return f'<table class="wl-runs"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def directory_problem(store: DataStore, infos: list[RunInfo]) -> str:
    """What is wrong with the runs directory as a whole, in words ('' when nothing is)."""
    where = store.runs_dir
    if not where.is_dir():
        return (f"No runs directory at {where}. Train runs with `dvc repro`, or point the viewer at another "
                "directory: panel serve viewer/ --args --runs DIR (or WEIGHTLAPSE_RUNS=DIR).")
    if not infos:
        return f"No runs in {where} yet. Train some with `dvc repro`; they appear here by themselves."
    if not any(info.readable for info in infos):
        return "None of the runs can be opened yet; the table below says why."
    return ""


class RunPicker(pn.viewable.Viewer):
    state = param.ClassSelector(class_=ViewState)
    store = param.ClassSelector(class_=DataStore)

    def __init__(self, **params) -> None:
        super().__init__(**params)
        self.run_select = pn.widgets.Select(label="Run", options=[], sizing_mode="stretch_width")
        self.compare_select = pn.widgets.Select(label="Compare with (Run vs run)", options=[NO_RUN],
                                                sizing_mode="stretch_width")
        self.status = pn.pane.HTML("", css_classes=["wl-state"])
        self.table = pn.pane.HTML("", stylesheets=[TABLE_CSS], sizing_mode="stretch_width", css_classes=["wl-table"])
        self.problem = pn.pane.Alert("", alert_type="warning", visible=False, sizing_mode="stretch_width")
        self.run_select.param.watch(lambda event: self._pick("run", event.new), "value")
        self.compare_select.param.watch(lambda event: self._pick("compare", event.new), "value")
        self.state.param.watch(lambda *events: self._show_selection(), ["run", "compare"])
        self.state.param.watch(lambda *events: self._show_status(), ["run", "revision"])
        self.refresh(self.store.runs())

    def __panel__(self):
        return pn.Column(self.run_select, self.compare_select, self.status, sizing_mode="stretch_width")

    def _pick(self, key: str, value) -> None:
        setattr(self.state, key, "" if value in (None, NO_RUN) else value)

    def refresh(self, infos: list[RunInfo]) -> None:
        """Show the runs as listed now: options, table, the directory's problem, the run's state."""
        readable = [info.name for info in infos if info.readable]
        # The state's run stays listed while it is briefly unreadable (a store being created
        # anew): a retrained run keeps its page.
        listed = [info.name for info in infos]
        for name in (self.state.run, self.state.compare):
            if name and name in listed and name not in readable:
                readable.append(name)
        # Options and value together: the value stays the state's run, never whatever the
        # select would fall back to while its options change.
        if self.run_select.options != readable:
            self.run_select.param.update(options=readable,
                                         value=self.state.run if self.state.run in readable else None)
        if self.compare_select.options != [NO_RUN, *readable]:
            self.compare_select.param.update(options=[NO_RUN, *readable],
                                             value=self.state.compare if self.state.compare in readable else NO_RUN)
        table = runs_table_html(infos)
        if self.table.object != table:
            self.table.object = table
        problem = directory_problem(self.store, infos)
        self.problem.object, self.problem.visible = escape(problem), bool(problem)
        self._show_selection()
        self._show_status(infos)

    def _show_selection(self) -> None:
        run = self.state.run if self.state.run in self.run_select.options else None
        if self.run_select.value != run:
            self.run_select.value = run
        compare = self.state.compare if self.state.compare in self.compare_select.options else NO_RUN
        if self.compare_select.value != compare:
            self.compare_select.value = compare

    def _show_status(self, infos: list[RunInfo] | None = None) -> None:
        if not self.state.run:
            self.status.object = ""
            return
        info = next((info for info in infos or self.store.runs() if info.name == self.state.run), None)
        try:
            run = self.store.open(self.state.run)
        except READ_ERRORS:
            self.status.object = ""
            return
        state = info.state if info is not None else ("finished" if run.finished else "not finished")
        self.status.object = (f"<small>step {run.last_step:,} of {run.progress.n_steps:,} written, "
                              f"<span class='wl-run-state'>{escape(state)}</span></small>")
