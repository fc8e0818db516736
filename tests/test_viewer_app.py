"""The viewer without a browser: what each state puts on the page (viewer/app.py and its components)."""

import asyncio
import html
import shutil

import holoviews as hv
import numpy as np
import panel as pn
import pytest
import xarray as xr
from bokeh.models import GlyphRenderer, Image, Legend, Span, Title
from viewer_runs import FASHION_CLASSES, training_like, write_run

from weightlapse.viewer.analysis.frames import centred, mosaic
from weightlapse.viewer.analysis.runs import RunCatalog, RunInfo
from weightlapse.viewer.analysis.stats import change_statistics
from weightlapse.viewer.app import WeightViewer, runs_table_html
from weightlapse.viewer.plots import HEADER, distance_curves, similarity_heatmap, variance_bars
from weightlapse.viewer.state import ViewState, read_query

hv.extension("bokeh")
TILE_SHAPE = (2 * (28 + HEADER), 5 * 29 - 1)


@pytest.fixture
def runs_dir(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "alpha", training_like(300, seed=0), class_names=FASHION_CLASSES, name="alpha")
    write_run(runs / "beta", training_like(300, seed=1), class_names=FASHION_CLASSES, name="beta")
    return runs


def viewer_on(runs, /, **query) -> tuple[WeightViewer, object]:
    viewer = WeightViewer(runs, query=query)
    return viewer, pn.panel(viewer).get_root()


def grid_renderer(root):
    for renderer in root.select({"type": GlyphRenderer}):
        if isinstance(renderer.glyph, Image) and np.asarray(renderer.data_source.data["image"][0]).shape == TILE_SHAPE:
            return renderer
    raise AssertionError("no weight grid on the page")


def shown(root) -> np.ndarray:
    """The weight grid as the browser receives it, back in picture orientation (row 0 on top)."""
    return np.flipud(np.asarray(grid_renderer(root).data_source.data["image"][0]))


def blank(root) -> bool:
    """Whether the grid shows nothing (every pixel NaN, the background)."""
    return bool(np.isnan(shown(root)).all())


def colour_range(root) -> tuple[float, float]:
    mapper = grid_renderer(root).glyph.color_mapper
    return mapper.low, mapper.high


def test_setting_the_step_shows_exactly_the_stored_weights(runs_dir):
    viewer, root = viewer_on(runs_dir, run="alpha")
    expected = training_like(300, seed=0)
    for step in (0, 1, 17, 299, 300):
        viewer.state.step = step
        np.testing.assert_array_equal(shown(root), mosaic(expected[step], header=HEADER))
        player = viewer.player
        assert player.player.value == player.slider.value == player.step_input.value == player.keys.step == step
    assert [span.location for span in root.select({"type": Span})] == [300, 300]
    viewer.player.keys.step = 120  # what a key press in the page sets
    assert viewer.state.step == 120


def test_the_first_page_opens_on_params_first_run_at_its_last_step(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "aaa", training_like(50, seed=0), name="aaa")
    write_run(runs / "zzz", training_like(80, seed=1), name="zzz")
    viewer = WeightViewer(runs, query={})
    assert (viewer.state.run, viewer.state.step) == ("zzz", 80)  # no params.yaml: the newest run
    (tmp_path / "params.yaml").write_text("runs:\n  missing: {}\n  aaa: {}\n")
    viewer = WeightViewer(runs, query={})
    assert (viewer.state.run, viewer.state.step) == ("aaa", 50)


