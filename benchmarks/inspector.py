"""Pixel inspector benchmark: one weight over every step of a long run, with and without the
pixel history beside the store.

    python benchmarks/inspector.py [--steps 300000] [--workdir DIR] [--keep] [--json FILE]

Writes a trajectory with benchmarks/viewing.write_trajectory (or reuses one of that length in
--workdir), then measures:

- the pixel history's build (pipeline.history.build_history): seconds and bytes on disk,
  beside the store's own;
- the pixel curve's latency, which is what the page waits for between the click and the
  curve's data in its Bokeh models: Run.pixel_history for a pixel, then the inspector's
  drawing of it (plots.pixel_curves rendered to Bokeh), with the copy: cold (a fresh
  process, the copy's files dropped from the page cache where the OS allows,
  ``posix_fadvise``) and warm (the same process, other pixels); without it (the store
  read, in a fresh process, cold too), for the ratio.

``inspector_latency(run_dir)`` is the part benchmarks/viewing.py can call on its own run.
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
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

LATENCY_CODE = """
import json, os, sys, time
from pathlib import Path
import numpy as np
run_dir, pixels, use_copy = Path(sys.argv[1]), [int(p) for p in sys.argv[2].split(",")], sys.argv[3] == "1"
for path in run_dir.rglob("*"):  # cold: drop the run's files from the page cache where the OS allows
    if path.is_file():
        with open(path, "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
import holoviews as hv
hv.extension("bokeh")
from weightlapse.viewer.analysis.run import Run
from weightlapse.viewer.plots import pixel_curves
run = Run("long", run_dir / "trajectory.zarr")
if not use_copy:
    run._pixel_history_copy = lambda: None  # as a run without a copy reads
times = []
for pixel in pixels:
    started = time.perf_counter()
    trace = run.pixel_history(pixel)
    read = time.perf_counter() - started
    hv.render(pixel_curves(trace.steps, trace.values, run.class_names, 3, title="pixel"))
    times.append({"pixel": pixel, "read_s": read, "total_s": time.perf_counter() - started,
                  "from_copy": trace.from_copy})
print(json.dumps(times))
"""


def _latency(run_dir: Path, pixels: list[int], *, use_copy: bool) -> list[dict]:
    """Latencies of ``pixels`` read one after the other in a fresh process (the first is cold)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", LATENCY_CODE, str(run_dir), ",".join(map(str, pixels)),
                             "1" if use_copy else "0"], capture_output=True, text=True, check=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def inspector_latency(run_dir: Path, *, warm_samples: int = 20, without_copy: bool = True) -> dict:
    """Build the run's pixel history and time the inspector's curve with it and without it."""
    from weightlapse.pipeline.history import build_history

    run_dir = Path(run_dir)
    shutil.rmtree(run_dir / "pixel-history.zarr", ignore_errors=True)
    build = build_history(run_dir)
    rng = np.random.default_rng(3)
    pixels = [int(pixel) for pixel in rng.choice(784, warm_samples + 1, replace=False)]
    with_copy = _latency(run_dir, pixels, use_copy=True)
    warm = [sample["total_s"] for sample in with_copy[1:]]
    results = {
        "history_build_s": build.seconds, "history_bytes": build.bytes,
        "store_bytes": sum(path.stat().st_size for path in (run_dir / "trajectory.zarr").rglob("*") if path.is_file()),
        "copy_cold_s": with_copy[0]["total_s"], "copy_cold_read_s": with_copy[0]["read_s"],
        "copy_warm_s_median": float(np.median(warm)), "copy_warm_s_max": float(max(warm)),
        "copy_warm_read_s_median": float(np.median([sample["read_s"] for sample in with_copy[1:]])),
        "warm_samples": warm_samples,
    }
    if without_copy:
        store = _latency(run_dir, pixels[:1], use_copy=False)[0]
        results |= {"store_cold_s": store["total_s"], "store_cold_read_s": store["read_s"],
                    "ratio_store_over_copy_cold": store["total_s"] / with_copy[0]["total_s"]}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300_000, help="trajectory length (default 300,000)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the trajectory is written (needs ~10 GB)")
    parser.add_argument("--keep", action="store_true", help="keep the trajectory and reuse it on the next run")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from viewing import write_trajectory

    from weightlapse.pipeline.store import TrajectoryError, read_progress

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="weightlapse-inspector-"))
    run_dir = workdir / "runs" / "long"
    try:
        try:
            reuse = read_progress(run_dir / "trajectory.zarr")["steps_done"] == args.steps
        except TrajectoryError:
            reuse = False
        if not reuse:
            shutil.rmtree(run_dir, ignore_errors=True)
            write_trajectory(run_dir, args.steps)
        results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                   "steps": args.steps, **inspector_latency(run_dir)}
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(results, indent=2))
    print(f"pixel history: {results['history_bytes'] / 1e9:.2f} GB (store {results['store_bytes'] / 1e9:.2f} GB), "
          f"built in {results['history_build_s']:.0f} s")
    print(f"pixel curve, {args.steps:,} steps: {results['copy_cold_s']:.2f} s cold, "
          f"{results['copy_warm_s_median'] * 1000:.0f} ms warm (target <= 1 s); from the store: "
          f"{results['store_cold_s']:.0f} s ({results['ratio_store_over_copy_cold']:.0f}x)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
