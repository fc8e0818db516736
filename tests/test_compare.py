"""Cross-run analytics against plain numpy on real stores, and the runs index they start from."""

import numpy as np
import pytest
import xarray as xr
from viewer_runs import training_like, write_run

from weightlapse.viewer.analysis import compare
from weightlapse.viewer.analysis.runs import RunCatalog

SEEDS = (0, 1, 2)


@pytest.fixture
def catalog(tmp_path):
    """Three seeds of one setup (of different lengths) and one run of another optimizer."""
    runs = tmp_path / "runs"
    for seed, n_steps in zip(SEEDS, (120, 100, 130)):
        write_run(runs / f"adam-seed{seed}", training_like(n_steps, seed=seed), name=f"adam-seed{seed}",
                  params={"optimizer": "adam", "lr": 0.001, "batch_size": 20, "seed": seed})
    write_run(runs / "sgd-seed0", training_like(100, seed=7), name="sgd-seed0",
              params={"optimizer": "sgd", "lr": 0.01, "batch_size": 20, "seed": 0})
    return RunCatalog(runs)


def stored(catalog, name, n=101):
    return np.asarray(catalog.open(name).weights(0, n - 1), dtype=np.float64)


def test_the_runs_index_groups_runs_that_differ_only_in_seed(catalog):
    index = catalog.index()
    assert list(index.index) == ["adam-seed0", "adam-seed1", "adam-seed2", "sgd-seed0"]
    assert set(index.columns) >= {"state", "steps_done", "optimizer", "lr", "seed", "group",
                                  "metric.heldout_accuracy"}
    assert (index.state == "finished").all()
    assert index.loc["adam-seed2", "steps_done"] == 130 and index.loc["adam-seed1", "seed"] == 1
    groups = index.groupby("group").size()
    assert sorted(groups.values) == [1, 3]
    assert index.loc["adam-seed0", "group"] == index.loc["adam-seed2", "group"] != index.loc["sgd-seed0", "group"]


def test_distance_over_steps_is_numpys(catalog):
    runs = compare.open_trajectories(catalog, ["adam-seed0", "adam-seed1"])
    result = compare.distance_over_steps(runs["adam-seed0"], runs["adam-seed1"])
    a, b = stored(catalog, "adam-seed0"), stored(catalog, "adam-seed1")
    assert list(result.step.values) == list(range(101))  # the steps both runs have
    np.testing.assert_allclose(result.distance, np.sqrt(((a - b) ** 2).sum(axis=(1, 2))), rtol=1e-12)
    np.testing.assert_allclose(result.distance_per_class, np.sqrt(((a - b) ** 2).sum(axis=2)), rtol=1e-12)
    cosine = (a * b).sum(axis=(1, 2)) / np.sqrt((a ** 2).sum(axis=(1, 2)) * (b ** 2).sum(axis=(1, 2)))
    np.testing.assert_allclose(result.cosine, cosine, rtol=1e-12)

    strided = compare.distance_over_steps(runs["adam-seed0"], runs["adam-seed1"], every=30)
    assert list(strided.step.values) == [0, 30, 60, 90, 100]  # the last shared step always counts
    np.testing.assert_allclose(strided.distance, result.distance.sel(step=[0, 30, 60, 90, 100]), rtol=1e-12)


