"""Schema version 2: a store of several matrices, one array per parameter of a network.

A run recorded with :class:`~weightlapse.Recorder` (any ``torch.nn.Module``) is one Zarr v3
group, ``<run>/trajectory.zarr``, of schema ``weightlapse.trajectory`` version 2::

    <parameter>  float32 (step, <parameter>.out, <parameter>.in, ...)  row t: after t steps
    loss         float32 (step,)   the loss given to step t (NaN at row 0 and where none was given)
    step         int64   (step,)   coordinate: 0, 1, 2, ...

Each array is named after its parameter (``fc1.weight``, ``0.bias``, ``bn.running_mean``)
and its dimensions after the parameter too, so that no two parameters share a dimension
they might disagree on. The group attribute ``weightlapse`` lists the parameters in the
model's order under ``parameters``: each one's ``name``, ``shape`` (one step's), ``role``
(weight, bias, parameter, or buffer for a module's floating-point state such as a norm's
running statistics), ``module`` (the owning module's class) and ``dims``.

A recorder does not know how many steps its loop will take, so the step arrays grow: the
store writer enlarges every array (whole blocks at a time, doubling) before it writes rows
past their end, and cuts them to the rows recorded when the run ends. The rule of version
1 holds unchanged: ``progress["steps_done"]`` says which rows are committed, and readers
never look past it (an array may be longer, never shorter). ``progress["n_steps"]`` is the
steps recorded so far. docs/store.md describes both versions.

A network trained by the train stage (``train.hidden``) is planned: its arrays have their
final ``n_steps + 1`` rows from the start, and it also holds version 1's optional arrays,
with their names and meaning: ``eval_step``, ``heldout_accuracy`` and ``heldout_loss``
(``progress["evals_done"]`` of them committed) and ``resume_state`` (``progress["resume"]``
names its checkpoint). :data:`RUN_ARRAYS` lists them; a recorder's store has none.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from weightlapse.pipeline.store.format import CODECS, MAX_CHUNK_BYTES, TrajectoryError, shown

NETWORK_SCHEMA_VERSION = 2
# The optional arrays of a planned network run (the train stage's), as in version 1.
RUN_ARRAYS = ("eval_step", "heldout_accuracy", "heldout_loss", "resume_state")
# Array names of a network store that are not parameters.
RESERVED_NAMES = ("step", "loss", *RUN_ARRAYS)
ROLES = ("weight", "bias", "parameter", "buffer")
# A parameter name is a module path of Python identifiers joined by dots (torch's
# named_parameters), so it is a safe Zarr node name and file name: never "/", "..", or a
# leading "__" (reserved by Zarr) or ".".
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*(\.[A-Za-z0-9_\-]+)*")
MAX_NAME_LENGTH = 200
MAX_PARAMETERS = 4096
MAX_PARAMETER_NDIM = 8
# One step of one parameter must fit in one chunk (the reader allocates a chunk at a time).
MAX_PARAMETER_VALUES = MAX_CHUNK_BYTES // 4
# Steps per chunk: as many as make about CHUNK_BYTES, a power of two, at most
# MAX_CHUNK_STEPS (a small parameter's chunk is rewritten whole with each block until full).
# Longer chunks cost the store writer less per step (a transpose across more steps
# compresses better, and fewer files are written): docs/benchmarks.md.
CHUNK_BYTES = 8 * 2**20
MAX_CHUNK_STEPS = 256
# The axes a parameter's dimensions are named after, by its number of axes (a Linear weight
# is (out, in), a convolution's (out, in, kh, kw)); other shapes get dim0, dim1, ...
_AXES = {1: ("out",), 2: ("out", "in"), 3: ("out", "in", "k"), 4: ("out", "in", "kh", "kw"),
         5: ("out", "in", "kd", "kh", "kw")}


def parameter_dims(name: str, ndim: int) -> tuple[str, ...]:
    """The dimension names of the array of parameter ``name`` with ``ndim`` axes per step."""
    axes = _AXES.get(ndim, tuple(f"dim{axis}" for axis in range(ndim)))
    return ("step", *(f"{name}.{axis}" for axis in axes))


def name_problem(name: Any) -> str | None:
    """Why ``name`` cannot name a parameter's array, or None if it can."""
    if not isinstance(name, str):
        return f"{shown(name)} is not a string"
    if len(name) > MAX_NAME_LENGTH:
        return f"{shown(name)} is longer than {MAX_NAME_LENGTH} characters"
    if name in RESERVED_NAMES:
        return f"{name!r} is the name of the store's {name} array"
    if name.startswith("__") or not _NAME.fullmatch(name):
        return (f"{shown(name)} is not a module path of letters, digits, '_' and '-' joined by dots "
                "(no '/', no leading '__' or '.')")
    return None


