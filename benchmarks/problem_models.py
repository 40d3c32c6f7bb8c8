"""The models of the benchmark problems (:mod:`benchmarks.problems`), one builder each.

Each builder returns a fresh, untrained model (seeding is the caller's business, see
:meth:`benchmarks.problems.Problem.model`); the architectures are described in
:mod:`benchmarks.problems`:

- :func:`logreg`: ``seed_logreg``;
- :func:`mlp`: ``mnist_mlp`` (``nn.ReLU``) and ``mnist_mlp_sigmoid`` (``nn.Sigmoid``);
- :func:`conv_2c2d`: ``fmnist_2c2d``; :func:`conv_3c3d`: ``cifar10_3c3d``;
- :func:`sigmoid_cnn`: ``sigmoid_cnn``;
- :func:`small_resnet`: ``small_resnet``, built from :class:`ResidualBlock`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "ResidualBlock",
    "conv_2c2d",
    "conv_3c3d",
    "logreg",
    "mlp",
    "sigmoid_cnn",
    "small_resnet",
]


class ResidualBlock(nn.Module):
    """``x + conv2(relu(conv1(x)))`` with 3x3 convolutions, padding 1 (shape preserving)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """The block's output, shaped like ``x``."""
        return x + self.conv2(torch.relu(self.conv1(x)))


def logreg() -> nn.Module:
    """Logistic regression ``nn.Linear(784, 10)`` (the seed model)."""
    return nn.Linear(784, 10)


def mlp(activation: Callable[[], nn.Module]) -> nn.Module:
    """The MLP 784-1000-500-100-10 with ``activation()`` after each hidden layer."""
    return nn.Sequential(
        nn.Linear(784, 1000),
        activation(),
        nn.Linear(1000, 500),
        activation(),
        nn.Linear(500, 100),
        activation(),
        nn.Linear(100, 10),
    )


def conv_2c2d() -> nn.Module:
    """DeepOBS's 2c2d: conv 32, conv 64 (5x5 "same", ReLU, max-pool 2), fc 1024, fc 10."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2),  # "same": padding=2 for 5x5, stride 1 (BackPACK
        # 1.7.1 does not accept the string)
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 1024),
        nn.ReLU(),
        nn.Linear(1024, 10),
    )


def conv_3c3d() -> nn.Module:
    """DeepOBS's 3c3d: conv 64, 96, 128 (ReLU, max-pool 3/2), fc 512, fc 256, fc 10."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 5),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(64, 96, 3),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(96, 128, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Flatten(),
        nn.Linear(128 * 3 * 3, 512),
        nn.ReLU(),
        nn.Linear(512, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


def sigmoid_cnn() -> nn.Module:
    """The paper's CNN, scaled down: conv 4, conv 8 (5x5, sigmoid, max-pool 2), fc 10."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 5),
        nn.Sigmoid(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 5),
        nn.Sigmoid(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


def small_resnet() -> nn.Module:
    """Conv 4/2 + ReLU, two :class:`ResidualBlock` around a max-pool, ReLU, fc 10."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        ResidualBlock(4),
        nn.MaxPool2d(2),
        ResidualBlock(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 7 * 7, 10),
    )
