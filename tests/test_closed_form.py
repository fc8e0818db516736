"""The closed-form numpy engine against torch autograd: same training, to float32 rounding."""

import numpy as np
import pytest
import torch

from weightlapse.pipeline.closed_form import ClosedFormEngine, ClosedFormSoftmaxRegression, flush_denormals, train_closed_form
from weightlapse.pipeline.datasets import TEST_IMAGES, TEST_LABELS, Dataset, Split
from weightlapse.pipeline.params import TrainParams
from weightlapse.pipeline.idx import read_idx_file
from weightlapse.pipeline.trainer import SoftmaxRegression, make_optimizer, train

# Weights are O(0.1); float32 rounding of one step is ~1e-8 of that, and differences
# between the two matrix-product implementations grow slowly over hundreds of steps.
ATOL = 2e-6


def digits_like(n=600, seed=0):
    """Sparse, non-negative images with a class signal, like MNIST's."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    templates = (rng.random((10, 784)) < 0.15).astype(np.float32)
    images = templates[labels] * rng.random((n, 784)).astype(np.float32)
    images[:, :100] = 0  # a border that is never lit, as in MNIST: Adam's state stays at 0 there
    return images.astype(np.float32), labels.astype(np.int64)


def both_engines(images, labels, *, optimizer, lr, bias=False, momentum=0.0, weight_decay=0.0, epochs=2, seed=3):
    """Per-step (weights, loss, gradient) of the autograd and the closed-form engines."""
    model = SoftmaxRegression(bias=bias, seed=seed)
    closed = ClosedFormSoftmaxRegression(model.weight.detach().numpy()[None],
                                         None if model.bias is None else model.bias.detach().numpy()[None],
                                         optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
    opt = make_optimizer(model.parameters(), name=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
    general, fast = [], []

    def record_general(step, loss):
        grad = None if step == 0 else model.weight.grad.detach().clone().numpy()
        bias_now = None if model.bias is None else model.bias.detach().clone().numpy()
        general.append((model.weight.detach().clone().numpy(), loss, grad, bias_now))

    def record_fast(step, losses):
        grad = None if step == 0 else closed.weight_grad[0].copy()
        fast.append((closed.weight[0].copy(), float(losses[0]), grad,
                     None if closed.bias is None else closed.bias[0].copy()))

    train(model, opt, torch.from_numpy(images), torch.from_numpy(labels), batch_size=20, epochs=epochs,
          seed=seed, on_step=record_general)
    train_closed_form(closed, images, labels, batch_size=20, epochs=epochs, seeds=[seed], on_step=record_fast)
    return general, fast


@pytest.mark.parametrize("setup", [
    {"optimizer": "adam", "lr": 1e-3},
    {"optimizer": "adam", "lr": 1e-2, "bias": True, "weight_decay": 1e-3},
    {"optimizer": "adamw", "lr": 1e-3, "bias": True, "weight_decay": 0.05},
    {"optimizer": "sgd", "lr": 0.05},
    {"optimizer": "sgd", "lr": 0.02, "momentum": 0.9, "weight_decay": 1e-3, "bias": True},
])
def test_the_closed_form_engine_trains_as_autograd_does(setup):
    images, labels = digits_like()
    general, fast = both_engines(images, labels, **setup)
    assert len(general) == len(fast) == 61  # 600 samples / batch 20 * 2 epochs, plus step 0
    for step, ((w_g, loss_g, grad_g, b_g), (w_f, loss_f, grad_f, b_f)) in enumerate(zip(general, fast)):
        np.testing.assert_allclose(w_f, w_g, rtol=0, atol=ATOL, err_msg=f"weights at step {step}")
        if step:
            assert loss_f == pytest.approx(loss_g, rel=1e-5, abs=1e-6)
            np.testing.assert_allclose(grad_f, grad_g, rtol=0, atol=1e-6, err_msg=f"gradient at step {step}")
        if b_g is not None:
            np.testing.assert_allclose(b_f, b_g, rtol=0, atol=ATOL)
    # and the runs did move: a comparison of two frozen models would prove nothing
    assert np.abs(general[-1][0] - general[0][0]).max() > 10 * ATOL


def test_the_engines_agree_on_real_digits_over_a_long_run(shared_mnist):
    images = read_idx_file(shared_mnist / TEST_IMAGES).reshape(-1, 784).astype(np.float32) / 255
    labels = read_idx_file(shared_mnist / TEST_LABELS).astype(np.int64)
    general, fast = both_engines(images[:4000], labels[:4000], optimizer="adam", lr=1e-3, epochs=2)
    assert len(fast) == 401
    worst = max(float(np.abs(g[0] - f[0]).max()) for g, f in zip(general, fast))
    assert worst < ATOL, f"largest difference over 400 steps: {worst:.2e}"


def test_each_engine_is_bitwise_deterministic():
    images, labels = digits_like()
    first, second = both_engines(images, labels, optimizer="adam", lr=1e-3), \
        both_engines(images, labels, optimizer="adam", lr=1e-3)
    for engine in (0, 1):
        a = np.stack([row[0] for row in first[engine]])
        b = np.stack([row[0] for row in second[engine]])
        assert np.array_equal(a.view(np.int32), b.view(np.int32))


def closed_form_stack(images, labels, *, seeds, lrs, optimizer, bias=False, momentum=0.0, weight_decay=0.0,
                      epochs=2):
    """Per-step (weights, losses, gradients, biases) of one stack of runs, each (step, run, ...)."""
    initial = [SoftmaxRegression(bias=bias, seed=seed) for seed in seeds]
    stack = ClosedFormSoftmaxRegression(np.stack([m.weight.detach().numpy() for m in initial]),
                                        np.stack([m.bias.detach().numpy() for m in initial]) if bias else None,
                                        optimizer=optimizer, lr=lrs, momentum=momentum, weight_decay=weight_decay)
    rows = []
    train_closed_form(stack, images, labels, batch_size=20, epochs=epochs, seeds=seeds,
                      on_step=lambda step, losses: rows.append(
                          (stack.weight.copy(), losses.copy(), stack.weight_grad.copy(),
                           stack.bias.copy() if bias else np.zeros(len(seeds), np.float32))))
    return [np.stack(column) for column in zip(*rows)]


@pytest.mark.parametrize("setup", [
    {"optimizer": "adam"},
    {"optimizer": "adam", "bias": True, "weight_decay": 1e-3},
    {"optimizer": "adamw", "bias": True, "weight_decay": 0.05},
    {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 1e-3, "bias": True},
])
def test_runs_trained_as_one_stack_get_the_bits_they_get_alone(setup):
    # A sweep's runs are stepped together (pipeline.stacked); each run's trajectory must
    # be the one its own train stage records, bit for bit, whatever it is stacked with.
    images, labels = digits_like(n=590)  # 590 / 20: each epoch ends with a short batch
    seeds, lrs = [0, 1, 2, 5], [1e-3, 1e-2, 1e-3, 3e-2]
    together = closed_form_stack(images, labels, seeds=seeds, lrs=lrs, **setup)
    for run, (seed, lr) in enumerate(zip(seeds, lrs)):
        alone = closed_form_stack(images, labels, seeds=[seed], lrs=[lr], **setup)
        for name, stacked, single in zip(("weights", "losses", "gradients", "bias"), together, alone):
            assert np.array_equal(np.ascontiguousarray(stacked[:, run]).view(np.int32),
                                  np.ascontiguousarray(single[:, 0]).view(np.int32)), \
                f"run {run} (seed {seed}, lr {lr}): {name} differ"
    final = together[0][-1]
    assert len(together[0]) == 61  # 2 epochs of 30 batches, plus step 0
    # the runs went different ways, so a stack that mixed up its runs' slices would fail above
    assert all(not np.array_equal(final[a], final[b]) for a in range(4) for b in range(a))


def test_subnormals_are_flushed_only_while_the_engine_trains():
    tiny = torch.tensor([1e-40])
    with flush_denormals():
        assert (tiny * 1).item() == 0.0
    assert (tiny * 1).item() != 0.0  # the rest of the process keeps IEEE behaviour



def test_the_engine_writing_rows_in_place_hands_over_the_rows_it_hands_step_by_step():
    # With rows_to_fill (the train stage's), each step is written straight into lent rows
    # and handed over a block at a time: the same rows, bit for bit, as step by step.
    images, labels = digits_like(700)
    config = TrainParams(optimizer="adam", lr=0.01, bias=True, epochs=2, batch_size=20)
    dataset = Dataset("digits", Split(images, labels), Split(images, labels), {}, tuple("0123456789"))
    by_step = {"weight": [], "loss": [], "bias": [], "gradient": []}
    engine = ClosedFormEngine(config, dataset)

    def on_step(step, loss):
        for name, value in (("weight", engine.weight_now()), ("bias", engine.bias_now()),
                            ("gradient", engine.gradient_now())):
            by_step[name].append(value.copy())
        by_step["loss"].append(np.float32(loss))

    engine.train(on_step)
    # the rows lent: 16 steps at a time, reused, as the writer's block buffers are
    lent = [np.full((16, *shape), np.nan, np.float32) for shape in ((10, 784), (), (10,), (10, 784))]
    blocks, in_place = [], {name: [] for name in by_step}
    engine = ClosedFormEngine(config, dataset)

    def rows_to_fill(first):
        size = min(16, len(by_step["loss"]) - first)  # as the writer's rows stop at the run's end
        return dict(zip(("weight", "loss", "bias", "gradient"), (values[:size] for values in lent)))

    def on_block(first, rows):
        blocks.append((first, len(rows["loss"])))
        for name, values in rows.items():
            in_place[name].extend(values.copy())

    stepped = []
    engine.train(lambda step, loss: stepped.append(step), on_block=on_block, rows_to_fill=rows_to_fill)
    assert stepped == [0]  # only step 0 goes to on_step
    assert [first for first, _ in blocks] == list(range(1, len(by_step["loss"]), 16))
    for name in ("weight", "loss", "bias", "gradient"):
        np.testing.assert_array_equal(np.stack(in_place[name]).view(np.int32), np.stack(by_step[name][1:]).view(np.int32),
                                      err_msg=name)
