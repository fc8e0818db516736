"""The view state: everything a page shows is a function of these parameters and the runs.

One ``ViewState`` per page. Components read it and set it (widgets are made from its
parameters); nothing else holds what is shown. The part a user can bookmark is kept in the
page's URL query: :meth:`ViewState.query` writes it, :func:`read_query` checks every value
read back (a run must be one of the listed names; nothing from a URL is ever used as a path).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import re

import param

from weightlapse.pipeline.store import IMAGE_SIDE, N_CLASSES, N_PIXELS
from weightlapse.viewer.analysis.frames import WEIGHT_CHOICES, clamp_step
from weightlapse.viewer.analysis.spacing import DEFAULT_SPACING, SPACINGS
from weightlapse.viewer.analysis.stats import STATISTICS

MODES = {"Replay": "replay", "Side by side": "side-by-side", "Step vs step": "step-diff", "Run vs run": "run-diff",
         "Statistics": "statistics", "Compare runs": "compare"}
SCALES = {"Whole run": "run", "This step": "step", "Per class": "class"}
WEIGHTS = dict(zip(("Raw", "Centred"), WEIGHT_CHOICES))
URL_KEYS = ("run", "compare", "mode", "step", "from", "start", "stop", "stat", "scale", "weights", "follow", "runs",
            "pixel", "class", "side", "spacing", "layer", "at", "every", "match")
PIXEL_VALUE = re.compile(r"(\d{1,2}),(\d{1,2})")  # the inspector's pixel in a URL: "row,column"
LIST_KEYS = ("runs", "side")   # URL values that are lists of runs
MAX_BESIDE = 3                 # runs shown beside the selected one in Side by side
# Longest URL value read: a list of runs may be long; one value is not.
MAX_VALUE = 300
MAX_RUNS_VALUE = 20_000
MAX_EVERY = 10**9              # Compare runs' "every N-th step": more than any run has


class ViewState(param.Parameterized):
    """What one page shows. Run names are names the runs directory lists (or "" for none)."""

    run = param.String(default="", doc="the run shown")
    compare = param.String(default="", doc="the run compared with in Run vs run ('' for none)")
    compare_runs = param.List(default=[], item_type=str, doc="the runs of Compare runs, the reference first")
    side_runs = param.List(default=[], item_type=str, doc="the runs shown beside the run in Side by side (up to 3)")
    mode = param.Selector(objects=MODES, default="replay")
    step = param.Integer(default=0, bounds=(0, None))
    from_step = param.Integer(default=0, bounds=(0, None), doc="the earlier step of Step vs step")
    range_start = param.Integer(default=0, bounds=(0, None), doc="first step of statistics and animations")
    range_stop = param.Integer(default=0, bounds=(0, None), doc="last step of statistics and animations")
    statistic = param.Selector(objects={statistic.title(): name for name, statistic in STATISTICS.items()},
                               default="path_length")
    scale = param.Selector(objects=SCALES, default="run", doc="colour scale: whole run, this step, or per class")
    weights = param.Selector(objects=WEIGHTS, default="raw",
                             doc="raw weights, or centred: the class-mean removed (the part that changes predictions)")
    spacing = param.Selector(objects={label: name for name, (label, _) in SPACINGS.items()}, default=DEFAULT_SPACING,
                             doc="which steps an animation shows: logarithmic, even, or by distance travelled")
    follow = param.Boolean(default=False, doc="keep showing the newest step of a run being written")
    playing = param.Boolean(default=False, doc="the player is playing")
    window_width = param.Integer(default=0, bounds=(0, None),
                                 doc="the browser window's width in CSS pixels (0: not known yet); the grid grows with it")
    revision = param.Integer(default=0, doc="bumped when the data shown changed on disk (new steps, a new store)")
    pixel = param.Integer(default=None, allow_None=True, bounds=(0, N_PIXELS - 1),
                          doc="the pixel the inspector follows over all steps (row * 28 + column); None: none chosen")
    pixel_class = param.Integer(default=0, bounds=(0, N_CLASSES - 1), doc="the class whose weight it highlights")
    layer = param.String(default="", doc="the parameter of a network run shown ('' for its first)")
    weight_index = param.Integer(default=None, allow_None=True, bounds=(0, None),
                                 doc="the weight of the layer the network inspector follows (flat index); None: none")
    compare_every = param.Integer(default=0, bounds=(0, MAX_EVERY),
                                  doc="Compare runs uses every N-th shared step (0: a spacing chosen for the runs)")
    match_units = param.Boolean(default=True,
                                doc="Compare runs matches network runs' hidden units to the reference run's")

    def query(self) -> dict[str, str]:
        """The bookmarkable part, as URL query values."""
        return {"run": self.run, "compare": self.compare, "mode": self.mode, "step": str(self.step),
                "from": str(self.from_step), "start": str(self.range_start), "stop": str(self.range_stop),
                "stat": self.statistic, "scale": self.scale, "weights": self.weights, "follow": "1" if self.follow else "0",
                "runs": ",".join(self.compare_runs),
                "pixel": "" if self.pixel is None else f"{self.pixel // IMAGE_SIDE},{self.pixel % IMAGE_SIDE}",
                "class": str(self.pixel_class), "side": ",".join(self.side_runs), "spacing": self.spacing,
                # A network run's layer and weight, only when chosen: a softmax-regression run's link is as before.
                **({"layer": self.layer} if self.layer else {}),
                **({"at": str(self.weight_index)} if self.weight_index is not None else {}),
                # Compare runs' choices, only when changed from their defaults
                **({"every": str(self.compare_every)} if self.compare_every else {}),
                **({} if self.match_units else {"match": "0"})}

    def shown_runs(self) -> list[str]:
        """The runs Side by side shows: the run, then those beside it (each once, at most four)."""
        return list(dict.fromkeys(name for name in (self.run, *self.side_runs) if name))[:MAX_BESIDE + 1]


def read_query(query: Mapping[str, str], *, names: list[str], last_step: Callable[[str], int],
               default_run: str = "", parameters: Callable[[str], dict[str, int]] | None = None) -> tuple[dict, list]:
    """Checked state values from URL query values, and what could not be used, in words.

    ``names``: the readable runs; ``last_step(name)``: a run's newest step; ``default_run``:
    the run shown when the query names none (or none that can be read); ``parameters(name)``:
    a network run's parameters and their sizes ({} for other runs). Only values that pass are
    returned (the run always); a step past the run's end is clamped to it.
    """
    values, problems = {}, []
    query = {key: str(value)[:MAX_RUNS_VALUE if key in LIST_KEYS else MAX_VALUE] for key, value in query.items()}
    for key, what in (("run", "run"), ("compare", "run to compare with")):
        name = query.get(key)
        if name:
            if name in names:
                values[key] = name
            else:
                problems.append(f"no readable {what} named {name[:80]!r} here")
    for key, name, allowed, what in (("mode", "mode", MODES.values(), "mode"),
                                     ("stat", "statistic", STATISTICS, "statistic"),
                                     ("scale", "scale", SCALES.values(), "colour scale"),
                                     ("weights", "weights", WEIGHTS.values(), "weights choice"),
                                     ("spacing", "spacing", SPACINGS, "frame spacing")):
        if key in query:
            if query[key] in allowed:
                values[name] = query[key]
            else:
                problems.append(f"unknown {what} {query[key][:40]!r}")
    for key, name in (("follow", "follow"), ("match", "match_units")):
        if query.get(key) in ("0", "1"):
            values[name] = query[key] == "1"
        elif query.get(key):
            problems.append(f"{key} {query[key][:40]!r} is not 0 or 1")
    every = query.get("every")
    if every:
        if every.isascii() and every.isdigit() and int(every) <= MAX_EVERY:
            values["compare_every"] = int(every)
        else:
            problems.append(f"every {every[:40]!r} is not a number of steps (0 to {MAX_EVERY:,})")
    _read_pixel(query, values, problems)
    run = values.setdefault("run", default_run)
    last = last_step(run) if run else -1
    for key, name in (("step", "step"), ("from", "from_step"), ("start", "range_start"), ("stop", "range_stop")):
        if key in query and run:
            step, problem = clamp_step(query[key], max(last, 0))
            values[name] = step
            if problem:
                problems.append(problem if key == "step" else f"{key}: {problem}")
    if query.get("runs"):
        chosen = [name for name in query["runs"].split(",") if name]
        unknown = [name for name in chosen if name not in names]
        if unknown:
            problems.append(f"no readable run named {unknown[0][:80]!r} to compare")
        values["compare_runs"] = list(dict.fromkeys(name for name in chosen if name in names))
    if query.get("side"):
        chosen = [name for name in query["side"].split(",") if name]
        unknown = [name for name in chosen if name not in names]
        if unknown:
            problems.append(f"no readable run named {unknown[0][:80]!r} to show side by side")
        beside = [name for name in dict.fromkeys(chosen) if name in names and name != run]
        if len(beside) > MAX_BESIDE:
            problems.append(f"side by side shows up to {MAX_BESIDE} runs beside the run, not {len(beside)}; "
                            f"showing the first {MAX_BESIDE}")
        values["side_runs"] = beside[:MAX_BESIDE]
    _read_layer(query, values, problems, parameters(run) if parameters is not None and run else {})
    return values, problems


def _read_layer(query: Mapping[str, str], values: dict, problems: list, sizes: dict[str, int]) -> None:
    """A network run's layer (one of its parameters) and the weight followed in it (a flat index)."""
    layer = query.get("layer")
    if layer:
        if layer in sizes:
            values["layer"] = layer
        else:
            problems.append(f"this run has no layer named {layer[:80]!r}" if sizes
                            else "layer: this run records no network")
    at = query.get("at")
    if at:
        size = sizes.get(values.get("layer") or next(iter(sizes), ""), 0)
        if at.isascii() and at.isdigit() and int(at) < size:
            values["weight_index"] = int(at)
        else:
            problems.append(f"weight {at[:40]!r} is not one of the layer's {size:,} weights")


def _read_pixel(query: Mapping[str, str], values: dict, problems: list) -> None:
    """The inspector's pixel ("row,column" of a 28x28 image) and class (0..9), when valid."""
    if query.get("pixel"):
        match = PIXEL_VALUE.fullmatch(query["pixel"])
        if match and all(int(part) < IMAGE_SIDE for part in match.groups()):
            values["pixel"] = int(match[1]) * IMAGE_SIDE + int(match[2])
        else:
            problems.append(f"pixel {query['pixel'][:40]!r} is not a row,column of a {IMAGE_SIDE}x{IMAGE_SIDE} image")
    if query.get("class"):
        if query["class"].isdigit() and query["class"].isascii() and int(query["class"]) < N_CLASSES:
            values["pixel_class"] = int(query["class"])
        else:
            problems.append(f"class {query['class'][:40]!r} is not one of 0..{N_CLASSES - 1}")
