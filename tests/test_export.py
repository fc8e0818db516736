"""Exports for papers and talks: PNG of a view, GIF and MP4 of a step range."""

import asyncio

import imageio.v2 as imageio
import matplotlib
import numpy as np
import pytest
from network_runs import mlp, record
from PIL import Image
from viewer_runs import FASHION_CLASSES, training_like, write_run

from weightlapse.viewer.app import WeightViewer
from weightlapse.viewer.analysis.export import (
    SIDE_PICTURE_PX,
    animation_steps,
    png_bytes,
    save_animation,
    save_png,
)
from weightlapse.viewer.analysis.layouts import layer_layout, picture_size
from weightlapse.viewer.analysis.renderers import write_picture_animation
from weightlapse.viewer.analysis.runs import RunCatalog


@pytest.fixture
def run(tmp_path):
    write_run(tmp_path / "runs" / "alpha", training_like(120), class_names=FASHION_CLASSES)
    return RunCatalog(tmp_path / "runs").open("alpha")


def test_png_shows_the_grid_at_a_size_for_papers(tmp_path, run):
    path = save_png(tmp_path / "step.png", run.weights_at(60), class_names=run.class_names, title="step 60")
    image = Image.open(path)
    assert image.format == "PNG" and image.size == (960, 448)
    pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # a picture, not a blank canvas
    per_class = png_bytes(run.weights_at(60), tile_titles=run.class_names, per_class=True)
    assert per_class != path.read_bytes()


@pytest.mark.parametrize("suffix", [".gif", ".mp4"])
def test_animations_have_one_frame_per_chosen_step(tmp_path, run, suffix):
    fractions = []
    path = save_animation(tmp_path / f"range{suffix}", run, start=10, stop=40, fps=5, progress=fractions.append)
    reader = imageio.get_reader(path)
    frames = [frame for frame in reader]
    assert len(frames) == 31 and frames[0].shape[:2] == (448, 960)
    assert not np.array_equal(frames[0], frames[-1])  # the weights moved
    assert fractions[-1] == 1.0


def test_long_ranges_are_thinned_evenly_keeping_both_ends():
    steps = animation_steps(0, 299_999, max_frames=300, spacing="even")
    assert len(steps) == 300 and steps[0] == 0 and steps[-1] == 299_999 and np.ptp(np.diff(steps)) <= 1
    dense_early = animation_steps(0, 299_999, max_frames=300)   # the default: logarithmic
    assert len(dense_early) == 300 and dense_early[-1] == 299_999 and dense_early[:10].tolist() == list(range(10))
    assert animation_steps(5, 7).tolist() == [5, 6, 7]
    with pytest.raises(ValueError, match="empty"):
        animation_steps(9, 3)


def test_bad_requests_say_what_is_wrong(tmp_path, run):
    with pytest.raises(ValueError, match="choose a .gif or .mp4"):
        save_animation(tmp_path / "x.avi", run)
    with pytest.raises(IndexError, match="outside this run's valid steps"):
        save_animation(tmp_path / "x.gif", run, start=0, stop=500)


def test_the_page_renders_an_animation_of_the_range(tmp_path, run):
    viewer = WeightViewer(tmp_path / "runs", query={})
    viewer.state.param.update(range_start=0, range_stop=120)
    export = viewer.export
    asyncio.run(export.render_animation())
    assert export.animation_download.visible and export.animation_download.filename == "weightlapse-0-120.gif"
    gif = Image.open(export.animation_download.file)
    assert gif.n_frames == 121


def test_runs_side_by_side_are_one_animation_on_one_colour_scale(tmp_path, run):
    write_run(tmp_path / "runs" / "short", training_like(60, seed=7) * 3, class_names=FASHION_CLASSES)
    short = RunCatalog(tmp_path / "runs").open("short")
    path = save_animation(tmp_path / "both.gif", [run, short], start=30, stop=110, spacing="even",
                          max_frames=21, fps=5)
    frames = list(imageio.get_reader(path))
    # two 2x5 grids beside each other; the shorter run stays at its last step once it ended
    assert len(frames) == 21 and frames[0].shape[:2] == (448, 1920)
    def change(a, b) -> float:  # mean colour change; a GIF's palette alone moves it by ~0.2
        return float(np.abs(a.astype(int) - b).mean())

    right = [frame[60:, 960:1850] for frame in frames]
    assert change(right[0], right[7]) > 2 and change(right[8], right[20]) < 0.5      # steps 30, 58 | 62, 110
    assert change(frames[8][60:, :880], frames[20][60:, :880]) > 2   # the longer run goes on
    with pytest.raises(ValueError, match="1 to 4 runs, not 5"):
        save_animation(tmp_path / "many.gif", [run] * 5)