def test_the_colour_scale_is_fixed_over_the_run_unless_asked_otherwise(runs_dir):
    viewer, root = viewer_on(runs_dir, run="alpha")
    weights = training_like(300, seed=0)
    largest = float(np.abs(weights).max())
    ranges = []
    for step in (0, 150, 300):
        viewer.state.step = step
        ranges.append(colour_range(root))
    assert ranges[0] == ranges[1] == ranges[2]
    assert ranges[0][1] == pytest.approx(largest, rel=0.05) and ranges[0][1] >= np.abs(weights[300]).max()
    viewer.state.scale = "step"
    viewer.state.step = 0
    assert colour_range(root)[1] == pytest.approx(float(np.abs(weights[0]).max()))
    viewer.state.scale = "class"
    np.testing.assert_allclose(shown(root)[np.isfinite(shown(root))].max(), 1.0, rtol=1e-6)


def test_step_and_run_diffs_and_a_missing_comparison_run(runs_dir):
    viewer, root = viewer_on(runs_dir, run="alpha")
    alpha, beta = training_like(300, seed=0), training_like(300, seed=1)
    viewer.state.param.update(mode="step-diff", step=200, from_step=50)
    np.testing.assert_array_equal(shown(root), mosaic(alpha[200] - alpha[50], header=HEADER))
    assert "L2 distance" in viewer.tiles.summary.object and "Trouser" in viewer.tiles.summary.object
    # Run vs run without a run to compare with: it says so and shows no picture, not the last diff
    viewer.state.mode = "run-diff"
    assert "choose a run to compare with" in viewer.tiles.notice.object and viewer.tiles.notice.visible
    assert blank(root) and viewer.tiles.summary.object == ""
    viewer.picker.compare_select.value = "beta"
    assert viewer.state.compare == "beta" and not blank(root) and not viewer.tiles.notice.visible
    np.testing.assert_array_equal(shown(root), mosaic(beta[200] - alpha[200], header=HEADER))
    distance = np.linalg.norm(beta[200].astype(np.float64) - alpha[200])
    assert f"L2 distance {distance:.4g}" in viewer.tiles.summary.object
    viewer.picker.compare_select.value = "(none)"
    assert blank(root) and viewer.tiles.summary.object == ""


def test_differences_keep_one_colour_scale_over_the_run_unless_asked_otherwise(runs_dir):
    # Whole run: a difference is drawn on one range at every step, that of the largest
    # difference over the sampled steps (the first of each chunk and the newest), so an early
    # small change looks small; This step fits each frame, as before.
    alpha, beta = training_like(300, seed=0), training_like(300, seed=1)
    sampled = [*range(0, 300, 16), 300]  # write_run's 16-step chunks
    cases = {
        ("step-diff", "raw"): (lambda step: alpha[step] - alpha[50]),
        ("step-diff", "centred"): (lambda step: centred(alpha[step]) - centred(alpha[50])),
        ("run-diff", "raw"): (lambda step: beta[step] - alpha[step]),
        ("run-diff", "centred"): (lambda step: centred(beta[step]) - centred(alpha[step])),
    }
    for (mode, weights), difference in cases.items():
        viewer, root = viewer_on(runs_dir, run="alpha", compare="beta", mode=mode, weights=weights, **{"from": "50"})
        largest = max(float(np.abs(difference(step)).max()) for step in sampled)
        for step in (52, 150, 300):
            viewer.state.step = step
            np.testing.assert_array_equal(shown(root), mosaic(difference(step), header=HEADER))
            assert colour_range(root) == pytest.approx((-largest, largest), rel=1e-6), (mode, weights, step)
        early = float(np.abs(difference(52)).max())
        assert early < largest / 2  # what a per-frame range would have hidden
        viewer.state.param.update(scale="step", step=52)
        assert colour_range(root) == pytest.approx((-early, early), rel=1e-6)


