"""The viewer component without a browser: what each control puts on the page."""

import asyncio
import html

import holoviews as hv
import numpy as np
import panel as pn
import pytest
from bokeh.models import GlyphRenderer, Image, Span, Title
from viewer_runs import FASHION_CLASSES, training_like, write_run

from weightlapse.viewer.app import WeightViewer, runs_table_html
from weightlapse.viewer.analysis.frames import mosaic
from weightlapse.viewer.plots import HEADER
from weightlapse.viewer.analysis.runs import RunCatalog
from weightlapse.viewer.analysis.stats import change_statistics

hv.extension("bokeh")
TILE_SHAPE = (2 * (28 + HEADER), 5 * 29 - 1)


@pytest.fixture
def runs_dir(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "alpha", training_like(300, seed=0), class_names=FASHION_CLASSES, name="alpha")
    write_run(runs / "beta", training_like(300, seed=1), class_names=FASHION_CLASSES, name="beta")
    return runs


def shown(viewer, root) -> np.ndarray:
    """The weight grid as the browser receives it, back in picture orientation (row 0 on top)."""
    for renderer in root.select({"type": GlyphRenderer}):
        if isinstance(renderer.glyph, Image):
            image = np.asarray(renderer.data_source.data["image"][0])
            if image.shape == TILE_SHAPE:
                return np.flipud(image)
    raise AssertionError("no weight grid on the page")


def render(viewer):
    return pn.panel(viewer).get_root()


def test_setting_the_step_shows_exactly_the_stored_weights(runs_dir):
    viewer = WeightViewer(runs_dir)
    root = render(viewer)
    expected = training_like(300, seed=0)
    assert viewer.run.name == "alpha"
    for step in (0, 1, 17, 299, 300):
        viewer.step = step
        picture = shown(viewer, root)
        np.testing.assert_array_equal(picture, mosaic(expected[step], header=HEADER))
        assert viewer.player.value == viewer.step_slider.value == viewer.step_input.value == step
    markers = [span for span in root.select({"type": Span})]
    assert markers and all(span.location == 300 for span in markers)


def test_step_and_run_diffs_show_differences_and_their_distance(runs_dir):
    viewer = WeightViewer(runs_dir)
    root = render(viewer)
    alpha, beta = training_like(300, seed=0), training_like(300, seed=1)
    viewer.param.update(mode="step-diff", step=200, from_step=50)
    np.testing.assert_array_equal(shown(viewer, root), mosaic(alpha[200] - alpha[50], header=HEADER))
    assert "L2 distance" in viewer.summary.object and "Trouser" in viewer.summary.object
    viewer.compare_select.value = "beta"
    viewer.mode = "run-diff"
    np.testing.assert_array_equal(shown(viewer, root), mosaic(beta[200] - alpha[200], header=HEADER))
    distance = np.linalg.norm(beta[200].astype(np.float64) - alpha[200])
    assert f"L2 distance {distance:.4g}" in viewer.summary.object


def test_statistics_mode_shows_the_dask_statistics(runs_dir):
    viewer = WeightViewer(runs_dir)
    root = render(viewer)
    viewer.param.update(mode="statistics", range_start=10, range_stop=250, statistic="reversals")
    assert "Compute statistics" in viewer.message.object
    asyncio.run(viewer._compute_clicked())
    expected = change_statistics(training_like(300, seed=0)[10:251], first_step=10)
    np.testing.assert_array_equal(shown(viewer, root), mosaic(expected.reversals.values, header=HEADER))
    assert "Top-changing pixels" in viewer.summary.object
    viewer.statistic = "settle_step"
    np.testing.assert_array_equal(shown(viewer, root), mosaic(expected.settle_step.values, header=HEADER))


