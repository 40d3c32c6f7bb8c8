"""Data of the benchmark problems (:mod:`benchmarks.problems`): datasets and their first images.

- ``mnist``: the bundled MNIST subset (:func:`curvgraph.datasets.load_mnist_subset`, training
  split).
- ``fashion-mnist``: IDX files (:func:`curvgraph.datasets.load_idx`) in ``data_dir`` (default
  ``<workspace>/shared/data/fashion-mnist``), falling back to the MNIST subset when absent.
- ``cifar10``: a torchvision root holding ``cifar-10-batches-py`` when one is found, else a
  synthetic batch of the same shape (uniform pixels in [0, 1], uniform labels, seeded with
  :data:`SYNTHETIC_SEED`).

:func:`data_info` says which of these a dataset resolves to (``dataset`` names the data
actually used), :func:`training_images` returns its first ``n`` training examples; the
loaded datasets are cached per process.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from benchmarks.common import DATA_ROOT, FASHION_MNIST_DIR
from curvgraph.datasets import load_idx, load_mnist_subset

__all__ = ["SYNTHETIC_SEED", "data_info", "idx_train_images", "training_images"]

SYNTHETIC_SEED = 1234  # generator seed of the synthetic CIFAR-10-shaped batch


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


def training_images(dataset: str, data_dir: Optional[str], n: int) -> Tuple[Tensor, Tensor]:
    """The first ``n`` training images ``[n, c, h, w]`` (float32 in [0, 1]) and labels.

    Args:
        dataset: ``"mnist" | "fashion-mnist" | "cifar10"`` (see :func:`data_info`).
        data_dir: Where to look for the datasets that are not bundled (None: the shared data).
        n: How many examples.

    Returns:
        ``(images, labels)``, the labels int64.
    """
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