def test_statistics_show_nothing_until_computed_then_the_dask_statistics(runs_dir):
    viewer, root = viewer_on(runs_dir, run="alpha", mode="step-diff", step="200", **{"from": "10"})
    assert viewer.tiles.summary.object  # a diff's table
    viewer.state.param.update(mode="statistics", range_start=10, range_stop=250, statistic="reversals")
    tiles = viewer.tiles
    assert "Compute statistics" in tiles.notice.object and blank(root)
    assert not tiles.map_box.visible and tiles.summary.object == ""
    asyncio.run(viewer.statistics.compute())
    expected = change_statistics(training_like(300, seed=0)[10:251], first_step=10)
    np.testing.assert_array_equal(shown(root), mosaic(expected.reversals.values, header=HEADER))
    assert "Top-changing pixels" in tiles.summary.object and tiles.map_box.visible
    viewer.state.statistic = "settle_step"
    np.testing.assert_array_equal(shown(root), mosaic(expected.settle_step.values, header=HEADER))
    viewer.state.range_stop = 200  # another range: not computed, so nothing shown
    assert blank(root) and "Compute statistics" in tiles.notice.object


def test_the_centred_choice_removes_each_pixels_class_mean_in_every_view(runs_dir):
    def centred(rows):
        return rows - rows.mean(axis=-2, keepdims=True)

    viewer, root = viewer_on(runs_dir, run="alpha", step="120", weights="centred")
    alpha, beta = training_like(300, seed=0), training_like(300, seed=1)
    np.testing.assert_array_equal(shown(root), mosaic(centred(alpha[120]), header=HEADER))
    low, high = colour_range(root)  # one scale over the run, of the centred weights, never clipping
    assert high == -low >= np.abs(centred(alpha[120])).max() and high <= np.abs(centred(alpha)).max() * 1.0001
    viewer.state.param.update(mode="run-diff", compare="beta")
    np.testing.assert_allclose(shown(root), mosaic(centred(beta[120]) - centred(alpha[120]), header=HEADER),
                               atol=1e-6)
    distance = np.linalg.norm(centred(beta[120].astype(np.float64)) - centred(alpha[120].astype(np.float64)))
    assert f"L2 distance {distance:.4g}" in viewer.tiles.summary.object
    viewer.state.param.update(mode="statistics", range_start=0, range_stop=200, statistic="net_change")
    asyncio.run(viewer.statistics.compute())
    expected = change_statistics(centred(alpha[:201]))
    np.testing.assert_allclose(shown(root), mosaic(expected.net_change.values, header=HEADER), atol=1e-6)
    viewer.state.weights = "raw"  # raw statistics of that range were not computed: nothing stale is shown
    assert blank(root) and "Compute statistics" in viewer.tiles.notice.object
    assert viewer.state.query()["weights"] == "raw"
    _, problems = read_query({"weights": "<b>x"}, names=["alpha"], last_step=lambda name: 300)
    assert problems == ["unknown weights choice '<b>x'"]


def test_compare_mode_offers_centred_weights_and_says_how_big_the_class_mean_is(tmp_path):
    runs = tmp_path / "runs"
    for seed in range(2):
        write_run(runs / f"adam-seed{seed}", training_like(100, seed=seed), name=f"adam-seed{seed}",
                  params={"optimizer": "adam", "lr": 0.001, "seed": seed})
    viewer, _ = viewer_on(runs, run="adam-seed0", mode="compare", weights="centred")
    panel = viewer.comparison
    assert "centred weights" in panel.notice.object
    asyncio.run(panel.compute())
    result = panel.result()
    assert result.attrs["weights"].startswith("centred")
    row = training_like(100, seed=0)[100].astype(np.float64)
    share = 10 * (row.mean(axis=0) ** 2).sum() / (row ** 2).sum()
    assert "no prediction depends on" in panel.gauge.object and f"{100 * share:.1f}%" in panel.gauge.object
    viewer.state.weights = "raw"  # the raw comparison is another one: not computed yet
    assert panel.result() is None and len(panel.plots) == 0 and panel.gauge.object == ""


