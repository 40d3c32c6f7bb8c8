"""Tests for curvgraph.datasets: bundled MNIST subset, IDX reader, torchvision bridge, batches."""

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from curvgraph.datasets import (
    MNIST_MEAN,
    MNIST_STD,
    batches,
    load_dataset,
    load_idx,
    load_mnist_subset,
    load_torchvision,
)

FASHION_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion-mnist"
needs_fashion = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST absent"
)


def write_idx(path: Path, array: np.ndarray, *, truncate: int = 0) -> Path:
    """Write ``array`` (uint8) as an IDX file, gzipped if ``path`` ends in .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    raw = header + np.ascontiguousarray(array, np.uint8).tobytes()
    raw = raw[: len(raw) - truncate]
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open if path.suffix == ".gz" else open)(path, "wb") as f:
        f.write(raw)
    return path


def write_mnist_like(directory: Path, n_train=12, n_test=5, suffix="", seed=0):
    """A tiny MNIST-style dataset as four IDX files; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        arrays[prefix] = (images, labels)
    return arrays


def check_form(ds, n, shape=(1, 28, 28)):
    x, y = ds.tensors
    assert isinstance(ds, TensorDataset) and len(ds) == n
    assert x.shape == (n, *shape) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0.5
    assert y.min() >= 0 and y.max() <= 9


def digests(ds):
    return {hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in ds.tensors[0]}


# --- bundled subset -------------------------------------------------------------------------


@pytest.mark.parametrize(("split", "n"), [("train", 8000), ("test", 2000)])
def test_bundled_subset_form(split, n):
    check_form(load_mnist_subset(split), n)


def test_bundled_split_deterministic_and_independent_of_torch_rng():
    torch.manual_seed(123)
    a = load_mnist_subset("train")
    torch.manual_seed(456)
    torch.rand(1000)
    b = load_mnist_subset("train")
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])


def test_bundled_split_disjoint_and_complete():
    train, test = digests(load_mnist_subset("train")), digests(load_mnist_subset("test"))
    assert len(train) == 8000 and len(test) == 2000  # the 10,000 digits are all distinct
    assert not train & test


@pytest.mark.parametrize("split", ["train", "test"])
def test_bundled_split_balanced(split):
    labels = load_mnist_subset(split).tensors[1]
    counts = torch.bincount(labels, minlength=10)
    assert (counts > 0).all()
    expected = len(labels) / 10
    assert counts.min() >= 0.6 * expected and counts.max() <= 1.4 * expected, counts
    # not ordered by label any more (the file is)
    assert (labels[1:] != labels[:-1]).float().mean() > 0.8


def test_bundled_normalize():
    x = load_mnist_subset("train", normalize=True).tensors[0]
    plain = load_mnist_subset("train").tensors[0]
    torch.testing.assert_close(x, (plain - MNIST_MEAN) / MNIST_STD)
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1.0) < 0.1


