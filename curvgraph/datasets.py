"""Datasets: the bundled MNIST subset, an IDX-file reader and a torchvision bridge.

Every loader returns a :class:`torch.utils.data.TensorDataset` of ``(images, labels)`` with
float32 images of shape ``[n, channels, height, width]`` scaled to ``[0, 1]`` (what
``torchvision.transforms.ToTensor`` produces) and int64 labels of shape ``[n]``. Tensors are on
the CPU; :func:`batches` moves mini-batches to a device. Nothing is downloaded unless a caller
passes ``download=True`` to :func:`load_torchvision` or :func:`load_dataset`.

Example:
    >>> from curvgraph.datasets import batches, load_dataset
    >>> train = load_dataset("mnist", "train")  # bundled, offline: 8,000 digits
    >>> for x, y in batches(train, 500, seed=0):
    ...     pass
"""

from __future__ import annotations

import functools
import gzip
import inspect
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

__all__ = ["MNIST_MEAN", "MNIST_STD", "SPLIT_SEED", "batches", "load_dataset", "load_idx"]
__all__ += ["load_mnist_subset", "load_torchvision"]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # pixel mean and standard deviation of MNIST
SPLIT_SEED = 0  # numpy.random.default_rng(SPLIT_SEED).permutation(10000) fixes the split
_N_TRAIN = 8000
_BUNDLED = Path(__file__).resolve().parent / "data" / "mnist-10k.npz"
_SPLITS = ("train", "test")
# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/, "IDX format")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _to_dataset(images, labels) -> TensorDataset:
    """Uint8 images ``[n, h, w]`` or ``[n, h, w, c]`` -> float32 ``[n, c, h, w]`` in [0, 1]."""
    x = torch.as_tensor(np.asarray(images))
    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif x.ndim == 4:
        x = x.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"expected images [n, h, w] or [n, h, w, c], got {tuple(x.shape)}")
    x = x.contiguous().to(torch.float32) / (255.0 if x.dtype == torch.uint8 else 1.0)
    y = torch.as_tensor(np.asarray(labels)).to(torch.int64).reshape(-1)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    return TensorDataset(x, y)