def test_the_view_round_trips_through_url_values(runs_dir):
    viewer = WeightViewer(runs_dir, query={})
    viewer.state.param.update(run="alpha", compare="beta", mode="run-diff", step=123, from_step=4, range_start=5,
                              range_stop=77, statistic="std", scale="class", compare_every=7, match_units=False)
    query = viewer.state.query()
    assert query["run"] == "alpha" and query["compare"] == "beta" and query["step"] == "123"
    assert query["every"] == "7" and query["match"] == "0"
    reopened = WeightViewer(runs_dir, query=query)
    assert reopened.state.query() == query and not reopened.message.visible


def test_bad_url_values_are_reported_and_the_message_goes_with_its_cause(runs_dir):
    listed_before = set(RunCatalog(runs_dir).names())
    viewer, _ = viewer_on(runs_dir, run="../../etc", compare="<script>x</script>", mode="hack", step="99999",
                          stat="nope", scale="huge")
    raw = viewer.message.object
    text = html.unescape(raw)
    assert "no readable run named '../../etc'" in text and "unknown mode" in text and "unknown colour scale" in text
    assert "<script>" not in raw and "&lt;script&gt;" in raw
    assert viewer.state.run == "beta" and viewer.state.mode == "replay" and viewer.state.step == 300
    assert set(RunCatalog(runs_dir).names()) == listed_before
    viewer.state.step = 5
    assert not viewer.message.visible
    values, problems = read_query({"run": "alpha", "step": "400"}, names=["alpha"], last_step=lambda name: 300)
    assert values["step"] == 300 and "past this run's last step" in problems[0]
    values, problems = read_query({"every": "-3", "match": "maybe"}, names=["alpha"], last_step=lambda name: 300)
    assert "compare_every" not in values and "match_units" not in values
    assert problems == ["match 'maybe' is not 0 or 1", "every '-3' is not a number of steps (0 to 1,000,000,000)"]
    # a link without them is as before: every N chosen for the runs, units matched
    assert "every" not in WeightViewer(runs_dir, query={}).state.query()


def test_empty_missing_and_broken_runs_directories_say_what_to_do(tmp_path):
    viewer, _ = viewer_on(tmp_path / "nowhere")
    problem = viewer.picker.problem
    assert "No runs directory" in problem.object and "--args --runs" in problem.object and problem.visible
    assert "Choose a run" in viewer.tiles.notice.object
    (tmp_path / "empty").mkdir()
    assert "No runs in" in WeightViewer(tmp_path / "empty", query={}).picker.problem.object
    (tmp_path / "broken" / "<img src=x onerror=alert(1)>" / "trajectory.zarr").mkdir(parents=True)
    broken = WeightViewer(tmp_path / "broken", query={})
    assert "None of the runs can be opened" in broken.picker.problem.object
    table = broken.picker.table.object
    assert "<img" not in table and "&lt;img src=x" in table


def test_a_new_run_appears_and_states_refresh_without_a_click(tmp_path):
    runs = tmp_path / "runs"
    rows = training_like(100)
    writer = write_run(runs / "live", rows[:30], n_steps=100, finish=False, name="live")
    viewer, _ = viewer_on(runs)
    assert viewer.picker.run_select.options == ["live"]
    assert "being written" in viewer.picker.table.object or "unfinished" in viewer.picker.table.object
    write_run(runs / "newer", training_like(40, seed=2), name="newer")
    for step in range(30, 101):
        writer.record_step(step, rows[step], 0.1)
    writer.close()
    viewer.store.runs(fresh=True)
    viewer.poll()
    assert viewer.picker.run_select.options == ["live", "newer"]
    assert "finished" in viewer.picker.status.object and "100 of 100" in viewer.picker.status.object
    assert "newer" in viewer.picker.table.object


