"""The network view without a browser (viewer/network_view.py): a Recorder-made run opens on its
first layer, the layer selector and the link choose a parameter (a bad one falls back), the
player replays it on one colour scale, and Step vs step, Run vs run and Statistics work per layer."""

import asyncio
import html

import holoviews as hv
import imageio.v2 as imageio
import matplotlib
import numpy as np
import panel as pn
import pytest
from bokeh.models import ColorBar, GlyphRenderer, Image, Title
from network_runs import mlp, record
from viewer_runs import training_like, write_run

from weightlapse.viewer.analysis.export import SIDE_PICTURE_PX
from weightlapse.viewer.app import WeightViewer
from weightlapse.viewer.analysis.layouts import layer_layout, picture_size

hv.extension("bokeh")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    runs = tmp_path_factory.mktemp("network-view") / "runs"
    seen = {"mlp": record(runs / "mlp", mlp(seed=0)), "mlp-seed1": record(runs / "mlp-seed1", mlp(seed=1))}
    record(runs / "wide", mlp(hidden=20), steps=3)
    write_run(runs / "softmax", training_like(20, seed=0), name="softmax")
    return runs, seen


def viewer_on(runs, /, **query):
    viewer = WeightViewer(runs, query=query)
    return viewer, pn.panel(viewer).get_root()


def drawn(root, shape) -> GlyphRenderer:
    """The network picture's image renderer (of ``shape``, as Bokeh holds it: row 0 at the bottom)."""
    for renderer in root.select({"type": GlyphRenderer}):
        if isinstance(renderer.glyph, Image) and np.asarray(renderer.data_source.data["image"][0]).shape == shape:
            return renderer
    raise AssertionError(f"no picture of shape {shape} on the page")


def network_picture(viewer, root) -> np.ndarray:
    """What the browser receives for the network picture, in picture orientation (row 0 on top)."""
    layout = viewer.network.shown.layout
    image = np.asarray(drawn(root, layout.index.shape).data_source.data["image"][0])
    return image if layout.axes else np.flipud(image)


def test_a_network_run_opens_on_its_first_layer_one_image_per_unit_and_the_player_moves_it(recorded):
    runs, seen = recorded
    viewer, root = viewer_on(runs, run="mlp", step="3")
    assert list(viewer.network.layer_select.options.values()) == ["hidden1.weight", "hidden1.bias", "output.weight",
                                                                  "output.bias"]
    assert viewer.network.layer_select.value == "hidden1.weight" and viewer.state.layer == ""
    layout = layer_layout((16, 784))
    np.testing.assert_array_equal(network_picture(viewer, root), layout.picture(seen["mlp"][3]["hidden1.weight"]))
    mapper = drawn(root, layout.index.shape).glyph.color_mapper
    limits = (mapper.low, mapper.high)
    viewer.state.step = 12  # the player's step: the same plot, new values, the run's one colour scale
    np.testing.assert_array_equal(network_picture(viewer, root), layout.picture(seen["mlp"][12]["hidden1.weight"]))
    whole_run = max(np.abs(seen["mlp"][step]["hidden1.weight"]).max() for step in (0, 12))
    assert (mapper.low, mapper.high) == limits and limits[1] == -limits[0] >= whole_run * (1 - 1e-6)
    assert "16 units, each one's 784 input weights as a 28x28 image" in html.unescape(viewer.network.description.object)
    assert not viewer.tiles._layout.visible and not viewer.inspector._layout.visible
    assert "records a network" not in viewer.message.object


def test_the_layer_selector_switches_to_the_output_heatmap_and_the_link_keeps_it(recorded):
    runs, seen = recorded
    viewer, root = viewer_on(runs, run="mlp", step="5")
    viewer.network.layer_select.value = "output.weight"  # what choosing it in the page does
    assert viewer.state.layer == "output.weight" and viewer.state.query()["layer"] == "output.weight"
    np.testing.assert_array_equal(network_picture(viewer, root), seen["mlp"][5]["output.weight"])
    assert viewer.network.shown.title == "mlp: output.weight after step 5"
    titles = [bar.title for bar in root.select({"type": ColorBar})]
    assert "weight" in titles
    reopened, _ = viewer_on(runs, **viewer.state.query())
    assert reopened.network.shown.title == viewer.network.shown.title and not reopened.message.visible


