"""Store-writer cost benchmark: what each piece of writing a chunk costs, per step recorded.

    python benchmarks/writer_costs.py [--dataset-dir DIR] [--rounds N] [--json FILE]

Trains one epoch of the original setup (Adam, batch 20, the numpy engine, every step
recorded) into a temporary run, then takes its weights' 64-step chunks (the store's own,
real trajectory data) and times, as CPU time of this process (``time.process_time``,
which other processes' load does not inflate), each piece the store writer does to a
chunk, and the alternatives weighed against it:

- the transpose to (class, pixel, step), made contiguous, as the chunk writer does;
- the ``fast`` codec (Blosc LZ4 clevel 5, byte shuffle), LZ4 at clevel 1, 3 and 9;
- the ``compact`` codec (pcodec, the store's settings) and pcodec at levels 5 and 6;
- writing a chunk's file and renaming it into place (pipeline/chunkwriter.py).

Each piece runs once per round over all the chunks, rounds interleaved, and the median
round counts. Prints microseconds and bytes per step; docs/benchmarks.md has the figures.
The store writer's whole cost per step is about the transpose, one codec and the file.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numcodecs
import numpy as np
import zarr

from weightlapse.pipeline.chunkwriter import _write_atomically, chunk_encoder
from weightlapse.pipeline.datasets import load_dataset
from weightlapse.pipeline.params import TrainParams
from weightlapse.pipeline.store import quiet_numcodecs
from weightlapse.pipeline.store.format import PCODEC_CONFIG, pcodec_codec
from weightlapse.pipeline.train import run_training

CHUNK_STEPS = 64


def trained_chunks(dataset_dir: Path, workdir: Path) -> list[np.ndarray]:
    """The (64, class, pixel) chunks of one epoch's recorded weights."""
    dataset = load_dataset(dataset_dir, dataset_dir.name)
    run_training(TrainParams(device="cpu"), dataset, workdir / "run", run_name="writer-costs", progress=False)
    weights = zarr.open_group(workdir / "run" / "trajectory.zarr", mode="r")["weights"][:]
    return [weights[start:start + CHUNK_STEPS] for start in range(0, len(weights) - CHUNK_STEPS + 1, CHUNK_STEPS)]


def pieces(workdir: Path) -> dict[str, Callable[[np.ndarray], bytes | None]]:
    """Each piece as a function of a contiguous transposed chunk (the transpose: of the chunk as stored)."""
    def blosc(level: int) -> Callable[[np.ndarray], bytes]:
        return numcodecs.Blosc(cname="lz4", clevel=level, shuffle=numcodecs.Blosc.SHUFFLE).encode

    def pcodec(level: int) -> Callable[[np.ndarray], bytes]:
        return numcodecs.pcodec.PCodec(**(PCODEC_CONFIG | {"level": level})).encode

    with quiet_numcodecs():
        compact = chunk_encoder([pcodec_codec()])
    target = workdir / "chunks" / "c" / "0"
    return {
        "transpose": lambda chunk: None,  # timed by the caller, on the chunk as stored
        "fast (LZ4 clevel 5, shuffle)": blosc(5), "LZ4 clevel 1": blosc(1), "LZ4 clevel 3": blosc(3),
        "LZ4 clevel 9": blosc(9),
        f"compact (pcodec level {PCODEC_CONFIG['level']})": compact, "pcodec level 5": pcodec(5),
        "pcodec level 6": pcodec(6),
        "chunk file written and renamed (fast's bytes)": lambda chunk: _write_atomically(target, blosc(5)(chunk)),
    }


def measure(chunks: list[np.ndarray], workdir: Path, rounds: int) -> dict[str, dict[str, float]]:
    steps = CHUNK_STEPS * len(chunks)
    transposed = [np.ascontiguousarray(chunk.transpose(1, 2, 0)) for chunk in chunks]
    timings: dict[str, list[float]] = {}
    sizes: dict[str, float] = {}
    encode_fast = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE).encode
    for _ in range(rounds):
        for name, piece in pieces(workdir).items():
            started = time.process_time()
            if name == "transpose":
                for chunk in chunks:
                    np.ascontiguousarray(chunk.transpose(1, 2, 0))
                n_bytes = None
            else:
                encoded = [piece(chunk) for chunk in transposed]
                n_bytes = sum(len(data) for data in encoded) if encoded[0] is not None else None
            seconds = time.process_time() - started
            if name.startswith("chunk file"):  # its encoding is timed on its own
                started = time.process_time()
                for chunk in transposed:
                    encode_fast(chunk)
                seconds -= time.process_time() - started
            timings.setdefault(name, []).append(seconds)
            if n_bytes is not None:
                sizes[name] = n_bytes / steps
    return {name: {"us_per_step": statistics.median(values) / steps * 1e6,
                   **({"bytes_per_step": sizes[name]} if name in sizes else {})}
            for name, values in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                        help="directory with the four IDX files, named after the dataset (mnist, fashion-mnist)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median counts (default 5)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="weightlapse-writer-costs-") as tmp:
        chunks = trained_chunks(args.dataset_dir, Path(tmp))
        results = measure(chunks, Path(tmp), args.rounds)
    raw = chunks[0][0].nbytes
    for name, result in results.items():
        size = result.get("bytes_per_step")
        print(f"{name:48s} {result['us_per_step']:7.1f} us/step"
              + (f"  {size:9,.0f} bytes/step ({raw / size:.2f}x)" if size else ""))
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.platform(), "processor": platform.processor(),
                                         "steps": CHUNK_STEPS * len(chunks), "raw_bytes_per_step": raw,
                                         "pieces": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
