"""Side by side without a browser: the runs' grids a page holds at a step (viewer/side_by_side.py)."""

import numpy as np
import panel as pn
import pytest
from bokeh.models import GlyphRenderer
from PIL import Image
from viewer_runs import FASHION_CLASSES, training_like, write_run

from weightlapse.viewer.analysis.frames import mosaic, scale_per_class, symmetric_limit
from weightlapse.viewer.app import WeightViewer
from weightlapse.viewer.plots import HEADER
from weightlapse.viewer.state import read_query

ROWS = {"adam": training_like(300, seed=0), "sgd": training_like(300, seed=1) * 2, "short": training_like(120, seed=2),
        "seed3": training_like(300, seed=3)}


@pytest.fixture
def runs_dir(tmp_path):
    runs = tmp_path / "runs"
    for name, rows in ROWS.items():
        write_run(runs / name, rows, class_names=FASHION_CLASSES, name=name)
    return runs


def side_grids(root) -> dict[int, GlyphRenderer]:
    return {int(renderer.name.rsplit("-", 1)[1]): renderer for renderer in root.select({"type": GlyphRenderer})
            if (renderer.name or "").startswith("wl-side-")}


def shown(renderer) -> np.ndarray:
    return np.flipud(np.asarray(renderer.data_source.data["image"][0]))


def page(runs, **query):
    viewer = WeightViewer(runs, query=query)
    return viewer, pn.panel(viewer).get_root()


def test_each_run_shows_its_own_stored_weights_at_the_step_on_one_colour_scale(runs_dir):
    viewer, root = page(runs_dir, run="adam", mode="side-by-side", side="sgd,short", step="50")
    for step in (50, 51, 200):
        viewer.state.step = step
        grids = side_grids(root)
        assert sorted(grids) == [0, 1, 2]
        expected = {0: ROWS["adam"][step], 1: ROWS["sgd"][step], 2: ROWS["short"][min(step, 120)]}
        for index, rows in expected.items():
            np.testing.assert_array_equal(shown(grids[index]), mosaic(rows, header=HEADER))
        mappers = {(grid.glyph.color_mapper.low, grid.glyph.color_mapper.high) for grid in grids.values()}
        assert len(mappers) == 1                              # one colour scale for every run
        low, high = mappers.pop()
        # the whole-run scale: the largest of the runs' largest |weight| (sgd's, twice as large)
        assert -low == high >= symmetric_limit(ROWS["sgd"][-1]) > symmetric_limit(ROWS["adam"][-1])
    # the short run ended at 120: its grid says it shows step 120, and the page says why
    assert "short ends at step 120: it is shown at that step." in viewer.side.notice.object
    assert viewer.side.slots[2].tiles_pipe.data.title == "short: step 120 (its last)"
    assert viewer.player.slider.end == 300                   # the longest run's steps can be played


def test_this_step_and_per_class_scales_are_shared_or_per_tile(runs_dir):
    viewer, root = page(runs_dir, run="adam", mode="side-by-side", side="sgd", step="10", scale="step")
    grids = side_grids(root)
    limit = max(symmetric_limit(ROWS["adam"][10]), symmetric_limit(ROWS["sgd"][10]))
    assert all(grid.glyph.color_mapper.high == pytest.approx(limit) for grid in grids.values())
    viewer.state.scale = "class"
    np.testing.assert_allclose(shown(side_grids(root)[1]), mosaic(scale_per_class(ROWS["sgd"][10]), header=HEADER),
                               rtol=1e-6)


def test_the_run_alone_asks_for_runs_and_a_broken_choice_shows_no_grid(runs_dir):
    viewer, root = page(runs_dir, run="adam", mode="side-by-side")
    assert list(side_grids(root)) == [0]
    assert "Choose up to 3 runs to show beside adam" in viewer.side.notice.object
    assert "adam" not in viewer.side.choice.options.values()   # the run itself is always shown
    viewer.side.choice.value = ["sgd", "seed3"]                 # what the page's choice sets
    assert viewer.state.side_runs == ["sgd", "seed3"] and sorted(side_grids(root)) == [0, 1, 2]
    assert "side=sgd%2Cseed3" in "&".join(f"{k}={v}" for k, v in viewer.state.query().items()).replace(",", "%2C")
    viewer.state.mode = "replay"
    assert not viewer.side._layout.visible and viewer.tiles._layout.visible


def test_hostile_or_too_many_runs_in_a_link_are_refused_with_a_message():
    names = ["adam", "sgd", "short", "seed3", "<b>x</b>"]
    values, problems = read_query({"run": "adam", "side": "sgd,../../etc,adam,sgd"}, names=names,
                                  last_step=lambda name: 300)
    assert values["side_runs"] == ["sgd"]               # the run itself and repeats are left out
    assert problems == ["no readable run named '../../etc' to show side by side"]
    values, problems = read_query({"run": "adam", "side": "sgd,short,seed3,<b>x</b>"}, names=names,
                                  last_step=lambda name: 300)
    assert values["side_runs"] == ["sgd", "short", "seed3"]
    assert problems == ["side by side shows up to 3 runs beside the run, not 4; showing the first 3"]
    values, problems = read_query({"spacing": "<script>", "mode": "side-by-side"}, names=names,
                                  last_step=lambda name: 300, default_run="adam")
    assert problems == ["unknown frame spacing '<script>'"] and values["mode"] == "side-by-side"
    assert read_query({"spacing": "distance"}, names=names, last_step=lambda name: 300)[0]["spacing"] == "distance"


def test_exports_of_side_by_side_hold_every_run_in_one_picture(runs_dir, tmp_path):
    import asyncio
    import io

    viewer, _ = page(runs_dir, run="adam", mode="side-by-side", side="sgd,short", step="150", start="100",
                     stop="110", spacing="even")
    picture = Image.open(io.BytesIO(viewer.export.png_file().getvalue()))
    assert picture.size == (1920, 896)                      # 2x2 grids for three runs
    asyncio.run(viewer.export.render_animation())
    animation = Image.open(viewer.export.animation_download.file)
    assert animation.size == (1920, 896) and animation.n_frames == 11
    assert "11 frames (steps 100..110, even spacing)" in viewer.export.outcome.object


def test_centred_weights_side_by_side_are_each_runs_own_centred_weights(runs_dir):
    viewer, root = page(runs_dir, run="adam", mode="side-by-side", side="sgd", step="80", weights="centred")
    grids = side_grids(root)
    for index, name in enumerate(("adam", "sgd")):
        rows = ROWS[name][80]
        np.testing.assert_allclose(shown(grids[index]), mosaic(rows - rows.mean(axis=0), header=HEADER), atol=1e-6)
    assert viewer.side.slots[0].tiles_pipe.data.title == "adam: centred weights, step 80"
    assert not viewer.inspector._layout.visible  # its clicks come from the Replay grid, not these
