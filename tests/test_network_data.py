"""What the network view reads, cached by the store (viewer/network_data.py): a parameter's colour
limit over the whole run, one weight's history, statistics and distances, and a run recorded
again read afresh."""

import shutil

import numpy as np
import pytest
from network_runs import mlp, record
from viewer_runs import training_like, write_run

from weightlapse.viewer.data import DataStore


@pytest.fixture
def runs(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "softmax", training_like(10, seed=0), name="softmax")
    return runs


def test_a_parameters_colour_limit_covers_the_sampled_steps_and_parameter_sizes_name_the_layers(runs):
    seen = record(runs / "mlp", mlp(seed=0), steps=6)
    store = DataStore(runs)
    run = store.networks.network("mlp")
    limit = store.networks.colour_limit(run, "output.weight")
    assert limit == max(np.abs(seen[step]["output.weight"]).max() for step in (0, 6))  # one chunk: its first and the newest
    assert store.networks.parameter_sizes("mlp") == {"hidden1.weight": 16 * 784, "hidden1.bias": 16,
                                                     "output.weight": 160, "output.bias": 10}
    assert store.networks.parameter_sizes("softmax") == {} and store.networks.network("softmax") is None


def test_a_differences_colour_limit_covers_the_sampled_steps_of_one_run_or_both(runs):
    # Step vs step and Run vs run on the whole run's scale: the largest change from "From step",
    # or difference of the two runs, over the sampled steps (one chunk: its first and the newest).
    seen = record(runs / "a", mlp(seed=0), steps=6)
    other = record(runs / "b", mlp(seed=1), steps=6)
    store = DataStore(runs)
    a, b = store.networks.network("a"), store.networks.network("b")
    for name in ("hidden1.weight", "output.bias"):
        change = max(np.abs(seen[step][name] - seen[2][name]).max() for step in (0, 6))
        assert store.networks.change_limit(a, name, 2) == change
        difference = max(np.abs(other[step][name] - seen[step][name]).max() for step in (0, 6))
        assert store.networks.difference_limit(a, b, name) == difference


def test_a_weights_history_is_cached_by_the_store_and_read_afresh_when_recorded_again(runs):
    record(runs / "mlp", mlp(seed=0), steps=4)
    store = DataStore(runs)
    first = store.networks.weight_history(store.networks.network("mlp"), "output.weight", 17)
    assert store.networks.weight_history(store.networks.network("mlp"), "output.weight", 17) is first
    shutil.rmtree(runs / "mlp")
    seen = record(runs / "mlp", mlp(seed=3), steps=5)
    store.refresh("mlp")
    steps, values = store.networks.weight_history(store.networks.network("mlp"), "output.weight", 17)
    np.testing.assert_array_equal(steps, np.arange(6))
    np.testing.assert_array_equal(values, [seen[step]["output.weight"][1, 1] for step in range(6)])
    with pytest.raises(IndexError, match="outside output.weight's 160 weights"):
        store.networks.weight_history(store.networks.network("mlp"), "output.weight", 160)


def test_statistics_and_distances_are_kept_once_computed(runs):
    record(runs / "a", mlp(seed=0), steps=4)
    record(runs / "b", mlp(seed=1), steps=4)
    store = DataStore(runs)
    a, b = store.networks.network("a"), store.networks.network("b")
    assert store.networks.statistics(a, "hidden1.bias", 0, 4) is None
    stats = store.networks.compute_statistics(a, "hidden1.bias", 0, 4)
    assert store.networks.statistics(a, "hidden1.bias", 0, 4) is stats
    assert store.networks.distances(a, b, 1) is None
    distances = store.networks.compute_distances(a, b, 1)
    assert store.networks.distances(a, b, 1) is distances and distances.shape == (4, 5)


def test_the_distance_a_parameter_travels_is_measured_in_its_own_shape(runs):
    # The animation's spacing "by distance travelled", for a layer of a network: a bias (1-d)
    # and a matrix alike.
    seen = record(runs / "mlp", mlp(seed=0), steps=5)
    store = DataStore(runs)
    run = store.networks.network("mlp")
    for name in ("output.bias", "hidden1.weight"):
        travelled = store.networks.travelled(run, name, 1, 5)
        steps = np.arange(1, 6)
        expected = np.cumsum([0.0] + [np.linalg.norm(seen[step][name].astype(np.float64) - seen[step - 1][name])
                                      for step in steps[1:]])
        np.testing.assert_array_equal(travelled.steps, steps)
        np.testing.assert_allclose(travelled.distance, expected, rtol=1e-6)
        assert store.networks.travelled(run, name, 1, 5) is travelled
