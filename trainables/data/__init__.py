"""Every data set behind one entry point: `build_dataset(name, split, root, image_size, ...)`.

Classification (and VAE) items are (image float (C,H,W), label int); segmentation items are
(image float (3,H,W) ImageNet-normalised, mask int64 (H,W) with 255 = ignore).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch.utils.data import Dataset

from .checks import class_frequencies
from .classification import build_cifar10, build_embedded, build_mnist
from .errors import BadDataError
from .shapes import generate_shapes
from .voc import VOC_CLASSES, build_voc

__all__ = ["DATASETS", "BadDataError", "DatasetInfo", "build_dataset", "class_frequencies", "dataset_info"]


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a data set before seeing it."""

    task: Literal["classification", "segmentation"]
    num_classes: int
    in_channels: int
    class_names: tuple[str, ...]
    native_size: int  # side the images are stored at; VOC's vary (~500x375), so its entry is the report's 256


_DIGIT_NAMES = tuple(str(digit) for digit in range(10))
_CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_INFOS = {
    "cifar10": DatasetInfo("classification", 10, 3, _CIFAR10_NAMES, 32),
    "mnist": DatasetInfo("classification", 10, 1, _DIGIT_NAMES, 28),
    "digits": DatasetInfo("classification", 10, 1, _DIGIT_NAMES, 8),
    "mnist5k": DatasetInfo("classification", 10, 1, _DIGIT_NAMES, 28),
    "voc": DatasetInfo("segmentation", 21, 3, VOC_CLASSES, 256),
    "shapes": DatasetInfo("segmentation", 21, 3, VOC_CLASSES, 96),
}
DATASETS: tuple[str, ...] = tuple(_INFOS)
SPLITS = ("train", "val")


def dataset_info(name: str) -> DatasetInfo:
    """Task, classes, channels and native size of a named data set."""
    if name not in _INFOS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return _INFOS[name]


def build_dataset(name: str, split: str, root: str | Path, image_size: int, *, download: bool = False,
                  normalize: bool = True, train_split: str = "trainval", augment: bool | None = None,
                  seed: int = 0) -> Dataset:
    """The named data set's split, resized to image_size; `root` holds real data or embedded sets' caches."""
    dataset_info(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1; got {image_size}")
    root = Path(root).expanduser().absolute()  # trials run in Ray's temp folder: never rely on the cwd
    augment = split == "train" if augment is None else augment
    if name == "cifar10":
        return build_cifar10(root, split, image_size, download=download, normalize=normalize, augment=augment)
    if name == "mnist":
        return build_mnist(root, split, image_size, download=download, normalize=normalize, augment=augment)
    if name in ("digits", "mnist5k"):
        return build_embedded(name, split, image_size, normalize=normalize, augment=augment)
    if name == "shapes":
        # `seed` picks the generated scenes; the split itself never depends on it.
        root = generate_shapes(root, seed)
    return build_voc(root, split, image_size, download=download and name == "voc", train_split=train_split,
                     augment=augment, normalize=normalize, name=name)