def test_bundled_root_and_errors(tmp_path):
    bundled = Path(__file__).resolve().parents[1] / "curvgraph" / "data" / "mnist-10k.npz"
    ds = load_mnist_subset("test", root=bundled.parent)
    assert torch.equal(ds.tensors[1], load_mnist_subset("test").tensors[1])
    with pytest.raises(FileNotFoundError, match="mnist-10k.npz"):
        load_mnist_subset("train", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_mnist_subset("validation")


# --- IDX files ------------------------------------------------------------------------------


@needs_fashion
@pytest.mark.parametrize(("split", "n"), [("train", 60000), ("test", 10000)])
def test_load_idx_fashion_mnist(split, n):
    ds = load_idx(FASHION_DIR, split)
    check_form(ds, n)
    assert (torch.bincount(ds.tensors[1], minlength=10) == n // 10).all()


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_load_idx_roundtrip(tmp_path, suffix):
    arrays = write_mnist_like(tmp_path, suffix=suffix)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = arrays[prefix]
        ds = load_idx(tmp_path, split)
        torch.testing.assert_close(ds.tensors[0], torch.from_numpy(images[:, None] / 255.0).float())
        assert ds.tensors[1].tolist() == labels.tolist()


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_load_idx_truncated(tmp_path, suffix):
    write_mnist_like(tmp_path, suffix=suffix)
    images = np.zeros((12, 28, 28), np.uint8)
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, truncate=100)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*truncated"):
        load_idx(tmp_path, "train")


def test_load_idx_corrupt_files(tmp_path):
    write_mnist_like(tmp_path)
    target = tmp_path / "train-labels-idx1-ubyte"
    target.write_bytes(b"\x08\x03" + target.read_bytes()[2:])  # bad magic
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.*magic"):
        load_idx(tmp_path, "train")
    write_idx(target, np.zeros((12, 2), np.uint8))  # wrong number of dimensions
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.*1-dimensional"):
        load_idx(tmp_path, "train")
    write_idx(target, np.zeros(11, np.uint8))  # 12 images, 11 labels
    with pytest.raises(ValueError, match="12 images"):
        load_idx(tmp_path, "train")
    target.write_bytes(b"")
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte"):
        load_idx(tmp_path, "train")


def test_load_idx_broken_gzip(tmp_path):
    write_mnist_like(tmp_path, suffix=".gz")
    target = tmp_path / "t10k-images-idx3-ubyte.gz"
    target.write_bytes(target.read_bytes()[:-50])  # truncated archive
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        load_idx(tmp_path, "test")
    target.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        load_idx(tmp_path, "test")


def test_load_idx_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte.*" + tmp_path.name):
        load_idx(tmp_path, "test")


# --- torchvision bridge and the entry point -------------------------------------------------


def test_torchvision_missing_files_clear_error(tmp_path):
    pytest.importorskip("torchvision")
    with pytest.raises(FileNotFoundError) as info:
        load_torchvision("FashionMNIST", tmp_path, "train")
    message = str(info.value)
    assert str(tmp_path / "FashionMNIST" / "raw") in message
    assert "download=True" in message and "internet" in message
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


def test_torchvision_bridge_matches_to_tensor(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    arrays = write_mnist_like(tmp_path / "MNIST" / "raw")  # torchvision's raw layout
    ds = load_torchvision("mnist", tmp_path, "test")
    check_form(ds, 5)
    reference = torchvision.datasets.MNIST(
        tmp_path, train=False, transform=torchvision.transforms.ToTensor()
    )
    for i in range(5):
        image, label = reference[i]
        assert torch.equal(ds.tensors[0][i], image) and ds.tensors[1][i].item() == label
    assert ds.tensors[1].tolist() == arrays["t10k"][1].tolist()
    with pytest.raises(ValueError, match="no dataset"):
        load_torchvision("NoSuchSet", tmp_path)


def test_load_dataset_dispatch(tmp_path):
    bundled = load_dataset()
    assert torch.equal(bundled.tensors[1], load_mnist_subset("train").tensors[1])
    arrays = write_mnist_like(tmp_path / "idx", suffix=".gz")
    ds = load_dataset("fashionmnist", "test", data_dir=tmp_path / "idx")
    assert ds.tensors[1].tolist() == arrays["t10k"][1].tolist()
    with pytest.raises(ValueError, match="bundled"):
        load_dataset("cifar10")


# --- batches --------------------------------------------------------------------------------


def test_batches_match_seeded_dataloader():
    train = load_mnist_subset("train")
    loader = batches(train, 500, seed=0)
    reference = DataLoader(train, 500, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert len(loader) == 16
    torch.manual_seed(1)  # the global RNG plays no part
    ours = [y for _ in range(2) for _, y in loader]
    torch.manual_seed(2)
    theirs = [y for _ in range(2) for _, y in reference]
    assert len(ours) == 32 and len(theirs) == 32
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert not torch.equal(ours[0], ours[16])  # a new order each epoch
    x, y = next(iter(loader))
    assert x.shape == (500, 1, 28, 28) and y.shape == (500,)


def test_batches_options():
    ds = TensorDataset(torch.arange(10.0), torch.arange(10))
    assert [len(y) for _, y in batches(ds, 4, shuffle=False, drop_last=False)] == [4, 4, 2]
    assert [y.tolist() for _, y in batches(ds, 4, shuffle=False, device="cpu")] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
    ]
    with pytest.raises(TypeError, match="TensorDataset"):
        batches([1, 2, 3], 2)
