"""Read ``params.yaml`` once and validate it into typed objects.

Every stage calls :func:`load_params`; nothing else parses the file. An unknown or
missing key, or an impossible value, is a :class:`ParamsError` that names the key and
says what would be accepted, so a typo never silently falls back to a default.

The file is untrusted input, so the work it can cause is bounded before anything is built:

- at most ``MAX_PARAMS_BYTES``, and YAML that could expand, recurse deep, collide or read
  differently in DVC is refused before it is composed (:mod:`pipeline.safe_yaml`);
- run names under ``runs`` must be text: ``1:``, ``true:`` or ``~:`` are refused, not stringified;
- a run's size: at most ``MAX_STEPS`` steps (counted on the largest built-in training split, a
  bound for any of them), ``MAX_EVALUATIONS`` held-out evaluations and ``MAX_CHUNK_BYTES`` a
  Zarr chunk; a ``capture.chunk_steps`` above the default and longer than the run is refused
  (the default stays valid for short runs); at most ``MAX_RUNS`` runs and sweep points in all.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from weightlapse.pipeline.datasets import (
    DATASETS, MAX_DECLARED_SAMPLES, N_CLASSES, N_PIXELS, DatasetError, DatasetSpec, check_dataset_name,
    declared_dataset,
)
from weightlapse.pipeline.layers import hidden_problem, parameter_count
from weightlapse.pipeline.optimizers import OPTIMIZERS
from weightlapse.pipeline.params_values import (
    ParamsError, check_positive, check_run_name, coerce, deep_merge, listed, refuse_twins, reject_unknown,
    require_mapping,
)
from weightlapse.pipeline.safe_yaml import UnsafeYamlError, load_yaml, read_bounded
from weightlapse.pipeline.safe_yaml import shown as _shown

DEVICES = ("auto", "cpu", "cuda")
# How training steps run: "auto" or one of pipeline.engines.ENGINES, which decides whether
# an engine can train a run (pipeline.engines.select_engine). Named here because the
# engines import torch, which validating params.yaml does not; tests/test_engines.py
# keeps the two lists equal.
ENGINE_NAMES = ("auto", "numpy", "torch", "cuda-graph")
# The axes of the sweep grid, in the order its points are listed (the last varies fastest).
SWEEP_AXES = ("dataset", "optimizer", "lr", "batch_size", "seed")
# The axes dvc.yaml's sweep stage expands into one stage each (a DVC matrix); the points of
# one stage differ in lr and seed only, so they can train as one stack (pipeline.train.stack_key).
SWEEP_STAGE_AXES = ("dataset", "optimizer", "batch_size")

# The repository's params.yaml is 3 KB and ~100 nodes; at these bounds any file is read or
# refused in well under a second (libyaml).
MAX_PARAMS_BYTES = 256 << 10
MAX_RUNS = 1_000  # runs plus sweep points: each is a DVC stage and a run directory
MAX_STEPS = 10_000_000  # 314 GB of weights
MAX_EVALUATIONS = 1_000_000
MAX_CHUNK_BYTES = 64 << 20
DEFAULT_CHUNK_STEPS = 64
STEP_BYTES = N_CLASSES * N_PIXELS * 4  # one step's float32 weights
MAX_TRAIN_SAMPLES = max(MAX_DECLARED_SAMPLES, *(spec.n_train for spec in DATASETS.values()))
MAX_DATASETS = 20



@dataclass(frozen=True)
class DataParams:
    dataset: str = "mnist"  # the dataset of every run and sweep point that names none


# pipeline.store.format.CODECS, named here too so that validating params loads no zarr
# (tests/test_params.py keeps the two equal).
CAPTURE_CODECS = ("fast", "compact")


@dataclass(frozen=True)
class CaptureParams:
    # Also store the gradient used at each step (doubles the store's size).
    gradients: bool = False
    # Steps per Zarr chunk along the step axis: small enough that reading one step
    # decompresses little, large enough that a long run has few files.
    chunk_steps: int = DEFAULT_CHUNK_STEPS
    # How the weights (and gradients) are encoded, both lossless: "fast" (Blosc LZ4, in the
    # Zarr v3 spec) or "compact" (pcodec, about 1.3 times smaller, slower to write; best
    # with chunk_steps 256). docs/store.md says which readers read each.
    codec: str = "fast"

    def __post_init__(self) -> None:
        if self.codec not in CAPTURE_CODECS:
            raise ParamsError(f"codec: unknown codec {_shown(self.codec)}; choose one of {', '.join(CAPTURE_CODECS)} "
                              "(fast: Blosc LZ4, readable everywhere; compact: pcodec, smaller)")
        check_positive("chunk_steps", self.chunk_steps)
        if self.chunk_steps * STEP_BYTES > MAX_CHUNK_BYTES:
            raise ParamsError(f"chunk_steps: {self.chunk_steps:,} steps of {STEP_BYTES:,} bytes is "
                              f"{self.chunk_steps * STEP_BYTES >> 20:,} MiB a chunk, more than the "
                              f"{MAX_CHUNK_BYTES >> 20} MiB limit; use at most {MAX_CHUNK_BYTES // STEP_BYTES:,} "
                              f"(the default is {DEFAULT_CHUNK_STEPS})")


@dataclass(frozen=True)
class TrainParams:
    """One run's training setup. Defaults reproduce the original study."""

    bias: bool = False  # every layer's
    # Widths of the hidden layers: [] is softmax regression (784 -> 10), [32] an MLP 784 -> 32 -> 10
    # (pipeline.layers), recorded as a network store, one array per parameter.
    hidden: tuple[int, ...] = ()
    activation: str = "relu"  # after each hidden layer: relu | tanh (pipeline.layers.ACTIVATIONS)
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
            raise ParamsError(f"optimizer: unknown optimizer {_shown(self.optimizer)}; choose one of "
                              f"{', '.join(OPTIMIZERS)}")
        if self.device not in DEVICES:
            raise ParamsError(f"device: {_shown(self.device)} is not one of {', '.join(DEVICES)}")
        if self.engine not in ENGINE_NAMES:
            raise ParamsError(f"engine: {_shown(self.engine)} is not one of {', '.join(ENGINE_NAMES)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ParamsError(f"lr: must be a positive number, got {self.lr!r}")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise ParamsError(f"momentum: must be in [0, 1), got {self.momentum!r}")
        problem = OPTIMIZERS[self.optimizer].refusal(momentum=self.momentum, weight_decay=self.weight_decay)
        if problem:
            raise ParamsError(problem)
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ParamsError(f"weight_decay: must be >= 0, got {self.weight_decay!r}")
        check_positive("batch_size", self.batch_size)
        check_positive("epochs", self.epochs)
        check_positive("eval_every", self.eval_every)
        if self.max_steps is not None:
            check_positive("max_steps", self.max_steps)
        if self.seed < 0:
            raise ParamsError(f"seed: must be >= 0, got {self.seed}")
        problem = hidden_problem(self.hidden, self.activation)
        if problem:
            raise ParamsError(problem)
        if self.hidden and self.capture.gradients:
            raise ParamsError("capture: a network store (hidden layers) records parameters without gradients; set "
                              "capture.gradients: false, or hidden: []")
        self._check_size()

    @property
    def max_n_steps(self) -> int:
        """Steps the run takes at most: on the largest built-in training split (a smaller one only shortens it)."""
        total = math.ceil(MAX_TRAIN_SAMPLES / self.batch_size) * self.epochs
        return min(total, self.max_steps) if self.max_steps is not None else total

    def _check_size(self) -> None:
        if self.batch_size > MAX_TRAIN_SAMPLES:
            raise ParamsError(f"batch_size: {self.batch_size:,} is more than the {MAX_TRAIN_SAMPLES:,} images of "
                              f"the largest training split; use at most {MAX_TRAIN_SAMPLES:,}")
        if self.max_steps is not None and self.max_steps > MAX_STEPS:
            raise ParamsError(f"max_steps: {self.max_steps:,} is more than the limit of {MAX_STEPS:,} steps "
                              f"({STEP_BYTES:,} bytes of weights each); lower it")
        n_steps = self.max_n_steps
        step_bytes = parameter_count(self.hidden, bias=self.bias) * 4
        if self.hidden and n_steps * step_bytes > MAX_STEPS * STEP_BYTES:
            raise ParamsError(f"hidden: {n_steps:,} steps of {step_bytes:,} bytes of parameters is more than the limit of "
                              f"{MAX_STEPS * STEP_BYTES >> 30:,} GiB a run; use narrower layers or set max_steps")
        if n_steps > MAX_STEPS:
            raise ParamsError(f"epochs: {self.epochs:,} epochs of {math.ceil(MAX_TRAIN_SAMPLES / self.batch_size):,} "
                              f"steps ({MAX_TRAIN_SAMPLES:,} images at batch_size {self.batch_size}) is {n_steps:,} "
                              f"steps, more than the limit of {MAX_STEPS:,}; lower epochs or set max_steps")
        n_evaluations = n_steps // self.eval_every + 2  # step 0, every eval_every steps, the last
        if n_evaluations > MAX_EVALUATIONS:
            raise ParamsError(f"eval_every: every {self.eval_every} steps of {n_steps:,} is {n_evaluations:,} "
                              f"held-out evaluations, more than the limit of {MAX_EVALUATIONS:,}; use eval_every "
                              f"of at least {math.ceil(n_steps / (MAX_EVALUATIONS - 2)):,}")
        # A chunk longer than the run is one oversized file; the default stays valid for short runs.
        chunk_steps = self.capture.chunk_steps
        if chunk_steps > DEFAULT_CHUNK_STEPS and chunk_steps > n_steps + 1:
            raise ParamsError(f"capture.chunk_steps: {chunk_steps:,} steps a chunk is more than the run records "
                              f"({n_steps + 1:,} steps, step 0 included); use at most "
                              f"{max(n_steps + 1, DEFAULT_CHUNK_STEPS):,} (the default is {DEFAULT_CHUNK_STEPS})")

    def to_dict(self) -> dict[str, Any]:
        """The params as stores and manifests record them; a softmax-regression run's (``hidden: []``)
        leave out hidden and activation (which it ignores), as they were before networks."""
        values = dataclasses.asdict(self)
        if not self.hidden:
            del values["hidden"], values["activation"]
        return values


@dataclass(frozen=True)
class Params:
    data: DataParams
    train: TrainParams
    # run name -> that run's resolved training params (train defaults + the run's overrides)
    runs: dict[str, TrainParams]
    # the sweep's grid, expanded: run name -> train defaults with that grid point's values
    sweep_runs: dict[str, TrainParams] = field(default_factory=dict)
    # run name -> the name of the dataset it trains on, for every run and sweep point
    run_datasets: dict[str, str] = field(default_factory=dict)
    # dataset name -> its files, checksums and mirrors: the datasets the data stage fetches
    # (params.yaml's `datasets`, or without one, the built-in datasets the runs use)
    datasets: dict[str, DatasetSpec] = field(default_factory=dict)
    # sweep point -> its grid values (SWEEP_AXES), for selecting the points of one sweep stage
    sweep_points: dict[str, dict[str, Any]] = field(default_factory=dict)

    def dataset_of(self, name: str) -> DatasetSpec:
        """The dataset run ``name`` trains on."""
        self.run(name)
        return self.datasets[self.run_datasets.get(name, self.data.dataset)]

    @property
    def all_runs(self) -> dict[str, TrainParams]:
        return {**self.runs, **self.sweep_runs}

    def run(self, name: str) -> TrainParams:
        try:
            return self.all_runs[name]
        except KeyError:
            raise ParamsError(f"run {_shown(name)} is neither listed under 'runs' nor a point of the 'sweep' grid in "
                              f"params.yaml; runs: {listed(self.runs)}; sweep: {listed(self.sweep_runs)}") from None


def load_params(path: str | Path) -> Params:
    """Read and validate params.yaml, refusing hostile YAML before composing it (pipeline.safe_yaml)."""
    path = Path(path)
    try:
        raw = load_yaml(read_bounded(path, MAX_PARAMS_BYTES), source=str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no params file here; run from the repository root or pass --params") from None
    except UnsafeYamlError as error:
        raise ParamsError(str(error)) from None
    return parse_params(raw if raw is not None else {}, source=str(path))


def parse_params(raw: Any, *, source: str = "params") -> Params:
    require_mapping(raw, source)
    reject_unknown(raw, {"data", "datasets", "train", "runs", "sweep"}, source)
    data = _build(DataParams, raw.get("data", {}), "data")
    declared = _declared_datasets(raw.get("datasets"))
    _check_dataset(data.dataset, declared, "data.dataset")
    train_raw = raw.get("train", {})
    train = _build(TrainParams, train_raw, "train")

    runs_raw = raw.get("runs")
    if not runs_raw:
        raise ParamsError(f"{source}: 'runs' is missing or empty; list at least one run, "
                          "e.g. runs: {original: {seed: 0}}")
    require_mapping(runs_raw, "runs")
    if len(runs_raw) > MAX_RUNS:
        raise ParamsError(f"runs: {len(runs_raw):,} runs, more than the limit of {MAX_RUNS:,}; list fewer")
    runs, run_datasets = {}, {}
    for name, overrides in runs_raw.items():
        if not isinstance(name, str):  # YAML reads `1:`, `true:` and `~:` as a number, a boolean and null
            text = "null" if name is None else str(name).lower() if isinstance(name, bool) else _shown(name)
            raise ParamsError(f"runs: the run name {text} is read as {'null' if name is None else type(name).__name__}"
                              f", not text; quote it in params.yaml: '{text}': ...")
        check_run_name(name)
        overrides = dict(overrides or {})
        require_mapping(overrides, f"runs.{name}")
        run_datasets[name] = _check_dataset(overrides.pop("dataset", data.dataset), declared, f"runs.{name}.dataset")
        merged = deep_merge(train_raw or {}, overrides)
        runs[name] = _build(TrainParams, merged, f"runs.{name}")
    sweep_points = expand_sweep(raw.get("sweep"), train_raw or {}, max_points=MAX_RUNS - len(runs),
                                default_dataset=data.dataset)
    sweep_runs = {name: config for name, (config, _) in sweep_points.items()}
    for name, (_, point) in sweep_points.items():
        run_datasets[name] = _check_dataset(point["dataset"], declared, f"sweep ({name})")
    clashes = sorted(set(runs) & set(sweep_runs))
    if clashes:
        raise ParamsError(f"runs: {', '.join(clashes)} is also a point of the sweep grid; rename the run")
    used = {name: declared[name] if declared is not None else DATASETS[name]
            for name in dict.fromkeys([data.dataset, *run_datasets.values()])}
    params = Params(data=data, train=train, runs=runs, sweep_runs=sweep_runs, run_datasets=run_datasets,
                    datasets={**used, **(declared or {})},
                    sweep_points={name: point for name, (_, point) in sweep_points.items()})
    refuse_twins(params)
    return params


def _declared_datasets(raw: Any) -> dict[str, DatasetSpec] | None:
    """params.yaml's `datasets`: name -> {} for a built-in dataset, or a declaration of one's own."""
    if raw is None:
        return None
    require_mapping(raw, "datasets")
    if not raw or len(raw) > MAX_DATASETS:
        raise ParamsError(f"datasets: list 1-{MAX_DATASETS} datasets (the data stage fetches each into "
                          f"data/<name>), e.g. datasets: {{mnist: {{}}}}; got {len(raw)}")
    specs = {}
    for name, declaration in raw.items():
        try:
            check_dataset_name(name)
            specs[name] = DATASETS[name] if name in DATASETS and not declaration else declared_dataset(name, declaration)
        except DatasetError as error:
            raise ParamsError(f"datasets.{error}" if str(error).startswith(f"{name}") else f"datasets: {error}") from None
    return specs


def _check_dataset(name: Any, declared: dict[str, DatasetSpec] | None, where: str) -> str:
    """A run's dataset must be one the data stage fetches: listed under `datasets`, or built in without one."""
    known = declared if declared is not None else DATASETS
    if not isinstance(name, str) or name not in known:
        fix = (f"add it to datasets ({_shown(name)}: {{}} for a built-in one, or its declaration)" if declared is not None
               else "declare it under datasets in params.yaml")
        raise ParamsError(f"{where}: unknown dataset {_shown(name)}; choose one of {', '.join(sorted(known))}, or {fix}")
    return name


def sweep_run_name(point: dict[str, Any], *, with_dataset: bool = False) -> str:
    """A grid point's run name, e.g. ``adam-lr0.001-b20-seed0``, or with ``with_dataset`` (a
    grid of several datasets) ``fashion-mnist-adam-lr0.001-b20-seed0``.

    Each value appears as its YAML text would: ``str`` of what YAML read, as DVC shows it.
    """
    name = "{optimizer}-lr{lr}-b{batch_size}-seed{seed}".format(**{key: str(value) for key, value in point.items()})
    return f"{point['dataset']}-{name}" if with_dataset else name


def expand_sweep(raw: Any, train_raw: dict, *, max_points: int = MAX_RUNS, default_dataset: str = "mnist"
                 ) -> dict[str, tuple[TrainParams, dict[str, Any]]]:
    """The sweep grid (one list of values per axis in ``SWEEP_AXES``) as runs: name -> its
    params and its grid values. Run names carry the dataset when the grid has several.

    Without a ``dataset`` axis the grid trains on ``default_dataset`` (``data.dataset``);
    dvc.yaml's sweep stage needs the axis written out.
    """
    if raw is None:
        return {}
    require_mapping(raw, "sweep")
    reject_unknown(raw, set(SWEEP_AXES), "sweep")
    if "dataset" not in raw:
        raw = {"dataset": [default_dataset], **raw}
    missing = [axis for axis in SWEEP_AXES if axis not in raw]
    if missing:
        # dvc.yaml's matrix and the stage's command name the axes, so DVC itself needs them.
        raise ParamsError(f"sweep: axis {', '.join(missing)} is missing; give every one of "
                          f"{', '.join(SWEEP_AXES)} a list of values (one value keeps it fixed)")
    for axis in SWEEP_AXES:
        values = raw[axis]
        if not isinstance(values, list) or not values:
            raise ParamsError(f"sweep.{axis}: expected a non-empty list of values, e.g. [{_example(axis)}], "
                              f"got {_shown(values)}")
        if len(set(map(str, values))) != len(values):
            raise ParamsError(f"sweep.{axis}: a value is listed twice: {_shown(values)}")
    n_points = math.prod(len(raw[axis]) for axis in SWEEP_AXES)
    if n_points > max_points:
        raise ParamsError(f"sweep: the grid has {' x '.join(str(len(raw[axis])) for axis in SWEEP_AXES)} = "
                          f"{n_points:,} points, more than the {max_points:,} runs left of the limit of "
                          f"{MAX_RUNS:,}; list fewer values")
    runs = {}
    for values in itertools.product(*(raw[axis] for axis in SWEEP_AXES)):
        point = dict(zip(SWEEP_AXES, values))
        name = sweep_run_name(point, with_dataset=len(raw["dataset"]) > 1)
        check_run_name(name)
        training = {axis: value for axis, value in point.items() if axis != "dataset"}
        runs[name] = (_build(TrainParams, deep_merge(train_raw, training), f"sweep ({name})"), point)
    return runs


def _example(axis: str) -> str:
    return {"dataset": "mnist, fashion-mnist", "optimizer": "adam, sgd", "lr": "0.001, 0.01", "batch_size": "20",
            "seed": "0, 1, 2"}[axis]


def _build(cls, raw: Any, where: str):
    raw = raw or {}
    require_mapping(raw, where)
    known = {f.name: f for f in fields(cls)}
    reject_unknown(raw, set(known), where)
    kwargs = {}
    for name, value in raw.items():
        f = known[name]
        key = f"{where}.{name}"
        if f.name == "capture":
            kwargs[name] = _build(CaptureParams, value, key)
        else:
            kwargs[name] = coerce(value, f.type, key)
    try:
        return cls(**kwargs)
    except ParamsError as error:
        raise ParamsError(f"{where}.{error}") from None
