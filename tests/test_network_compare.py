"""Comparing network runs with their hidden units matched (viewer/analysis/network_compare.py),
on real stores recorded by ``weightlapse.Recorder`` from small torch loops."""

import copy

import numpy as np
import pytest
import torch
from network_runs import conv_net, mlp, record
from viewer_runs import training_like, write_run

from weightlapse.viewer.analysis import network_compare
from weightlapse.viewer.analysis.network import linear_chain
from weightlapse.viewer.analysis.runs import RunCatalog

PERMUTATION = np.array([3, 0, 7, 1, 2, 6, 4, 5, 15, 8, 9, 14, 10, 13, 11, 12])


def relabelled_copy(model: torch.nn.Module, order: np.ndarray) -> torch.nn.Module:
    """The same network with its hidden units in ``order``: unit i of the copy is unit order[i]."""
    other = copy.deepcopy(model)
    index = torch.as_tensor(order)
    with torch.no_grad():
        other.hidden1.weight.copy_(model.hidden1.weight[index])
        other.hidden1.bias.copy_(model.hidden1.bias[index])
        other.output.weight.copy_(model.output.weight[:, index])
    return other


def two_hidden(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(784, 12), torch.nn.Tanh(), torch.nn.Linear(12, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 10))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("network-compare") / "runs"
    model = mlp(hidden=16, seed=0)
    record(root / "net", model, steps=20)
    # trained on the same batches, a relabelled copy is the same network at every step
    record(root / "net-relabelled", relabelled_copy(mlp(hidden=16, seed=0), PERMUTATION), steps=20)
    record(root / "net-seed1", mlp(hidden=16, seed=1), steps=20)
    record(root / "deep", two_hidden(0), steps=20)
    record(root / "deep-seed1", two_hidden(1), steps=20)
    record(root / "conv", conv_net(0), steps=4, inputs=(1, 8, 8))
    record(root / "conv-seed1", conv_net(1), steps=4, inputs=(1, 8, 8))
    write_run(root / "softmax", training_like(20, seed=0), name="softmax")
    diverged = mlp(hidden=16, seed=2)
    with torch.no_grad():
        diverged.hidden1.weight[0, 0] = float("inf")
    record(root / "net-diverged", diverged, steps=3)
    catalog = RunCatalog(root)
    return {name: catalog.open(name) for name in ("net", "net-relabelled", "net-seed1", "deep", "deep-seed1", "conv",
                                                  "conv-seed1", "net-diverged")}


def test_a_relabelled_copy_is_matched_back_to_the_same_network_at_every_step(runs):
    result = network_compare.compare_networks({"net": runs["net"], "net-relabelled": runs["net-relabelled"]})
    assert result.attrs["matched"] and "hidden1 matched to net's" in result.attrs["matching"]
    assert int(result.moved_units.sel(other_run="net-relabelled")) == int((PERMUTATION != np.arange(16)).sum())
    matched = result.distance_to_reference.sel(other_run="net-relabelled").values
    as_recorded = result.unmatched_distance.sel(other_run="net-relabelled").values
    assert list(result.step.values) == list(range(21))
    assert as_recorded.min() > 1.0  # the same function, far apart as recorded
    assert matched.max() < 1e-5 * as_recorded.min()  # float rounding only: the sums run in another order
    np.testing.assert_allclose(result.cosine.values, 1.0, atol=1e-6)
    # the permutation found is the inverse of the relabelling: unit perm[i] of the copy is unit i
    reference = {name: runs["net"].values_at(name, 20) for name in runs["net"].names}
    other = {name: runs["net-relabelled"].values_at(name, 20) for name in runs["net"].names}
    (perm,) = network_compare.match_units(reference, other, linear_chain(runs["net"].parameters))
    np.testing.assert_array_equal(perm, np.argsort(PERMUTATION))


