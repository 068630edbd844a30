"""SegNet: VGG16-BN encoder whose max-pool indices drive a mirrored MaxUnpool2d + conv decoder."""
from __future__ import annotations

import torch
from torch import nn

from vision_models.layers import conv_bn_relu, init_weights
from vision_models.sizes import SizeRule
from vision_models.vgg import vgg16_bn_features
from vision_models.weights import PRETRAINED, load_prefixed, torchvision_state_dict

# Decoder block i mirrors encoder block 6-i: (input width, output width, convs).
DECODER_BLOCKS = ((512, 512, 3), (512, 256, 3), (256, 128, 3), (128, 64, 2), (64, 64, 2))


def size_rule(**_builder_kwargs) -> SizeRule:
    """Five 2x2 pools whose indices must fit back exactly: sides must be multiples of 32."""
    return SizeRule("segnet_vgg16", multiple=32, minimum=32)


class UnpoolBlock(nn.Module):
    """Unpool with the mirrored encoder's indices (sparse map, maxima back in place), then densify by convs."""

    def __init__(self, in_channels: int, out_channels: int, convs: int) -> None:
        super().__init__()
        self.unpool = nn.MaxUnpool2d(kernel_size=2, stride=2)
        widths = [in_channels] * convs + [out_channels]
        self.convs = nn.Sequential(*[conv_bn_relu(a, b) for a, b in zip(widths[:-1], widths[1:])])

    def forward(self, x: torch.Tensor, indices: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return self.convs(self.unpool(x, indices, output_size=size))


class SegNet(nn.Module):
    """SegNet with torchvision's ``vgg16_bn`` feature layout (``features.*`` keys load its ImageNet weights)."""

    TAPS = {"encoder_out": "encoder_out", **{f"decoder_block{i}": f"decoder.{i - 1}" for i in range(1, 6)}}

    def __init__(self, num_classes: int = 21, in_channels: int = 3, pretrained: bool = False) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.size_rule = size_rule()
        self.features = vgg16_bn_features(in_channels, return_indices=True)
        self.encoder_out = nn.Identity()  # a tap point for the pooled bottleneck (B,512,H/32,W/32)
        self.decoder = nn.ModuleList(UnpoolBlock(*spec) for spec in DECODER_BLOCKS)
        self.head = nn.Conv2d(64, num_classes, kernel_size=3, padding=1)
        init_weights(self)
        nn.init.normal_(self.head.weight, std=0.01)  # near-uniform class scores at the start, not ReLU-scaled ones
        if pretrained:
            if in_channels != 3:
                raise ValueError(f"segnet_vgg16(pretrained=True) needs in_channels=3 (ImageNet RGB); "
                                 f"got {in_channels}")
            state = torchvision_state_dict(PRETRAINED["segnet_vgg16"], "segnet_vgg16")
            load_prefixed(self.features, state, prefix="features.")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B,C,H,W) -> logits (B,num_classes,H,W)."""
        self.size_rule.check_input(images, self.in_channels)
        x, pooled = images, []  # pooled: (indices, pre-pool size) of each encoder block
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):
                size = x.shape[-2:]
                x, indices = layer(x)
                pooled.append((indices, size))
            else:
                x = layer(x)
        x = self.encoder_out(x)
        for block, (indices, size) in zip(self.decoder, reversed(pooled)):
            x = block(x, indices, size)
        return self.head(x)


def segnet_vgg16(num_classes: int = 21, in_channels: int = 3, pretrained: bool = False) -> SegNet:
    """SegNet with a VGG16-BN encoder (optionally torchvision's ImageNet weights); H, W multiples of 32."""
    return SegNet(num_classes=num_classes, in_channels=in_channels, pretrained=pretrained)
