"""Animation frame spacing: which steps an animation shows (viewer/analysis/spacing.py)."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from viewer_runs import training_like, write_run

from weightlapse.viewer.analysis.export import animation_steps
from weightlapse.viewer.analysis.runs import RunCatalog
from weightlapse.viewer.analysis.spacing import (
    DEFAULT_SPACING,
    SPACINGS,
    Travelled,
    combined,
    distance_steps,
    even_steps,
    log_steps,
    path_length,
    spaced_steps,
    travelled_by,
)


REPO = Path(__file__).resolve().parents[1]
PARAMS = """\
data:
  dataset: fashion-mnist
datasets:
  fashion-mnist: {}
train:
  max_steps: 3000
  eval_every: 1000
runs:
  adam: {}
"""


@pytest.fixture
def trained(tmp_path, debian_fashion):
    """The original study's run (Adam, batch 20) for 3,000 steps of real Fashion-MNIST, by the train stage."""
    data = tmp_path / "data"
    shutil.copytree(debian_fashion, data)
    (tmp_path / "params.yaml").write_text(PARAMS)
    subprocess.run([sys.executable, "-m", "weightlapse.pipeline.train", "--params", str(tmp_path / "params.yaml"),
                    "--run", "adam", "--data", str(data), "--out", str(tmp_path / "runs" / "adam")], check=True,
                   cwd=REPO, capture_output=True)
    return RunCatalog(tmp_path / "runs").open("adam")


@pytest.fixture
def run(tmp_path):
    """A run that moves like training: fast at first, then noise around where it settles."""
    write_run(tmp_path / "runs" / "trained", training_like(3000, seed=2), chunk_steps=64)
    return RunCatalog(tmp_path / "runs").open("trained")


@pytest.mark.parametrize("spacing", ["even", "log"])
@pytest.mark.parametrize("start, stop, frames", [(0, 2999, 100), (17, 300_016, 300), (5, 9, 100), (4, 4, 3),
                                                 (0, 1, 2), (10, 110, 101)])
def test_every_spacing_keeps_both_ends_and_exactly_the_frames_the_range_allows(spacing, start, stop, frames):
    steps = spaced_steps(spacing, start, stop, frames)
    assert steps.dtype == np.int64 and steps[0] == start and steps[-1] == stop
    assert np.all(np.diff(steps) > 0)                         # sorted, no frame twice
    assert len(steps) == min(frames, stop - start + 1)


def test_even_spacing_matches_numpy():
    np.testing.assert_array_equal(even_steps(0, 2999, 100), np.linspace(0, 2999, 100).round().astype(int))
    assert np.ptp(np.diff(even_steps(0, 299_999, 300))) <= 1


def test_log_spacing_is_every_step_at_first_then_a_constant_ratio():
    steps = log_steps(0, 2999, 100)
    assert steps[:20].tolist() == list(range(20))             # the first steps each get a frame
    ratios = (steps[60:] + 1) / (steps[59:-1] + 1)
    reference = ((3000 / (steps[59] + 1)) ** (1 / 40))          # the ratio numpy's geomspace takes from there
    np.testing.assert_allclose(ratios, reference, rtol=0.02)
    np.testing.assert_allclose(steps[59:] + 1, np.geomspace(steps[59] + 1, 3000, 41), rtol=0.02)


def test_distance_spacing_gives_equal_shares_of_the_distance():
    # a path that travels 10 per step for 10 steps, then 1 per step for 90
    steps = np.arange(101)
    distance = np.concatenate([[0], np.cumsum([10.0] * 10 + [1.0] * 90)])
    chosen = distance_steps(0, 100, 20, Travelled(steps, distance))
    # half the distance (95 of 190) is in the first 10 steps: about half the frames are there
    assert 9 <= np.sum(chosen <= 10) <= 11
    shares = np.diff(np.interp(chosen, steps, distance))
    assert shares[1:-1].max() <= 2 * 190 / 19 and chosen[0] == 0 and chosen[-1] == 100
    # a range that never moves is spaced evenly; a jump larger than a frame's share gets one frame
    np.testing.assert_array_equal(distance_steps(0, 100, 5, Travelled(steps, np.zeros(101))),
                                  even_steps(0, 100, 5))
    jump = distance_steps(0, 100, 50, Travelled(steps, np.where(steps >= 50, 1.0, 0.0)))
    assert jump.tolist() == [0, 50, 100]
    with pytest.raises(ValueError, match="covers steps 0..100, not 0..200"):
        distance_steps(0, 200, 5, Travelled(steps, distance))


def test_path_length_matches_numpy_on_a_real_store(run):
    rows = training_like(3000, seed=2).astype(np.float64)
    every = path_length(run.weights(100, 400), np.arange(100, 401))
    reference = np.concatenate([[0], np.cumsum(np.linalg.norm((rows[101:401] - rows[100:400]).reshape(300, -1),
                                                              axis=1))])
    np.testing.assert_allclose(every.distance, reference, rtol=1e-10)
    sampled = travelled_by(run, 0, 3000, max_samples=31)     # 31 steps 100 apart: the change between them
    assert sampled.steps.tolist() == list(range(0, 3001, 100))
    chords = np.linalg.norm((rows[100::100] - rows[:-100:100]).reshape(30, -1), axis=1)
    np.testing.assert_allclose(np.diff(sampled.distance), chords, rtol=1e-10)


def test_the_default_spacing_shows_the_early_steps_of_a_training_run(trained):
    # a third of the frames in the first 10% of the steps, where the picture forms
    default = animation_steps(0, 3000, max_frames=100)
    assert DEFAULT_SPACING in SPACINGS and np.sum(default <= 300) >= 34
    # Adam moves every weight about lr a step, so the distance travelled (noise included) grows
    # nearly evenly: by distance, the first 10% get more frames than evenly, not a third
    by_distance = animation_steps(0, 3000, max_frames=100, spacing="distance",
                                  travelled=lambda: travelled_by(trained, 0, 3000))
    assert np.sum(by_distance <= 300) >= 12 and len(by_distance) == 100
    evenly = animation_steps(0, 3000, max_frames=100, spacing="even")
    assert np.sum(evenly <= 300) == 10 and np.ptp(np.diff(evenly)) <= 1


def test_runs_side_by_side_share_one_spacing_by_their_summed_distance():
    first = Travelled(np.array([0, 10, 20]), np.array([0.0, 1.0, 2.0]))
    ended = Travelled(np.array([0, 5]), np.array([0.0, 3.0]))   # a shorter run: no distance after step 5
    total = combined([first, ended])
    assert total.steps.tolist() == [0, 5, 10, 20]
    np.testing.assert_allclose(total.distance, [0.0, 3.5, 4.0, 5.0])


def test_unknown_or_impossible_spacings_say_what_to_do():
    with pytest.raises(ValueError, match="unknown frame spacing 'cubic'; choose one of log, even, distance"):
        spaced_steps("cubic", 0, 10, 5)
    with pytest.raises(ValueError, match="empty"):
        spaced_steps("log", 9, 3, 5)
    with pytest.raises(ValueError, match="needs the run's distance"):
        spaced_steps("distance", 0, 10, 5)
