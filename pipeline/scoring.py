"""Held-out scoring of recorded weights on a worker thread, overlapping training."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from weightlapse.pipeline.trainer import Evaluation, evaluate


def scoring_thread() -> ThreadPoolExecutor:
    """A worker thread for :class:`HeldOutScorer`, which the scorers of a stack's runs share."""
    # torch's thread count is per thread under OpenMP: a new thread would use every core
    # and take the training thread's, so it gets the caller's count explicitly.
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="held-out-scorer",
                              initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),))


class HeldOutScorer:
    """Scores held-out data for recorded weights on a worker thread, handing results back in order.

    Scoring 10,000 test images takes milliseconds, as long as dozens of training steps; on
    the worker thread (torch releases the GIL in its kernels) it overlaps training instead.
    A stack's runs share one ``thread`` (:func:`scoring_thread`, closed by its creator): one
    thread each took turns on the training core with it. ``score(parameters, images,
    labels)`` scores any model from its parameters (numpy arrays or tensors, None for a
    missing bias); by default softmax regression's (weight, bias).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, thread: ThreadPoolExecutor | None = None,
                 score: Callable[[Sequence, torch.Tensor, torch.Tensor], Evaluation] | None = None) -> None:
        self.images, self.labels = images, labels
        self._score = score or _score_softmax_regression
        self._owns_thread = thread is None
        self._executor = scoring_thread() if thread is None else thread
        self._pending: deque[tuple[int, Future]] = deque()

    def submit(self, step: int, *parameters: np.ndarray | torch.Tensor | None) -> None:
        # Copies: the training thread goes on updating the arrays (or tensors) it passed in.
        copies = tuple(None if value is None else value.copy() if isinstance(value, np.ndarray)
                       else value.detach().clone() for value in parameters)
        self._pending.append((step, self._executor.submit(self._score, copies, self.images, self.labels)))

    def scored(self, *, wait: bool = False) -> Iterator[tuple[int, Evaluation]]:
        """(step, evaluation) of the scorings finished so far (all of them, with ``wait``), in step order."""
        while self._pending and (wait or self._pending[0][1].done()):
            step, future = self._pending.popleft()
            yield step, future.result()

    def __enter__(self) -> HeldOutScorer:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._owns_thread:
            self._executor.shutdown(wait=True, cancel_futures=True)
        else:  # the thread goes on for the other runs; this run's scorings are not wanted any more
            for _, future in self._pending:
                future.cancel()


def _score_softmax_regression(parameters: Sequence, images: torch.Tensor, labels: torch.Tensor) -> Evaluation:
    weight, bias = parameters
    return evaluate(weight, bias, images, labels)
