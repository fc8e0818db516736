"""Record every parameter of your own PyTorch training loop, every step::

    from weightlapse import Recorder

    with Recorder("runs/my-mlp", model, optimizer=opt, params={"lr": 1e-3}) as rec:
        for x, y in loader:
            opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); opt.step()
            rec.step(loss=loss)  # records every parameter of `model` after this step

Row 0 is the model when the recorder starts, row t its state after t calls to
:meth:`Recorder.step`: every parameter, and every float32 buffer (a norm's running mean and
variance), full and lossless. Integer buffers (BatchNorm's ``num_batches_tracked``) are
not recorded. The run is a network store (schema version 2, pipeline/store/network.py)
written by the crash-safe writer of the pipeline's runs (pipeline/network_writer.py), with
the run directory's writer lock held (pipeline/runlock.py); ``weightlapse.open_run`` and
the runs index read it.

A step costs the training thread one copy of the parameters into a block buffer. On a GPU
the rows are copied on the device into a device block, and from there to the host once
per hand-off (a few rows at a time), so a step never waits for the device: no ``.item()``,
no host copy, the loss too stays a device tensor until its block goes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weightlapse import __version__
from weightlapse.pipeline.network_writer import NetworkWriter
from weightlapse.pipeline.runlock import exclusive_writer
from weightlapse.pipeline.store import STORE_NAME, NetworkLayout, ParameterSpec, RunMetadata

log = logging.getLogger(__name__)


def stages_on_device(device: torch.device) -> bool:
    """Whether rows go through a block on the device first: everywhere but the CPU, where a
    step's copy goes straight into the host block."""
    return device.type != "cpu"


def recorded_tensors(model: torch.nn.Module) -> list[tuple[ParameterSpec, dict, str]]:
    """What a recorder records of ``model``, in its order: each parameter, then each float32
    buffer, as (spec, the owning module's ``_parameters`` or ``_buffers`` dict, key). The
    tensor is looked up there at every step, so a module that replaces a buffer (instead of
    updating it in place) is still recorded right."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"Recorder records a torch.nn.Module, got {type(model).__name__}")
    found = []
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in named:
            module_name, _, key = name.rpartition(".")
            module = model.get_submodule(module_name)
            if kind == "buffer" and not tensor.is_floating_point():
                continue  # counters (num_batches_tracked): not weights
            if tensor.dtype != torch.float32:
                raise TypeError(f"cannot record {name}: it is {tensor.dtype}; the recorder records float32 "
                                "parameters and buffers (cast the model with model.float())")
            role = "buffer" if kind == "buffer" else key if key in ("weight", "bias") else "parameter"
            spec = ParameterSpec(name, tuple(tensor.shape), role, type(module).__name__)
            found.append((spec, module._parameters if kind == "parameter" else module._buffers, key))
    return found


class Recorder:
    """Record ``model``'s parameters after every training step into the run ``run_dir``.

    ``run_dir``: the run's directory (``runs/my-mlp``); the store is its ``trajectory.zarr``.
    ``optimizer``: named in the run's params (the runs index shows it). ``params``: what the
    run was made with (JSON values), shown in the runs index. ``overwrite``: replace a run
    already there. ``codec``: how the parameters' arrays are encoded, ``"fast"`` (Blosc LZ4,
    any Zarr v3 reader) or ``"compact"`` (pcodec, smaller; docs/store.md). Use as a context manager: on an exception in the block, the rows recorded
    so far are written and the run is marked unfinished with the exception's text.
    """

    def __init__(self, run_dir: str | Path, model: torch.nn.Module, *, optimizer: torch.optim.Optimizer | None = None,
                 params: dict[str, Any] | None = None, overwrite: bool = False, codec: str = "fast") -> None:
        self.run_dir = Path(run_dir)
        self._tensors = recorded_tensors(model)
        self.layout = NetworkLayout(tuple(spec for spec, _, _ in self._tensors), codec=codec)
        devices = {self._tensor(index).device for index in range(len(self._tensors))}
        if len(devices) != 1:
            raise ValueError(f"cannot record a model spread over several devices ({', '.join(map(str, devices))})")
        self.device = devices.pop()
        metadata = _metadata(self.run_dir, model, optimizer, params, self.device)
        self._exit = contextlib.ExitStack()
        try:
            self._exit.enter_context(exclusive_writer(self.run_dir))
            self._rows = ParameterRows(self.layout, self.device)
            self.writer = NetworkWriter(self.run_dir / STORE_NAME, self.layout, metadata, overwrite=overwrite,
                                        before_send=self._rows.before_send)
            self._exit.callback(self.writer.close, error="the recorder was not closed")
            self._rows.attach(self.writer)
            self._record(None)  # row 0: the model as it starts
        except BaseException:
            self._exit.close()
            raise
        self._closed = False

    @property
    def steps(self) -> int:
        """Steps recorded so far (calls of :meth:`step`)."""
        return self.writer.next_step - 1

    def step(self, loss: float | torch.Tensor | None = None) -> None:
        """Record the model's parameters after one more training step, with that step's
        ``loss`` (a number or a 0-d tensor, left on its device; None: NaN)."""
        if self._closed:
            raise RuntimeError(f"{self.run_dir}: the recorder is closed; open a new one to record another run")
        self._record(loss)

    def close(self, *, error: str | None = None) -> None:
        """Write every recorded row and mark the run finished (or unfinished, with ``error``)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.writer.close(error=error)
        finally:
            self._exit.close()  # the writer lock goes last: the store is complete by then

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close(error=f"{exc_type.__name__}: {exc}")
        except Exception as error:  # noqa: BLE001 - the loop's own exception is the one to report
            log.warning("%s: the failure could not be recorded in the store either (%s)", self.run_dir, error)

    def _tensor(self, index: int) -> torch.Tensor:
        _, owner, key = self._tensors[index]
        return owner[key]

    def _record(self, loss: float | torch.Tensor | None) -> None:
        self._rows.record([owner[key] for _, owner, key in self._tensors], loss)


