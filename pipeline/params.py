"""Read ``params.yaml`` once and validate it into typed objects.

Every stage calls :func:`load_params`; nothing else parses the file. An unknown or
missing key, or an impossible value, is a :class:`ParamsError` that names the key and
says what would be accepted, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pipeline.datasets import DATASETS

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
DEVICES = ("auto", "cpu", "cuda")
# How training steps run: "numpy" is the closed-form softmax-regression gradient on the
# CPU (pipeline.closed_form), "torch" is autograd on any device, "cuda-graph" is autograd
# replayed as a CUDA graph with capture into a device ring (pipeline.graph_engine); "auto"
# picks numpy on the CPU where it applies, cuda-graph on CUDA where it applies, else torch.
ENGINES = ("auto", "numpy", "torch", "cuda-graph")
CLOSED_FORM_OPTIMIZERS = ("adam", "adamw", "sgd")
# The axes of the sweep grid, in the order dvc.yaml's matrix expands them (the last varies fastest).
SWEEP_AXES = ("optimizer", "lr", "batch_size", "seed")


class ParamsError(ValueError):
    """params.yaml holds a key or value that the pipeline cannot use."""


@dataclass(frozen=True)
class DataParams:
    dataset: str = "mnist"

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ParamsError(
                f"dataset: unknown dataset {self.dataset!r}; "
                f"choose one of {', '.join(sorted(DATASETS))}"
            )


@dataclass(frozen=True)
class CaptureParams:
    # Also store the gradient used at each step (doubles the store's size).
    gradients: bool = False
    # Steps per Zarr chunk along the step axis: small enough that reading one step
    # decompresses little, large enough that a long run has few files.
    chunk_steps: int = 64

    def __post_init__(self) -> None:
        _check_positive_int("chunk_steps", self.chunk_steps)


@dataclass(frozen=True)
class TrainParams:
    """One run's training setup. Defaults reproduce the original study."""

    bias: bool = False
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 20
    epochs: int = 1
    max_steps: int | None = None
    seed: int = 0
    device: str = "auto"
    engine: str = "auto"
    # Held-out accuracy is measured at step 0, every eval_every steps, and at the end.
    eval_every: int = 100
    capture: CaptureParams = field(default_factory=CaptureParams)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ParamsError(
                f"optimizer: unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"
            )
        if self.device not in DEVICES:
            raise ParamsError(f"device: {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.engine not in ENGINES:
            raise ParamsError(f"engine: {self.engine!r} is not one of {', '.join(ENGINES)}")
        if self.engine == "cuda-graph" and self.device == "cpu":
            raise ParamsError("engine: cuda-graph needs a CUDA GPU; with device: cpu use engine: numpy, torch or auto")
        if self.engine == "numpy" and self.device == "cuda":
            raise ParamsError("engine: numpy runs on the CPU only; with device: cuda use engine: torch (or auto)")
        if self.engine == "numpy" and self.optimizer not in CLOSED_FORM_OPTIMIZERS:
            raise ParamsError(f"engine: numpy implements {', '.join(CLOSED_FORM_OPTIMIZERS)}, not "
                              f"{self.optimizer!r}; use engine: torch (or auto)")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ParamsError(f"lr: must be a positive number, got {self.lr!r}")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise ParamsError(f"momentum: must be in [0, 1), got {self.momentum!r}")
        if self.momentum and self.optimizer not in ("sgd", "rmsprop"):
            raise ParamsError(
                f"momentum: {self.optimizer} has no momentum parameter (it uses betas); "
                "set momentum to 0 or use sgd/rmsprop"
            )
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ParamsError(f"weight_decay: must be >= 0, got {self.weight_decay!r}")
        _check_positive_int("batch_size", self.batch_size)
        _check_positive_int("epochs", self.epochs)
        _check_positive_int("eval_every", self.eval_every)
        if self.max_steps is not None:
            _check_positive_int("max_steps", self.max_steps)
        if self.seed < 0:
            raise ParamsError(f"seed: must be >= 0, got {self.seed}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Params:
    data: DataParams
    train: TrainParams
    # run name -> that run's resolved training params (train defaults + the run's overrides)
    runs: dict[str, TrainParams]
    # the sweep's grid, expanded: run name -> train defaults with that grid point's values
    sweep_runs: dict[str, TrainParams] = field(default_factory=dict)

    @property
    def all_runs(self) -> dict[str, TrainParams]:
        return {**self.runs, **self.sweep_runs}

    def run(self, name: str) -> TrainParams:
        try:
            return self.all_runs[name]
        except KeyError:
            raise ParamsError(
                f"run {name!r} is neither listed under 'runs' nor a point of the 'sweep' grid in params.yaml; "
                f"runs: {', '.join(self.runs) or '(none)'}; sweep: {', '.join(self.sweep_runs) or '(none)'}"
            ) from None


def load_params(path: str | Path) -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: no params file here; run from the repository root or pass --params"
        ) from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from None
    return parse_params(raw if raw is not None else {}, source=str(path))


def parse_params(raw: Any, *, source: str = "params") -> Params:
    _require_mapping(raw, source)
    _reject_unknown(raw, {"data", "train", "runs", "sweep"}, source)
    data = _build(DataParams, raw.get("data", {}), "data")
    train_raw = raw.get("train", {})
    train = _build(TrainParams, train_raw, "train")

    runs_raw = raw.get("runs")
    if not runs_raw:
        raise ParamsError(
            f"{source}: 'runs' is missing or empty; list at least one run, e.g. runs: {{original: {{seed: 0}}}}"
        )
    _require_mapping(runs_raw, "runs")
    runs = {}
    for name, overrides in runs_raw.items():
        check_run_name(str(name))
        overrides = overrides or {}
        _require_mapping(overrides, f"runs.{name}")
        merged = _deep_merge(train_raw or {}, overrides)
        runs[str(name)] = _build(TrainParams, merged, f"runs.{name}")
    sweep_runs = expand_sweep(raw.get("sweep"), train_raw or {})
    clashes = sorted(set(runs) & set(sweep_runs))
    if clashes:
        raise ParamsError(f"runs: {', '.join(clashes)} is also a point of the sweep grid; rename the run")
    return Params(data=data, train=train, runs=runs, sweep_runs=sweep_runs)


def sweep_run_name(point: dict[str, Any]) -> str:
    """A grid point's run name, e.g. ``adam-lr0.001-b20-seed0``.

    dvc.yaml builds the same name from the same values (``${item.optimizer}-lr${item.lr}-...``),
    so each value appears as its YAML text would: ``str`` of what YAML read.
    """
    return "{optimizer}-lr{lr}-b{batch_size}-seed{seed}".format(**{key: str(value) for key, value in point.items()})


def expand_sweep(raw: Any, train_raw: dict) -> dict[str, TrainParams]:
    """The sweep grid (one list of values per axis in ``SWEEP_AXES``) as runs, in dvc.yaml's order."""
    if raw is None:
        return {}
    _require_mapping(raw, "sweep")
    _reject_unknown(raw, set(SWEEP_AXES), "sweep")
    missing = [axis for axis in SWEEP_AXES if axis not in raw]
    if missing:
        # dvc.yaml's matrix names every axis, so DVC itself needs them all.
        raise ParamsError(f"sweep: axis {', '.join(missing)} is missing; give every one of "
                          f"{', '.join(SWEEP_AXES)} a list of values (one value keeps it fixed)")
    for axis in SWEEP_AXES:
        values = raw[axis]
        if not isinstance(values, list) or not values:
            raise ParamsError(f"sweep.{axis}: expected a non-empty list of values, e.g. [{_example(axis)}], "
                              f"got {values!r}")
        if len(set(map(str, values))) != len(values):
            raise ParamsError(f"sweep.{axis}: a value is listed twice: {values!r}")
    runs = {}
    for values in itertools.product(*(raw[axis] for axis in SWEEP_AXES)):
        point = dict(zip(SWEEP_AXES, values))
        name = sweep_run_name(point)
        check_run_name(name)
        runs[name] = _build(TrainParams, _deep_merge(train_raw, point), f"sweep ({name})")
    return runs


def _example(axis: str) -> str:
    return {"optimizer": "adam, sgd", "lr": "0.001, 0.01", "batch_size": "20", "seed": "0, 1, 2"}[axis]


def check_run_name(name: str) -> None:
    """Run names become directory names under runs/: keep them plain."""
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    if not name or len(name) > 100 or name.startswith(".") or not set(name) <= allowed:
        raise ParamsError(
            f"runs: {name!r} is not a usable run name; use 1-100 letters, digits, '-', '_' or '.', "
            "not starting with '.'"
        )


def _check_positive_int(key: str, value: int) -> None:
    if value < 1:
        raise ParamsError(f"{key}: must be at least 1, got {value}")


def _build(cls, raw: Any, where: str):
    raw = raw or {}
    _require_mapping(raw, where)
    known = {f.name: f for f in fields(cls)}
    _reject_unknown(raw, set(known), where)
    kwargs = {}
    for name, value in raw.items():
        f = known[name]
        key = f"{where}.{name}"
        if f.name == "capture":
            kwargs[name] = _build(CaptureParams, value, key)
        else:
            kwargs[name] = _coerce(value, f.type, key)
    try:
        return cls(**kwargs)
    except ParamsError as error:
        raise ParamsError(f"{where}.{error}") from None


def _coerce(value: Any, type_name: str, key: str) -> Any:
    """Check a YAML value against a field's annotation (given as a string)."""
    if type_name == "int | None" and value is None:
        return None
    if type_name in ("int", "int | None"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key}: expected a whole number, got {value!r}")
        return value
    if type_name == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads "1e-3" (no dot) as a string; accept it as a number.
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ParamsError(f"{key}: expected a number, got {value!r}") from None
        return float(value)
    if type_name == "bool":
        if not isinstance(value, bool):
            raise ParamsError(f"{key}: expected true or false, got {value!r}")
        return value
    if type_name == "str":
        if not isinstance(value, str):
            raise ParamsError(f"{key}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unhandled field type {type_name}")  # a programming error, not input


def _require_mapping(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise ParamsError(f"{where}: expected a mapping of keys to values, got {value!r}")


def _reject_unknown(raw: dict, known: set[str], where: str) -> None:
    unknown = sorted(set(map(str, raw)) - known)
    if unknown:
        raise ParamsError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}"
        )


def _deep_merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