def test_follow_keeps_the_newest_step_and_the_curves_follow_the_data(tmp_path):
    rows = training_like(100)
    writer = write_run(tmp_path / "runs" / "live", rows[:17], n_steps=100, finish=False)
    viewer, root = viewer_on(tmp_path / "runs", follow="1")
    assert viewer.state.step == 16
    for step in range(17, 60):
        writer.record_step(step, rows[step], 0.1)
    writer.flush()
    viewer.poll()
    assert viewer.state.step == 59 and viewer.player.slider.end == 59
    np.testing.assert_array_equal(shown(root), mosaic(rows[59], header=HEADER))
    loss_x = viewer.curves.data("loss")[0]
    assert loss_x[-1] == 59
    viewer.state.follow = False
    for step in range(60, 101):
        writer.record_step(step, rows[step], 0.1)
    writer.close()
    viewer.poll()
    assert viewer.state.step == 59 and viewer.player.slider.end == 100
    assert viewer.curves.data("loss")[0][-1] == 100


def test_png_export_uses_the_pages_colour_scale_and_compare_mode_exports_nothing(runs_dir, monkeypatch):
    from weightlapse.viewer import tasks

    viewer, root = viewer_on(runs_dir, run="alpha", step="42")
    seen = {}
    real = tasks.png_bytes
    monkeypatch.setattr(tasks, "png_bytes", lambda tiles, **options: seen.update(options) or real(tiles, **options))
    data = viewer.export.png_file().getvalue()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert viewer.export.png_download.filename == "weightlapse-replay-42.png"
    assert seen["clim"] == colour_range(root)
    viewer.state.mode = "compare"
    assert viewer.export.png_download.disabled and viewer.export.png_file() is None


def test_the_runs_table_escapes_everything():
    table = runs_table_html([RunInfo("<b>x</b>", "broken", "bad <script>alert(1)</script>",
                                     params={"optimizer": "<i>"})])
    assert "<script>" not in table and "<b>x</b>" not in table and "&lt;i&gt;" in table


def test_compare_mode_follows_the_run_selector_and_draws_only_the_runs_chosen(tmp_path):
    runs = tmp_path / "runs"
    for seed in range(3):
        write_run(runs / f"adam-seed{seed}", training_like(200, seed=seed), name=f"adam-seed{seed}",
                  params={"optimizer": "adam", "lr": 0.001, "seed": seed})
    for seed in range(2):
        write_run(runs / f"sgd-seed{seed}", training_like(200, seed=9 + seed), name=f"sgd-seed{seed}",
                  params={"optimizer": "sgd", "lr": 0.01, "seed": seed})
    viewer, _ = viewer_on(runs, run="adam-seed0", mode="compare")
    panel = viewer.comparison
    assert viewer.player._layout.visible is False and panel._layout.visible
    assert panel.runs_choice.value == ["adam-seed0", "adam-seed1", "adam-seed2"]
    assert "Compute comparison" in panel.notice.object and len(panel.plots) == 0
    panel.every_input.value = 1
    asyncio.run(panel.compute())
    result = panel.result()
    assert list(result.run.values) == ["adam-seed0", "adam-seed1", "adam-seed2"]
    stack = np.stack([training_like(200, seed=seed).astype(np.float64) for seed in range(3)])
    np.testing.assert_allclose(result.mean_spread, stack.std(axis=0, ddof=1).mean(axis=(1, 2)), rtol=1e-9)
    page = pn.panel(viewer).get_root()
    titles = {model.text for model in page.select({"type": Title})}
    assert {"Distance from adam-seed0", "Cosine similarity of the weights", "Trajectories in a shared PCA basis",
            "Variance explained", "A random walk, same PCA"} <= titles
    assert "Antognini" in panel.caveat.object
    viewer.picker.run_select.value = "sgd-seed1"  # the group follows the run selector
    assert panel.runs_choice.value == ["sgd-seed0", "sgd-seed1"] and panel.group_select.value != "(choose runs below)"
    assert len(panel.plots) == 0 and "Compute comparison" in panel.notice.object  # not the adam comparison
    panel.runs_choice.value = ["sgd-seed0"]
    assert "at least two runs" in panel.notice.object


