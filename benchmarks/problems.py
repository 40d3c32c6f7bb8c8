"""DeepOBS-style benchmark problems: a model, the cross-entropy loss and a fixed batch.

Every problem uses ``torch.nn.functional.cross_entropy`` with mean reduction and a model built
after ``torch.manual_seed(seed)``. ``problem.batch(n, device, dtype)`` returns the first ``n``
examples of its training data (always the same batch), from real data where it is available:

- ``seed_logreg``: the seed tutorial's ``nn.Linear(784, 10)`` on flattened MNIST, N = 500.
- ``mnist_mlp``: DeepOBS ``mnist_mlp``, 784-1000-500-100-10 with ReLU, N = 128.
- ``mnist_mlp_sigmoid``: the same with sigmoid activations (the foundation benchmark's MLP).
- ``fmnist_2c2d``: DeepOBS ``fmnist_2c2d``: conv 32 5x5 "same" + ReLU + max-pool 2, conv 64
  5x5 "same" + ReLU + max-pool 2, fc 1024 + ReLU, fc 10, on Fashion-MNIST, N = 128 ("same"
  written as ``padding=2``, identical for 5x5 kernels at stride 1, which BackPACK accepts).
- ``cifar10_3c3d``: DeepOBS ``cifar10_3c3d``: conv 64 5x5 valid + ReLU + max-pool 3/2, conv 96
  3x3 valid + ReLU + max-pool 3/2, conv 128 3x3 "same" + ReLU + max-pool 3/2 (pool padding 1,
  DeepOBS's "same" pooling), fc 512 + ReLU, fc 256 + ReLU, fc 10, on 3x32x32 inputs, N = 128.
  CIFAR-10 is not bundled: without it the batch is synthetic (uniform pixels in [0, 1],
  uniform labels, seeded) and the problem says so (``synthetic=True``).
- ``sigmoid_cnn``: the paper's CNN with sigmoid activations, scaled down so that the dense
  matrices of HBP stay below its default size limit: conv 4 5x5 + sigmoid + max-pool 2, conv 8
  5x5 + sigmoid + max-pool 2, fc 10, on MNIST, N = 128.
- ``small_resnet``: a small residual network on MNIST: conv 4 3x3 stride 2 + ReLU, two
  residual blocks ``x + conv(relu(conv(x)))`` (4 channels, 3x3, padding 1) separated by a
  max-pool 2 and followed by a ReLU, fc 10 on the flattened 4x7x7 map; no BatchNorm; N = 128.

Data: the bundled MNIST subset (:func:`curvgraph.datasets.load_mnist_subset`, training split);
Fashion-MNIST from IDX files (:func:`curvgraph.datasets.load_idx`) in ``data_dir`` (default
``<workspace>/shared/data/fashion-mnist``), falling back to the MNIST subset when absent
(``dataset`` says which was used); CIFAR-10 from a torchvision root holding
``cifar-10-batches-py`` when one is found, synthetic otherwise.

The builders of the models are in :mod:`benchmarks.problem_models`, the data loading in
:mod:`benchmarks.problem_data`; :class:`ResidualBlock`, :func:`data_info` and
:func:`idx_train_images` are importable from here as well.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from benchmarks.problem_data import data_info, idx_train_images, training_images
from benchmarks.problem_models import (
    ResidualBlock,
    conv_2c2d,
    conv_3c3d,
    logreg,
    mlp,
    sigmoid_cnn,
    small_resnet,
)

__all__ = [
    "PROBLEMS",
    "Problem",
    "ResidualBlock",
    "data_info",
    "get",
    "idx_train_images",
]


@dataclass(frozen=True)
class Problem:
    """A benchmark problem: model builder, data, batch size; the loss is cross-entropy (mean).

    Attributes:
        name: key in :data:`PROBLEMS`.
        title: one line for reports.
        build_model: builds the (untrained) model; call :meth:`model` for a seeded one.
        dataset: ``"mnist" | "fashion-mnist" | "cifar10"``.
        input_shape: shape of one example as the model takes it.
        batch_size: the problem's default N.
        deepobs: the DeepOBS problem it follows (empty if none).
    """

    name: str
    title: str
    build_model: Callable[[], nn.Module]
    dataset: str
    input_shape: Tuple[int, ...]
    batch_size: int
    deepobs: str = ""

    def model(self, seed: int = 0, device="cpu", dtype=torch.float32) -> nn.Module:
        """The model built after ``torch.manual_seed(seed)``, on ``device`` in ``dtype``."""
        torch.manual_seed(seed)
        return self.build_model().to(device=device, dtype=dtype)

    @staticmethod
    def loss(outputs: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy, mean over the batch."""
        return nn.functional.cross_entropy(outputs, labels)

    def loss_module(self) -> nn.Module:
        """The same loss as an ``nn.Module`` (for the peers)."""
        return nn.CrossEntropyLoss()

    def data(self, data_dir: Optional[str] = None) -> Dict[str, object]:
        """Which data :meth:`batch` uses (see :func:`data_info`)."""
        return data_info(self.dataset, data_dir)

    def batch(
        self,
        n: Optional[int] = None,
        device="cpu",
        dtype: torch.dtype = torch.float32,
        data_dir: Optional[str] = None,
    ) -> Tuple[Tensor, Tensor]:
        """The first ``n`` (default :attr:`batch_size`) training examples ``(x, y)``.

        ``x`` is shaped ``[n, *input_shape]`` (flattened for the MLPs), in ``dtype`` on
        ``device``; ``y`` holds int64 labels.
        """
        n = self.batch_size if n is None else n
        images, labels = training_images(self.dataset, data_dir, n)
        x = images.reshape(n, *self.input_shape)
        return x.to(device=device, dtype=dtype), labels.to(device)

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.build_model().parameters())


