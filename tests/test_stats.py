"""Per-pixel change statistics: dask, block by block, against a plain numpy reference."""

import logging

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from network_runs import mlp, record
from viewer_runs import write_run

from weightlapse.pipeline.store import open_run
from weightlapse.viewer.analysis import stats as stats_module
from weightlapse.viewer.analysis.stats import STATISTICS, change_statistics, top_pixels
from weightlapse.viewer.analysis.stats_command import main


def reference(w: np.ndarray, first: int = 0, fraction: float = 0.9) -> dict[str, np.ndarray]:
    """The definitions in viewer/analysis/stats.py, written the obvious way over the whole array."""
    w = w.astype(np.float64)
    change = np.diff(w, axis=0)
    net = w[-1] - w[0]
    path = np.abs(change).sum(axis=0)
    signs = np.sign(change)
    reversals = (signs[1:] * signs[:-1] < 0).sum(axis=0)

    def settle(moved, total):
        travelled = np.cumsum(moved, axis=0)
        reached = travelled >= fraction * total
        return np.where(total > 0, first + 1 + np.argmax(reached, axis=0), first)

    moved = np.abs(change)
    with np.errstate(invalid="ignore", divide="ignore"):
        straight = np.where(path > 0, np.abs(net) / path, np.nan)
        path_all = path.sum(axis=0)
        straight_all = np.where(path_all > 0, np.abs(net).sum(axis=0) / path_all, np.nan)
    return {
        "net_change": net,
        "path_length": path,
        "straightness": straight,
        "std": w.std(axis=0),
        "reversals": reversals,
        "settle_step": settle(moved, path) if len(change) else np.full(net.shape, first),
        "net_change_over_classes": np.abs(net).sum(axis=0),
        "path_length_over_classes": path_all,
        "straightness_over_classes": straight_all,
        "std_over_classes": np.sqrt(w.var(axis=0).sum(axis=0)),
        "reversals_over_classes": reversals.sum(axis=0),
        "settle_step_over_classes": (settle(moved.sum(axis=1), path_all) if len(change)
                                     else np.full(path_all.shape, first)),
    }


def assert_matches(result: xr.Dataset, expected: dict[str, np.ndarray], w: np.ndarray) -> None:
    """Counts exactly; sums to float32 rounding (weights are differenced in their stored float32)."""
    for name, values in expected.items():
        got = result[name].values
        if name.startswith("reversals"):
            np.testing.assert_array_equal(got, values, err_msg=name)
        elif name.startswith("settle_step"):
            assert_same_settle(got, values, w, result.attrs, over_classes=name.endswith("classes"))
        else:
            np.testing.assert_allclose(got, values, rtol=2e-5, atol=1e-9, equal_nan=True, err_msg=name)


def assert_same_settle(got, expected, w, attrs, *, over_classes):
    """Equal settle steps, except where the path reaches the threshold within rounding of it."""
    differ = got != expected
    if not differ.any():
        return
    moved = np.abs(np.diff(w.astype(np.float64), axis=0))
    if over_classes:
        moved = moved.sum(axis=1)
    travelled = np.cumsum(moved, axis=0)
    threshold = attrs["settle_fraction"] * travelled[-1]
    at = np.minimum(got, expected) - attrs["first_step"] - 1     # the earlier of the two steps
    reached = np.take_along_axis(travelled, at[None], axis=0)[0]
    np.testing.assert_allclose(reached[differ], threshold[differ], rtol=1e-5,
                               err_msg="settle steps differ by more than rounding")


def random_walk(rng, n_rows, *, stuck_fraction=0.2):
    steps = rng.standard_normal((n_rows, 10, 784)).astype(np.float32) * np.float32(0.01)
    stuck = rng.random((10, 784)) < stuck_fraction   # weights that never move (MNIST's border pixels)
    steps[1:, stuck] = 0
    return np.cumsum(steps, axis=0, dtype=np.float32)