def test_compare_charts_are_coloured_by_series_and_fitted_to_their_values():
    bars = hv.render(variance_bars(xr.DataArray([0.5, 0.2], dims="fitted", coords={"fitted": [1, 2]}),
                                   xr.DataArray([0.6, 0.15], dims="fitted", coords={"fitted": [1, 2]})))
    glyph = next(r for r in bars.renderers if isinstance(r, GlyphRenderer)).glyph
    assert glyph.fill_color.field == "source"
    mapper = glyph.fill_color.transform
    assert dict(zip(mapper.factors, mapper.palette)) == {"these runs": "#1f77b4", "random walk": "#bbbbbb"}
    cosine = xr.DataArray([[1.0, 0.97], [0.97, 1.0]], dims=("run", "other"),
                          coords={"run": ["a", "b"], "other": ["a", "b"]})
    heat = hv.render(similarity_heatmap(cosine))
    image_mapper = next(r for r in heat.renderers if isinstance(r, GlyphRenderer)).glyph.fill_color.transform
    assert (image_mapper.low, image_mapper.high) == (0.97, 1.0)
    distances = xr.DataArray(np.ones((2, 3)), dims=("other_run", "step"),
                             coords={"other_run": ["b", "c"], "step": [0, 1, 2]})
    plot = hv.render(distance_curves(distances, "a"))
    assert any(isinstance(model, Legend) for model in plot.right)  # beside the curves, not over them


def test_a_run_retrained_under_an_open_page_is_shown_exactly(tmp_path):
    runs = tmp_path / "runs"
    old = training_like(300, seed=0)
    write_run(runs / "alpha", old, name="alpha")
    viewer, root = viewer_on(runs, step="250")
    np.testing.assert_array_equal(shown(root), mosaic(old[250], header=HEADER))
    assert "finished" in viewer.picker.status.object
    # `dvc repro --force` with another seed and length, while the page stays open
    new = training_like(900, seed=9)
    shutil.rmtree(runs / "alpha" / "trajectory.zarr")
    writer = write_run(runs / "alpha", new[:512], n_steps=900, finish=False, name="alpha")
    viewer.store.runs(fresh=True)
    viewer.poll()
    assert viewer.state.step == 250 and viewer.player.slider.end == 511
    np.testing.assert_array_equal(shown(root), mosaic(new[250], header=HEADER))
    assert "finished" not in viewer.picker.status.object and "511 of 900" in viewer.picker.status.object
    assert viewer.curves.data("loss")[0][-1] == 511
    fresh, fresh_root = viewer_on(runs)
    for step in (3, 500):
        fresh.state.step = step
        np.testing.assert_array_equal(shown(fresh_root), mosaic(new[step], header=HEADER))
    writer.close()


def test_names_with_format_and_math_characters_draw_and_export_as_written(tmp_path):
    # HoloViews formats titles ("{label}") and matplotlib reads "$...$" as math: names are text to both.
    runs = tmp_path / "runs"
    names = ["{x}", "{0}", "$\\alpha$", "50$", "{label}", "a}b", "c{d", "$", "{}", "e"]
    write_run(runs / "{0}-$x$", training_like(40, seed=0), name="{0}-$x$", class_names=names)
    viewer, root = viewer_on(runs)
    assert viewer.state.run == "{0}-$x$" and not viewer.message.visible
    titles = [title.text for title in root.select({"type": Title})]
    assert any("{0}-$x$: weights after step" in title for title in titles), titles
    viewer.state.step = 30
    assert viewer.export.png_download.callback().getvalue()[:4] == b"\x89PNG"
    distances = xr.DataArray(np.ones((1, 3)), dims=("other_run", "step"),
                             coords={"other_run": ["{y}"], "step": [0, 1, 2]})
    assert hv.render(distance_curves(distances, "{0}-$x$")).title.text == "Distance from {0}-$x$"


