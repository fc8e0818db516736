"""The closed-form numpy engine against torch autograd: same training, to float32 rounding."""

import numpy as np
import pytest
import torch

from pipeline.closed_form import ClosedFormSoftmaxRegression, flush_denormals, train_closed_form
from pipeline.datasets import TEST_IMAGES, TEST_LABELS
from pipeline.engines import select_engine
from pipeline.idx import read_idx_file
from pipeline.params import ParamsError, TrainParams
from pipeline.trainer import SoftmaxRegression, make_optimizer, train

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
    closed = ClosedFormSoftmaxRegression(model.weight.detach().numpy(),
                                         None if model.bias is None else model.bias.detach().numpy(),
                                         optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
    opt = make_optimizer(model.parameters(), name=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
    general, fast = [], []

    def record_general(step, loss):
        grad = None if step == 0 else model.weight.grad.detach().clone().numpy()
        bias_now = None if model.bias is None else model.bias.detach().clone().numpy()
        general.append((model.weight.detach().clone().numpy(), loss, grad, bias_now))

    def record_fast(step, loss):
        grad = None if step == 0 else closed.weight_grad.copy()
        fast.append((closed.weight.copy(), loss, grad, None if closed.bias is None else closed.bias.copy()))

    train(model, opt, torch.from_numpy(images), torch.from_numpy(labels), batch_size=20, epochs=epochs,
          seed=seed, on_step=record_general)
    train_closed_form(closed, images, labels, batch_size=20, epochs=epochs, seed=seed, on_step=record_fast)
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


def test_subnormals_are_flushed_only_while_the_engine_trains():
    tiny = torch.tensor([1e-40])
    with flush_denormals():
        assert (tiny * 1).item() == 0.0
    assert (tiny * 1).item() != 0.0  # the rest of the process keeps IEEE behaviour


def test_the_engine_is_chosen_where_it_applies():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert select_engine("auto", "adam", cpu) == "numpy"
    assert select_engine("auto", "rmsprop", cpu) == "torch"  # no closed-form rmsprop
    assert select_engine("auto", "adam", cuda) == "cuda-graph"  # tests/test_graph_engine.py
    assert select_engine("torch", "adam", cpu) == "torch"
    with pytest.raises(ParamsError, match="engine: numpy runs on the CPU only"):
        TrainParams(engine="numpy", device="cuda")
    with pytest.raises(ParamsError, match="engine: numpy implements adam, adamw, sgd, not 'rmsprop'"):
        TrainParams(engine="numpy", optimizer="rmsprop")
    with pytest.raises(ParamsError, match="engine: 'jax' is not one of auto, numpy, torch"):
        TrainParams(engine="jax")
