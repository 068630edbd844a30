"""Per-sample PIL transforms: joint image+mask ones for segmentation, per-image ones for classification.

Trials now run the batched path (batched.py, segmentation.py); these stay as its reference, which the
tests and benchmarks/data_throughput.py compare it with."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from .segmentation import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 (this path's users import them here)

JointTransform = Callable[[Image.Image, Image.Image], tuple]


def _uniform(low: float, high: float) -> float:
    # torch's RNG (not `random`) so DataLoader workers and torch.manual_seed make augmentation reproducible.
    return low + (high - low) * torch.rand(()).item()


class JointCompose:
    """Apply joint transforms in order."""

    def __init__(self, transforms: Sequence[JointTransform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image, mask):
        for transform in self.transforms:
            image, mask = transform(image, mask)
        return image, mask


class JointResize:
    """Resize both to (size, size): bilinear for the image, nearest for the mask so labels (and 255) survive."""

    def __init__(self, size: int) -> None:
        self.size = [size, size]

    def __call__(self, image: Image.Image, mask: Image.Image) -> tuple[Image.Image, Image.Image]:
        return (F.resize(image, self.size, InterpolationMode.BILINEAR),
                F.resize(mask, self.size, InterpolationMode.NEAREST))


class JointRandomScaleCrop:
    """Rescale the short side to size*s, s ~ U(scale), pad (mask with 255) and take a random size x size crop."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.5, 2.0)) -> None:
        self.size, self.scale = size, scale

    def __call__(self, image: Image.Image, mask: Image.Image) -> tuple[Image.Image, Image.Image]:
        short = max(1, round(self.size * _uniform(*self.scale)))
        image = F.resize(image, short, InterpolationMode.BILINEAR)
        mask = F.resize(mask, short, InterpolationMode.NEAREST)
        width, height = image.size
        pad_w, pad_h = max(self.size - width, 0), max(self.size - height, 0)
        if pad_w or pad_h:
            # Padded pixels are "ignore" in the mask, so the loss never learns that black borders are background.
            image = F.pad(image, [0, 0, pad_w, pad_h], fill=0)
            mask = F.pad(mask, [0, 0, pad_w, pad_h], fill=IGNORE_INDEX)
            width, height = image.size
        top = int(torch.randint(0, height - self.size + 1, ()).item())
        left = int(torch.randint(0, width - self.size + 1, ()).item())
        return (F.crop(image, top, left, self.size, self.size),
                F.crop(mask, top, left, self.size, self.size))


class JointRandomHFlip:
    """Flip image and mask together with probability p."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: Image.Image, mask: Image.Image) -> tuple[Image.Image, Image.Image]:
        if torch.rand(()).item() < self.p:
            return F.hflip(image), F.hflip(mask)
        return image, mask


class JointToTensor:
    """PIL pair -> (float (3,H,W), normalised unless mean is None; int64 (H,W) mask keeping 255)."""

    def __init__(self, mean: Sequence[float] | None = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean, self.std = mean, std

    def __call__(self, image: Image.Image, mask: Image.Image) -> tuple[Tensor, Tensor]:
        image_t = F.to_tensor(image)
        if self.mean is not None:
            image_t = F.normalize(image_t, list(self.mean), list(self.std))
        # np.array of a palette PNG gives the palette indices, i.e. the class labels.
        mask_t = torch.as_tensor(np.array(mask, dtype=np.uint8), dtype=torch.int64)
        return image_t, mask_t


def segmentation_transform(image_size: int, augment: bool, normalize: bool = True) -> JointCompose:
    """Train: random scale-crop + flip; val: plain resize. Then ImageNet-normalised (or [0,1])."""
    if augment:
        steps = [JointRandomScaleCrop(image_size), JointRandomHFlip(0.5)]
    else:
        steps = [JointResize(image_size)]
    return JointCompose([*steps, JointToTensor(IMAGENET_MEAN if normalize else None)])


def classification_transform(image_size: int, native_size: int, mean: Sequence[float] | None,
                             std: Sequence[float] | None, augment: bool, flip: bool) -> T.Compose:
    """PIL image -> float (C,H,W): resize, optional shift (+flip), [0,1] or mean/std normalised."""
    steps: list = [T.ToTensor()]
    if image_size != native_size:
        steps.append(T.Resize([image_size, image_size], InterpolationMode.BILINEAR, antialias=True))
    steps += tensor_augment(image_size, augment, flip)
    if mean is not None:
        steps.append(T.Normalize(list(mean), list(std)))
    return T.Compose(steps)


def tensor_augment(image_size: int, augment: bool, flip: bool) -> list:
    """Random shift by a few pixels (zero padding = black, before normalising) and optionally a flip."""
    if not augment:
        return []
    # 4 px at 32 px, as in the usual CIFAR recipe; digits get the same relative shift.
    steps: list = [T.RandomCrop(image_size, padding=max(1, image_size // 8))]
    if flip:
        steps.append(T.RandomHorizontalFlip())
    return steps
