"""CIFAR-style ResNets: torchvision's BasicBlock/Bottleneck stages behind a 3x3 stem without max-pool."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from vision_models.sizes import SizeRule

# name -> (block, blocks per stage), as torchvision's resnet18/34/50
DEPTHS = {"resnet18": (BasicBlock, (2, 2, 2, 2)),
          "resnet34": (BasicBlock, (3, 4, 6, 3)),
          "resnet50": (Bottleneck, (3, 4, 6, 3))}


def size_rule(name: str = "resnet18", **_builder_kwargs) -> SizeRule:
    """Three stride-2 stages: sides must be multiples of 8."""
    return SizeRule(name, multiple=8, minimum=8)


class CifarResNet(ResNet):
    """torchvision's ResNet with the 32x32 stem: a 3x3 stride-1 conv and no max-pool (overall stride 8)."""

    TAPS = {"logits": "fc"}

    def __init__(self, name: str, num_classes: int = 10, in_channels: int = 3) -> None:
        block, layers = DEPTHS[name]
        super().__init__(block, list(layers), num_classes=num_classes)
        self.in_channels = in_channels
        self.size_rule = size_rule(name)
        # A 7x7/2 conv and a max-pool would shrink 32x32 images to 8x8 before the first residual stage.
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.maxpool = nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B,C,H,W) -> logits (B,num_classes)."""
        self.size_rule.check_input(images, self.in_channels)
        return super().forward(images)


def resnet18(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet18 (BasicBlock, 2-2-2-2) for 32x32 images."""
    return CifarResNet("resnet18", num_classes, in_channels)


def resnet34(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet34 (BasicBlock, 3-4-6-3) for 32x32 images."""
    return CifarResNet("resnet34", num_classes, in_channels)


def resnet50(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet50 (Bottleneck, 3-4-6-3) for 32x32 images."""
    return CifarResNet("resnet50", num_classes, in_channels)