def test_a_bad_layer_or_weight_in_the_link_falls_back_and_says_so(recorded):
    runs, _ = recorded
    viewer, _ = viewer_on(runs, run="mlp", layer="<b>fc9</b>.weight", at="99999999")
    assert viewer.network.shown.title.startswith("mlp: hidden1.weight")
    message = html.unescape(viewer.message.object)
    assert "no layer named '<b>fc9</b>.weight'" in message and "weight '99999999' is not one of" in message
    assert "<b>fc9" not in viewer.message.object  # escaped
    viewer, _ = viewer_on(runs, run="softmax", layer="hidden1.weight")
    assert "layer: this run records no network" in viewer.message.object
    assert set(viewer.state.query()) == {"run", "compare", "mode", "step", "from", "start", "stop", "stat", "scale",
                                         "weights", "follow", "runs", "pixel", "class", "side", "spacing"}


def test_every_shape_has_its_picture(recorded):
    runs, seen = recorded
    viewer, root = viewer_on(runs, run="mlp", step="2", layer="output.bias")
    assert viewer.network.shown.layout.kind == "vector"
    np.testing.assert_array_equal(network_picture(viewer, root), seen["mlp"][2]["output.bias"][None, :])
    viewer.state.weights = "centred"  # a softmax regression's choice: said, not silently ignored
    assert "a network's values are shown as stored" in viewer.network.summary.object
    viewer.state.scale = "class"  # each unit on its own scale: the largest |value| of every unit is 1
    viewer.state.layer = "output.weight"
    assert np.abs(viewer.network.shown.values).max(axis=1) == pytest.approx(np.ones(10))


def test_step_vs_step_and_run_vs_run_per_layer_and_different_models_are_refused(recorded):
    runs, seen = recorded
    viewer, root = viewer_on(runs, run="mlp", step="9", mode="step-diff", layer="output.weight")
    viewer.state.from_step = 4
    np.testing.assert_allclose(network_picture(viewer, root),
                               seen["mlp"][9]["output.weight"] - seen["mlp"][4]["output.weight"])
    viewer.state.param.update(mode="run-diff", compare="mlp-seed1")
    np.testing.assert_allclose(network_picture(viewer, root),
                               seen["mlp-seed1"][9]["output.weight"] - seen["mlp"][9]["output.weight"])
    distance = np.linalg.norm(seen["mlp-seed1"][9]["hidden1.bias"].astype(np.float64)
                              - seen["mlp"][9]["hidden1.bias"])
    assert f"<td>hidden1.bias</td><td>{distance:.4g}</td>" in viewer.network.summary.object
    asyncio.run(viewer.network.compute_distances())
    assert viewer.network.distance_pane.object is not None
    assert viewer.network.distances.sel(parameter="hidden1.bias", step=9).item() == pytest.approx(distance)
    viewer.state.compare = "wide"
    assert html.unescape(viewer.network.notice.object) == (
        "mlp and wide cannot be compared: hidden1.weight is (16, 784) in mlp but (20, 784) in wide: the runs "
        "record different models.")
    viewer.state.compare = "softmax"
    assert "softmax is not a network run" in viewer.network.notice.object