def load_mnist_subset(
    split: str = "train", *, root: str | Path | None = None, normalize: bool = False
) -> TensorDataset:
    """The bundled 10,000-digit MNIST subset, split 8,000 train / 2,000 test.

    The file stores the digits ordered by label, so they are shuffled with a fixed permutation,
    ``numpy.random.default_rng(SPLIT_SEED).permutation(10000)`` (``SPLIT_SEED = 0``), that does
    not depend on torch's global random state: its first 8,000 indices are the training split,
    the last 2,000 the test split. Both splits contain all ten classes in roughly equal numbers.

    Args:
        split: ``"train"`` (8,000 digits) or ``"test"`` (2,000 digits).
        root: Directory holding ``mnist-10k.npz``, or the ``.npz`` file itself. Default: the
            copy bundled with curvgraph (``curvgraph/data/mnist-10k.npz``).
        normalize: If True, standardize with the MNIST mean and standard deviation
            (``(x - 0.1307) / 0.3081``) instead of leaving pixels in ``[0, 1]``.

    Returns:
        ``TensorDataset`` of float32 images ``[n, 1, 28, 28]`` and int64 labels ``[n]``.

    Raises:
        ValueError: For an unknown ``split`` or a file without ``images``/``labels`` arrays.
        FileNotFoundError: If ``root`` holds no ``mnist-10k.npz``.
    """
    _check_split(split)
    path = _BUNDLED if root is None else Path(root).expanduser()
    if path.is_dir():
        path = path / "mnist-10k.npz"
    if not path.is_file():
        raise FileNotFoundError(f"MNIST subset not found: {path}")
    with np.load(path) as data:
        if "images" not in data or "labels" not in data:
            raise ValueError(f"{path}: expected arrays 'images' and 'labels', found {data.files}")
        images, labels = data["images"], data["labels"]
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    order = order[:_N_TRAIN] if split == "train" else order[_N_TRAIN:]
    dataset = _to_dataset(images[order], labels[order])
    if normalize:
        dataset.tensors[0].sub_(MNIST_MEAN).div_(MNIST_STD)
    return dataset


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse one IDX file (optionally gzipped) and check it has ``ndim`` dimensions."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # gzip raises these on corrupt or truncated archives
        raise ValueError(f"cannot read IDX file {path}: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file: bad magic number {raw[:4].hex() or 'empty'}")
    code, file_ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX data type code 0x{code:02x}")
    if file_ndim != ndim:
        raise ValueError(f"{path}: expected a {ndim}-dimensional IDX file, header says {file_ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path}: header promises shape {shape} ({expected} bytes) but the file has "
            f"{len(raw)} bytes; the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).copy()  # writable


def _find_idx(directory: Path, split: str, kind: str) -> Path | None:
    """Locate e.g. ``train-images-idx3-ubyte[.gz]`` (also ``train-images.idx3-ubyte``)."""
    prefix = "train" if split == "train" else "t10k"
    suffix = "images-idx3-ubyte" if kind == "images" else "labels-idx1-ubyte"
    for name in (f"{prefix}-{suffix}", f"{prefix}-{suffix.replace('-', '.', 1)}"):
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def load_idx(directory: str | Path, split: str = "train") -> TensorDataset:
    """Read an MNIST-style dataset stored as IDX files (gzipped or not).

    Expects ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte`` (training split) or
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (test split), each optionally with a
    ``.gz`` suffix, as distributed for MNIST, Fashion-MNIST and KMNIST. The IDX header (magic
    number: two zero bytes, a type code, the number of dimensions, then one big-endian uint32
    per dimension) is parsed and checked against the file size.

    Args:
        directory: Directory containing the IDX files.
        split: ``"train"`` or ``"test"``.

    Returns:
        ``TensorDataset`` of float32 images ``[n, 1, h, w]`` in ``[0, 1]``, int64 labels ``[n]``.

    Raises:
        FileNotFoundError: If a file is missing (the message lists the names looked for).
        ValueError: If a file is not a valid IDX file, is truncated, or images and labels
            disagree in number; the message names the file.
    """
    _check_split(split)
    directory = Path(directory).expanduser()
    arrays = []
    for kind, ndim in (("images", 3), ("labels", 1)):
        path = _find_idx(directory, split, kind)
        if path is None:
            prefix = "train" if split == "train" else "t10k"
            name = f"{prefix}-{kind}-idx{ndim}-ubyte"
            raise FileNotFoundError(f"no {name} or {name}.gz in {directory}")
        arrays.append((path, _read_idx(path, ndim)))
    (image_path, images), (label_path, labels) = arrays
    if len(images) != len(labels):
        raise ValueError(
            f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels"
        )
    return _to_dataset(images, labels)


def load_torchvision(
    name: str, root: str | Path, split: str = "train", download: bool = False
) -> TensorDataset:
    """Load a ``torchvision.datasets`` image-classification dataset as tensors.

    Images are converted as ``torchvision.transforms.ToTensor`` would (float32, channels
    first, ``[0, 1]``), for the whole dataset at once.

    Args:
        name: Class name in ``torchvision.datasets``, case-insensitive: ``"MNIST"``,
            ``"FashionMNIST"``, ``"KMNIST"``, ``"CIFAR10"``, ``"CIFAR100"``, ``"SVHN"``, ...
        root: torchvision's ``root`` directory.
        split: ``"train"`` or ``"test"``.
        download: Let torchvision download missing files (needs internet access).

    Returns:
        ``TensorDataset`` of float32 images ``[n, c, h, w]`` and int64 labels ``[n]``.

    Raises:
        ImportError: If torchvision is not installed.
        ValueError: If ``name`` is not a torchvision dataset class.
        FileNotFoundError: If ``download=False`` and the files are not under ``root``.
    """
    _check_split(split)
    try:
        import torchvision.datasets as tvd
    except ImportError as err:
        raise ImportError("load_torchvision needs torchvision: pip install torchvision") from err
    classes = {k.lower(): getattr(tvd, k) for k in dir(tvd) if inspect.isclass(getattr(tvd, k))}
    cls = classes.get(name.lower().replace("-", "").replace("_", ""))
    if cls is None:
        raise ValueError(f"torchvision.datasets has no dataset {name!r}")
    root = Path(root).expanduser()
    params = inspect.signature(cls).parameters
    kwargs = {"train": split == "train"} if "train" in params else {"split": split}
    try:
        ds = cls(root=str(root), download=download, **kwargs)
    except RuntimeError as err:
        if download:
            raise
        folder = getattr(cls, "base_folder", None) or (
            f"{cls.__name__}/raw" if issubclass(cls, tvd.MNIST) else cls.__name__
        )
        raise FileNotFoundError(
            f"torchvision {cls.__name__} ({split}) not found: looked in {root / folder} "
            f"({err}). Pass download=True to fetch it (needs internet access), point root at "
            "a directory that holds it, or use load_idx on a directory of IDX files"
        ) from err
    images = getattr(ds, "data", None)
    labels = getattr(ds, "targets", None)
    if (
        images is not None
        and labels is not None
        and (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3))
    ):
        return _to_dataset(images, labels)  # MNIST family [n, h, w]; CIFAR [n, h, w, c]
    from torchvision.transforms.functional import to_tensor  # other layouts: item by item

    items = [(to_tensor(img), int(lab)) for img, lab in ds]
    xs, ys = torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])
    return TensorDataset(xs, ys)


