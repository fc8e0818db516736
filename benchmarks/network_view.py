"""The network view's cost per frame, by layer size, beside a softmax-regression run's grid.

    python benchmarks/network_view.py [--steps 128] [--workdir DIR] [--json FILE]

Records, with ``weightlapse.Recorder``, a network of the layer kinds the view draws (a
784-256 hidden layer shown as its first 64 unit images, a 640x1024 matrix shown as its
first 512 rows, biases, a 64x32x3x3 convolution shown as its first 32 x 16 kernels), its
weights nudged at every step; and writes a softmax-regression run of as many steps as the
baseline. For each layer it measures, in this process, the server-side time from setting
the viewer's step to the new picture being in the page's Bokeh models (what is then sent to
the browser): random jumps (a chunk decompressed) and playback (consecutive steps), the
first draw after choosing the layer, the bytes of one frame's picture, and one weight over
every step read by the weight inspector; and Run vs run of two 12-parameter MLPs played
back (ms a frame, chunks decompressed a frame). Not a test: the numbers go into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def record_network(run_dir: Path, steps: int) -> None:
    import torch

    from weightlapse import Recorder

    torch.manual_seed(0)
    model = torch.nn.Module()
    model.hidden = torch.nn.Linear(784, 256)
    model.square = torch.nn.Linear(1024, 640)
    model.conv = torch.nn.Conv2d(32, 64, 3)
    with Recorder(run_dir, model) as rec, torch.no_grad():
        for _ in range(steps):
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter), alpha=1e-3)
            rec.step(loss=1.0)


def record_deep(run_dir: Path, steps: int, seed: int) -> None:
    """A 784-64-64-64-64-64-10 MLP with biases (12 parameters), nudged every step: Run vs run
    reads every parameter of both runs at each frame."""
    import torch

    from weightlapse import Recorder

    torch.manual_seed(seed)
    widths = (784, 64, 64, 64, 64, 64, 10)
    model = torch.nn.Sequential(*(torch.nn.Linear(a, b) for a, b in zip(widths, widths[1:])))
    with Recorder(run_dir, model) as rec, torch.no_grad():
        for _ in range(steps):
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter), alpha=1e-3)
            rec.step(loss=1.0)


def run_vs_run_playback(runs: Path, last: int) -> dict:
    """Run vs run of two 12-parameter runs, played back over 40 steps: ms a frame, and the
    chunks decompressed a frame (every layer's distance is computed at each one)."""
    import panel as pn

    from weightlapse.viewer.analysis import network
    from weightlapse.viewer.app import WeightViewer

    decoded = [0]
    original = network.CheckedSteps.__getitem__

    def counted(self, key):
        decoded[0] += 1
        return original(self, key)

    viewer = WeightViewer(runs, query={"run": "deep", "compare": "deep-seed1", "mode": "run-diff",
                                       "step": str(last - 41)})
    root = pn.panel(viewer).get_root()  # noqa: F841 - the page's models, updated at each frame
    network.CheckedSteps.__getitem__ = counted
    try:
        seconds = []
        for step in range(last - 40, last):
            started = time.perf_counter()
            viewer.state.step = step
            seconds.append(time.perf_counter() - started)
    finally:
        network.CheckedSteps.__getitem__ = original
    return {"playback_ms": statistics.median(seconds) * 1000, "chunks_decoded_per_frame": decoded[0] / 40}


def frame_times(viewer, root, layer: str, last: int, rng) -> dict:
    from bokeh.models import GlyphRenderer, Image

    started = time.perf_counter()
    viewer.state.layer = layer
    first_draw = time.perf_counter() - started

    def picture():
        shape = viewer.network.shown.layout.index.shape
        for renderer in root.select({"type": GlyphRenderer}):
            if isinstance(renderer.glyph, Image) and np.asarray(renderer.data_source.data["image"][0]).shape == shape:
                return renderer.data_source.data["image"][0]
        return None

    timings = {}
    for kind, steps in (("jump", rng.integers(0, last + 1, 20)), ("playback", np.arange(last - 40, last))):
        seconds = []
        for step in steps:
            started = time.perf_counter()
            viewer.state.step = int(step)
            seconds.append(time.perf_counter() - started)
            assert picture() is not None  # looked up outside the timing, as the softmax baseline is
        timings[kind] = statistics.median(seconds) * 1000
    index = viewer.network.shown.layout.size // 2
    started = time.perf_counter()
    viewer.state.weight_index = index
    history_ms = (time.perf_counter() - started) * 1000
    viewer.state.weight_index = None
    return {"first_draw_ms": first_draw * 1000, "jump_ms": timings["jump"], "playback_ms": timings["playback"],
            "frame_kb": viewer.network.shown.layout.index.size * 4 / 1024, "history_ms": history_ms,
            "shown": viewer.network.shown.layout.description}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import holoviews as hv
    import panel as pn
    from viewer_runs import training_like, write_run

    from weightlapse.viewer.app import WeightViewer

    hv.extension("bokeh")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="network-view-"))
    runs = workdir / "runs"
    started = time.perf_counter()
    record_network(runs / "net", args.steps)
    write_run(runs / "softmax", training_like(args.steps, seed=0), name="softmax")
    print(f"recorded in {time.perf_counter() - started:.1f} s under {workdir}", flush=True)
    rng = np.random.default_rng(0)

    softmax = WeightViewer(runs, query={"run": "softmax"})
    softmax_root = pn.panel(softmax).get_root()
    baseline = []
    for kind, steps in (("jump", rng.integers(0, args.steps + 1, 20)), ("playback", np.arange(args.steps - 40, args.steps))):
        seconds = []
        for step in steps:
            started = time.perf_counter()
            softmax.state.step = int(step)
            seconds.append(time.perf_counter() - started)
        baseline.append(statistics.median(seconds) * 1000)
    results = {"softmax grid (10, 784)": {"jump_ms": baseline[0], "playback_ms": baseline[1]}}
    del softmax_root

    viewer = WeightViewer(runs, query={"run": "net"})
    root = pn.panel(viewer).get_root()
    for layer in ("hidden.weight", "hidden.bias", "square.weight", "conv.weight"):
        results[layer] = frame_times(viewer, root, layer, args.steps, rng)
    record_deep(runs / "deep", args.steps, seed=0)
    record_deep(runs / "deep-seed1", args.steps, seed=1)
    results["Run vs run, 12 parameters"] = run_vs_run_playback(runs, args.steps)
    for name, numbers in results.items():
        ratio = numbers["playback_ms"] / baseline[1]
        print(f"{name:24s} " + "  ".join(f"{key} {value:.1f}" if isinstance(value, float) else f"{key}: {value}"
                                          for key, value in numbers.items()) + f"  playback/softmax {ratio:.2f}")
    machine = {"python": platform.python_version(), "cpus": os.cpu_count(), "steps": args.steps}
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
