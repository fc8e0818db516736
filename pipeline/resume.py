"""Where an interrupted run carries on: :func:`find_resume_point` reads the checkpoint its
store's progress marker names, if the store was started by the same run.

A resumed run writes the steps after the checkpoint again, over whatever is there, and
ends bit for bit as an uninterrupted one (tests/test_resume.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from weightlapse.pipeline.run_files import links_in
from weightlapse.pipeline.store import NetworkLayout, Progress, RunMetadata, StoreLayout, TrajectoryError, open_store

# What must be the same for a run to carry on in an existing store: the name a refusal
# gives, and the RunMetadata fields it stands for.
RESUME_MUST_MATCH = {
    "model": ("model",),
    "params": ("params",),
    "dataset": ("dataset", "dataset_files", "class_names", "n_train", "n_test"),
    "engine": ("engine",),
}


@dataclass(frozen=True)
class ResumePoint:
    """Where an interrupted run can carry on: its state after ``step`` steps, read from its store."""
    step: int
    # after ``step`` steps, in the model's order: softmax regression's (class, pixel) weights
    # and its bias, if any; a network's parameters (pipeline.layers.parameter_shapes)
    parameters: tuple[np.ndarray, ...]
    optimizer_state: np.ndarray   # the vector saved with the checkpoint
    row: int                      # resume_state row holding it
    losses: np.ndarray            # loss of steps 1 .. step
    heldout: np.ndarray           # (evals_done, 2): accuracy and loss of the evaluations written

    @property
    def weight(self) -> np.ndarray:  # softmax regression's (class, pixel)
        return self.parameters[0]

    @property
    def bias(self) -> np.ndarray | None:  # softmax regression's (class,), if it has one
        return self.parameters[1] if len(self.parameters) > 1 else None


def find_resume_point(path: str | Path, layout: StoreLayout | NetworkLayout, metadata: RunMetadata
                      ) -> ResumePoint | str:
    """Where the unfinished run in the store at ``path`` can carry on, or why it cannot.

    It can when the store was started with the same model, params, dataset and engine as
    ``metadata`` describes and holds a checkpoint: the step the progress marker names, its
    weights (a network store: every parameter, ``layout`` being planned) and its optimizer state.
    """
    names = layout.names if isinstance(layout, NetworkLayout) else ("weights", "bias")[:1 + layout.bias]
    path = Path(path)
    links = links_in(path)
    if links:
        return f"it holds a symbolic link ({links[0]}), which the writer would write through"
    try:
        group = open_store(path)
        stored = RunMetadata.parse(group.attrs["weightlapse"])
        progress = Progress.parse(group.attrs.get("progress"), str(path))
    except (TrajectoryError, KeyError, TypeError) as error:
        return f"it is not a readable trajectory ({error})"
    if progress.finished:
        return "it is finished"
    differing = differs(stored, metadata)
    if differing:
        return f"it was started with other {differing}"
    if progress.resume is None:
        return "it has no checkpoint yet"
    step, row = progress.resume["step"], progress.resume["row"]
    try:
        if not (0 <= step <= progress.steps_done and row in (0, 1)):
            raise ValueError(f"checkpoint {progress.resume} beyond the marker {progress.steps_done}")
        if any(group[name].shape[0] != layout.n_steps + 1 for name in names) or (
                layout.resume_size and group["resume_state"].shape != (2, layout.resume_size)):
            raise ValueError("array shapes differ from this run's")
        parameters = tuple(group[name][step] for name in names)
        state = group["resume_state"][row] if layout.resume_size else np.zeros(0, np.float32)
        evals_done = sum(1 for e in layout.eval_steps[:progress.evals_done] if e <= step)
        heldout = np.stack([group["heldout_accuracy"][:evals_done], group["heldout_loss"][:evals_done]], axis=1)
        losses = group["loss"][1:step + 1]
    except (KeyError, ValueError, TypeError) as error:
        return f"its checkpoint cannot be used ({error})"
    if not (all(np.isfinite(value).all() for value in parameters) and np.isfinite(state).all()
            and np.isfinite(losses).all()):
        return "its checkpoint holds values that are not finite"
    return ResumePoint(step=step, parameters=parameters, optimizer_state=state, row=row, losses=losses,
                       heldout=heldout)


def differs(stored: RunMetadata, metadata: RunMetadata) -> str | None:
    """What of :data:`RESUME_MUST_MATCH` differs between a store's metadata and a run's, or None."""
    for name, fields in RESUME_MUST_MATCH.items():
        if any(_as_json(getattr(stored, field)) != _as_json(getattr(metadata, field)) for field in fields):
            return name
    return None


def remove_partial_files(path: Path) -> None:
    """Temporary files a killed writer left (ours and zarr's): never data, and no part of a clean store."""
    for leftover in path.rglob("*.partial"):
        leftover.unlink(missing_ok=True)


def _as_json(value: Any) -> Any:
    """``value`` as it reads back from the store's JSON (tuples as lists, say)."""
    return json.loads(json.dumps(value))