def test_the_state_holds_only_parameters():
    assert set(ViewState.param) - {"name"} == {
        "run", "compare", "compare_runs", "mode", "step", "from_step", "range_start", "range_stop", "statistic",
        "scale", "weights", "follow", "playing", "revision", "pixel", "pixel_class", "side_runs", "spacing",
        "window_width", "layer", "weight_index", "compare_every", "match_units"}


def test_compare_mode_compares_predictions_on_the_held_out_images(tmp_path, generated_data):
    from weightlapse.pipeline.datasets import load_dataset
    from weightlapse.pipeline.params import TrainParams
    from weightlapse.pipeline.train import run_training
    from weightlapse.viewer.analysis import function_space

    data_dir, _ = generated_data
    project = tmp_path / "project"
    shutil.copytree(data_dir, project / "data" / "mnist")  # the DVC layout: data/<dataset> beside runs/
    dataset = load_dataset(project / "data" / "mnist", "mnist")
    for seed in (0, 1):
        run_training(TrainParams(seed=seed, epochs=2, eval_every=5, device="cpu"), dataset,
                     project / "runs" / f"adam-{seed}", run_name=f"adam-{seed}", progress=False)
    viewer, _ = viewer_on(project / "runs", run="adam-0", mode="compare", step="7", runs="adam-0,adam-1")
    panel = viewer.comparison.predictions
    assert "Compare predictions" in panel.notice.object and len(panel.plots) == 0
    viewer.comparison.every_input.value = 1
    asyncio.run(panel.compute())
    heldout = function_space.load_heldout(project / "data" / "mnist", "mnist")
    models = function_space.open_models(RunCatalog(project / "runs"), ["adam-0", "adam-1"])
    expected = function_space.agreement_over_steps(models, heldout)
    result = panel.result()
    xr.testing.assert_equal(result.agreement, expected.agreement)
    xr.testing.assert_equal(result.symmetric_kl, expected.symmetric_kl)
    page = pn.panel(viewer).get_root()
    titles = {model.text for model in page.select({"type": Title})}
    assert {"Agreement with adam-0", "Divergence from adam-0's predictions", "Held-out accuracy",
            "Held-out loss on the line between runs"} <= titles
    line = function_space.loss_along_line(models, heldout)
    ends = line.loss.values[0, 0] + (line.loss.values[0, -1] - line.loss.values[0, 0]) * line.alpha.values
    assert f"Barrier: adam-1: {(line.loss.values[0] - ends).max():.3g} nats." in panel.summary.object
    confusion = function_space.confusion_at(models["adam-0"], heldout, step=7)
    right = confusion.values.trace() / confusion.values.sum()
    assert f"Step 7: {100 * right:.1f}% right" in titles
    assert "Confusion matrix of adam-0" in panel.confusion[0].object
    # without the held-out files, the page says what is missing instead of drawing
    shutil.rmtree(project / "data" / "mnist")
    viewer.state.compare_runs = ["adam-1", "adam-0"]
    asyncio.run(panel.compute())
    assert "missing" in panel.notice.object and panel.notice.alert_type == "danger"


def test_compare_mode_compares_runs_of_two_datasets_in_weight_space(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "fashion", training_like(120, seed=0), name="fashion", dataset="fashion-mnist")
    write_run(runs / "mine", training_like(120, seed=1), name="mine", dataset="kmnist")
    viewer, _ = viewer_on(runs, run="fashion", mode="compare", runs="fashion,mine")
    panel = viewer.comparison
    asyncio.run(panel.compute())
    a, b = (training_like(120, seed=seed).astype(np.float64) for seed in (0, 1))
    distance = np.sqrt(((a - b) ** 2).sum(axis=(1, 2)))
    shown = panel.result().distance_to_reference.sel(other_run="mine")
    np.testing.assert_allclose(shown, distance[shown.step.values], rtol=1e-6)
    # predictions are compared on one dataset's held-out images: the page says why not here
    asyncio.run(panel.predictions.compute())
    assert "choose runs of one dataset" in html.unescape(panel.predictions.notice.object)


