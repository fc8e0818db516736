"""Recorder benchmark: what recording every parameter costs a plain PyTorch loop.

    python benchmarks/recorder.py [--steps N] [--repeats N] [--batch-size B] [--hidden H] [--threads T] [--json FILE]

A 784-H-10 MLP (ReLU; H = 128 by default) trained with Adam (lr 1e-3) on batches of
random images, on the CPU, the same loop twice per repeat: without a recorder, and with
``weightlapse.Recorder`` recording every parameter after every step (the README's loop).
The two alternate (which goes first changes each repeat) and the medians count: timings on
a small shared machine drift by 20% between runs. The recorded loop is timed from its
first step to the end of the ``with`` block, so the writer's last block and the closing of
the store are included; its loop alone (until the last ``rec.step``) is reported beside.
Prints steps/s of both, their ratio (the target is at least 0.8), and the bytes per step on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from weightlapse import Recorder


def make_model(hidden: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def loop(model, opt, batches, rec=None) -> None:
    for x, y in batches:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if rec is not None:
            rec.step(loss=loss)


def plain(batches, hidden: int) -> float:
    model, opt = make_model(hidden)
    start = time.perf_counter()
    loop(model, opt, batches)
    return time.perf_counter() - start


def recorded(batches, hidden: int, run_dir: Path) -> tuple[float, float, int]:
    """Seconds with the recorder (to the end of the ``with`` block), of its loop alone, and bytes on disk."""
    model, opt = make_model(hidden)
    rec = Recorder(run_dir, model, optimizer=opt, overwrite=True)  # row 0 and the store: before the clock
    start = time.perf_counter()
    with rec:
        loop(model, opt, batches, rec)
        looped = time.perf_counter() - start
    total = time.perf_counter() - start
    size = sum(path.stat().st_size for path in run_dir.rglob("*") if path.is_file())
    return total, looped, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.rand(args.batch_size, 784, generator=generator),
                torch.randint(0, 10, (args.batch_size,), generator=generator)) for _ in range(args.steps)]
    plain(batches[:200], args.hidden)  # warm up torch's kernels and allocator
    with tempfile.TemporaryDirectory(prefix="weightlapse-recorder-") as scratch:
        recorded(batches[:200], args.hidden, Path(scratch) / "warm-up")
        without, with_total, with_loop, sizes = [], [], [], []
        for repeat in range(args.repeats):
            order = ("plain", "recorded") if repeat % 2 == 0 else ("recorded", "plain")
            for kind in order:
                if kind == "plain":
                    without.append(args.steps / plain(batches, args.hidden))
                else:
                    total, looped, size = recorded(batches, args.hidden, Path(scratch) / "run")
                    with_total.append(args.steps / total)
                    with_loop.append(args.steps / looped)
                    sizes.append(size)
    figures = {
        "steps": args.steps, "repeats": args.repeats, "batch_size": args.batch_size, "hidden": args.hidden,
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
        "torch": torch.__version__, "python": platform.python_version(),
        "plain_steps_per_s": statistics.median(without),
        "recorded_steps_per_s": statistics.median(with_total),
        "recorded_loop_steps_per_s": statistics.median(with_loop),
        "bytes_per_step": statistics.median(sizes) / (args.steps + 1),
        "raw_bytes_per_step": sum(p.numel() for p in make_model(args.hidden)[0].parameters()) * 4,
        "runs": {"plain": without, "recorded": with_total, "recorded_loop": with_loop},
    }
    figures["ratio"] = figures["recorded_steps_per_s"] / figures["plain_steps_per_s"]
    figures["ratio_loop"] = figures["recorded_loop_steps_per_s"] / figures["plain_steps_per_s"]
    print(f"784-{args.hidden}-10 MLP, batch {args.batch_size}, Adam, CPU ({figures['torch_threads']} torch threads), "
          f"{args.steps} steps x {args.repeats} (medians; load average {figures['load_average'][0]:.2f})")
    print(f"  without recorder: {figures['plain_steps_per_s']:8,.0f} steps/s  {sorted(round(v) for v in without)}")
    print(f"  with recorder:    {figures['recorded_steps_per_s']:8,.0f} steps/s  {sorted(round(v) for v in with_total)}"
          f"  (loop alone {figures['recorded_loop_steps_per_s']:,.0f})")
    print(f"  ratio: {figures['ratio']:.2f} (loop alone {figures['ratio_loop']:.2f}); "
          f"{figures['bytes_per_step']:,.0f} bytes per step on disk of {figures['raw_bytes_per_step']:,} raw")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