def load_dataset(
    name: str = "mnist",
    split: str = "train",
    *,
    data_dir: str | Path | None = None,
    download: bool = False,
) -> TensorDataset:
    """One entry point for all datasets.

    - ``data_dir=None`` and ``name="mnist"``: the bundled subset (:func:`load_mnist_subset`).
    - ``data_dir`` holding ``mnist-10k.npz``: that file (:func:`load_mnist_subset`).
    - ``data_dir`` holding IDX files for ``split``: :func:`load_idx` (``name`` is not used).
    - otherwise: :func:`load_torchvision` with ``root=data_dir``.

    Args:
        name: Dataset name (``"mnist"``, ``"fashionmnist"``, ``"cifar10"``, ...).
        split: ``"train"`` or ``"test"``.
        data_dir: Directory of IDX files or torchvision root; None for the bundled subset.
        download: Passed to torchvision; downloading needs internet access.

    Returns:
        ``TensorDataset`` of float32 images ``[n, c, h, w]`` in ``[0, 1]``, int64 labels.

    Raises:
        ValueError: If ``data_dir`` is None and ``name`` is not ``"mnist"`` (the bundled one).
    """
    _check_split(split)
    if data_dir is None:
        if name.lower() in ("mnist", "mnist-10k", "mnist_subset"):
            return load_mnist_subset(split)
        raise ValueError(f"only 'mnist' is bundled; pass data_dir to load {name!r}")
    directory = Path(data_dir).expanduser()
    if (directory / "mnist-10k.npz").is_file():
        return load_mnist_subset(split, root=directory)
    if directory.is_dir() and _find_idx(directory, split, "images") is not None:
        return load_idx(directory, split)
    return load_torchvision(name, directory, split, download=download)


def _to_device(batch: tuple[torch.Tensor, ...], device) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device) for t in batch)


def batches(
    dataset: TensorDataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    device: torch.device | str | None = None,
    drop_last: bool = True,
) -> DataLoader:
    """Mini-batches of a ``TensorDataset``, moved to ``device``.

    Returns a ``DataLoader`` with the batches, in the same order, of ``DataLoader(dataset,
    batch_size, shuffle=shuffle, drop_last=drop_last, generator=torch.Generator().manual_seed(
    seed))`` (never torch's global RNG), each gathered by one indexing operation.

    Args:
        dataset: The dataset (e.g. from :func:`load_dataset`).
        batch_size: Samples per batch.
        shuffle: Draw a new random order every epoch.
        seed: Seed of the shuffling generator.
        device: Where batches go (default: stay on the CPU).
        drop_last: Drop a last, incomplete batch.

    Returns:
        A ``DataLoader`` of ``(images, labels)`` batches, iterated once per epoch.

    Raises:
        TypeError: If ``dataset`` is not a ``TensorDataset``.
    """
    if not isinstance(dataset, TensorDataset):
        raise TypeError("batches() takes a TensorDataset; use torch.utils.data.DataLoader")
    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(dataset, generator=generator) if shuffle else range(len(dataset))
    index_batches = BatchSampler(sampler, batch_size, drop_last)  # validates batch_size
    to_device = functools.partial(_to_device, device=device)
    return DataLoader(
        dataset, batch_size=None, sampler=index_batches, generator=generator, collate_fn=to_device
    )
