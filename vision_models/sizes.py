"""Input-size rules: each model states which H and W it accepts, so a config can check before any trial."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SizeRule:
    """H and W must be multiples of ``multiple`` and at least ``minimum`` (a multiple itself)."""

    model: str  # how the message names the model, e.g. "unet_resnet50 (encoder_stop='layer3')"
    multiple: int
    minimum: int

    def valid_size(self, size: int) -> bool:
        """Whether one side length is accepted."""
        return size >= self.minimum and size % self.multiple == 0

    def nearest(self, size: int) -> int:
        """The valid side length closest to ``size`` (ties round up)."""
        return max(self.minimum, self.multiple * int(size / self.multiple + 0.5))

    def check(self, height: int, width: int) -> None:
        """Raise ValueError naming the nearest valid size unless both sides are valid."""
        if self.valid_size(height) and self.valid_size(width):
            return
        floor = f" (at least {self.minimum})" if self.minimum > self.multiple else ""
        raise ValueError(f"{self.model} needs H and W multiples of {self.multiple}{floor}; got {height}x{width}, "
                         f"nearest valid {self.nearest(height)}x{self.nearest(width)}")

    def check_input(self, images: torch.Tensor, in_channels: int) -> None:
        """Check a (B,C,H,W) batch: channel count and spatial size, before the model runs on it."""
        if images.dim() != 4 or images.shape[1] != in_channels:
            raise ValueError(f"{self.model} expects (B,{in_channels},H,W) inputs; got shape {tuple(images.shape)}")
        self.check(images.shape[2], images.shape[3])


def as_hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
    """A square side or an (H, W) pair as (H, W)."""
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)
