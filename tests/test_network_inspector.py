"""The weight inspector of a network run (viewer/network_inspector.py): a click on any weight of
the picture follows it over every step, the link keeps it, a click on the curve jumps there."""

import holoviews as hv
import numpy as np
import panel as pn
import pytest
from network_runs import mlp, record

from weightlapse.viewer.app import WeightViewer
from weightlapse.viewer.network_inspector import weight_name
from weightlapse.viewer.analysis.layouts import HEADER

hv.extension("bokeh")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    runs = tmp_path_factory.mktemp("inspector") / "runs"
    return runs, record(runs / "mlp", mlp(seed=0), steps=8)


def test_a_click_on_a_units_pixel_follows_that_weight_over_every_step(recorded):
    runs, seen = recorded
    viewer = WeightViewer(runs, query={"run": "mlp"})
    pn.panel(viewer).get_root()
    assert "Click a weight of the picture" in viewer.network_inspector.notice.object
    picture_height = 2 * (28 + HEADER)
    # unit 9 is the second row's second image; its pixel (row 4, column 5)
    x, y = 29 + 5.5, picture_height - (28 + HEADER + HEADER + 4) - 0.5
    viewer.network._clicked(x=x, y=y)  # what a tap on the picture sends
    assert viewer.state.weight_index == 9 * 784 + 4 * 28 + 5 and viewer.state.query()["at"] == str(9 * 784 + 117)
    steps, values = viewer.network_inspector.data()
    np.testing.assert_array_equal(values, [seen[step]["hidden1.weight"][9, 117] for step in range(9)])
    assert hv.render(viewer.network_inspector.pane.object).title.text == (
        "mlp: hidden1.weight unit 9, pixel (row 4, column 5), over all steps")
    viewer.network_inspector._curve_clicked(x=5.2)
    assert viewer.state.step == 5


def test_the_link_restores_the_weight_and_another_layer_forgets_it(recorded):
    runs, seen = recorded
    viewer = WeightViewer(runs, query={"run": "mlp", "layer": "output.weight", "at": "23"})
    steps, values = viewer.network_inspector.data()
    np.testing.assert_array_equal(values, [seen[step]["output.weight"][1, 7] for step in range(9)])
    viewer.network.layer_select.value = "hidden1.bias"  # chosen in the page
    assert viewer.state.weight_index is None and viewer.network_inspector.data() is None


def test_weights_are_named_in_words():
    assert weight_name((16, 784), 9 * 784 + 117) == "unit 9, pixel (row 4, column 5)"
    assert weight_name((10, 16), 23) == "[1, 7]"
    assert weight_name((4, 2, 3, 3), 5) == "[0, 0, 1, 2]"
