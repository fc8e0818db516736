"""The store group's two attributes, typed: ``progress`` (:class:`Progress`) and
``weightlapse`` (:class:`RunMetadata`).

Both are written from these types (``as_dict``, ``to_attributes``) and validated when read
(``parse``): a reader gets the types here or a :class:`TrajectoryError`, never a value of
the wrong type from a file on disk.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from weightlapse.pipeline.store.format import MAX_STEPS, N_CLASSES, TrajectoryError, shown


def marker_time() -> str:
    """Now, as the progress marker's ``updated`` (ISO 8601, UTC, whole seconds)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Progress:
    """The progress marker (group attribute ``progress``), validated."""

    steps_done: int             # last step whose row is committed; -1: none yet
    n_steps: int                # steps planned
    evals_done: int             # held-out evaluations committed
    finished: bool
    updated: str | None = None  # when an unfinished run last moved its marker (ISO 8601)
    error: str | None = None    # why training stopped early
    resume: dict[str, int] | None = None  # the last checkpoint: {"step": s, "row": k}

    @classmethod
    def parse(cls, raw: Any, where: str, *, n_evals: int | None = None) -> Progress:
        if not isinstance(raw, dict):
            raise TrajectoryError(f"{where}: the store has no progress marker; it was not written by weightlapse")

        def whole(key: str, default: int | None = None) -> int:
            value = raw.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TrajectoryError(f"{where}: progress marker: {key} is {shown(value)}, not a whole number; "
                                      "the store is damaged or not written by weightlapse: retrain the run")
            return value

        steps_done, n_steps, evals_done = whole("steps_done"), whole("n_steps"), whole("evals_done", 0)
        if not 0 <= n_steps <= MAX_STEPS:
            raise TrajectoryError(f"{where}: progress marker plans {n_steps:,} steps; weightlapse writes 0 to "
                                  f"{MAX_STEPS:,}: the store is damaged: retrain the run")
        if not -1 <= steps_done <= n_steps:
            raise TrajectoryError(f"{where}: progress marker says {steps_done:,} of {n_steps:,} steps, which cannot "
                                  "be: the store is damaged: retrain the run")
        if not 0 <= evals_done <= (n_evals if n_evals is not None else n_steps + 1):
            raise TrajectoryError(f"{where}: progress marker says {evals_done:,} evaluations done of "
                                  f"{n_evals if n_evals is not None else n_steps + 1:,} planned: the store is damaged")
        finished = raw.get("finished", False)
        if not isinstance(finished, bool):
            raise TrajectoryError(f"{where}: progress marker: finished is {shown(finished)}, not true or false")
        if finished and steps_done != n_steps:
            raise TrajectoryError(f"{where}: progress marker says finished at step {steps_done:,} of {n_steps:,}: "
                                  "the store is damaged: retrain the run")
        updated, error = raw.get("updated"), raw.get("error")
        resume = raw.get("resume")
        if resume is not None:
            if not (isinstance(resume, dict) and all(isinstance(resume.get(key), int)
                                                     and not isinstance(resume.get(key), bool)
                                                     for key in ("step", "row"))):
                raise TrajectoryError(f"{where}: progress marker: resume is {shown(resume)}, not a checkpoint")
            resume = {"step": resume["step"], "row": resume["row"]}
        return cls(steps_done, n_steps, evals_done, finished,
                   updated=updated if isinstance(updated, str) else None,
                   error=None if error is None else str(error)[:2000], resume=resume)

    def as_dict(self) -> dict[str, Any]:
        """The marker as the writer writes it (keys left out when empty)."""
        marker = {"steps_done": self.steps_done, "n_steps": self.n_steps, "evals_done": self.evals_done,
                  "finished": self.finished}
        for key in ("updated", "resume", "error"):
            if getattr(self, key) is not None:
                marker[key] = getattr(self, key)
        return marker


# Longest text kept of each RunMetadata string read from a store (it is shown in the viewer).
_TEXT_LIMITS = {"command": 4000, "git_commit": 200}
_TEXT_LIMIT = 200


