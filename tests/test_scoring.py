"""The held-out scorer: scores weights on its thread, hands them back in step order, copies
what it is given, and leaves a shared thread running for the other runs."""

import numpy as np
import torch

from weightlapse.pipeline.scoring import HeldOutScorer, scoring_thread
from weightlapse.pipeline.trainer import evaluate


def test_scores_come_back_in_step_order_for_the_weights_submitted():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.random((200, 784), dtype=np.float32))
    labels = torch.from_numpy(rng.integers(0, 10, 200))
    weights = [rng.standard_normal((10, 784)).astype(np.float32) for _ in range(5)]
    bias = np.zeros(10, np.float32)
    with HeldOutScorer(images, labels) as scorer:
        live = weights[0].copy()
        for step, weight in enumerate(weights):
            live[...] = weight  # one array, updated in place, as an engine's weights are
            scorer.submit(step * 10, live, bias)
        live[...] = 0
        scored = list(scorer.scored(wait=True))
    assert [step for step, _ in scored] == [0, 10, 20, 30, 40]
    for (_, evaluation), weight in zip(scored, weights):
        assert evaluation == evaluate(weight, bias, images, labels)
    assert len({evaluation.loss for _, evaluation in scored}) == 5  # the weights differed


def test_a_shared_thread_outlives_its_scorers():
    images, labels = torch.zeros(4, 784), torch.zeros(4, dtype=torch.long)
    thread = scoring_thread()
    try:
        with HeldOutScorer(images, labels, thread=thread) as scorer:
            scorer.submit(0, np.zeros((10, 784), np.float32), None)
            assert [step for step, _ in scorer.scored(wait=True)] == [0]
        assert thread.submit(lambda: 7).result() == 7  # still running for the stack's other runs
    finally:
        thread.shutdown(wait=True)
