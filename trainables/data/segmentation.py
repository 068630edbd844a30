"""VOC-format segmentation read from its decoded cache, with the joint scale / crop / flip done per batch.

Train: the short side rescaled to size * s, s ~ U(0.5, 2), a random size x size crop (padded with black and
mask 255 where the scaled image is smaller), a flip with p = 1/2; val: a plain resize. Only the source region
a crop needs is resized (bilinear with antialiasing for images, nearest for masks, so labels and 255 survive),
on the trial's device; on a CPU it runs in the loader's workers. All random draws of an epoch come from the
loader's generator (reseeded per epoch by the loop), so they do not depend on the number of workers.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .decoded import DecodedArrays

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255

SCALE = (0.5, 2.0)


class Crop(NamedTuple):
    """A source region and where it lands: resized to (valid_h, valid_w) at the crop's top-left corner."""

    image: Tensor  # uint8 (3,h,w): the source region, resized by ``finish``
    mask: Tensor  # uint8 (valid_h,valid_w): already resized (nearest needs only a gather)
    valid_h: int
    valid_w: int
    flip: bool


def scale_crop_window(height: int, width: int, size: int, scale: float, top_u: float,
                      left_u: float) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """Source box (y0, y1, x0, x1) and landed size of a size x size crop of the image rescaled so its short side
    is round(size * scale), the crop's offsets at fractions top_u, left_u in [0, 1) of their range."""
    short = max(1, round(size * scale))
    if height <= width:  # torchvision's rule for resizing the short side: the long one is truncated
        new_h, new_w = short, max(1, int(short * width / height))
    else:
        new_h, new_w = max(1, int(short * height / width)), short
    top = min(int(top_u * (max(new_h, size) - size + 1)), max(new_h, size) - size)
    left = min(int(left_u * (max(new_w, size) - size + 1)), max(new_w, size) - size)
    valid_h, valid_w = min(size, new_h - top), min(size, new_w - left)
    fy, fx = height / new_h, width / new_w
    y0, x0 = min(int(top * fy), height - 1), min(int(left * fx), width - 1)
    y1 = max(y0 + 1, min(height, math.ceil((top + valid_h) * fy)))
    x1 = max(x0 + 1, min(width, math.ceil((left + valid_w) * fx)))
    return (y0, y1, x0, x1), (valid_h, valid_w)


def _resize(region: Tensor, size: tuple[int, int]) -> Tensor:
    """uint8 (1,3,h,w) -> uint8 (1,3,H,W), bilinear with antialiasing (as PIL's): the CPU has a uint8 kernel
    (3x its float one), CUDA goes through float."""
    if tuple(region.shape[-2:]) == size:
        return region
    mode = {"mode": "bilinear", "align_corners": False, "antialias": True}
    if region.device.type == "cpu":
        return F.interpolate(region, size=size, **mode)
    return F.interpolate(region.float(), size=size, **mode).round_().clamp_(0, 255).to(torch.uint8)


def nearest_rows(start: int, stop: int, count: int) -> np.ndarray:
    """Source rows (or columns) of ``count`` outputs resampling [start, stop) by nearest pixel centre, as PIL's
    NEAREST and torch's nearest-exact do: labels and 255 are copied, never blended."""
    return np.minimum(start + ((np.arange(count) + 0.5) * ((stop - start) / count)).astype(np.int64), stop - 1)