def test_the_view_round_trips_through_url_values(runs_dir):
    viewer = WeightViewer(runs_dir)
    viewer.compare_select.value = "beta"
    viewer.param.update(mode="run-diff", step=123, from_step=4, range_start=5, range_stop=77,
                        statistic="std", per_class=True)
    state = viewer.state()
    assert state["run"] == "alpha" and state["compare"] == "beta" and state["step"] == "123"
    reopened = WeightViewer(runs_dir)
    reopened.apply_state(state)
    assert reopened.state() == state
    assert reopened.message.object == ""


def test_bad_url_values_are_reported_and_nothing_is_opened(runs_dir):
    viewer = WeightViewer(runs_dir)
    opened_before = set(RunCatalog(runs_dir).names())
    viewer.apply_state({"run": "../../etc", "compare": "<script>x</script>", "mode": "hack", "step": "99999",
                        "stat": "nope"})
    raw = viewer.message.object
    text = html.unescape(raw)
    assert "no readable run named '../../etc'" in text and "unknown mode" in text and "past this run" in text
    assert "<script>" not in raw and "&lt;script&gt;" in raw
    assert viewer.run.name == "alpha" and viewer.step == 300 and viewer.mode == "replay"
    assert set(RunCatalog(runs_dir).names()) == opened_before


def test_empty_missing_and_broken_runs_directories_say_what_to_do(tmp_path):
    viewer = WeightViewer(tmp_path / "nowhere")
    render(viewer)
    assert "No runs directory" in viewer.message.object and "--args --runs" in viewer.message.object
    (tmp_path / "empty").mkdir()
    assert "No runs in" in WeightViewer(tmp_path / "empty").message.object
    (tmp_path / "broken" / "<img src=x onerror=alert(1)>" / "trajectory.zarr").mkdir(parents=True)
    broken = WeightViewer(tmp_path / "broken")
    assert "None of the runs can be opened" in broken.message.object
    assert "<img" not in broken.runs_table.object and "&lt;img src=x" in broken.runs_table.object


def test_live_follow_moves_to_each_new_step(tmp_path):
    rows = training_like(100)
    writer = write_run(tmp_path / "runs" / "live", rows[:17], n_steps=100, finish=False)
    viewer = WeightViewer(tmp_path / "runs")
    root = render(viewer)
    viewer.follow = True
    assert viewer.step == 16
    for step in range(17, 60):
        writer.record_step(step, rows[step], 0.1)
    writer.flush()
    viewer.poll()
    assert viewer.step == 59 and viewer.step_slider.end == 59
    np.testing.assert_array_equal(shown(viewer, root), mosaic(rows[59], header=HEADER))
    viewer.follow = False
    for step in range(60, 101):
        writer.record_step(step, rows[step], 0.1)
    writer.close()
    viewer.poll()
    assert viewer.step == 59 and viewer.step_slider.end == 100


def test_png_export_of_the_current_view(runs_dir):
    viewer = WeightViewer(runs_dir)
    viewer.step = 42
    data = viewer._png_file().getvalue()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert viewer.png_download.filename == "weightlapse-replay-42.png"


def test_the_runs_table_escapes_everything():
    from weightlapse.viewer.analysis.runs import RunInfo

    table = runs_table_html([RunInfo("<b>x</b>", "broken", "bad <script>alert(1)</script>",
                                     params={"optimizer": "<i>"})])
    assert "<script>" not in table and "<b>x</b>" not in table and "&lt;i&gt;" in table