def test_run_vs_run_played_back_keeps_the_whole_runs_scale_or_each_frames_range(recorded):
    # Whole run (the default): every frame on one range, the largest difference of the sampled
    # steps (here the newest), so a small early difference looks small. This step: each frame
    # on its own range, the colour bar following the runs as they drift apart.
    runs, seen = recorded
    viewer, root = viewer_on(runs, run="mlp", compare="mlp-seed1", mode="run-diff", layer="output.weight", step="2")
    last = len(seen["mlp"]) - 1
    largest = float(np.abs(seen["mlp-seed1"][last]["output.weight"] - seen["mlp"][last]["output.weight"]).max())
    for scale in ("run", "step"):
        viewer.state.scale = scale
        for step in (0, 3, 7, last):
            viewer.state.step = step
            difference = seen["mlp-seed1"][step]["output.weight"] - seen["mlp"][step]["output.weight"]
            np.testing.assert_allclose(network_picture(viewer, root), difference)
            mapper = drawn(root, difference.shape).glyph.color_mapper
            limit = largest if scale == "run" else float(np.abs(difference).max())
            assert (mapper.low, mapper.high) == pytest.approx((-limit, limit), rel=1e-6), (scale, step)
    assert float(np.abs(seen["mlp-seed1"][0]["output.weight"] - seen["mlp"][0]["output.weight"]).max()) < largest / 2


def test_per_class_scales_each_units_change_or_difference_on_its_own(recorded):
    # Per class ("each unit on its own" for a network) holds for differences as for the weights:
    # each unit of the change divided by its own largest |change|, the colour range ±1.
    runs, seen = recorded
    for mode, query in (("step-diff", {"from": "2"}), ("run-diff", {"compare": "mlp-seed1"})):
        viewer, root = viewer_on(runs, run="mlp", mode=mode, layer="output.weight", step="9", scale="class", **query)
        difference = (seen["mlp"][9]["output.weight"] - seen["mlp"][2]["output.weight"] if mode == "step-diff"
                      else seen["mlp-seed1"][9]["output.weight"] - seen["mlp"][9]["output.weight"])
        expected = difference / np.abs(difference).max(axis=1, keepdims=True)
        np.testing.assert_allclose(network_picture(viewer, root), expected, rtol=1e-6)
        mapper = drawn(root, difference.shape).glyph.color_mapper
        assert (mapper.low, mapper.high) == (-1.0, 1.0)
        assert "/ unit max |" in viewer.network.shown.label


def side_picture(root, index: int) -> tuple[np.ndarray, tuple[float, float]]:
    """Side by side's picture ``index`` as the browser receives it (a heatmap: row 0 on top) and its colour range."""
    (renderer,) = root.select({"type": GlyphRenderer, "name": f"wl-network-side-{index}"})
    mapper = renderer.glyph.color_mapper
    return np.asarray(renderer.data_source.data["image"][0]), (mapper.low, mapper.high)


def test_side_by_side_shows_each_network_runs_layer_at_the_step_on_one_colour_scale(recorded):
    runs, seen = recorded
    viewer, root = viewer_on(runs, run="mlp", mode="side-by-side", side="mlp-seed1", layer="output.weight", step="5")
    store = viewer.store.networks
    names = ("mlp", "mlp-seed1")
    limit = max([store.colour_limit(store.network(name), "output.weight") for name in names]
                + [float(np.abs(seen[name][5]["output.weight"]).max()) for name in names])
    for index, name in enumerate(names):
        picture, colour_range = side_picture(root, index)
        np.testing.assert_array_equal(picture, seen[name][5]["output.weight"])
        assert colour_range == pytest.approx((-limit, limit))
    viewer.state.scale = "step"  # one range still, the largest |weight| of the two pictures
    largest = max(float(np.abs(seen[name][5]["output.weight"]).max()) for name in names)
    assert all(side_picture(root, index)[1] == pytest.approx((-largest, largest)) for index in (0, 1))
    assert not viewer.network_inspector._layout.visible  # its clicks come from the single picture
    assert "save tool above each picture" in viewer.export.png_download.label
    # A run that ends sooner is shown at its last step, and says so; another model's layer is refused.
    viewer.state.param.update(layer="output.bias", side_runs=["wide"])
    picture, _ = side_picture(root, 1)
    np.testing.assert_array_equal(picture[0], record_of(runs, "wide", 3, "output.bias"))
    assert "wide ends at step 3: it is shown at that step." in viewer.network.notice.object
    viewer.state.layer = "output.weight"
    assert "wide has no parameter output.weight of shape (10, 16)" in viewer.network.notice.object
    assert not viewer.network.side_box.visible
    viewer.state.side_runs = ["softmax"]
    assert "softmax is not a network run" in viewer.network.notice.object