def chunk_steps_for(shape: tuple[int, ...]) -> int:
    """Steps per chunk of a parameter of ``shape``: about ``CHUNK_BYTES``, a power of two."""
    row_bytes = math.prod(shape) * 4
    steps = max(1, min(MAX_CHUNK_STEPS, CHUNK_BYTES // row_bytes))
    return 1 << (steps.bit_length() - 1)


@dataclass(frozen=True)
class ParameterSpec:
    """One recorded parameter (or buffer): one array of the store."""

    name: str
    shape: tuple[int, ...]  # one step's
    role: str = "parameter"
    module: str = ""        # the class of the module that owns it (Linear, Conv2d, ...)

    @property
    def dims(self) -> tuple[str, ...]:
        return parameter_dims(self.name, len(self.shape))

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def chunk_steps(self) -> int:
        return chunk_steps_for(self.shape)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "role": self.role, "module": self.module,
                "dims": list(self.dims)}


@dataclass(frozen=True)
class NetworkLayout:
    """The arrays of a network store, in the model's order.

    A recorder's run (``n_steps`` None) grows; a planned run (the train stage's, ``n_steps``
    known) has its arrays at ``n_steps + 1`` rows from the start, and also the version 1 arrays
    ``eval_step``, ``heldout_accuracy``, ``heldout_loss`` and (with ``resume_size``) ``resume_state``."""

    parameters: tuple[ParameterSpec, ...]
    n_steps: int | None = None      # steps planned; None: as many as are recorded
    eval_steps: tuple[int, ...] = ()  # steps at which held-out data is scored (a planned run)
    resume_size: int = 0            # length of the optimizer state saved for resuming (0: none kept)
    codec: str = "fast"             # how the parameters' arrays are encoded: one of CODECS

    def __post_init__(self) -> None:
        problem = parameters_problem(self.parameters)
        if problem:
            raise ValueError(f"cannot record this model: {problem}")
        if self.codec not in CODECS:
            raise ValueError(f"unknown codec {self.codec!r}; choose one of {', '.join(CODECS)}")
        if self.n_steps is None and (self.eval_steps or self.resume_size):
            raise ValueError("held-out scores and checkpoints need a planned run (n_steps)")

    @property
    def row_bytes(self) -> int:
        """Bytes of one step of every parameter."""
        return sum(spec.size for spec in self.parameters) * 4

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.parameters)

    def describe(self, limit: int = 6) -> str:
        """The parameters in words, for a message: ``fc1.weight (128, 784), fc1.bias (128,), ...``."""
        shown_specs = [f"{spec.name} {spec.shape}" for spec in self.parameters[:limit]]
        more = len(self.parameters) - limit
        return ", ".join(shown_specs) + (f" and {more} more" if more > 0 else "")


def parameters_problem(parameters: tuple[ParameterSpec, ...]) -> str | None:
    """Why these parameters cannot be one store's, or None."""
    if not parameters:
        return "it has no floating-point parameters"
    if len(parameters) > MAX_PARAMETERS:
        return f"it has {len(parameters):,} parameters and buffers; a store holds at most {MAX_PARAMETERS:,}"
    seen: set[str] = set()
    dims = {dim for spec in parameters if isinstance(spec.name, str) and isinstance(spec.shape, tuple)
            for dim in spec.dims[1:]}
    for spec in parameters:
        problem = name_problem(spec.name)
        if problem:
            return f"the parameter name {problem}"
        if spec.name in seen:
            return f"the name {spec.name!r} is used twice"
        if spec.name in dims:  # xarray would take the array for that dimension's coordinate
            return f"the name {spec.name!r} is also a dimension of another parameter"
        seen.add(spec.name)
        if not (isinstance(spec.shape, tuple) and len(spec.shape) <= MAX_PARAMETER_NDIM
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in spec.shape)):
            return (f"{spec.name} has shape {shown(spec.shape)}; a parameter has 0 to {MAX_PARAMETER_NDIM} axes, "
                    "each of at least 1")
        if spec.size > MAX_PARAMETER_VALUES:
            return (f"{spec.name} has {spec.size:,} values; one step of a parameter is at most "
                    f"{MAX_PARAMETER_VALUES:,} (one chunk of {MAX_CHUNK_BYTES:,} bytes)")
        if spec.role not in ROLES:
            return f"{spec.name} has role {shown(spec.role)}, not one of {', '.join(ROLES)}"
        if not isinstance(spec.module, str) or len(spec.module) > 100:
            return f"{spec.name} has module {shown(spec.module)}, not a class name"
    return None


def parse_parameters(raw: Any, where: str) -> NetworkLayout:
    """The ``parameters`` list of a network store's ``weightlapse`` attribute, validated, or a
    :class:`TrajectoryError` saying what is wrong with it."""

    def refuse(problem: str) -> TrajectoryError:
        return TrajectoryError(f"{where}: the store's parameter list is not weightlapse's: {problem}: the store is "
                               "damaged or was not written by weightlapse: record the run again")

    if not isinstance(raw, list):
        raise refuse(f"it is {shown(raw)}, not a list")
    if len(raw) > MAX_PARAMETERS:
        raise refuse(f"it names {len(raw):,} parameters, more than {MAX_PARAMETERS:,}")
    specs = []
    for entry in raw:
        if not isinstance(entry, dict) or set(entry) != {"name", "shape", "role", "module", "dims"}:
            raise refuse(f"the entry {shown(entry)} is not a dict of name, shape, role, module and dims")
        shape = entry["shape"]
        if not isinstance(shape, list) or len(shape) > MAX_PARAMETER_NDIM:
            raise refuse(f"the shape {shown(shape)} of {shown(entry['name'])} is not a list of up to "
                         f"{MAX_PARAMETER_NDIM} sizes")
        spec = ParameterSpec(entry["name"], tuple(shape), entry["role"], entry["module"])
        problem = parameters_problem((spec,))
        if problem:
            raise refuse(problem)
        if entry["dims"] != list(spec.dims):
            raise refuse(f"{spec.name} has dims {shown(entry['dims'])}, expected {list(spec.dims)}")
        specs.append(spec)
    try:
        return NetworkLayout(tuple(specs))
    except ValueError as error:
        raise refuse(str(error).removeprefix("cannot record this model: ")) from None
