"""The CUDA path: whole training steps replayed as a CUDA graph, every step's weights kept
in a device ring and copied to the host a block at a time, with no per-step synchronisation.

On a GPU, a softmax-regression step is a dozen tiny kernels, and launching them one by one
from Python costs far more than running them: an H200 ran about 1,000 eager steps/s
(a sync per step) or 1,200 (no sync), and 15,500 steps/s replaying the same step as a
CUDA graph (docs/benchmarks.md). So one step, with its batch taken on the device from a
precomputed index table and its weights, loss (and bias, gradient) written into a ring
slot, is captured once and replayed.

The host side runs one block behind the GPU: after launching block k's replays it
queues block k's rows for an asynchronous copy to pinned memory on a side stream, then
hands block k-1's rows to ``on_step``, one by one, as the other engines do. The
optimizer state is snapshotted on the device at each block's last step, so the writer's
checkpoint for that step is exact (``optimizer_state``); blocks end where the writer's do.

Without CUDA (tests on the CPU) the same step runs eagerly through the same ring and
host-side machinery, so everything but the graph capture is tested everywhere. Needs every
batch the same size (the training split a multiple of the batch size): pipeline.engines
decides where it applies.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from weightlapse.pipeline.datasets import N_CLASSES, N_PIXELS, Dataset
from weightlapse.pipeline.params import TrainParams
from weightlapse.pipeline.torch_engine import TorchEngine
from weightlapse.pipeline.trainer import BlockCallback, RowsToFill, StepCallback, remaining_batches

# Eager steps before the graph is captured: CUDA needs its libraries' work areas and the
# optimizer its state allocated before capture (PyTorch's documented warm-up).
WARMUP_STEPS = 3


class CudaGraphEngine(TorchEngine):
    """The torch model and optimizer of :class:`TorchEngine`, stepped through a device ring.

    ``block_steps`` is the writer's block: ring blocks end on the writer's block ends
    (steps ``first_row + k * block_steps - 1``), so every checkpoint the writer asks for at
    a block's end has an exact optimizer-state snapshot.
    """

    def __init__(self, config: TrainParams, dataset: Dataset, device: torch.device, *, block_steps: int) -> None:
        # capturable on CUDA: the step count and bias corrections stay on the device
        super().__init__(config, dataset, device, capturable=device.type == "cuda")
        self.device = device
        self.use_graph = device.type == "cuda"
        self.block_steps = block_steps
        self.parameters = list(self.model.parameters())
        rows = 2 * block_steps  # two halves: the GPU fills one while the host drains the other
        self.ring = {"weight": torch.empty(rows, N_CLASSES, N_PIXELS, device=device),
                     "loss": torch.empty(rows, device=device)}
        if config.bias:
            self.ring["bias"] = torch.empty(rows, N_CLASSES, device=device)
        if config.capture.gradients:
            self.ring["gradient"] = torch.empty(rows, N_CLASSES, N_PIXELS, device=device)
        pin = self.use_graph
        self.host = {name: torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)
                     for name, tensor in self.ring.items()}
        self.state_size = self.optimizer_state_tensor().numel()
        self.state_snapshot = torch.zeros(2, self.state_size, device=device)
        self.state_host = torch.zeros(2, self.state_size, pin_memory=pin)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)     # ring row the next step writes
        self.counter = torch.zeros(1, dtype=torch.long, device=device)  # row of the batch table
        self.copy_stream = torch.cuda.Stream(device) if self.use_graph else None
        self._row: tuple[int, int] | None = None  # (ring row, step) handed to on_step now
        self._snapshot_step: dict[int, int] = {}  # ring half -> step its state snapshot belongs to
        self._copied: dict[int, torch.cuda.Event] = {}  # ring half -> its copy to the host done
        self._graph: torch.cuda.CUDAGraph | None = None

    # -- what on_step sees --------------------------------------------------------------------
    def weight_now(self) -> np.ndarray:
        if self._row is None:
            return super().weight_now()
        return self.host["weight"][self._row[0]].numpy()

    def bias_now(self) -> np.ndarray | None:
        if self._row is None or "bias" not in self.host:
            return super().bias_now()
        return self.host["bias"][self._row[0]].numpy()

    def gradient_now(self) -> np.ndarray:
        return self.host["gradient"][self._row[0]].numpy()

    def optimizer_state(self) -> np.ndarray | None:
        """The optimizer state after the step on_step is at now, when a snapshot was taken
        there (a block's last step); None elsewhere (the writer then keeps its last checkpoint)."""
        if self._row is None:
            return super().optimizer_state()
        half = self._row[0] // self.block_steps
        if self._snapshot_step.get(half) != self._row[1]:
            return None
        return self.state_host[half].numpy().copy()

    def restore(self, weight: np.ndarray, bias: np.ndarray | None, state: np.ndarray, steps: int) -> None:
        super().restore(weight, bias, state, steps)
        if self.use_graph:  # capturable optimizers keep their step count on the device
            for p in self.parameters:
                if "step" in self.optimizer.state.get(p, {}):
                    self.optimizer.state[p]["step"] = self.optimizer.state[p]["step"].to(self.device)

    # -- training -------------------------------------------------------------------------------
    def train(self, on_step: StepCallback, start_step: int = 0, on_block: BlockCallback | None = None,
              rows_to_fill: RowsToFill | None = None) -> None:
        """As the other engines' ``train`` (``rows_to_fill`` is not used: the rows are copied
        from the device's ring, a block at a time); with ``on_block``, each block's rows after step 0
        go to ``on_block(first_step, rows)`` at once instead of ``on_step`` row by row:
        ``rows`` maps "weight", "loss" (and "bias", "gradient") to arrays of the block's
        steps, valid during the call. During it, :meth:`optimizer_state` is the state after
        the block's last step."""
        config = self.config
        if start_step == 0:
            on_step(0, float("nan"))
        batches = [batch for _, batch in remaining_batches(
            len(self.images), batch_size=config.batch_size, epochs=config.epochs, seed=config.seed,
            max_steps=config.max_steps, start_step=start_step)]
        if not batches:
            return
        self.batch_table = torch.stack(batches).to(self.device)
        # Ring blocks end where the writer's blocks end: rows first_row + k * block_steps - 1.
        first_row = start_step + 1 if start_step else 0
        last_step = start_step + len(batches)
        ends = list(range(first_row + self.block_steps - 1, last_step, self.block_steps)) + [last_step]
        pending = None
        step = start_step
        for index, end in enumerate(ends):
            half = index % 2
            self.slot.fill_(half * self.block_steps)
            for _ in range(end - step):
                self._advance()
            block = (half, step + 1, end)
            self._snapshot_state(half, end)
            self._copy_to_host(block)
            if pending is not None:
                self._drain(pending, on_step, on_block)
            pending = block
            step = end
        self._drain(pending, on_step, on_block)
        self._row = None

    def _advance(self) -> None:
        """One training step: replayed from the graph once it is captured."""
        if self._graph is not None:
            self._graph.replay()
            return
        if not self.use_graph:
            self._step()
            return
        if int(self.counter) < WARMUP_STEPS:  # eager warm-up, on a side stream as CUDA graphs need
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            return
        self._graph = torch.cuda.CUDAGraph()
        # thread_local: the held-out scorer's thread may be using the GPU meanwhile
        with torch.cuda.graph(self._graph, capture_error_mode="thread_local"):
            self._step()
        self._graph.replay()  # capturing records the step without running it

    def _step(self) -> None:
        """The step the graph holds: everything indexed by device tensors, nothing read back."""
        batch = self.batch_table.index_select(0, self.counter).view(-1)
        self.optimizer.zero_grad(set_to_none=False)
        loss = F.nll_loss(self.model(self.images.index_select(0, batch)), self.labels.index_select(0, batch))
        loss.backward()
        if "gradient" in self.ring:  # the gradient this step applies, before the optimizer moves the weights
            self.ring["gradient"].index_copy_(0, self.slot, self.model.weight.grad.unsqueeze(0))
        self.optimizer.step()
        with torch.no_grad():
            self.ring["weight"].index_copy_(0, self.slot, self.model.weight.unsqueeze(0))
            self.ring["loss"].index_copy_(0, self.slot, loss.detach().view(1))
            if "bias" in self.ring:
                self.ring["bias"].index_copy_(0, self.slot, self.model.bias.unsqueeze(0))
        self.slot.add_(1)
        self.counter.add_(1)

    def _snapshot_state(self, half: int, step: int) -> None:
        if self.state_size:
            self.state_snapshot[half].copy_(self.optimizer_state_tensor())
        self._snapshot_step[half] = step

    def _copy_to_host(self, block: tuple[int, int, int]) -> None:
        """Queue the block's rows (and its state snapshot) for copying to pinned host memory."""
        half, first, last = block
        rows = slice(half * self.block_steps, half * self.block_steps + last - first + 1)
        if self.copy_stream is None:
            for name, tensor in self.ring.items():
                self.host[name][rows].copy_(tensor[rows])
            self.state_host[half].copy_(self.state_snapshot[half])
            return
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            for name, tensor in self.ring.items():
                self.host[name][rows].copy_(tensor[rows], non_blocking=True)
            self.state_host[half].copy_(self.state_snapshot[half], non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(self.copy_stream)
        self._copied[half] = copied

    def _drain(self, block: tuple[int, int, int], on_step: StepCallback, on_block: BlockCallback | None) -> None:
        """Hand a copied block's rows to on_block at once, or to on_step in order."""
        half, first, last = block
        if self.copy_stream is not None:
            self._copied[half].synchronize()
        rows = slice(half * self.block_steps, half * self.block_steps + last - first + 1)
        if on_block is not None:
            self._row = (rows.stop - 1, last)
            on_block(first, {name: tensor[rows].numpy() for name, tensor in self.host.items()})
            return
        losses = self.host["loss"][rows].tolist()
        for offset, loss in enumerate(losses):
            self._row = (half * self.block_steps + offset, first + offset)
            on_step(first + offset, loss)
