"""How each parameter shape is laid out and drawn (viewer/analysis/layouts.py,
viewer/network_plots.py): every weight in its place, a click maps back to it, large layers
are cut with a note, colours centred on zero."""

import holoviews as hv
import numpy as np
import pytest

from weightlapse.viewer.analysis.layouts import HEADER, MAX_UNITS, layer_layout, picture_size
from weightlapse.viewer.network_plots import colour_limits, layer_image

hv.extension("bokeh")


def test_a_layer_on_the_784_pixels_is_one_28x28_image_per_unit_titled_by_its_index():
    values = np.random.default_rng(0).standard_normal((16, 784)).astype(np.float32)
    layout = layer_layout((16, 784))
    picture = layout.picture(values)
    assert layout.kind == "units" and picture.shape == (2 * (28 + HEADER), 8 * 29 - 1)
    for unit in (0, 7, 8, 15):
        row, column = divmod(unit, 8)
        top, left = row * (28 + HEADER) + HEADER, column * 29
        np.testing.assert_array_equal(picture[top:top + 28, left:left + 28], values[unit].reshape(28, 28))
    assert np.isnan(picture[:HEADER]).all()  # the titles' rows, drawn as background
    assert [text for _, _, text in layout.labels] == [f"unit {unit}" for unit in range(16)]
    # a click on unit 9's pixel (row 4, column 5): x across, y up from the picture's bottom
    top, left = 1 * (28 + HEADER) + HEADER, 1 * 29
    assert layout.clicked(left + 5.5, picture.shape[0] - (top + 4) - 0.5) == 9 * 784 + 4 * 28 + 5
    assert layout.clicked(28.5, 10) is None  # between tiles


def test_a_large_layer_shows_its_first_units_and_says_how_many():
    layout = layer_layout((100, 784))
    assert int(layout.index.max()) == MAX_UNITS * 784 - 1
    assert "the first 64 of 100 units shown" in layout.description


def test_other_matrices_are_heatmaps_with_units_down_and_inputs_across():
    values = np.arange(160, dtype=np.float32).reshape(10, 16)
    layout = layer_layout((10, 16))
    np.testing.assert_array_equal(layout.picture(values), values)
    assert layout.kind == "matrix" and layout.axes
    assert layout.clicked(3.2, 7.1) == 7 * 16 + 3  # cells centred on their (in, out) indices
    image = layer_image(layout, layout.picture(values), label="weight", title="t", clim=(-1, 1), cmap="RdBu_r")
    plot = hv.render(image)
    glyph = plot.renderers[0]
    # Bokeh draws an image's row 0 at its lowest y, here out = 0, and the y axis runs downwards:
    # unit 0 on top, as a matrix is written
    np.testing.assert_array_equal(glyph.data_source.data["image"][0], values)
    assert glyph.data_source.data["y"][0] == -0.5 and plot.y_range.start > plot.y_range.end
    assert layer_layout((3000, 5000)).index.shape == (512, 2048)
    assert "the first 512 of 3,000 rows shown; the first 2,048 of 5,000 columns shown" in \
        layer_layout((3000, 5000)).description


def test_vectors_kernels_and_other_shapes():
    bias = layer_layout((16,))
    assert bias.kind == "vector" and bias.index.shape == (1, 16) and bias.clicked(15.4, 0.2) == 15
    assert layer_layout(()).index.shape == (1, 1)
    kernels = layer_layout((16, 8, 3, 3))  # many inputs: one unit a row, its input channels across
    values = np.arange(16 * 8 * 9, dtype=np.float32).reshape(16, 8, 3, 3)
    picture = kernels.picture(values)
    assert kernels.kind == "kernels" and picture.shape == (16 * 4 - 1, 8 * 4 - 1)
    np.testing.assert_array_equal(picture[4:7, 4:7], values[1, 1])
    assert np.isnan(picture[3]).all()
    first = layer_layout((8, 1, 5, 5))  # a first layer's one channel: the units across
    assert first.index.shape == (5, 8 * 7 - 2) and "8 units (units across)" in first.description
    np.testing.assert_array_equal(first.picture(np.arange(200, dtype=np.float32).reshape(8, 1, 5, 5))[:, 7:12],
                                  np.arange(25, 50).reshape(5, 5))
    other = layer_layout((4, 5, 6))
    assert other.kind == "flattened" and other.index.shape == (4, 30)
    assert other.description.startswith("shape (4, 5, 6) flattened to 4 rows (first axis) by 30 columns")


def test_colours_are_centred_on_zero_and_never_clip():
    picture = np.array([[0.5, -2.0], [np.nan, 1.0]], np.float32)
    assert colour_limits(picture, diverging=True) == ((-2.0, 2.0), "RdBu_r")
    assert colour_limits(picture, diverging=True, limit=3.0)[0] == (-3.0, 3.0)
    assert colour_limits(picture, diverging=True, limit=1.0)[0] == (-2.0, 2.0)  # widened to this picture
    assert colour_limits(picture, diverging=False) == ((-2.0, 1.0), "viridis")


@pytest.mark.parametrize("shape", [(16, 784), (10, 16), (16,), (512, 2048), (32, 16, 5, 5)])
def test_pictures_fit_the_page_with_square_cells(shape):
    layout = layer_layout(shape)
    width, height = picture_size(layout, 820)
    rows, columns = layout.index.shape
    assert width <= 820 and height <= 620
    if rows > 1 and width > 420:
        assert width / columns == pytest.approx(height / rows, rel=0.05)