@pytest.mark.parametrize("n_rows", [1, 2, 3, 511, 512, 513, 514, 1300])
def test_matches_numpy_across_block_edges(monkeypatch, n_rows):
    monkeypatch.setattr(stats_module, "BLOCK_STEPS", 512)
    w = random_walk(np.random.default_rng(n_rows), n_rows)
    assert_matches(change_statistics(w, first_step=7), reference(w, first=7), w)


@settings(max_examples=40, deadline=None)
@given(n_rows=st.integers(1, 40), block=st.integers(2, 9), seed=st.integers(0, 2**32 - 1),
       fraction=st.sampled_from([0.5, 0.9, 1.0]), quantised=st.booleans())
def test_matches_numpy_on_random_trajectories(n_rows, block, seed, fraction, quantised):
    rng = np.random.default_rng(seed)
    w = random_walk(rng, n_rows)
    if quantised:  # many exactly-equal steps: zero changes and ties in the cumulative path
        w = np.round(w * 20).astype(np.float32)
    stats_module.BLOCK_STEPS, saved = block, stats_module.BLOCK_STEPS
    try:
        result = change_statistics(w, settle_fraction=fraction)
    finally:
        stats_module.BLOCK_STEPS = saved
    assert_matches(result, reference(w, fraction=fraction), w)


def test_every_registered_statistic_has_a_numpy_reference_and_a_colour_rule():
    # Adding a statistic is one registry entry plus its reference in reference() above.
    w = random_walk(np.random.default_rng(0), 40)
    expected = reference(w)
    result = change_statistics(w)
    for name, statistic in STATISTICS.items():
        assert name in expected and f"{name}_over_classes" in expected, f"{name} has no numpy reference"
        assert statistic.title(0.9) in result[name].attrs["long_name"]
        assert result[name].dtype == (np.int64 if statistic.integer else np.float64)
    assert set(expected) == {f"{n}{suffix}" for n in STATISTICS for suffix in ("", "_over_classes")}
    # signed statistics are drawn on a colour map centred on zero, the others sequentially
    assert {name for name, statistic in STATISTICS.items() if statistic.diverging} == {"net_change"}


def test_reads_the_store_lazily_and_labels_steps_from_the_coordinate(tmp_path):
    w = random_walk(np.random.default_rng(1), 700)
    write_run(tmp_path / "run", w)
    weights = open_run(tmp_path / "run").weights.sel(step=slice(100, 650))
    fractions = []
    result = change_statistics(weights, progress=fractions.append)
    assert result.attrs["first_step"] == 100 and result.attrs["last_step"] == 650
    assert_matches(result, reference(w[100:651], first=100), w[100:651])
    assert fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert set(STATISTICS) <= set(result.data_vars)


def test_top_pixels_are_the_largest_over_classes():
    w = random_walk(np.random.default_rng(2), 50)
    w[:, :, 300] *= 50  # pixel 300 (row 10, column 20) moves most
    top = top_pixels(change_statistics(w), "path_length", n=3)
    assert top[0] == {"pixel": 300, "row": 10, "col": 20, "value": pytest.approx(top[0]["value"])}
    assert top[0]["value"] >= top[1]["value"] >= top[2]["value"]
    with pytest.raises(ValueError, match="unknown statistic 'speed'"):
        top_pixels(change_statistics(w), "speed")


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="settle_fraction must be in"):
        change_statistics(np.zeros((3, 10, 784), np.float32), settle_fraction=0)
    with pytest.raises(ValueError, match="3-d"):
        change_statistics(np.zeros((3, 784), np.float32))


def test_command_line_writes_a_store_xarray_opens(tmp_path):
    w = random_walk(np.random.default_rng(3), 300)
    write_run(tmp_path / "run", w)
    out = tmp_path / "stats.zarr"
    assert main([str(tmp_path / "run"), "--start", "10", "--stop", "200", "--out", str(out)]) == 0
    saved = xr.open_zarr(out)
    assert_matches(saved.load(), reference(w[10:201], first=10), w[10:201])
    assert main([str(tmp_path / "run"), "--start", "10", "--stop", "999", "--out", str(out)]) == 1