def test_spread_across_seeds_is_numpys_std(catalog):
    names = [f"adam-seed{seed}" for seed in SEEDS]
    runs = compare.open_trajectories(catalog, names)
    stack = np.stack([stored(catalog, name) for name in names])
    expected = stack.std(axis=0, ddof=1)
    spread = compare.spread_across_runs(runs)
    assert spread.dims == ("step", "class", "pixel") and spread.shape == (101, 10, 784)
    np.testing.assert_allclose(spread.sel(step=40), expected[40], rtol=1e-10, atol=1e-15)
    fractions = []
    summary = compare.spread_summary(runs, step=40, progress=fractions.append)
    np.testing.assert_allclose(summary.mean_spread, expected.mean(axis=(1, 2)), rtol=1e-10)
    np.testing.assert_allclose(summary.spread, expected[40], rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(summary.spread_over_classes, np.sqrt((expected[40] ** 2).sum(axis=0)), rtol=1e-10)
    assert fractions and fractions[-1] == pytest.approx(1.0)


def test_similarity_matrix_is_numpys(catalog):
    names = ["adam-seed0", "adam-seed1", "sgd-seed0"]
    result = compare.similarity_matrix(compare.open_trajectories(catalog, names))
    assert result.attrs["step"] == 100
    flat = np.stack([stored(catalog, name)[100].ravel() for name in names])
    norms = np.linalg.norm(flat, axis=1)
    np.testing.assert_allclose(result.cosine, flat @ flat.T / np.outer(norms, norms), rtol=1e-12)
    np.testing.assert_allclose(result.distance, np.linalg.norm(flat[:, None] - flat[None], axis=2), atol=1e-9)
    np.testing.assert_allclose(np.diag(result.cosine), 1.0)
    assert list(result.run.values) == names


def test_trajectory_pca_matches_an_exact_svd_in_one_shared_basis(catalog):
    names = [f"adam-seed{seed}" for seed in SEEDS]
    runs = compare.open_trajectories(catalog, names)
    pca = compare.trajectory_pca(runs, n_components=3)
    stack = np.concatenate([stored(catalog, name) .reshape(101, -1) for name in names])
    centred = stack - stack.mean(axis=0)
    _, singular, basis = np.linalg.svd(centred, full_matrices=False)
    ratio = singular ** 2 / (centred ** 2).sum()
    np.testing.assert_allclose(pca.explained_variance_ratio[:3], ratio[:3], rtol=1e-6)
    for k in range(3):  # the same component up to sign; the sign is fixed by the largest loading
        loading = pca.components.values[k].ravel()
        assert abs(abs(loading @ basis[k]) - 1) < 1e-6
        assert loading[np.abs(loading).argmax()] > 0
    projected = centred @ pca.components.values.reshape(3, -1).T
    np.testing.assert_allclose(pca.path.values.reshape(-1, 3), projected, rtol=1e-6, atol=1e-9)
    assert pca.path.dims == ("run", "step", "component") and list(pca.run.values) == names
    np.testing.assert_allclose(pca.random_walk_ratio[:2], [6 / np.pi ** 2, 6 / (4 * np.pi ** 2)])
    assert "random walk" in pca.attrs["caveat"]


def test_too_few_runs_or_steps_say_what_to_do(catalog):
    runs = compare.open_trajectories(catalog, ["adam-seed0"])
    with pytest.raises(ValueError, match="at least 2 runs"):
        compare.spread_across_runs(runs)
    with pytest.raises(ValueError, match="outside the steps all runs have"):
        compare.similarity_matrix(runs, step=500)


def test_the_command_writes_every_comparison_of_a_group(catalog, tmp_path):
    group = catalog.index().loc["adam-seed0", "group"]
    out = tmp_path / "comparison.zarr"
    assert compare.main([str(catalog.runs_dir), "--group", group, "--every", "10", "--out", str(out)]) == 0
    result = xr.open_zarr(out)
    assert list(result.run.values) == ["adam-seed0", "adam-seed1", "adam-seed2"]
    assert result.distance_to_reference.dims == ("other_run", "step")
    assert result.pca_path.shape == (3, 11, 2)
    assert compare.main([str(catalog.runs_dir), "--group", "no such group", "--out", str(out)]) == 1
    assert result.attrs["weights"] == "raw"
    centred = tmp_path / "centred.zarr"
    assert compare.main([str(catalog.runs_dir), "--group", group, "--every", "10", "--centred", "--out",
                         str(centred)]) == 0
    assert xr.open_zarr(centred).attrs["weights"].startswith("centred")


def test_the_runs_index_command_writes_it_as_csv(catalog, tmp_path):
    import pandas as pd

    from weightlapse.viewer.analysis.runs import main

    assert main([str(catalog.runs_dir), "--csv", str(tmp_path / "index.csv")]) == 0
    table = pd.read_csv(tmp_path / "index.csv", index_col="name")
    assert list(table.index) == ["adam-seed0", "adam-seed1", "adam-seed2", "sgd-seed0"]
    assert list(table.optimizer) == ["adam", "adam", "adam", "sgd"] and table.group.nunique() == 2


def test_the_command_never_writes_over_the_runs_it_compares(catalog, tmp_path):
    group = catalog.index().loc["adam-seed0", "group"]
    runs = catalog.runs_dir.local_path
    for out in (runs, runs / "adam-seed0", runs / "comparison.zarr", runs / "adam-seed1" / "trajectory.zarr"):
        assert compare.main([str(runs), "--group", group, "--out", str(out)]) == 1
    assert {info.state for info in catalog.list()} == {"finished"} and len(catalog.list()) == 4


def test_the_distance_splits_into_its_centred_and_class_mean_parts(catalog):
    runs = compare.open_trajectories(catalog, ["adam-seed0", "adam-seed1"])
    result = compare.distance_over_steps(runs["adam-seed0"], runs["adam-seed1"])
    a, b = stored(catalog, "adam-seed0"), stored(catalog, "adam-seed1")
    mean_a, mean_b = a.mean(axis=1, keepdims=True), b.mean(axis=1, keepdims=True)
    centred = np.sqrt((((a - mean_a) - (b - mean_b)) ** 2).sum(axis=(1, 2)))
    class_mean = np.sqrt(10 * ((mean_a - mean_b) ** 2).sum(axis=(1, 2)))
    np.testing.assert_allclose(result.centred_distance.values, centred, rtol=1e-9)
    np.testing.assert_allclose(result.class_mean_distance.values, class_mean, rtol=1e-9)
    np.testing.assert_allclose(result.distance ** 2, result.centred_distance ** 2 + result.class_mean_distance ** 2,
                               rtol=1e-9)


def test_centred_weights_have_no_class_mean_and_predict_the_same(catalog):
    weights = compare.open_trajectories(catalog, ["adam-seed0"])["adam-seed0"]
    centred = compare.centred(weights)
    assert centred.dims == weights.dims and np.abs(centred.mean("class").values).max() < 1e-6
    images = np.random.default_rng(0).random((20, 784))
    logits, centred_logits = weights.values[50] @ images.T, centred.values[50] @ images.T
    shift = logits - centred_logits  # the same for every class: softmax ignores it
    np.testing.assert_allclose(shift, np.broadcast_to(shift[:1], shift.shape), atol=1e-4)


def test_a_centred_comparison_uses_the_centred_weights_throughout(catalog):
    runs = compare.open_trajectories(catalog, ["adam-seed0", "adam-seed1", "adam-seed2"])
    raw = compare.compare_runs(runs)
    result = compare.compare_runs(runs, centre=True)
    assert result.attrs["weights"].startswith("centred") and raw.attrs["weights"] == "raw"
    split = compare.distance_over_steps(runs["adam-seed0"], runs["adam-seed1"])
    np.testing.assert_allclose(result.distance_to_reference.sel(other_run="adam-seed1"), split.centred_distance)
    np.testing.assert_allclose(result.class_mean_distance_to_reference, raw.class_mean_distance_to_reference)
    centred = {name: compare.centred(weights) for name, weights in runs.items()}
    np.testing.assert_allclose(result.cosine, compare.similarity_matrix(centred).cosine)
    # the class-mean part's own size, in each run's weights at the compared step (numpy reference)
    step = result.attrs["similarity_step"]
    for name, weights in runs.items():
        row = weights.values[step].astype(np.float64)
        expected = 10 * (row.mean(axis=0) ** 2).sum() / (row ** 2).sum()
        np.testing.assert_allclose(result.class_mean_fraction.sel(run=name), expected, rtol=1e-9)
        np.testing.assert_allclose(raw.class_mean_fraction.sel(run=name), expected, rtol=1e-9)


def test_under_plain_sgd_the_class_mean_of_the_weights_stays_at_its_initial_value(tmp_path, generated_data):
    from weightlapse.pipeline.datasets import load_dataset
    from weightlapse.pipeline.params import TrainParams
    from weightlapse.pipeline.store import open_run
    from weightlapse.pipeline.train import run_training

    data_dir, _ = generated_data
    run_training(TrainParams(optimizer="sgd", lr=0.1, epochs=3, device="cpu"), load_dataset(data_dir, "mnist"),
                 tmp_path / "sgd", run_name="sgd", progress=False)
    weights = open_run(tmp_path / "sgd").weights.values.astype(np.float64)  # (31, 10, 784)
    class_mean = weights.mean(axis=1)
    assert np.abs(weights[-1] - weights[0]).max() > 1e-3  # the weights moved
    assert np.abs(class_mean - class_mean[0]).max() < 1e-7  # their class-mean did not, to float32 rounding