class ParameterRows:
    """Copies a model's tensors into a :class:`NetworkWriter`'s rows, one row a step: on the
    CPU straight into the host block; on a device into a device block, copied to the host
    block once per hand-off (``before_send``), so that a step never waits for the device.

    Pass :attr:`before_send` to the writer, then :meth:`attach` it (the rows are its buffers).
    """

    def __init__(self, layout: NetworkLayout, device: torch.device, *, staged: bool | None = None) -> None:
        """``staged``: through a device block (default: on any device but the CPU)."""
        self.layout, self.device = layout, device
        self.staged = stages_on_device(device) if staged is None else staged
        self.before_send = self._copy_rows if self.staged else None
        self._device_block: list[torch.Tensor] | None = None

    def attach(self, writer: NetworkWriter) -> None:
        self.writer = writer
        # The block buffers, as tensors: row copies go through torch (no numpy round trip).
        self._host = [[torch.from_numpy(slot[spec.name]) for spec in self.layout.parameters] for slot in writer.slots]
        self._host_loss = [torch.from_numpy(slot["loss"]) for slot in writer.slots]
        if self.staged:
            rows = writer.block_steps
            self._device_block = [torch.empty((rows, *spec.shape), dtype=torch.float32, device=self.device)
                                  for spec in self.layout.parameters]
            self._device_loss = torch.empty((rows,), dtype=torch.float32, device=self.device)

    @torch.no_grad()
    def record(self, tensors: list[torch.Tensor], loss: float | torch.Tensor | None) -> None:
        """One row: ``tensors`` (the layout's parameters, in order) and the step's ``loss`` (a
        number, a 0-d tensor on the tensors' device, or None for NaN)."""
        writer = self.writer
        row = writer.row
        if self._device_block is None:
            targets, loss_target = self._host[writer.slot], self._host_loss[writer.slot]
        else:
            targets, loss_target = self._device_block, self._device_loss
        for tensor, target in zip(tensors, targets):
            target[row].copy_(tensor)
        if isinstance(loss, torch.Tensor):
            loss_target[row].copy_(loss.detach().reshape(()))  # same device: no wait
        else:
            loss_target[row].fill_(math.nan if loss is None else float(loss))
        writer.commit_row()

    def to_host(self) -> None:
        """The current block's rows on the device into its host block now (one wait), so that
        the writer can look at them (a diverged run's last row)."""
        if self.staged and self.writer.row:
            self._copy_rows(self.writer.slot, 0, self.writer.row)

    def _copy_rows(self, slot: int, first: int, stop: int) -> None:
        """The device block's rows ``first .. stop - 1`` into the host block ``slot``: one wait
        for the device per hand-off, never per step."""
        for source, target in zip(self._device_block, self._host[slot]):
            target[first:stop].copy_(source[first:stop])
        self._host_loss[slot][first:stop].copy_(self._device_loss[first:stop])


def _metadata(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
              params: dict[str, Any] | None, device: torch.device) -> RunMetadata:
    params = dict(params or {})
    if optimizer is not None:
        params.setdefault("optimizer", type(optimizer).__name__.lower())
    try:
        params = json.loads(json.dumps(params, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise TypeError(f"Recorder params must be JSON values (numbers, strings, lists, dicts of them): {error}"
                        ) from None
    return RunMetadata(run=run_dir.name, params=params, model=type(model).__name__, device=str(device),
                       engine="recorder",
                       versions={"weightlapse": __version__, "python": platform.python_version(),
                                 "torch": torch.__version__, "numpy": np.__version__},
                       command=" ".join(sys.argv))