@dataclass(frozen=True)
class RunMetadata:
    """How a run was made: the group attribute ``weightlapse`` (less the schema's name and
    version), built by the train stage's ``run_metadata``.

    Written with :meth:`to_attributes`, read with :meth:`parse`. Made here, every field must
    have its type (a clear TypeError otherwise). Read from a store, a value of the wrong
    type reads as absent, and the attribute as written stays in ``raw``.
    """

    run: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    model: str = ""
    dataset: str = ""                           # the dataset's name
    dataset_files: dict[str, str] = field(default_factory=dict)  # file name -> "sha256:..."
    class_names: tuple[str, ...] | None = None  # one per class, when the store says
    n_train: int | None = None                  # training and held-out examples
    n_test: int | None = None
    device: str = ""
    engine: str = ""
    versions: dict[str, str] = field(default_factory=dict)  # package -> version that wrote the run
    git_commit: str | None = None               # the checkout's commit ("-dirty" if changed); None outside git
    command: str = ""
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name, expected in (("run", str), ("model", str), ("dataset", str), ("device", str), ("engine", str),
                               ("command", str), ("params", dict), ("dataset_files", dict), ("versions", dict)):
            _require(name, getattr(self, name), expected)
        for name in ("n_train", "n_test"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise TypeError(f"RunMetadata.{name} must be a count of examples (an int >= 0) or None, "
                                f"got {shown(value)}")
        if self.git_commit is not None:
            _require("git_commit", self.git_commit, str)
        if self.class_names is not None and not (isinstance(self.class_names, tuple)
                                                 and all(isinstance(name, str) for name in self.class_names)):
            raise TypeError(f"RunMetadata.class_names must be a tuple of strings or None, got {shown(self.class_names)}")

    def to_attributes(self) -> dict[str, Any]:
        """The ``weightlapse`` attribute's fields as written to the store, in this order."""
        return {
            "run": self.run,
            "params": self.params,
            "model": self.model,
            "dataset": {"name": self.dataset, "files": self.dataset_files,
                        "class_names": None if self.class_names is None else list(self.class_names),
                        "n_train": self.n_train, "n_test": self.n_test},
            "device": self.device,
            "engine": self.engine,
            "versions": self.versions,
            "git_commit": self.git_commit,
            "command": self.command,
        }

    @classmethod
    def parse(cls, raw: Any, *, n_classes: int = N_CLASSES) -> RunMetadata:
        raw = raw if isinstance(raw, dict) else {}
        dataset = raw.get("dataset") if isinstance(raw.get("dataset"), dict) else {}
        names = dataset.get("class_names")
        class_names = (tuple(str(name)[:100] for name in names)
                       if isinstance(names, list) and len(names) == n_classes else None)

        def text(value: Any, key: str) -> str:
            return value[:_TEXT_LIMITS.get(key, _TEXT_LIMIT)] if isinstance(value, str) else ""

        def count(value: Any) -> int | None:
            return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None

        def texts(value: Any) -> dict[str, str]:
            return ({str(key): value for key, value in value.items() if isinstance(value, str)}
                    if isinstance(value, dict) else {})

        git_commit = raw.get("git_commit")
        return cls(run=text(raw.get("run"), "run"), params=raw["params"] if isinstance(raw.get("params"), dict) else {},
                   model=text(raw.get("model"), "model"), dataset=text(dataset.get("name"), "dataset"),
                   dataset_files=texts(dataset.get("files")), class_names=class_names,
                   n_train=count(dataset.get("n_train")), n_test=count(dataset.get("n_test")),
                   device=text(raw.get("device"), "device"), engine=text(raw.get("engine"), "engine"),
                   versions=texts(raw.get("versions")),
                   git_commit=text(git_commit, "git_commit") if isinstance(git_commit, str) else None,
                   command=text(raw.get("command"), "command"), raw=raw)



def _require(name: str, value: Any, expected: type) -> None:
    if not isinstance(value, expected):
        raise TypeError(f"RunMetadata.{name} must be a {expected.__name__}, got {shown(value)}")
