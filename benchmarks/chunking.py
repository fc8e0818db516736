"""How the trajectory store's chunk length (steps per chunk) trades write speed, one-step
read time and file count. Justifies the default `capture.chunk_steps: 64`.

    python benchmarks/chunking.py --run runs/adam-lr0.001-b20-seed0     # replay a real run's weights
    python benchmarks/chunking.py                         # or a synthetic 3,000-step walk

Numbers are recorded in docs/store.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from weightlapse.pipeline.store import RunMetadata, StoreLayout, open_run
from weightlapse.pipeline.writer import TrajectoryWriter


def synthetic_trajectory(n_steps: int, seed: int = 0) -> np.ndarray:
    """A random start and small sign-like steps, roughly what Adam does to these weights."""
    rng = np.random.default_rng(seed)
    start = rng.uniform(-0.0357, 0.0357, (1, 10, 784)).astype(np.float32)
    steps = (rng.choice([-1.0, 0.0, 1.0], (n_steps, 10, 784)) * 1e-3).astype(np.float32)
    return np.concatenate([start, start + np.cumsum(steps, axis=0, dtype=np.float32)])


def measure(rows: np.ndarray, chunk_steps: int, directory: Path) -> dict[str, float]:
    path = directory / f"chunk{chunk_steps}.zarr"
    n_steps = len(rows) - 1
    started = time.perf_counter()
    with TrajectoryWriter(path, StoreLayout(n_steps=n_steps, eval_steps=(0,), chunk_steps=chunk_steps), RunMetadata(),
                          overwrite=True) as w:
        for step, row in enumerate(rows):
            w.record_step(step, row)
    write_s = time.perf_counter() - started
    weights = zarr.open_array(path / "weights", mode="r")
    steps = np.random.default_rng(1).integers(0, len(rows), 200)
    started = time.perf_counter()
    for step in steps:
        weights[int(step)]
    read_ms = (time.perf_counter() - started) / len(steps) * 1e3
    files = [f for f in (path / "weights").rglob("*") if f.is_file()]
    return {
        "chunk_steps": chunk_steps,
        "write_steps_per_s": len(rows) / write_s,
        "read_one_step_ms": read_ms,
        "compression": rows.nbytes / sum(f.stat().st_size for f in files),
        "files": len(files),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a run directory whose weights to replay (default: synthetic)")
    parser.add_argument("--chunks", default="16,64,256", help="chunk lengths to compare")
    args = parser.parse_args()
    rows = open_run(args.run).weights.values if args.run else synthetic_trajectory(3000)
    print(f"trajectory: {len(rows) - 1} steps, {rows.nbytes / 1e6:.0f} MB raw "
          f"({'run ' + args.run if args.run else 'synthetic'})")
    with tempfile.TemporaryDirectory() as directory:
        for chunk_steps in map(int, args.chunks.split(",")):
            r = measure(rows, chunk_steps, Path(directory))
            print(f"chunk {r['chunk_steps']:4d}: write {r['write_steps_per_s']:6.0f} steps/s, "
                  f"read one step {r['read_one_step_ms']:5.2f} ms, {r['compression']:.2f}x smaller than raw, "
                  f"{r['files']} files")


if __name__ == "__main__":
    main()