PROBLEMS: Dict[str, Problem] = {
    p.name: p
    for p in [
        Problem(
            "seed_logreg",
            "logistic regression nn.Linear(784, 10) (the seed model), MNIST",
            logreg,
            "mnist",
            (784,),
            500,
            "mnist_logreg",
        ),
        Problem(
            "mnist_mlp",
            "MLP 784-1000-500-100-10, ReLU, MNIST",
            functools.partial(mlp, nn.ReLU),
            "mnist",
            (784,),
            128,
            "mnist_mlp",
        ),
        Problem(
            "mnist_mlp_sigmoid",
            "MLP 784-1000-500-100-10, sigmoid, MNIST",
            functools.partial(mlp, nn.Sigmoid),
            "mnist",
            (784,),
            128,
        ),
        Problem(
            "fmnist_2c2d",
            "2c2d: conv32-conv64-fc1024-fc10, ReLU, Fashion-MNIST",
            conv_2c2d,
            "fashion-mnist",
            (1, 28, 28),
            128,
            "fmnist_2c2d",
        ),
        Problem(
            "cifar10_3c3d",
            "3c3d: conv64-conv96-conv128-fc512-fc256-fc10, ReLU, CIFAR-10 shape",
            conv_3c3d,
            "cifar10",
            (3, 32, 32),
            128,
            "cifar10_3c3d",
        ),
        Problem(
            "sigmoid_cnn",
            "CNN conv4-conv8-fc10, sigmoid, MNIST (the paper's CNN, scaled down)",
            sigmoid_cnn,
            "mnist",
            (1, 28, 28),
            128,
        ),
        Problem(
            "small_resnet",
            "ResNet: conv4/2 + 2 residual blocks x + conv(relu(conv(x))) + fc10, MNIST",
            small_resnet,
            "mnist",
            (1, 28, 28),
            128,
        ),
    ]
}


def get(name: str) -> Problem:
    """The problem called ``name`` (a clear error for unknown names)."""
    if name not in PROBLEMS:
        raise KeyError(f"unknown problem {name!r}; choose from {', '.join(PROBLEMS)}")
    return PROBLEMS[name]
