"""Viewer benchmark on a long trajectory: frame latency, statistics time and memory.

    python benchmarks/viewing.py [--steps 300000] [--workdir DIR] [--keep] [--json FILE]

Writes a trajectory of --steps steps (a drifting random walk, written by the pipeline's own
TrajectoryWriter in the real store format) and measures, in this process:

- frame latency: server-side time from setting the viewer's step to the new frame being in
  the page's Bokeh models (what is then sent to the browser), for random jumps (a chunk is
  decompressed) and for playback (consecutive steps, mostly cached chunks);
- side by side: the same server-side frame time for four runs at once (the run hard-linked
  under three more names: four Run objects, each decompressing its own chunks, on one disk copy);
- the distance travelled that spaces an animation by distance (1,024 sampled steps of the whole
  run, and every step of 3,000);
- statistics over 3,000 steps at random places (all six per-pixel statistics);
- in Chromium against a real `panel serve` (benchmarks/browser_viewing.py, unless --no-browser):
  distinct frames per second in playback at 10, 20 and 30 fps asked, step change to frame as
  the page receives it, and both for four runs side by side;
and, in a fresh subprocess so its peak memory is its own, statistics over the whole
trajectory with the process's peak resident memory next to the trajectory's size.
Not a test: the numbers go into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from memory import peak_rss_mb  # this folder's, on sys.path when run as a script

RAW_BYTES_PER_STEP = 10 * 784 * 4


def write_trajectory(run_dir: Path, n_steps: int, *, seed: int = 0) -> float:
    """A random walk pulled towards per-class templates, like weights under training; returns seconds."""
    from tqdm import tqdm

    from weightlapse.pipeline.store import STORE_NAME, RunMetadata, StoreLayout
    from weightlapse.pipeline.writer import TrajectoryWriter

    rng = np.random.default_rng(seed)
    template = rng.standard_normal((10, 784)).astype(np.float32) * np.float32(0.05)
    weights = rng.standard_normal((10, 784)).astype(np.float32) * np.float32(0.01)
    layout = StoreLayout(n_steps=n_steps, eval_steps=tuple(range(0, n_steps + 1, 1000)))
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    with TrajectoryWriter(run_dir / STORE_NAME, layout, RunMetadata(run=run_dir.name, params={"optimizer": "adam"})) \
            as writer:
        block = 64
        for start in tqdm(range(0, n_steps + 1, block), desc="writing trajectory", unit="chunk"):
            noise = rng.standard_normal((block, 10, 784), dtype=np.float32) * np.float32(0.002)
            for offset in range(min(block, n_steps + 1 - start)):
                step = start + offset
                if step:
                    weights = weights + np.float32(1e-4) * (template - weights) + noise[offset]
                writer.record_step(step, weights, 2.3 * np.exp(-step / 20000) if step else float("nan"))
                if step % 1000 == 0:
                    writer.record_eval(step, 1 - 0.9 * np.exp(-step / 5000), 0.5)
    return time.perf_counter() - started


def frame_latency(runs_dir: Path, run: str, n_steps: int, *, samples: int = 200, beside: tuple[str, ...] = ()) -> dict:
    import holoviews as hv
    import panel as pn

    from weightlapse.viewer.app import WeightViewer

    hv.extension("bokeh")
    query = {"run": run, "mode": "side-by-side", "side": ",".join(beside)} if beside else {"run": run}
    viewer = WeightViewer(runs_dir, query=query)
    pn.panel(viewer).get_root()  # the Bokeh models a browser page would hold
    rng = np.random.default_rng(1)

    def timed(steps) -> np.ndarray:
        times = []
        for step in steps:
            started = time.perf_counter()
            viewer.state.step = int(step)
            times.append(time.perf_counter() - started)
        return np.array(times) * 1000

    timed(rng.integers(0, n_steps, 10))  # warm-up
    jumps = timed(rng.integers(0, n_steps, samples))
    start = int(rng.integers(0, n_steps - 10 * samples))
    playback = timed(range(start, start + samples))
    return {
        "random_jump_ms_median": float(np.median(jumps)), "random_jump_ms_p95": float(np.percentile(jumps, 95)),
        "playback_ms_median": float(np.median(playback)), "playback_ms_p95": float(np.percentile(playback, 95)),
        "samples": samples,
    }


def distance_cost(runs_dir: Path, run: str, n_steps: int) -> dict:
    """Seconds to measure the distance travelled (what the distance spacing reads), cold and cached."""
    from weightlapse.viewer.data import DataStore

    store = DataStore(runs_dir)
    opened = store.open(run)
    results = {}
    for label, stop in (("whole_run", n_steps), ("first_3000", 3000)):
        started = time.perf_counter()
        travelled = store.travelled(opened, 0, stop)
        results[f"{label}_seconds"] = time.perf_counter() - started
        results[f"{label}_samples"] = len(travelled.steps)
        started = time.perf_counter()
        store.travelled(opened, 0, stop)
        results[f"{label}_cached_ms"] = (time.perf_counter() - started) * 1000
    return results


def link_copies(runs_dir: Path, run: str, names: tuple[str, ...]) -> None:
    """``run`` under more names, its files hard-linked (no second copy on disk)."""
    for name in names:
        if not (runs_dir / name).exists():
            subprocess.run(["cp", "-al", str(runs_dir / run), str(runs_dir / name)], check=True)


def window_statistics(run_dir: Path, n_steps: int, *, window: int = 3000, repeats: int = 5) -> dict:
    from weightlapse.pipeline.store import open_run
    from weightlapse.viewer.analysis.stats import change_statistics

    weights = open_run(run_dir).weights
    rng = np.random.default_rng(2)
    times = []
    for start in rng.integers(0, n_steps - window, repeats):
        started = time.perf_counter()
        change_statistics(weights.isel(step=slice(int(start), int(start) + window)))
        times.append(time.perf_counter() - started)
    return {"window_steps": window, "seconds_median": float(np.median(times)), "seconds_max": float(max(times)),
            "repeats": repeats}


def whole_statistics(run_dir: Path) -> dict:
    """Statistics over every step, in a fresh process; its peak resident memory is reported."""
    code = (
        "import json, sys, time\n"
        "from memory import peak_rss_mb\n"
        "from weightlapse.pipeline.store import open_run\n"
        "from weightlapse.viewer.analysis.stats import change_statistics\n"
        "weights = open_run(sys.argv[1]).weights\n"
        "started = time.perf_counter()\n"
        "change_statistics(weights)\n"
        "print(json.dumps({'seconds': time.perf_counter() - started, 'peak_rss_mb': peak_rss_mb()}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                filter(None, [str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH")]))})
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300_000, help="trajectory length (default 300,000)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to write the trajectory (default: a temporary directory; needs ~8 GB)")
    parser.add_argument("--keep", action="store_true", help="keep the trajectory and reuse it on the next run")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--no-browser", action="store_true", help="skip the Chromium measurements")
    parser.add_argument("--no-statistics", action="store_true", help="skip the statistics measurements")
    parser.add_argument("--no-inspector", action="store_true",
                        help="skip the pixel inspector (builds the run's pixel history: ~100 s and ~7 GB more)")
    args = parser.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="weightlapse-bench-"))
    runs_dir = workdir / "runs"
    run_dir = runs_dir / "long"
    try:
        from weightlapse.pipeline.store import TrajectoryError, read_progress

        try:
            reuse = read_progress(run_dir / "trajectory.zarr")["steps_done"] == args.steps
        except TrajectoryError:
            reuse = False
        if not reuse:
            shutil.rmtree(run_dir, ignore_errors=True)
            write_seconds = write_trajectory(run_dir, args.steps)
        else:
            write_seconds = None
        store_bytes = sum(f.stat().st_size for f in (run_dir / "trajectory.zarr").rglob("*") if f.is_file())
        beside = ("long-2", "long-3", "long-4")
        link_copies(runs_dir, "long", beside)
        results = {
            "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, Python {platform.python_version()}",
            "steps": args.steps,
            "raw_gb": (args.steps + 1) * RAW_BYTES_PER_STEP / 1e9,
            "store_gb": store_bytes / 1e9,
            "write_seconds": write_seconds,
            "frame": frame_latency(runs_dir, "long", args.steps),
            "side_by_side_frame": frame_latency(runs_dir, "long", args.steps, beside=beside),
            "distance_spacing": distance_cost(runs_dir, "long", args.steps),
        }
        if not args.no_statistics:
            results["statistics_3000"] = window_statistics(run_dir, args.steps)
            results["statistics_whole"] = whole_statistics(run_dir)
        if not args.no_inspector:
            from inspector import inspector_latency

            results["pixel_inspector"] = inspector_latency(run_dir, without_copy=False)
        results["benchmark_process_peak_rss_mb"] = peak_rss_mb()
        if not args.no_browser:
            from browser_viewing import measure

            results["browser"] = measure(runs_dir, "long", args.steps, beside=list(beside), log_dir=workdir)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(results, indent=2))
    frame, side = results["frame"], results["side_by_side_frame"]
    print(f"step change -> frame: {frame['random_jump_ms_median']:.1f} ms median on random jumps "
          f"(target <= 50), {frame['playback_ms_median']:.1f} ms in playback; four runs side by side: "
          f"{side['random_jump_ms_median']:.1f} ms, {side['playback_ms_median']:.1f} ms")
    if "statistics_3000" in results:
        window, whole = results["statistics_3000"], results["statistics_whole"]
        print(f"statistics over 3,000 steps: {window['seconds_median']:.2f} s median (target <= 1)")
        print(f"statistics over all {args.steps:,} steps: {whole['seconds']:.0f} s, peak memory "
              f"{whole['peak_rss_mb']:.0f} MB for a {results['raw_gb']:.1f} GB trajectory")
    if "pixel_inspector" in results:
        pixel = results["pixel_inspector"]
        print(f"pixel inspector: {pixel['copy_cold_s']:.2f} s cold, {pixel['copy_warm_s_median']:.2f} s warm median "
              "(target <= 1)")
    if "browser" in results:
        browser = results["browser"]
        for played in browser["playback"] + browser["side_by_side_playback"]:
            print(f"playback in Chromium at {played['asked_fps']:.0f} fps asked: {played['distinct_fps']:.1f} "
                  "distinct frames/s")
        print(f"step change -> frame in Chromium: {browser['jump']['ms_median']:.0f} ms median; side by side "
              f"({browser['side_by_side_runs']} runs): {browser['side_by_side_jump']['ms_median']:.0f} ms")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