def test_the_command_computes_centred_statistics_on_request(tmp_path):
    w = random_walk(np.random.default_rng(4), 120)
    write_run(tmp_path / "run", w)
    out = tmp_path / "centred.zarr"
    assert main([str(tmp_path / "run"), "--centred", "--out", str(out)]) == 0
    saved = xr.open_zarr(out).load()
    centred_w = w - w.mean(axis=1, keepdims=True)  # numpy reference: each pixel's class-mean removed
    assert saved.attrs["weights"].startswith("centred")
    assert_matches(saved, reference(centred_w), centred_w)


def test_the_command_never_writes_over_its_run_or_a_users_files(tmp_path, caplog):
    w = random_walk(np.random.default_rng(4), 100)
    run = tmp_path / "runs" / "run"
    write_run(run, w)
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    for out in (run, run / "trajectory.zarr", run / "change_stats.zarr", tmp_path / "runs", tmp_path):
        assert main([str(run), "--out", str(out)]) == 1
    assert "which this command reads" in caplog.text
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("precious")
    assert main([str(run), "--out", str(mine)]) == 1
    assert (mine / "chapter1.tex").read_text() == "precious"
    assert "not an earlier change-statistics output" in caplog.text
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    np.testing.assert_array_equal(open_run(run).weights.values, w)
    out = tmp_path / "stats.zarr"  # an earlier output of the command may be replaced
    assert main([str(run), "--out", str(out)]) == 0 and main([str(run), "--out", str(out)]) == 0


def test_the_command_writes_a_network_runs_statistics_a_group_per_parameter(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    seen = record(tmp_path / "mlp", mlp(seed=0), steps=12)
    out = tmp_path / "mlp-stats.zarr"
    assert main([str(tmp_path / "mlp"), "--start", "2", "--stop", "11", "--out", str(out)]) == 0
    tree = xr.open_datatree(out, engine="zarr")
    # a group per parameter (Zarr lists them by name), the model's order in the root's attributes
    assert tree.attrs["parameters"] == ["hidden1.weight", "hidden1.bias", "output.weight", "output.bias"]
    assert set(tree.children) == set(tree.attrs["parameters"])
    for name in tree.children:
        values = np.stack([seen[step][name] for step in range(2, 12)])   # (step, *shape)
        rows = values.reshape(len(values), values.shape[1], -1)
        expected = reference(rows, first=2)
        saved = xr.open_zarr(out, group=name).load()
        assert saved.path_length.shape == values.shape[1:]
        for statistic in ("path_length", "net_change", "std", "settle_step", "reversals"):
            np.testing.assert_allclose(saved[statistic].values.reshape(rows.shape[1:]), expected[statistic],
                                       rtol=1e-5, atol=1e-7, err_msg=f"{name} {statistic}")
    top = int(np.argmax(np.abs(np.diff(np.stack([seen[step]["hidden1.weight"] for step in range(2, 12)]),
                                       axis=0)).sum(axis=0)))
    unit, pixel = divmod(top, 784)
    assert (f"hidden1.weight #1 weight ({unit}, {pixel}) (pixel row {pixel // 28}, col {pixel % 28}): path length"
            in caplog.text)
    # one parameter on request; a second run of the command replaces its own output
    assert main([str(tmp_path / "mlp"), "--parameter", "output.bias", "--out", str(out)]) == 0
    assert list(xr.open_datatree(out, engine="zarr").children) == ["output.bias"]
    assert main([str(tmp_path / "mlp"), "--parameter", "fc9.weight", "--out", str(out)]) == 1
    assert "no parameter 'fc9.weight'; its parameters: hidden1.weight, hidden1.bias" in caplog.text
    assert main([str(tmp_path / "mlp"), "--centred", "--out", str(out)]) == 1
    assert "a network does not have" in caplog.text
