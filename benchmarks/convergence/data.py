"""The datasets of the convergence benchmark: the bundled MNIST subset or Fashion-MNIST.

:func:`load_data` returns the train and test tensors (images flattened, on the CPU) of a
suite and a description of the dataset; the full suite falls back to the bundled subset,
and says so, when Fashion-MNIST is not in :data:`DEFAULT_FASHION_MNIST`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from benchmarks.common import FASHION_MNIST_DIR
from benchmarks.convergence.config import Suite
from curvgraph.datasets import load_dataset, load_mnist_subset

DEFAULT_FASHION_MNIST = FASHION_MNIST_DIR  # read at call time: tests point it elsewhere
_BUNDLED_INFO = {
    "name": "MNIST subset (bundled)",
    "source": "curvgraph/data/mnist-10k.npz",
    "key": "mnist-subset",
}


def load_data(suite: Suite, data_dir: Optional[str]) -> Tuple[Dict[str, Any], Tuple]:
    """Train and test tensors (CPU, images flattened) and a description of the dataset."""
    note = None
    if suite.dataset == "fashion-mnist":
        directory = Path(data_dir).expanduser() if data_dir else DEFAULT_FASHION_MNIST
        try:
            train = load_dataset("fashionmnist", "train", data_dir=directory)
            test = load_dataset("fashionmnist", "test", data_dir=directory)
            fashion = "fashion" in directory.name.lower() or data_dir is None
            key = "fashion-mnist" if fashion else "other"
            info = {
                "name": "Fashion-MNIST" if fashion else directory.name,
                "source": str(directory),
                "key": key,
            }
        except (FileNotFoundError, ImportError, ValueError) as err:
            if data_dir:  # the caller asked for this directory: do not hide the problem
                raise
            note = (
                f"Fashion-MNIST not found in {directory} ({err}); used the bundled MNIST "
                "subset instead"
            )
            train, test = load_mnist_subset("train"), load_mnist_subset("test")
            info = dict(_BUNDLED_INFO)
    else:
        train, test = load_mnist_subset("train"), load_mnist_subset("test")
        info = dict(_BUNDLED_INFO)
    x_train, y_train = train.tensors
    x_test, y_test = test.tensors
    if suite.max_train is not None:
        x_train, y_train = x_train[: suite.max_train], y_train[: suite.max_train]
    if suite.max_test is not None:
        x_test, y_test = x_test[: suite.max_test], y_test[: suite.max_test]
    x_train, x_test = x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)
    info.update(
        n_train=len(y_train),
        n_test=len(y_test),
        in_features=x_train.shape[1],
        classes=int(max(y_train.max(), y_test.max())) + 1,
        note=note,
    )
    return info, (x_train, y_train, x_test, y_test)
