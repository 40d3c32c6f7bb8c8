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
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from benchmarks.common import DATA_ROOT, FASHION_MNIST_DIR
from curvgraph.datasets import load_idx, load_mnist_subset

__all__ = [
    "PROBLEMS",
    "Problem",
    "ResidualBlock",
    "data_info",
    "get",
    "idx_train_images",
]

SYNTHETIC_SEED = 1234  # generator seed of the synthetic CIFAR-10-shaped batch


# -- data ------------------------------------------------------------------------------------


@functools.cache
def _mnist() -> Tuple[Tensor, Tensor]:
    return load_mnist_subset("train").tensors


@functools.cache
def _fashion_mnist(directory: str) -> Tuple[Tensor, Tensor]:
    return load_idx(directory, "train").tensors


@functools.cache
def _cifar10(root: str) -> Tuple[Tensor, Tensor]:
    from curvgraph.datasets import load_torchvision

    return load_torchvision("CIFAR10", root, "train").tensors


def _fashion_dir(data_dir: Optional[str]) -> Path:
    if data_dir is None:
        return FASHION_MNIST_DIR
    directory = Path(data_dir).expanduser()
    return directory / "fashion-mnist" if (directory / "fashion-mnist").is_dir() else directory


def _cifar_root(data_dir: Optional[str]) -> Optional[Path]:
    """A torchvision root holding ``cifar-10-batches-py`` (``data_dir`` or the shared data)."""
    for root in ([Path(data_dir).expanduser()] if data_dir else []) + [DATA_ROOT]:
        if (root / "cifar-10-batches-py").is_dir():
            return root
    return None


def idx_train_images(directory: Path) -> Optional[Path]:
    """The IDX file of the training images in ``directory``, if there is one (not read).

    Looks for the names :func:`curvgraph.datasets.load_idx` reads:
    ``train-images-idx3-ubyte`` or ``train-images.idx3-ubyte``, each optionally gzipped.

    Args:
        directory: The folder to look in.

    Returns:
        The path of the first of those files that exists, else None.
    """
    for name in ("train-images-idx3-ubyte", "train-images.idx3-ubyte"):
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def data_info(dataset: str, data_dir: Optional[str] = None) -> Dict[str, object]:
    """What ``dataset`` (``mnist`` | ``fashion-mnist`` | ``cifar10``) resolves to.

    Returns ``{"dataset", "loader", "synthetic", "source", "note"}``: the dataset actually
    used (the MNIST subset stands in for a missing Fashion-MNIST), which loader reads it
    (``mnist | fashion-mnist | cifar10 | synthetic``), whether the data is synthetic, and
    where it comes from.
    """
    if dataset == "mnist":
        return {
            "dataset": "MNIST subset (bundled, 8,000 training digits)",
            "loader": "mnist",
            "synthetic": False,
            "source": "curvgraph/data/mnist-10k.npz",
            "note": "",
        }
    if dataset == "fashion-mnist":
        directory = _fashion_dir(data_dir)
        if idx_train_images(directory) is not None:
            return {
                "dataset": "Fashion-MNIST (full, 60,000 training images)",
                "loader": "fashion-mnist",
                "synthetic": False,
                "source": str(directory),
                "note": "",
            }
        return {
            "dataset": "MNIST subset (bundled) in place of Fashion-MNIST",
            "loader": "mnist",
            "synthetic": False,
            "source": "curvgraph/data/mnist-10k.npz",
            "note": f"Fashion-MNIST IDX files not found in {directory}; the bundled MNIST "
            "subset (same shape) is used instead",
        }
    if dataset == "cifar10":
        root = _cifar_root(data_dir)
        if root is not None:
            return {
                "dataset": "CIFAR-10 (torchvision files)",
                "loader": "cifar10",
                "synthetic": False,
                "source": str(root),
                "note": "",
            }
        return {
            "dataset": "synthetic CIFAR-10-shaped data",
            "loader": "synthetic",
            "synthetic": True,
            "source": f"torch.Generator().manual_seed({SYNTHETIC_SEED}): pixels uniform in "
            "[0, 1], labels uniform in 0..9",
            "note": "CIFAR-10 is not available offline: timings are valid (same shapes), the "
            "data is not real",
        }
    raise ValueError(f"unknown dataset {dataset!r}")


def _images(dataset: str, data_dir: Optional[str], n: int) -> Tuple[Tensor, Tensor]:
    """The first ``n`` training images ``[n, c, h, w]`` (float32 in [0, 1]) and labels."""
    info = data_info(dataset, data_dir)
    if info["loader"] == "synthetic":
        g = torch.Generator().manual_seed(SYNTHETIC_SEED)
        return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    if info["loader"] == "cifar10":
        images, labels = _cifar10(str(info["source"]))
    elif info["loader"] == "fashion-mnist":
        images, labels = _fashion_mnist(str(info["source"]))
    else:
        images, labels = _mnist()
    if n > len(labels):
        raise ValueError(f"batch size {n} exceeds the {len(labels)} training examples")
    return images[:n], labels[:n]


# -- models ----------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """``x + conv2(relu(conv1(x)))`` with 3x3 convolutions, padding 1 (shape preserving)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """The block's output, shaped like ``x``."""
        return x + self.conv2(torch.relu(self.conv1(x)))


def _logreg() -> nn.Module:
    return nn.Linear(784, 10)


def _mlp(activation: Callable[[], nn.Module]) -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 1000),
        activation(),
        nn.Linear(1000, 500),
        activation(),
        nn.Linear(500, 100),
        activation(),
        nn.Linear(100, 10),
    )


def _2c2d() -> nn.Module:
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


def _3c3d() -> nn.Module:
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


def _sigmoid_cnn() -> nn.Module:
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


def _small_resnet() -> nn.Module:
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


# -- problems --------------------------------------------------------------------------------


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
        images, labels = _images(self.dataset, data_dir, n)
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
            _logreg,
            "mnist",
            (784,),
            500,
            "mnist_logreg",
        ),
        Problem(
            "mnist_mlp",
            "MLP 784-1000-500-100-10, ReLU, MNIST",
            functools.partial(_mlp, nn.ReLU),
            "mnist",
            (784,),
            128,
            "mnist_mlp",
        ),
        Problem(
            "mnist_mlp_sigmoid",
            "MLP 784-1000-500-100-10, sigmoid, MNIST",
            functools.partial(_mlp, nn.Sigmoid),
            "mnist",
            (784,),
            128,
        ),
        Problem(
            "fmnist_2c2d",
            "2c2d: conv32-conv64-fc1024-fc10, ReLU, Fashion-MNIST",
            _2c2d,
            "fashion-mnist",
            (1, 28, 28),
            128,
            "fmnist_2c2d",
        ),
        Problem(
            "cifar10_3c3d",
            "3c3d: conv64-conv96-conv128-fc512-fc256-fc10, ReLU, CIFAR-10 shape",
            _3c3d,
            "cifar10",
            (3, 32, 32),
            128,
            "cifar10_3c3d",
        ),
        Problem(
            "sigmoid_cnn",
            "CNN conv4-conv8-fc10, sigmoid, MNIST (the paper's CNN, scaled down)",
            _sigmoid_cnn,
            "mnist",
            (1, 28, 28),
            128,
        ),
        Problem(
            "small_resnet",
            "ResNet: conv4/2 + 2 residual blocks x + conv(relu(conv(x))) + fc10, MNIST",
            _small_resnet,
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