def record_of(runs, name: str, step: int, parameter: str) -> np.ndarray:
    """A parameter at a step as the run's store holds it."""
    from weightlapse.viewer.data import DataStore

    return DataStore(runs).networks.network(name).values_at(parameter, step)


def test_statistics_of_the_layer_shown_in_its_own_shape(recorded):
    runs, seen = recorded
    viewer, root = viewer_on(runs, run="mlp", mode="statistics", layer="hidden1.weight", start="0", stop="12")
    assert "Press “Compute statistics” for hidden1.weight, steps 0..12 of mlp" in viewer.network.notice.object
    asyncio.run(viewer.statistics.compute())
    rows = np.stack([seen["mlp"][step]["hidden1.weight"] for step in range(13)]).astype(np.float64)
    expected = layer_layout((16, 784)).picture(np.abs(np.diff(rows, axis=0)).sum(axis=0))
    np.testing.assert_allclose(network_picture(viewer, root), expected, rtol=1e-5)
    assert viewer.network.shown.label == "path length" and not viewer.network.shown.diverging


def test_another_run_forgets_a_layer_and_a_weight_it_does_not_have(recorded):
    runs, _ = recorded
    viewer, _ = viewer_on(runs, run="mlp", layer="output.weight", at="150")
    viewer.state.run = "wide"  # has output.weight, of 200 weights: both kept
    assert (viewer.state.layer, viewer.state.weight_index) == ("output.weight", 150)
    viewer.state.run = "softmax"
    assert (viewer.state.layer, viewer.state.weight_index) == ("", None) and "layer" not in viewer.state.query()


def test_the_sidebar_offers_centring_only_where_it_applies_and_animates_a_networks_layer(recorded):
    # Centring is a softmax regression's (its mean over ten classes): a network run's sidebar
    # does not offer it, and says where its layer's picture is saved. Animations are of the
    # tile grid, or of the network layer shown.
    runs, _ = recorded
    viewer, _ = viewer_on(runs, run="mlp")
    assert not viewer.weights_box.visible and viewer.export.animation_box.visible
    assert "save tool" in viewer.export.png_download.label
    viewer.state.run = "softmax"
    assert viewer.weights_box.visible and viewer.export.animation_box.visible
    assert viewer.export.png_download.label == "Download PNG of this view"
    viewer.state.run = "mlp"
    assert not viewer.weights_box.visible


@pytest.mark.parametrize("scale", ["run", "class"])
def test_a_network_layers_animation_is_its_pictures_on_the_pages_colour_scale(recorded, scale):
    runs, seen = recorded
    viewer, _ = viewer_on(runs, run="mlp", layer="hidden1.weight", start="0", stop="12", spacing="even", scale=scale)
    asyncio.run(viewer.export.render_animation())
    assert "13 frames (steps 0..12, even spacing)" in viewer.export.outcome.object
    assert viewer.export.animation_download.filename == "weightlapse-0-12.gif"
    frames = [np.asarray(frame)[..., :3].astype(int) for frame in imageio.get_reader(viewer.export.animation_download.file)]
    assert len(frames) == 13
    # The weight that moves most over the run, where the picture draws it: the colour of its
    # value on the whole run's scale (or, Per class, its unit's own), the same mapping every frame.
    layout = layer_layout((16, 784))
    width, height = picture_size(layout)
    rows, columns = layout.index.shape
    moved = np.abs(seen["mlp"][12]["hidden1.weight"] - seen["mlp"][0]["hidden1.weight"]).ravel()
    flat = int(np.argmax(moved))
    row, column = np.argwhere(layout.index == flat)[0]
    at = (frames[0].shape[0] - 16 - height + int((row + 0.5) * height / rows), 16 + int((column + 0.5) * width / columns))
    unit, pixel = divmod(flat, 784)
    limit = max([viewer.store.networks.colour_limit(viewer.store.networks.network("mlp"), "hidden1.weight")]
                + [float(np.abs(seen["mlp"][step]["hidden1.weight"]).max()) for step in range(13)])  # widened to its frames
    colours = matplotlib.colormaps["RdBu_r"]
    for step in (0, 6, 12):
        values = seen["mlp"][step]["hidden1.weight"]
        value = values[unit, pixel] / (np.abs(values[unit]).max() if scale == "class" else limit)
        expected = np.array(colours((value + 1) / 2)[:3]) * 255
        assert np.abs(frames[step][at] - expected).max() < 24, (step, frames[step][at], expected)