@pytest.mark.parametrize("names", [("net", "net-seed1"), ("deep", "deep-seed1")])
def test_matching_never_takes_runs_apart_and_keeps_each_runs_own_weights(runs, names):
    """Matching starts from the recorded order and only moves units when that brings the runs
    closer: at the step matched the distance shrinks; without matching it is the recorded one."""
    chosen = {name: runs[name] for name in names}
    result = network_compare.compare_networks(chosen, every=3)
    assert list(result.step.values) == [0, 3, 6, 9, 12, 15, 18, 20]
    if names[0] == "deep":
        assert "hidden units of layer 0, layer 2 matched" in result.attrs["matching"]
    other = names[1]
    matched = result.distance_to_reference.sel(other_run=other)
    as_recorded = result.unmatched_distance.sel(other_run=other)
    assert float(matched.isel(step=-1)) < float(as_recorded.isel(step=-1))
    plain = network_compare.compare_networks(chosen, every=3, match=False)
    assert plain.attrs["matched"] == 0 and plain.attrs["matching"] == "units not matched: not asked for"
    np.testing.assert_allclose(plain.distance_to_reference.values, as_recorded.values.reshape(1, -1), rtol=1e-12)
    # the similarity matrix's distance is the distance drawn at the last step
    assert result.distance.sel(run=names[0], other=other).item() == pytest.approx(float(matched.isel(step=-1)))
    # per parameter, at the last step: their squares add up to the whole distance's
    per_parameter = result.distance_per_parameter.sel(other_run=other).values
    assert np.sqrt((per_parameter ** 2).sum()) == pytest.approx(float(matched.isel(step=-1)))
    assert result.pca_path.shape == (2, 8, 2)
    assert result.explained_variance_ratio.values[0] >= result.explained_variance_ratio.values[1]


def test_a_model_that_is_not_a_chain_of_linear_layers_is_compared_as_recorded_and_other_models_refused(runs):
    result = network_compare.compare_networks({"conv": runs["conv"], "conv-seed1": runs["conv-seed1"]})
    assert result.attrs["matched"] == 0
    assert result.attrs["matching"].startswith("units not matched: 0.weight is a weight of a Conv2d")
    np.testing.assert_array_equal(result.distance_to_reference.values, result.unmatched_distance.values)
    with pytest.raises(ValueError, match="net-diverged's hidden1.weight is not finite at step 3: the run diverged"):
        network_compare.compare_networks({"net": runs["net"], "net-diverged": runs["net-diverged"]})
    with pytest.raises(ValueError, match="the runs record different models"):
        network_compare.compare_networks({"net": runs["net"], "deep": runs["deep"]})
    with pytest.raises(ValueError, match="at least 2 network runs"):
        network_compare.compare_networks({"net": runs["net"]})


def test_the_compare_command_writes_a_network_comparison_and_refuses_what_does_not_apply(runs, tmp_path):
    import xarray as xr

    from weightlapse.viewer.analysis import compare

    root = str(runs["net"].store.local_path.parent.parent)
    out = tmp_path / "comparison.zarr"
    assert compare.main([root, "--runs", "net", "net-seed1", "--every", "5", "--out", str(out)]) == 0
    written = xr.open_zarr(out)
    expected = network_compare.compare_networks({"net": runs["net"], "net-seed1": runs["net-seed1"]}, every=5)
    np.testing.assert_array_equal(written.distance_to_reference.values, expected.distance_to_reference.values)
    assert written.attrs["matching"] == expected.attrs["matching"]
    assert list(written.parameter.values) == runs["net"].names
    assert compare.main([root, "--runs", "net", "net-seed1", "--unmatched", "--out", str(out)]) == 0
    assert xr.open_zarr(out).attrs["matched"] == 0
    refused = tmp_path / "refused.zarr"
    for names, extra in ((["net", "net-seed1"], ["--centred"]), (["net", "deep"], []), (["net", "softmax"], [])):
        assert compare.main([root, "--runs", *names, *extra, "--out", str(refused)]) == 1
    assert not refused.exists()
