"""Real trajectory stores for viewer tests, written by the pipeline's own writer."""

import json

import numpy as np

from weightlapse.pipeline.store import STORE_NAME, RunMetadata, StoreLayout
from weightlapse.pipeline.writer import TrajectoryWriter

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def random_rows(n_steps, seed=0):
    """(step, class, pixel) float32 rows of standard normal noise."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n_steps + 1, 10, 784)).astype(np.float32)


def write_store(path, rows, *, chunk_steps=8, finish=True, eval_every=5, **layout):
    """Write ``rows`` as the store at ``path``: losses NaN, 1, 2, .., an evaluation every ``eval_every`` steps."""
    n_steps = len(rows) - 1
    evals = tuple(range(0, n_steps + 1, eval_every))
    writer = TrajectoryWriter(path, StoreLayout(n_steps=n_steps, eval_steps=evals, chunk_steps=chunk_steps,
                                                **layout), RunMetadata(run="test"))
    for step, row in enumerate(rows):
        writer.record_step(step, row, float(step) if step else float("nan"))
        if step in evals:
            writer.record_eval(step, step / 100, 1.0 / (step + 1))
    if finish:
        writer.close()
    return writer


def training_like(n_steps: int, seed: int = 0) -> np.ndarray:
    """(step, class, pixel) float32 rows that drift like trained weights: a slow pull
    towards a per-class template plus noise, border pixels never moving."""
    rng = np.random.default_rng(seed)
    template = rng.standard_normal((10, 28, 28)).astype(np.float32)
    template[:, :4, :] = template[:, -4:, :] = template[:, :, :4] = template[:, :, -4:] = 0
    template = template.reshape(10, 784) * np.float32(0.05)
    rows = np.empty((n_steps + 1, 10, 784), np.float32)
    rows[0] = rng.standard_normal((10, 784)).astype(np.float32) * np.float32(0.01)
    noise = rng.standard_normal((n_steps, 10, 784)).astype(np.float32) * np.float32(0.002)
    noise[:, template == 0] = 0
    for step in range(1, n_steps + 1):
        rows[step] = rows[step - 1] + np.float32(0.01) * (template - rows[step - 1]) + noise[step - 1]
    return rows


def write_run(run_dir, rows, *, finish=True, chunk_steps=16, eval_every=10, name="test",
              class_names=None, params=None, n_steps=None, dataset="generated"):
    """Write ``rows`` (step, class, pixel) as a run under ``run_dir``; ``n_steps`` > len(rows)-1
    leaves the run unfinished, as if training were still going."""
    run_dir.mkdir(parents=True, exist_ok=True)
    n_steps = len(rows) - 1 if n_steps is None else n_steps
    evals = tuple(sorted(set(range(0, n_steps + 1, eval_every)) | {n_steps}))
    metadata = RunMetadata(run=name, params=params or {"optimizer": "adam", "lr": 0.001, "seed": 0},
                           dataset=dataset, class_names=tuple(class_names or [str(c) for c in range(10)]))
    writer = TrajectoryWriter(run_dir / STORE_NAME, StoreLayout(n_steps=n_steps, eval_steps=evals,
                                                                chunk_steps=chunk_steps), metadata)
    for step, row in enumerate(rows):
        writer.record_step(step, row, 2.3 * np.exp(-step / 50) if step else float("nan"))
        if step in evals:
            writer.record_eval(step, 1 - 0.9 * np.exp(-step / 30), 2.3 * np.exp(-step / 50))
    if finish:
        writer.close()
        (run_dir / "metrics.json").write_text(json.dumps(
            {"steps": n_steps, "final_train_loss": 0.3, "heldout_accuracy": 0.9, "heldout_loss": 0.35}))
    else:
        writer.flush()
    return writer