def test_network_runs_side_by_side_animate_as_one_picture_a_run_on_one_colour_scale(recorded):
    runs, seen = recorded
    viewer, _ = viewer_on(runs, run="mlp", mode="side-by-side", side="mlp-seed1", layer="output.weight",
                          start="0", stop="12", spacing="even")
    asyncio.run(viewer.export.render_animation())
    assert "13 frames (steps 0..12, even spacing)" in viewer.export.outcome.object
    frames = [np.asarray(frame)[..., :3].astype(int) for frame in imageio.get_reader(viewer.export.animation_download.file)]
    assert len(frames) == 13
    # Each run's picture where the export lays it out (two across, each titled above it), and
    # the same weight of each coloured on one scale: the larger of the runs' whole-run limits.
    layout = layer_layout((10, 16))
    width, height = picture_size(layout, SIDE_PICTURE_PX)
    networks = viewer.store.networks
    limit = max([networks.colour_limit(networks.network(name), "output.weight") for name in ("mlp", "mlp-seed1")]
                + [float(np.abs(seen[name][step]["output.weight"]).max()) for name in seen for step in range(13)])
    colours = matplotlib.colormaps["RdBu_r"]
    row, column = 3, 5
    y = frames[0].shape[0] - 16 - height + int((row + 0.5) * height / 10)
    for index, name in enumerate(("mlp", "mlp-seed1")):
        x = 16 + index * (width + 16) + int((column + 0.5) * width / 16)
        for step in (0, 12):
            value = seen[name][step]["output.weight"][row, column] / limit
            expected = np.array(colours((value + 1) / 2)[:3]) * 255
            assert np.abs(frames[step][y, x] - expected).max() < 24, (name, step, frames[step][y, x], expected)
    # runs of another model, or a softmax run, beside it: named, nothing rendered
    for beside, problem in (("wide", "output.weight is (10, 16) in mlp but (10, 20) in wide"),
                            ("softmax", "mlp records a network and softmax softmax regression")):
        viewer.state.side_runs = [beside]
        asyncio.run(viewer.export.render_animation())
        assert problem in html.unescape(viewer.export.outcome.object), viewer.export.outcome.object
        assert not viewer.export.animation_download.visible


def test_a_hidden_layer_run_of_the_train_stage_replays_its_units_and_its_held_out_accuracy(generated_data, tmp_path):
    """What `dvc repro` makes of runs.mlp-32 (here 8 units, 8 steps): the pipeline's planned
    network store, with its held-out scores, opens in the viewer one image per hidden unit."""
    import weightlapse
    from weightlapse.pipeline.datasets import load_dataset
    from weightlapse.pipeline.params import TrainParams
    from weightlapse.pipeline.train import run_training

    runs = tmp_path / "runs"
    config = TrainParams(device="cpu", max_steps=8, hidden=(8,), eval_every=5)
    run_training(config, load_dataset(generated_data[0], "mnist"), runs / "mlp-8", run_name="mlp-8", progress=False)
    stored = weightlapse.open_run(runs / "mlp-8")
    viewer, root = viewer_on(runs, run="mlp-8", step="7")
    assert list(viewer.network.layer_select.options.values()) == ["hidden1.weight", "output.weight"]
    layout = layer_layout((8, 784))
    np.testing.assert_array_equal(network_picture(viewer, root), layout.picture(stored["hidden1.weight"][7].values))
    steps, accuracy = viewer.store.open("mlp-8").accuracy()
    assert list(steps) == [0, 5, 8] and np.all((accuracy >= 0) & (accuracy <= 1))


