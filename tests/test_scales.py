"""Whole-run colour scales (viewer/analysis/scales.py): which steps they read, and what they keep."""

import numpy as np

from weightlapse.viewer.analysis.scales import RunScales, largest_magnitude, sampled_steps


def test_a_scale_reads_the_first_step_of_evenly_spaced_chunks_and_the_newest():
    assert sampled_steps(-1, 64) == []
    assert sampled_steps(0, 64) == [0]
    assert sampled_steps(200, 64) == [0, 64, 128, 192, 200]
    for last in (10_000, 300_000, 3_000_000):
        steps = sampled_steps(last, 64)
        assert steps[0] == 0 and steps[-1] == last and len(steps) <= 34
        assert all(step % 64 == 0 for step in steps[:-1]) and steps == sorted(set(steps))
    # As a run grows, its chunk samples stay among the earlier ones (a power-of-two stride), so
    # the magnitudes already read are read again from the cache, not from the store.
    earlier = set(sampled_steps(100_000, 64)[:-1])
    assert set(sampled_steps(150_000, 64)[:-1]) <= earlier | set(range(100_032, 150_001, 64))


def test_a_scale_is_the_largest_sampled_magnitude_each_read_once():
    scales, reads = RunScales(kept=2), []

    def magnitude_at(step):
        reads.append(step)
        return float(step % 7)

    assert scales.limit("a", [0, 3, 5], magnitude_at) == 5.0
    assert scales.limit("a", [0, 3, 5, 6], magnitude_at) == 6.0
    assert reads == [0, 3, 5, 6]  # the first three were kept
    assert scales.limit("zero", [0, 7], magnitude_at) == 1.0  # nothing to scale: not a zero-wide range
    assert scales.limit("none", [], magnitude_at) == 1.0
    scales.limit("b", [1], magnitude_at)
    reads.clear()
    scales.limit("a", [0], magnitude_at)  # kept=2: "a" was the least recently used, dropped
    assert reads == [0]


def test_the_largest_magnitude_ignores_what_is_not_finite():
    assert largest_magnitude(np.array([1.0, -3.0, np.nan, np.inf])) == 3.0
    assert largest_magnitude(np.array([np.nan])) == 0.0
