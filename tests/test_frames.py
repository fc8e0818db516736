"""Pure picture computations: mosaic layout, colour scaling, diffs, curve binning, step checks."""

import numpy as np
import pytest

from weightlapse.viewer.analysis.frames import (
    centred,
    class_mean_fraction,
    clamp_step,
    diff_summary,
    downsample_curve,
    mosaic,
    scale_per_class,
    tile_origin,
)


def test_mosaic_places_each_class_as_a_28x28_tile_in_two_rows_of_five():
    frames = np.arange(10 * 784, dtype=np.float32).reshape(10, 784)
    picture = mosaic(frames, header=5)
    assert picture.shape == (2 * (28 + 5), 5 * 29 - 1)
    for index in range(10):
        top, left = tile_origin(index, header=5)
        assert (top, left) == (5 + (index // 5) * 33, (index % 5) * 29)
        np.testing.assert_array_equal(picture[top:top + 28, left:left + 28], frames[index].reshape(28, 28))
    # everything outside the tiles is NaN (background), never a fake zero weight
    assert np.isnan(picture).sum() == picture.size - 10 * 784


def test_per_class_scale_maps_each_tile_to_its_own_range():
    frames = np.zeros((10, 784), np.float32)
    frames[3, 7], frames[4, 0] = -8, 0.5
    scaled = scale_per_class(frames)
    assert scaled[3, 7] == -1 and scaled[4, 0] == 1
    assert not np.any(scaled[0])  # an all-zero class stays zero, no division by zero


def test_diff_summary_matches_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 10, 784)).astype(np.float32)
    summary = diff_summary(a, b)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    assert summary.l2 == pytest.approx(np.linalg.norm(b64 - a64))
    assert summary.cosine == pytest.approx(a64.ravel() @ b64.ravel() / np.linalg.norm(a64) / np.linalg.norm(b64))
    np.testing.assert_allclose(summary.l2_per_class, np.linalg.norm(b64 - a64, axis=1))
    assert diff_summary(a, a).l2 == 0 and diff_summary(a, a).cosine == pytest.approx(1)
    assert np.isnan(diff_summary(np.zeros_like(a), b).cosine)
    with pytest.raises(ValueError, match="cannot compare"):
        diff_summary(a, b[:5])


def test_long_curves_are_binned_keeping_the_extremes():
    steps = np.arange(1, 300_001)
    values = np.sin(steps / 5000.0)
    values[123_456] = 50.0  # a spike must survive binning
    values[200] = np.nan
    x, mean, low, high = downsample_curve(steps, values, 1000)
    assert len(x) == len(mean) == 1000 and x[0] == 1
    assert np.nanmax(high) == 50.0
    assert np.all(low <= mean) and np.all(mean <= high)
    short = downsample_curve(steps[:10], values[:10], 1000)
    np.testing.assert_array_equal(short[1], values[:10])


@pytest.mark.parametrize("given, expected, problem", [
    ("12", 12, ""), (0, 0, ""), (-3, 0, "before the first step"), ("999", 100, "past this run's last step"),
    ("abc", 100, "not a number"), (None, 100, "not a number"), ("1e400", 100, "not a number"),
])
def test_untrusted_steps_are_clamped_with_a_reason(given, expected, problem):
    step, message = clamp_step(given, 100)
    assert step == expected
    assert problem in message and bool(message) == bool(problem)


def test_centring_removes_each_pixels_class_mean_and_keeps_what_predicts():
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(3, 10, 784)).astype(np.float32) + rng.normal(size=(1, 1, 784)).astype(np.float32)
    got = centred(weights)
    np.testing.assert_allclose(got, weights - weights.mean(axis=1, keepdims=True), atol=1e-6)
    image = rng.random(784).astype(np.float32)
    logits, centred_logits = weights[1] @ image, got[1] @ image
    np.testing.assert_allclose(logits - centred_logits, np.full(10, (logits - centred_logits)[0]), atol=1e-4)
    # the squared weights split into the centred part and the class-mean part
    row = weights[2].astype(np.float64)
    share = class_mean_fraction(row)
    np.testing.assert_allclose((got[2].astype(np.float64) ** 2).sum(), (1 - share) * (row ** 2).sum(), rtol=1e-5)
    assert class_mean_fraction(np.zeros((10, 784))) == 0.0