def test_compare_runs_matches_network_runs_hidden_units_and_draws_both_distances(recorded):
    from weightlapse.viewer.analysis.network_compare import compare_networks

    runs, _ = recorded
    viewer, root = viewer_on(runs, mode="compare", runs="mlp,mlp-seed1")
    comparison = viewer.comparison
    assert comparison.match_box.visible and comparison.match_box.value
    assert "compare these network runs (hidden units matched)" in comparison.notice.object
    asyncio.run(comparison.compute())
    expected = compare_networks({"mlp": viewer.store.open("mlp"), "mlp-seed1": viewer.store.open("mlp-seed1")},
                                every=1)
    as_recorded = float(expected.unmatched_distance.isel(step=-1, other_run=0))
    matched = float(expected.distance_to_reference.isel(step=-1, other_run=0))
    assert matched < as_recorded
    note = comparison.gauge.object
    assert "Hidden units matched" in note
    assert f"<td>mlp-seed1</td><td>{int(expected.moved_units[0])} of 16</td><td>{as_recorded:.4g}</td>" in note
    assert f"<td>{matched:.4g}</td>" in note
    dashes = {curve.opts.get().kwargs.get("line_dash") for curve in comparison.plots[0].objects[0].object}
    assert dashes == {"solid", "dashed"}
    # unticked: the runs as recorded, one more computation
    comparison.match_box.value = False
    assert "hidden units as recorded" in comparison.notice.object
    assert viewer.state.query()["match"] == "0"  # kept in the link
    asyncio.run(comparison.compute())
    assert "Hidden units as recorded" in comparison.gauge.object
    # a softmax run or another model in the group is named, before anything is computed
    viewer.state.compare_runs = ["mlp", "softmax"]
    assert "mlp records a network and softmax softmax regression" in comparison.notice.object
    viewer.state.compare_runs = ["mlp", "wide"]
    assert "hidden1.weight is (16, 784) in mlp but (20, 784) in wide" in comparison.notice.object
    assert not comparison.match_box.visible
    # runs recorded by a loop of their own have no held-out images to predict
    viewer.state.compare_runs = ["mlp", "mlp-seed1"]
    asyncio.run(comparison.predictions.compute())
    assert "mlp records no dataset" in html.unescape(comparison.predictions.notice.object)


def test_compare_runs_of_train_stage_networks_matches_units_in_weights_and_on_the_line_between_them(
        generated_data, tmp_path):
    """Two seeds of a hidden-layer run: weight-space distances with units matched, and the
    held-out loss on the line between the runs, as recorded and matched, from the stored layers."""
    import shutil

    from weightlapse.pipeline.datasets import load_dataset
    from weightlapse.pipeline.params import TrainParams
    from weightlapse.pipeline.train import run_training
    from weightlapse.viewer.analysis import function_space
    from weightlapse.viewer.analysis.runs import RunCatalog

    project = tmp_path / "project"
    shutil.copytree(generated_data[0], project / "data" / "mnist")
    dataset = load_dataset(project / "data" / "mnist", "mnist")
    for seed in (0, 1):
        config = TrainParams(seed=seed, hidden=(8,), eval_every=5, device="cpu")
        run_training(config, dataset, project / "runs" / f"mlp-{seed}", run_name=f"mlp-{seed}", progress=False)
    viewer, _ = viewer_on(project / "runs", mode="compare", runs="mlp-0,mlp-1")
    comparison = viewer.comparison
    asyncio.run(comparison.compute())
    assert "Hidden units matched" in comparison.gauge.object and "of 8</td>" in comparison.gauge.object
    asyncio.run(comparison.predictions.compute())
    models = function_space.open_models(RunCatalog(project / "runs"), ["mlp-0", "mlp-1"])
    line = function_space.loss_along_line(models, function_space.load_heldout(project / "data" / "mnist", "mnist"))
    result = comparison.predictions.result()
    np.testing.assert_array_equal(result.line_matched_loss.values, line.matched_loss.values)
    assert "with units matched" in comparison.predictions.summary.object
    titles = {model.text for model in pn.panel(viewer).get_root().select({"type": Title})}
    assert "Held-out loss on the line between runs" in titles