def test_compare_mode_draws_a_seed_group_from_the_runs_index(tmp_path):
    runs = tmp_path / "runs"
    for seed in range(3):
        write_run(runs / f"adam-seed{seed}", training_like(200, seed=seed), name=f"adam-seed{seed}",
                  params={"optimizer": "adam", "lr": 0.001, "seed": seed})
    write_run(runs / "sgd", training_like(200, seed=9), name="sgd", params={"optimizer": "sgd", "lr": 0.01, "seed": 0})
    viewer = WeightViewer(runs)
    render(viewer)
    viewer.mode = "compare"
    panel = viewer.comparison
    assert not viewer._step_views.visible and panel._layout.visible
    # The selected run's seed group is preselected, the reference first.
    assert panel.runs_choice.value == ["adam-seed0", "adam-seed1", "adam-seed2"]
    panel.every_input.value = 1
    asyncio.run(panel._compare_clicked())
    result = panel.result
    assert list(result.run.values) == ["adam-seed0", "adam-seed1", "adam-seed2"]
    stack = np.stack([training_like(200, seed=seed).astype(np.float64) for seed in range(3)])
    np.testing.assert_allclose(result.mean_spread, stack.std(axis=0, ddof=1).mean(axis=(1, 2)), rtol=1e-9)
    np.testing.assert_allclose(result.distance_to_reference.sel(other_run="adam-seed2"),
                               np.sqrt(((stack[2] - stack[0]) ** 2).sum(axis=(1, 2))), rtol=1e-9)
    page = pn.panel(viewer).get_root()
    titles = {model.text for model in page.select({"type": Title})}
    assert {"Distance from adam-seed0", "Cosine similarity of the weights", "Trajectories in a shared PCA basis",
            "Variance explained (blue: these runs, grey: a random walk)", "A random walk, same PCA"} <= titles
    assert "random walk" in panel.caveat.object and "Antognini" in panel.caveat.object

    panel.runs_choice.value = ["sgd"]
    asyncio.run(panel._compare_clicked())
    assert "at least two runs" in viewer.message.object


def test_a_run_retrained_under_an_open_page_is_shown_exactly(tmp_path):
    import shutil

    runs = tmp_path / "runs"
    old = training_like(300, seed=0)
    write_run(runs / "alpha", old, name="alpha")
    viewer = WeightViewer(runs)
    root = render(viewer)
    viewer.step = 250
    np.testing.assert_array_equal(shown(viewer, root), mosaic(old[250], header=HEADER))
    assert "finished" in viewer.state_text.object and "not finished" not in viewer.state_text.object

    # `dvc repro --force` with another seed and length, while the page stays open
    new = training_like(900, seed=9)
    shutil.rmtree(runs / "alpha" / "trajectory.zarr")
    writer = write_run(runs / "alpha", new[:512], n_steps=900, finish=False, name="alpha")
    viewer.poll()
    assert viewer.step == 250 and viewer.step_slider.end == 511
    np.testing.assert_array_equal(shown(viewer, root), mosaic(new[250], header=HEADER))
    assert "not finished" in viewer.state_text.object
    steps, _ = viewer.run.loss()
    assert steps[-1] == 511
    # a page opened now shows the new store too, at an early and a late step
    fresh = WeightViewer(runs)
    fresh_root = render(fresh)
    for step in (3, 500):
        fresh.step = step
        np.testing.assert_array_equal(shown(fresh, fresh_root), mosaic(new[step], header=HEADER))
    writer.close()


def test_names_with_format_and_math_characters_draw_and_export_as_written(tmp_path):
    # HoloViews formats titles ("{label}") and matplotlib reads "$...$" as math: names are text to both.
    runs = tmp_path / "runs"
    names = ["{x}", "{0}", "$\\alpha$", "50$", "{label}", "a}b", "c{d", "$", "{}", "e"]
    write_run(runs / "{0}-$x$", training_like(40, seed=0), name="{0}-$x$", class_names=names)
    viewer = WeightViewer(runs)
    root = render(viewer)
    assert viewer.run.name == "{0}-$x$" and viewer.message.object == ""
    titles = [title.text for title in root.select({"type": Title})]
    assert any("{0}-$x$: weights after step" in title for title in titles), titles
    viewer.step = 30
    assert viewer.png_download.callback().getvalue()[:4] == b"\x89PNG"
    from weightlapse.viewer.plots import distance_curves
    import xarray as xr

    distances = xr.DataArray(np.ones((1, 3)), dims=("other_run", "step"),
                             coords={"other_run": ["{y}"], "step": [0, 1, 2]})
    plot = hv.render(distance_curves(distances, "{0}-$x$"))
    assert plot.title.text == "Distance from {0}-$x$"