def finish(crops: Sequence[Crop], size: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """(images uint8 (B,3,S,S), masks uint8 (B,S,S), 255 = ignore) of the crops, resized and flipped on ``device``."""
    images = torch.zeros(len(crops), 3, size, size, dtype=torch.uint8, device=device)
    masks = torch.full((len(crops), size, size), IGNORE_INDEX, dtype=torch.uint8, device=device)
    for b, crop in enumerate(crops):
        landed = (crop.valid_h, crop.valid_w)
        image = _resize(crop.image.to(device, non_blocking=True).unsqueeze(0), landed)[0]
        mask = crop.mask.to(device, non_blocking=True)
        # a flip mirrors the whole canvas, padding included, as the per-sample flip after the crop did
        cols = slice(size - crop.valid_w, size) if crop.flip else slice(0, crop.valid_w)
        images[b, :, :crop.valid_h, cols] = image.flip(-1) if crop.flip else image
        masks[b, :crop.valid_h, cols] = mask.flip(-1) if crop.flip else mask
    return images, masks


@functools.lru_cache(maxsize=8)
def _imagenet_stats(device: torch.device) -> tuple[Tensor, Tensor]:
    # made once per device: a tensor built from a list per batch is a blocking copy to a GPU
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    return mean, 1 / (torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255)


def normalise(images: Tensor, normalize: bool = True) -> Tensor:
    """uint8 (B,3,H,W) -> float, ImageNet-normalised (or [0, 1])."""
    if not normalize:
        return images.float().div_(255)
    mean, scale = _imagenet_stats(images.device)
    # (x / 255 - mean) / std as float, then two in-place passes; mixing uint8 and float in one op is 5x slower
    return images.float().sub_(mean).mul_(scale)


class SegmentationSet(Dataset):
    """A VOC-format split from its decoded arrays; ``images``/``masks`` keep the source paths.

    Items (artifacts, tests) are (image float (3,S,S), mask int64 (S,S)) as before, augmented from torch's
    global RNG; loaders ask for whole batches of crops through ``__getitems__``.
    """

    def __init__(self, arrays: DecodedArrays, images: Sequence[str], masks: Sequence[str], image_size: int,
                 augment: bool, normalize: bool = True) -> None:
        self.arrays, self.images, self.masks = arrays, list(images), list(masks)
        self.image_size, self.augment, self.normalize = image_size, augment, normalize

    def __len__(self) -> int:
        return len(self.arrays)

    def draw(self, count: int, generator: torch.Generator | None = None) -> list[tuple]:
        """Per sample (scale, top_u, left_u, flip); () for val, which is a plain resize."""
        if not self.augment:
            return [()] * count
        values = torch.rand(count, 4, generator=generator, dtype=torch.float64)
        values[:, 0] = SCALE[0] + (SCALE[1] - SCALE[0]) * values[:, 0]
        return [(s, t, l, f < 0.5) for s, t, l, f in values.tolist()]

    def crop(self, index: int, draw: tuple) -> Crop:
        image, mask = self.arrays.sample(index)  # (H,W,3), (H,W) memory-map views
        if draw:
            (y0, y1, x0, x1), (valid_h, valid_w) = scale_crop_window(*mask.shape, self.image_size, *draw[:3])
        else:
            (y0, y1, x0, x1), (valid_h, valid_w) = (0, mask.shape[0], 0, mask.shape[1]), (self.image_size,) * 2
        # copies (np.array, take): a tensor must not alias the read-only map
        region = torch.from_numpy(np.array(image[y0:y1, x0:x1])).permute(2, 0, 1)  # (3,h,w) channels-last
        landed = mask.take(nearest_rows(y0, y1, valid_h), axis=0).take(nearest_rows(x0, x1, valid_w), axis=1)
        return Crop(region, torch.from_numpy(landed), valid_h, valid_w, bool(draw[3]) if draw else False)

    def __getitems__(self, keys: Sequence[tuple]) -> list[Crop]:
        return [self.crop(index, draw) for index, draw in keys]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        images, masks = finish([self.crop(index, self.draw(1)[0])], self.image_size)
        return normalise(images, self.normalize)[0].contiguous(), masks[0].long()


class _Batches:
    """Batch sampler: each epoch's order and draws, taken up front from the owner's generator."""

    def __init__(self, owner: "SegmentationBatches") -> None:
        self.owner = owner

    def __len__(self) -> int:
        return len(self.owner)

    def __iter__(self):
        owner = self.owner
        order = owner.indices[torch.randperm(len(owner.indices), generator=owner.generator)] if owner.shuffle \
            else owner.indices
        keys = list(zip(order.tolist(), owner.data.draw(len(order), owner.generator)))
        for start in range(0, len(self) * owner.batch_size, owner.batch_size):
            yield keys[start:start + owner.batch_size]


class _Collate:
    """On a CPU trial the crops are finished in the worker; for a GPU they go over as they are."""

    def __init__(self, size: int, on_cpu: bool) -> None:
        self.size, self.on_cpu = size, on_cpu

    def __call__(self, crops: list[Crop]):
        return finish(crops, self.size) if self.on_cpu else crops


class SegmentationBatches:
    """Batches (images float (B,3,S,S) on the device, masks int64 (B,S,S)) of a ``SegmentationSet``."""

    def __init__(self, data: SegmentationSet, batch_size: int, *, shuffle: bool, device: torch.device,
                 workers: int = 0, drop_last: bool = False, indices: Sequence[int] | None = None) -> None:
        self.data, self.batch_size, self.shuffle, self.drop_last = data, batch_size, shuffle, drop_last
        self.device = torch.device(device)
        self.indices = torch.as_tensor(list(indices) if indices is not None else range(len(data)), dtype=torch.long)
        self.generator = torch.Generator()
        on_cpu = self.device.type == "cpu"
        # the loader's own generator: its per-epoch worker seed must not consume the global RNG
        self.loader = DataLoader(data, batch_sampler=_Batches(self), num_workers=workers,
                                 persistent_workers=workers > 0, pin_memory=not on_cpu,
                                 collate_fn=_Collate(data.image_size, on_cpu), generator=torch.Generator())

    def __len__(self) -> int:
        full, rest = divmod(len(self.indices), self.batch_size)
        return full + (rest > 0 and not self.drop_last)

    def __iter__(self):
        for batch in self.loader:
            images, masks = batch if self.device.type == "cpu" else finish(batch, self.data.image_size, self.device)
            images = images.to(self.device, non_blocking=True)
            yield normalise(images, self.data.normalize), masks.to(self.device, non_blocking=True).long()
