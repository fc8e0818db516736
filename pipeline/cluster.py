"""Where dask computations run: threads in this process (the default), or a Dask cluster.

Every analytics and statistics entry point takes ``scheduler``:

- ``None``: dask's threaded scheduler in this process; nothing to start.
- an address such as ``"tcp://10.0.0.5:8786"``: a ``dask.distributed`` scheduler, started with
  ``dask scheduler`` and ``dask worker tcp://10.0.0.5:8786`` (docs/scaling.md). One client
  per address is kept for the process, so a viewer does not reconnect for every request.
- a ``distributed.Client``: used as it is.

On a cluster the workers read the runs themselves, so run locations must be reachable from
every worker: object storage (``s3://...``) or a shared file system.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import dask
from dask.callbacks import Callback

_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()
# Seconds to wait for a scheduler before saying it cannot be reached.
CONNECT_TIMEOUT_S = 20


class ClusterError(ConnectionError):
    """The Dask scheduler named cannot be reached."""


def client_for(scheduler: Any) -> Any | None:
    """The ``distributed.Client`` for ``scheduler`` (None for in-process threads)."""
    if scheduler is None:
        return None
    from distributed import Client

    if isinstance(scheduler, Client):
        return scheduler
    address = str(scheduler)
    with _clients_lock:
        client = _clients.get(address)
        if client is None or client.status in ("closed", "closing"):
            try:
                client = Client(address, set_as_default=False, timeout=CONNECT_TIMEOUT_S)
            except OSError as error:
                raise ClusterError(f"cannot reach the Dask scheduler at {address} ({error}); start it with "
                                   "`dask scheduler` and workers with `dask worker ADDRESS`, or leave "
                                   "scheduler unset to compute in this process") from None
            _clients[address] = client
        return client


def compute(collections: Sequence[Any], *, scheduler: Any = None,
            progress: Callable[[float], None] | None = None) -> list[Any]:
    """``dask.compute(*collections)`` on ``scheduler``, reporting the fraction of tasks done.

    Returns the computed values as a list, in order.
    """
    client = client_for(scheduler)
    if client is None:
        with _ThreadedProgress(progress) if progress else contextlib.nullcontext():
            return list(dask.compute(*collections, scheduler="threads"))
    futures = client.compute(list(collections))
    if progress:
        from distributed import as_completed

        for done, _ in enumerate(as_completed(futures, loop=client.loop), start=1):
            progress(done / len(futures))
    return client.gather(futures)


def submit(function: Callable, *args: Any, scheduler: Any, **kwargs: Any) -> Any:
    """Run ``function`` on the cluster as a task of its own (a future), e.g. one training run."""
    return client_for(scheduler).submit(function, *args, pure=False, **kwargs)


def as_completed(futures: Sequence[Any]) -> Iterator[Any]:
    """The futures of one client, as they finish."""
    from distributed import as_completed as completed

    return iter(completed(futures, loop=futures[0].client.loop)) if futures else iter(())


class _ThreadedProgress(Callback):
    """The fraction of tasks done, for the in-process scheduler (dask's local callbacks)."""

    def __init__(self, report: Callable[[float], None]) -> None:
        super().__init__()
        self._report = report
        self._total = self._done = 0

    def _start_state(self, dsk, state) -> None:
        self._total = sum(len(state[key]) for key in ("ready", "waiting", "running")) or 1

    def _posttask(self, key, result, dsk, state, worker_id) -> None:
        self._done += 1
        self._report(min(self._done / self._total, 1.0))