def test_the_distance_spacing_reads_the_run_and_spaces_by_its_change(tmp_path, run):
    path = save_animation(tmp_path / "far.gif", run, start=0, stop=120, max_frames=12, spacing="distance")
    assert Image.open(path).n_frames == 12


@pytest.mark.parametrize("fmt", ["gif", "mp4"])
def test_a_picture_animation_colours_every_frame_on_one_range(tmp_path, fmt):
    # One picture a frame (a network layer as the viewer lays it out): a value is the same colour
    # in every frame, ±limit widened to the frames; NaN between tiles is white.
    import matplotlib

    picture = {0: np.full((4, 6), 0.25, np.float32), 1: np.full((4, 6), -0.5, np.float32)}
    picture[1][:, 3] = np.nan
    path = tmp_path / f"layer.{fmt}"
    write_picture_animation(path, [0, 1], picture.__getitem__, fmt=fmt, title=lambda step: f"step {step}",
                            size_px=(300, 200), limit=0.4)  # widened to 0.5 by frame 1
    frames = [np.asarray(frame)[..., :3].astype(int) for frame in imageio.get_reader(path)]
    assert len(frames) == 2 and all(side % 16 == 0 for side in frames[0].shape[:2])
    height = frames[0].shape[0]
    centre = (height - 16 - 100, 16 + 25)  # the picture's axes: 16 px from the left and the bottom, 300 x 200
    colours = matplotlib.colormaps["RdBu_r"]
    for frame, value in zip(frames, (0.25, -0.5)):
        expected = np.array(colours((value / 0.5 + 1) / 2)[:3]) * 255
        assert np.abs(frame[centre] - expected).max() < 24, (fmt, value, frame[centre], expected)
    gap = (height - 16 - 100, 16 + 3 * 50 + 25)
    assert (frames[1][gap] > 230).all()  # white


def test_network_runs_animate_headless_a_layer_laid_out_as_the_viewer_draws_it(tmp_path, run):
    runs = tmp_path / "runs"
    seen = {name: record(runs / name, mlp(seed=seed), steps=12, seed=seed)
            for seed, name in enumerate(("mlp", "mlp-seed1"))}
    record(runs / "wide", mlp(hidden=20), steps=3)
    catalog = RunCatalog(runs)
    first, second = catalog.open("mlp"), catalog.open("mlp-seed1")
    path = save_animation(tmp_path / "one.mp4", first, stop=12, spacing="even", max_frames=7)
    frames = [frame for frame in imageio.get_reader(path)]  # list() asks an MP4 reader its length: inf
    layout = layer_layout((16, 784))  # the first parameter by default: one image per hidden unit
    width, height = picture_size(layout)
    assert len(frames) == 7 and frames[0].shape[:2] == (-(-(height + 64) // 16) * 16, -(-(width + 152) // 16) * 16)
    # two runs side by side: one picture each, on one range over the whole animation
    path = save_animation(tmp_path / "both.gif", [first, second], stop=12, spacing="even", max_frames=13,
                          layer="output.weight")
    frames = [np.asarray(frame)[..., :3].astype(int) for frame in imageio.get_reader(path)]
    width, height = picture_size(layer_layout((10, 16)), SIDE_PICTURE_PX)
    limit = max(float(np.abs(seen[name][step]["output.weight"]).max()) for name in seen for step in range(13))
    colours = matplotlib.colormaps["RdBu_r"]
    y = frames[0].shape[0] - 16 - height + int(2.5 * height / 10)
    for index, name in enumerate(seen):
        x = 16 + index * (width + 16) + int(7.5 * width / 16)
        for step in (0, 12):
            expected = np.array(colours((seen[name][step]["output.weight"][2, 7] / limit + 1) / 2)[:3]) * 255
            assert np.abs(frames[step][y, x] - expected).max() < 24, (name, step)
    with pytest.raises(ValueError, match=r"hidden1.weight is \(16, 784\) in mlp but \(20, 784\) in wide"):
        save_animation(tmp_path / "x.gif", [first, catalog.open("wide")], stop=3)
    with pytest.raises(ValueError, match="mlp has no parameter 'nope'; its parameters: hidden1.weight, hidden1.bias"):
        save_animation(tmp_path / "x.gif", first, layer="nope")
    with pytest.raises(ValueError, match="mlp records a network and alpha softmax regression"):
        save_animation(tmp_path / "x.gif", [first, run])
    with pytest.raises(ValueError, match="layer= is a network run's parameter; alpha records softmax regression"):
        save_animation(tmp_path / "x.gif", run, layer="output.weight")
