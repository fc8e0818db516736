"""How fast can one softmax-regression Adam step run on a CUDA GPU, and what does it cost to
keep every step's weights? Random data shaped like Fashion-MNIST; needs a GPU.

    python benchmarks/cuda_step_probe.py [--steps N] [--json FILE]

Four ways, steps/s each:

1. eager, ``loss.item()`` and a weight copy to the host every step (the old CUDA path);
2. eager, the weights copied into a device ring, nothing read back per step;
3. one step captured as a CUDA graph (capturable Adam, the batch indexed on the device,
   the ring write) and replayed;
4. the same with 16 steps per graph.

It measured the lead for pipeline/graph_engine.py (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RING = 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible to torch: this probe measures the GPU path")
    device = torch.device("cuda")
    torch.manual_seed(0)
    images = torch.rand(60000, 784, device=device)
    labels = torch.randint(0, 10, (60000,), device=device)
    batches = torch.randint(0, 60000, (args.steps + 400, 20), device=device)
    ring = torch.empty(RING, 10, 784, device=device)
    ring_loss = torch.empty(RING, device=device)
    results: dict[str, object] = {}

    def timed(label: str, run, steps: int) -> None:
        run(50)  # warm-up
        torch.cuda.synchronize()
        started = time.perf_counter()
        run(steps)
        torch.cuda.synchronize()
        results[label] = round(steps / (time.perf_counter() - started))
        print(f"{label}: {results[label]:,} steps/s", flush=True)

    def eager(sync: bool):
        weight = torch.zeros(10, 784, device=device, requires_grad=True)
        optimizer = torch.optim.Adam([weight], lr=1e-3, fused=True)
        position = [0]

        def run(steps: int) -> None:
            for _ in range(steps):
                batch = batches[position[0] % len(batches)]
                optimizer.zero_grad(set_to_none=True)
                loss = F.nll_loss(F.log_softmax(images[batch] @ weight.t(), 1), labels[batch])
                loss.backward()
                optimizer.step()
                if sync:
                    loss.item()
                    weight.detach().cpu()
                else:
                    ring[position[0] % RING].copy_(weight.detach())
                    ring_loss[position[0] % RING] = loss.detach()
                position[0] += 1
        return run

    def graphed(unroll: int):
        weight = torch.zeros(10, 784, device=device, requires_grad=True)
        optimizer = torch.optim.Adam([weight], lr=1e-3, capturable=True)
        counter = torch.zeros(1, dtype=torch.long, device=device)

        def step() -> None:
            batch = batches.index_select(0, counter.remainder(len(batches))).view(-1)
            loss = F.nll_loss(F.log_softmax(images.index_select(0, batch) @ weight.t(), 1),
                              labels.index_select(0, batch))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
            slot = counter.remainder(RING)
            ring.index_copy_(0, slot, weight.detach().unsqueeze(0))
            ring_loss.index_copy_(0, slot, loss.detach().view(1))
            counter.add_(1)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(unroll):
                step()

        def run(steps: int) -> None:
            for _ in range(steps // unroll):
                graph.replay()
        return run

    timed("eager, sync per step", eager(sync=True), args.steps)
    timed("eager, device ring, no sync", eager(sync=False), args.steps)
    timed("CUDA graph, 1 step per replay", graphed(1), args.steps)
    timed("CUDA graph, 16 steps per replay", graphed(16), args.steps)
    results.update(device=torch.cuda.get_device_name(), torch=torch.__version__)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
