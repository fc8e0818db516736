"""The training loop against an independent numpy implementation of the same maths."""

import math

import numpy as np
import pytest
import torch

from weightlapse.pipeline.trainer import (
    SoftmaxRegression, batch_indices, make_optimizer, plan_evals, plan_steps, select_device, train,
)


def numpy_gradient(weights, images, labels):
    """d mean(NLL(log_softmax(x W^T))) / dW, in float64: (class, pixel)."""
    logits = images @ weights.T
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    probs[np.arange(len(labels)), labels] -= 1.0
    return probs.T @ images / len(labels)


def numpy_adam(weights, batches, images, labels, lr, betas=(0.9, 0.999), eps=1e-8):
    m = np.zeros_like(weights)
    v = np.zeros_like(weights)
    path = [weights.copy()]
    for t, batch in enumerate(batches, start=1):
        g = numpy_gradient(weights, images[batch], labels[batch])
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat = m / (1 - betas[0] ** t)
        v_hat = v / (1 - betas[1] ** t)
        weights = weights - lr * m_hat / (np.sqrt(v_hat) + eps)
        path.append(weights.copy())
    return path


def numpy_sgd(weights, batches, images, labels, lr, momentum):
    velocity = np.zeros_like(weights)
    path = [weights.copy()]
    for t, batch in enumerate(batches, start=1):
        g = numpy_gradient(weights, images[batch], labels[batch])
        velocity = g if t == 1 else momentum * velocity + g
        weights = weights - lr * velocity
        path.append(weights.copy())
    return path


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    images = rng.random((100, 784), dtype=np.float32)
    labels = rng.integers(0, 10, 100)
    return images, labels


def run(data, *, optimizer="adam", lr=1e-3, momentum=0.0, seed=0, max_steps=None, epochs=1, batch_size=20):
    images, labels = data
    model = SoftmaxRegression(seed=seed)
    opt = make_optimizer(model.parameters(), name=optimizer, lr=lr, momentum=momentum)
    path, losses = [], []

    def on_step(step, loss):
        path.append(model.weight.detach().clone())
        losses.append(loss)

    train(model, opt, torch.from_numpy(images), torch.from_numpy(labels), batch_size=batch_size,
          epochs=epochs, seed=seed, max_steps=max_steps, on_step=on_step)
    return torch.stack(path), losses


def test_step_zero_is_the_seeded_initialisation(data):
    path, losses = run(data, max_steps=3)
    assert torch.equal(path[0], SoftmaxRegression(seed=0).weight.detach())
    assert math.isnan(losses[0]) and len(path) == 4
    bound = 1 / math.sqrt(784)
    assert path[0].abs().max() <= bound and path[0].std() > bound / 3  # nn.Linear's default scale


def test_step_t_equals_t_manual_adam_steps(data):
    images, labels = data
    path, _ = run(data, epochs=2)  # 10 steps, crossing an epoch boundary
    batches = [b.numpy() for b in batch_indices(100, batch_size=20, epochs=2, seed=0)]
    reference = numpy_adam(path[0].double().numpy(), batches, images.astype(np.float64), labels, lr=1e-3)
    assert len(path) == len(reference) == 11
    for t, expected in enumerate(reference):
        np.testing.assert_allclose(path[t].numpy(), expected, rtol=1e-5, atol=1e-7, err_msg=f"step {t}")


def test_step_t_equals_t_manual_sgd_momentum_steps(data):
    images, labels = data
    path, losses = run(data, optimizer="sgd", lr=0.5, momentum=0.9)
    batches = [b.numpy() for b in batch_indices(100, batch_size=20, epochs=1, seed=0)]
    reference = numpy_sgd(path[0].double().numpy(), batches, images.astype(np.float64), labels, 0.5, 0.9)
    for t, expected in enumerate(reference):
        np.testing.assert_allclose(path[t].numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=f"step {t}")


def test_loss_is_the_batch_loss_before_the_step(data):
    images, labels = data
    path, losses = run(data, max_steps=2)
    first = next(batch_indices(100, batch_size=20, epochs=1, seed=0)).numpy()
    logits = images[first].astype(np.float64) @ path[0].double().numpy().T
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert losses[1] == pytest.approx(-log_probs[np.arange(20), labels[first]].mean(), rel=1e-5)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd", "rmsprop"])
def test_same_seed_gives_a_bitwise_identical_trajectory(data, optimizer):
    first, first_losses = run(data, optimizer=optimizer, epochs=2)
    second, second_losses = run(data, optimizer=optimizer, epochs=2)
    assert torch.equal(first, second) and first_losses[1:] == second_losses[1:]
    other, _ = run(data, optimizer=optimizer, epochs=2, seed=1)
    assert not torch.equal(first, other)


def test_every_sample_once_per_epoch_in_a_seeded_order():
    batches = list(batch_indices(45, batch_size=20, epochs=2, seed=7))
    assert [len(b) for b in batches] == [20, 20, 5, 20, 20, 5]
    assert sorted(torch.cat(batches[:3]).tolist()) == list(range(45))
    assert sorted(torch.cat(batches[3:]).tolist()) == list(range(45))
    assert not torch.equal(torch.cat(batches[:3]), torch.cat(batches[3:]))
    again = list(batch_indices(45, batch_size=20, epochs=2, seed=7))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    assert len(list(batch_indices(45, batch_size=20, epochs=2, seed=7, max_steps=4))) == 4


def test_planned_steps_and_evaluations():
    assert plan_steps(60000, batch_size=20, epochs=1, max_steps=None) == 3000
    assert plan_steps(60000, batch_size=20, epochs=1, max_steps=100) == 100
    assert plan_steps(45, batch_size=20, epochs=2, max_steps=None) == 6
    assert plan_evals(250, 100) == (0, 100, 200, 250)
    assert plan_evals(200, 100) == (0, 100, 200)


def test_bias_option_adds_a_bias_without_changing_the_weight_init():
    with_bias = SoftmaxRegression(bias=True, seed=0)
    assert with_bias.bias is not None and with_bias.bias.shape == (10,)
    assert torch.equal(with_bias.weight, SoftmaxRegression(seed=0).weight)


def test_device_selection():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            select_device("cuda")
