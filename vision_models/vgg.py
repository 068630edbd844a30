"""VGG16 with batch norm: the 13-conv stack shared with SegNet, and a classifier for 32x32 images."""
from __future__ import annotations

import torch
from torch import nn

from vision_models.layers import init_weights
from vision_models.sizes import SizeRule

# torchvision's configuration "D" (VGG16): conv widths, "M" = 2x2 max-pool.
VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                    512, 512, 512, "M", 512, 512, 512, "M")


def vgg16_bn_features(in_channels: int = 3, return_indices: bool = False) -> nn.Sequential:
    """The conv stack with torchvision's ``vgg16_bn().features`` layout, so its state dict keys match."""
    layers: list[nn.Module] = []
    channels = in_channels
    for width in VGG16_CFG:
        if width == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, return_indices=return_indices))
        else:
            layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            channels = width
    return nn.Sequential(*layers)


def size_rule(**_builder_kwargs) -> SizeRule:
    """Five 2x2 pools: sides must be multiples of 32."""
    return SizeRule("vgg16", multiple=32, minimum=32)


class VGG16(nn.Module):
    """VGG16-BN for CIFAR-sized inputs: the ImageNet conv stack, global average pool, a small MLP head."""

    TAPS = {"logits": "classifier"}

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.size_rule = size_rule()
        self.features = vgg16_bn_features(in_channels)
        # 32x32 inputs leave 1x1 maps; pooling makes larger multiples of 32 work with the same head.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(512, 512), nn.ReLU(inplace=True),
                                        nn.Dropout(0.5), nn.Linear(512, num_classes))
        init_weights(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B,C,H,W) -> logits (B,num_classes)."""
        self.size_rule.check_input(images, self.in_channels)
        return self.classifier(self.avgpool(self.features(images)))


def vgg16(num_classes: int = 10, in_channels: int = 3) -> VGG16:
    """VGG16-BN classifier for 32x32 images (any multiple of 32)."""
    return VGG16(num_classes=num_classes, in_channels=in_channels)
