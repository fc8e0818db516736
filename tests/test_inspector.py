"""The pixel inspector (viewer/inspector.py) without a browser: a click on the tile image
chooses a class and pixel, the curve drawn is the stored weights, the marker follows the step,
and the URL values it reads back are checked. The browser test is in test_viewer_browser.py."""

import holoviews as hv
import numpy as np
import panel as pn
import pytest
from bokeh.models import GlyphRenderer, HoverTool, Line, Span
from viewer_runs import FASHION_CLASSES, training_like, write_run

from weightlapse.viewer.analysis.frames import extreme_points, mosaic_pixel, tile_origin
from weightlapse.viewer.app import WeightViewer
from weightlapse.viewer.inspector import HINT, MAX_STORE_STEPS, clicked_pixel
from weightlapse.viewer.plots import HEADER
from weightlapse.viewer.state import read_query

hv.extension("bokeh")
HEIGHT = 2 * (28 + HEADER)  # the tile image's rows


@pytest.fixture
def rows():
    return training_like(300, seed=0)


@pytest.fixture
def runs_dir(tmp_path, rows):
    write_run(tmp_path / "runs" / "alpha", rows, class_names=FASHION_CLASSES, name="alpha")
    return tmp_path / "runs"


def lines(root) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The inspector's curves as the browser receives them: legend label -> (steps, weights)."""
    drawn = {}
    for renderer in root.select({"type": GlyphRenderer}):
        data = renderer.data_source.data
        if isinstance(renderer.glyph, Line) and "weight" in data:
            drawn[renderer.name or str(len(drawn))] = (np.asarray(data["step"]), np.asarray(data["weight"]))
    return drawn


def test_a_click_maps_to_the_class_and_pixel_under_it():
    for index in (0, 4, 7):
        top, left = tile_origin(index, header=HEADER)
        # row 3, column 20 of the tile: x is the column, y counts rows from the bottom (Bokeh)
        assert clicked_pixel(left + 20 + 0.5, HEIGHT - (top + 3) - 0.5, 10) == (index, 3 * 28 + 20)
    assert clicked_pixel(28.5, HEIGHT - 10, 10) is None  # the blank column between tiles
    assert clicked_pixel(10, HEIGHT - 1, 10) is None     # the header rows, where the names are
    assert mosaic_pixel(500, 5, 10, header=HEADER) is None


def test_clicking_a_tile_draws_that_weight_and_the_same_pixel_in_every_class(runs_dir, rows):
    viewer = WeightViewer(runs_dir, query={"run": "alpha", "step": "120"})
    root = pn.panel(viewer).get_root()
    assert viewer.inspector.notice.object == HINT and not viewer.inspector.plot_box.visible
    top, left = tile_origin(3, header=HEADER)
    viewer.inspector._tap.event(x=left + 15.5, y=HEIGHT - (top + 14) - 0.5)  # class 3, row 14, column 15
    assert (viewer.state.pixel_class, viewer.state.pixel) == (3, 14 * 28 + 15)
    assert viewer.state.query()["pixel"] == "14,15" and viewer.state.query()["class"] == "3"
    root = pn.panel(viewer).get_root()
    drawn = viewer.inspector.data()
    assert np.array_equal(drawn.values, rows[:, :, 14 * 28 + 15].T) and np.array_equal(drawn.steps, np.arange(301))
    curves = lines(root)
    assert len(curves) == 10
    for steps, weights in curves.values():  # 301 steps: every stored value is drawn
        assert np.array_equal(steps, np.arange(301))
    assert any(np.array_equal(weights.astype(np.float32), rows[:, 3, 14 * 28 + 15]) for _, weights in curves.values())
    assert "Dress" in viewer.inspector.pane.object.opts.get().kwargs["title"]
    hover = [tool for tool in root.select({"type": HoverTool}) if tool.mode == "vline"]
    assert hover and ("weight", "@weight{0.0000000}") in hover[0].tooltips
    # the step marker follows the player without reading the weights again
    markers = [span for span in root.select({"type": Span}) if span.location == 120]
    viewer.state.step = 250
    assert markers and all(span.location == 250 for span in markers)
    assert viewer.inspector.data() is drawn
    # centred: the same pixel less its mean over the ten classes, from the same read
    viewer.state.weights = "centred"
    root = pn.panel(viewer).get_root()
    column = rows[:, :, 14 * 28 + 15]
    expected = column - column.mean(axis=1, keepdims=True)
    assert any(np.allclose(weights, expected[:, 3], atol=1e-7) for _, weights in lines(root).values())
    assert "centred weight" in viewer.inspector.pane.object.opts.get().kwargs["title"]


def test_a_long_run_without_a_copy_says_how_to_make_one(tmp_path, monkeypatch):
    write_run(tmp_path / "runs" / "long", training_like(120, seed=1), name="long")
    monkeypatch.setattr("weightlapse.viewer.inspector.MAX_STORE_STEPS", 100)
    viewer = WeightViewer(tmp_path / "runs", query={"run": "long", "pixel": "3,4", "class": "1"})
    assert "weightlapse index" in viewer.inspector.notice.object and not viewer.inspector.plot_box.visible
    assert MAX_STORE_STEPS >= 10_000


@pytest.mark.parametrize("pixel, class_, problems", [
    ("14,15", "3", 0), ("27,27", "9", 0), ("28,0", "3", 1), ("-1,3", "3", 1), ("3", "3", 1), ("1,2,3", "x", 2),
    ("<script>", "10", 2), ("../../etc", "٣", 2), ("1e3,2", "00003", 1), ("9" * 400, "3" * 400, 2),
])
def test_the_url_pixel_is_a_row_and_column_of_an_image_and_a_class(pixel, class_, problems):
    values, found = read_query({"run": "alpha", "pixel": pixel, "class": class_}, names=["alpha"],
                               last_step=lambda name: 300)
    assert len(found) == problems, found
    if "pixel" in values:
        row, col = (int(part) for part in pixel.split(","))
        assert values["pixel"] == row * 28 + col
    if not problems:
        assert values["pixel_class"] == int(class_)
    assert all("<script>" not in problem or "'<script>'" in problem for problem in found)


def test_extreme_points_keep_every_spike_and_only_stored_values():
    rng = np.random.default_rng(0)
    values = np.cumsum(rng.standard_normal(300_001)).astype(np.float32)
    values[123_457] += 500  # a one-step spike
    values[7] -= 500
    picked = extreme_points(values, 2000)
    assert len(picked) <= 2002 and np.all(np.diff(picked) > 0)
    assert 123_457 in picked and 7 in picked and picked[0] == 0 and picked[-1] == 300_000
    assert values[picked].max() == values.max() and values[picked].min() == values.min()
    assert np.array_equal(extreme_points(values[:1500], 2000), np.arange(1500))  # short: all of it
