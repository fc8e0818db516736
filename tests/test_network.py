"""A network run read for research and the viewer (viewer/analysis/network.py): every parameter
as recorded, one weight over every step, per-layer statistics and distances, through the catalog."""

import numpy as np
import pytest
from network_runs import mlp, record
from viewer_runs import training_like, write_run

from weightlapse.viewer.analysis.network import NetworkRun, layer_distances, layer_statistics, layout_problem
from weightlapse.viewer.analysis.run import Run
from weightlapse.viewer.analysis.runs import RunCatalog


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    runs = tmp_path_factory.mktemp("network") / "runs"
    seen = {name: record(runs / name, mlp(seed=seed), seed=seed) for name, seed in (("a", 0), ("b", 1))}
    record(runs / "wide", mlp(hidden=20), steps=3)
    write_run(runs / "softmax", training_like(20, seed=0), name="softmax")
    return runs, seen


def test_the_catalog_opens_a_network_run_and_a_softmax_run_each_as_its_kind(recorded):
    runs, _ = recorded
    catalog = RunCatalog(runs)
    assert isinstance(catalog.open("a"), NetworkRun) and isinstance(catalog.open("softmax"), Run)
    assert catalog.open("a").names == ["hidden1.weight", "hidden1.bias", "output.weight", "output.bias"]


def test_every_parameter_at_every_step_is_exactly_what_the_loop_saw(recorded):
    runs, seen = recorded
    run = RunCatalog(runs).open("a")
    assert run.last_step == 12
    for step in (0, 1, 7, 12):
        for name, values in seen["a"][step].items():
            assert run.values_at(name, step).tobytes() == values.tobytes(), (name, step)
    with pytest.raises(IndexError, match="outside this run's valid steps 0..12"):
        run.values_at("output.weight", 13)
    with pytest.raises(ValueError, match="has no parameter 'fc9.weight'"):
        run.values_at("fc9.weight", 0)


def test_one_weight_over_every_step_is_read_as_stored(recorded):
    runs, seen = recorded
    steps, values = RunCatalog(runs).open("a").weight_history("hidden1.weight", (3, 400))
    np.testing.assert_array_equal(steps, np.arange(13))
    np.testing.assert_array_equal(values, [seen["a"][step]["hidden1.weight"][3, 400] for step in range(13)])
    with pytest.raises(IndexError, match="not an index into hidden1.weight"):
        RunCatalog(runs).open("a").weight_history("hidden1.weight", (16, 0))


def test_layer_statistics_have_the_parameters_shape_and_match_numpy(recorded):
    runs, seen = recorded
    stats = layer_statistics(RunCatalog(runs).open("a"), "output.weight", 2, 10)
    rows = np.stack([seen["a"][step]["output.weight"] for step in range(2, 11)]).astype(np.float64)
    assert stats.path_length.shape == (10, 16) and stats.attrs["first_step"] == 2 and stats.attrs["last_step"] == 10
    np.testing.assert_allclose(stats.path_length.values, np.abs(np.diff(rows, axis=0)).sum(axis=0), rtol=1e-5)
    np.testing.assert_allclose(stats.net_change.values, rows[-1] - rows[0], rtol=1e-5, atol=1e-7)
    bias = layer_statistics(RunCatalog(runs).open("a"), "output.bias", 0, 12)
    assert bias["std"].shape == (10,)


def test_distances_per_layer_match_numpy_and_different_models_are_refused(recorded):
    runs, seen = recorded
    catalog = RunCatalog(runs)
    distances = layer_distances(catalog.open("a"), catalog.open("b"), every=4)
    assert list(distances.parameter.values) == catalog.open("a").names
    np.testing.assert_array_equal(distances.step.values, [0, 4, 8, 12])
    expected = np.linalg.norm(seen["a"][8]["hidden1.weight"].astype(np.float64)
                              - seen["b"][8]["hidden1.weight"].astype(np.float64))
    assert distances.sel(parameter="hidden1.weight", step=8).item() == pytest.approx(expected, rel=1e-9)
    assert layout_problem(catalog.open("a"), catalog.open("wide")) == (
        "hidden1.weight is (16, 784) in a but (20, 784) in wide: the runs record different models")
    with pytest.raises(ValueError, match="^hidden1.weight is .* different models$"):
        layer_distances(catalog.open("a"), catalog.open("wide"))


def test_a_run_recorded_again_is_read_afresh(tmp_path):
    runs = tmp_path / "runs"
    record(runs / "again", mlp(seed=0), steps=2)
    catalog = RunCatalog(runs)
    before = catalog.open("again").values_at("output.bias", 2).copy()
    import shutil

    shutil.rmtree(runs / "again")
    seen = record(runs / "again", mlp(seed=5), steps=4)
    run = catalog.open("again")
    assert run.last_step == 4 and run.generation == 1
    assert run.values_at("output.bias", 2).tobytes() == seen[2]["output.bias"].tobytes() != before.tobytes()


def test_a_store_recreated_under_the_same_identity_is_read_afresh(tmp_path):
    # The train stage derives a network store's identity from its run, so a rerun recreates it
    # under the same one: its marker going back tells the reader, which drops what it kept
    # (a finished run's last chunk, here the only one, is kept once read).
    from weightlapse.pipeline.network_writer import NetworkWriter
    from weightlapse.pipeline.store import NetworkLayout, ParameterSpec, RunMetadata

    layout = NetworkLayout((ParameterSpec("output.bias", (3,)),))
    path = tmp_path / "runs" / "same" / "trajectory.zarr"

    def write(rows, *, error=None):
        writer = NetworkWriter(path, layout, RunMetadata(), overwrite=True, store_id="the-same")
        for values in rows:
            writer.slots[writer.slot]["output.bias"][writer.row] = values
            writer.commit_row()
        writer.close(error=error)

    old = np.arange(18, dtype=np.float32).reshape(6, 3)
    write(old)
    run = RunCatalog(tmp_path / "runs").open("same")
    assert run.finished and run.values_at("output.bias", 1).tolist() == old[1].tolist()
    new = -old[:3]
    write(new, error="stopped")  # rerun, stopped after step 2
    run.refresh()
    assert run.last_step == 2 and not run.finished
    assert run.values_at("output.bias", 1).tolist() == new[1].tolist()

def test_one_weight_of_a_layer_too_large_to_read_whole_is_read_from_evenly_spaced_chunks(tmp_path):
    seen = record(tmp_path / "runs" / "wide", mlp(hidden=256), steps=40)  # 800 KB a step: 8 steps a chunk
    run = RunCatalog(tmp_path / "runs").open("wide")
    per_chunk = run.chunk_steps("hidden1.weight")
    assert per_chunk == 8
    steps, values = run.weight_history("hidden1.weight", (200, 300), max_bytes=2 * per_chunk * 256 * 784 * 4)
    # six chunks, at most two chunks' bytes: every third chunk, and the newest
    np.testing.assert_array_equal(steps, [*range(0, 8), *range(24, 32), *range(40, 41)])
    np.testing.assert_array_equal(values, [seen[step]["hidden1.weight"][200, 300] for step in steps])
    assert run.weight_history("hidden1.weight", (200, 300))[0].size == 41  # under the default bound: every step
