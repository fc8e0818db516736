"""Real network stores for viewer tests, recorded by ``weightlapse.Recorder`` from small torch loops."""

from pathlib import Path

import numpy as np
import torch

from weightlapse import Recorder


def mlp(hidden: int = 16, *, seed: int = 0) -> torch.nn.Module:
    """784-hidden-10, its layers named as the pipeline names a hidden-layer run's."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential()
    model.add_module("hidden1", torch.nn.Linear(784, hidden))
    model.add_module("relu", torch.nn.ReLU())
    model.add_module("output", torch.nn.Linear(hidden, 10))
    return model


def record(run_dir: Path, model: torch.nn.Module, *, steps: int = 12, seed: int = 0, inputs=(784,)) -> dict:
    """Train ``model`` ``steps`` SGD steps on random data, recording every step; returns
    {step: {parameter: values}}, each parameter as the loop saw it after that step."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    seen = {0: snapshot(model)}
    with Recorder(run_dir, model, optimizer=optimizer, params={"lr": 0.5, "seed": seed}) as rec:
        for step in range(1, steps + 1):
            x = torch.rand((8, *inputs), generator=generator)
            y = torch.randint(0, 10, (8,), generator=generator)
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            rec.step(loss=loss)
            seen[step] = snapshot(model)
    return seen


def snapshot(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {name: tensor.detach().numpy().copy() for name, tensor in model.state_dict().items()
            if tensor.is_floating_point()}


def conv_net(seed: int = 0) -> torch.nn.Module:
    """A small convolution network on 1x8x8 images: a 4-d kernel, a norm and a flattened head."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Flatten(),
                               torch.nn.Linear(3 * 6 * 6, 10))