def test_playback_moves_only_the_picture_and_the_rest_catches_up_on_pause(runs_dir, monkeypatch):
    from weightlapse.viewer import tiles

    monkeypatch.setattr(tiles, "PLAYING_MARKER_S", 60.0)  # however slow this machine, no second move
    viewer, root = viewer_on(runs_dir, run="alpha", step="10")
    expected = training_like(300, seed=0)
    viewer.state.playing = True
    for step in range(11, 40):
        viewer.state.step = step
        np.testing.assert_array_equal(shown(root), mosaic(expected[step], header=HEADER))  # every frame drawn
    player = viewer.player
    assert player.slider.value == player.step_input.value == 10       # not a layout per frame
    assert {span.location for span in root.select({"type": Span})} == {10}  # markers: at most every PLAYING_MARKER_S
    viewer.state.playing = False
    assert player.slider.value == player.step_input.value == player.keys.step == 39
    assert {span.location for span in root.select({"type": Span})} == {39}
    assert type(player.player)._debounce == 0  # a frame from the browser is handled at once, not 50 ms later


def test_the_grid_grows_with_the_window_keeping_its_tiles_square(runs_dir):
    from bokeh.models import Plot

    from weightlapse.viewer.plots import MAX_TILE_PX, grid_tile_px

    viewer, root = viewer_on(runs_dir, run="alpha")
    grid = grid_renderer(root)
    figure = next(plot for plot in root.select({"type": Plot}) if grid in plot.renderers)
    ratio = figure.frame_height / figure.frame_width
    widths = {}
    for window in (1280, 1920, 3840):
        viewer.player.keys.window_width = window  # what the page reports on load and after a resize
        widths[window] = figure.frame_width
        assert figure.frame_width == 5 * grid_tile_px(window)
        assert figure.frame_height / figure.frame_width == pytest.approx(ratio, rel=0.01)
    assert widths[1280] < widths[1920] <= widths[3840] == 5 * MAX_TILE_PX


def test_a_recorded_network_is_listed_and_replayed_by_the_network_view_not_the_grid(runs_dir):
    import torch

    from weightlapse import Recorder

    with Recorder(runs_dir / "my-mlp", torch.nn.Sequential(torch.nn.Linear(784, 8), torch.nn.Linear(8, 10)),
                  params={"lr": 0.01}) as rec:
        rec.step(loss=1.0)
    viewer, _ = viewer_on(runs_dir, run="my-mlp")
    assert "my-mlp" in viewer.picker.run_select.options and "my-mlp" in viewer.picker.table.object
    assert not viewer.tiles._layout.visible and not viewer.inspector._layout.visible
    assert viewer.network.shown.title == "my-mlp: 0.weight after step 1"
    viewer.state.mode = "side-by-side"  # the network view draws its layer, the run choice stays the grid's
    assert viewer.network.side_box.visible and not viewer.side.notice.visible and viewer.side.choice.visible
    assert "Choose up to 3 network runs to show beside my-mlp" in html.unescape(viewer.network.notice.object)
    viewer.state.mode = "replay"
    viewer.state.run = "alpha"  # the other runs replay as before
    assert viewer.tiles._layout.visible and not viewer.network._layout.visible
    assert not blank(viewer_on(runs_dir, run="alpha")[1])


def test_compare_runs_is_hidden_outside_its_mode_for_a_run_in_no_group(tmp_path):
    write_run(tmp_path / "runs" / "alone", training_like(20, seed=0), name="alone")
    viewer, _ = viewer_on(tmp_path / "runs", run="alone")
    assert viewer.state.mode == "replay" and not viewer.comparison._layout.visible
    viewer.state.mode = "compare"
    assert viewer.comparison._layout.visible
