"""U-Net with torchvision's ResNet50, truncated after layer2 or layer3, as encoder."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from vision_models.layers import conv_bn_relu, init_weights
from vision_models.sizes import SizeRule
from vision_models.weights import PRETRAINED, load_prefixed, torchvision_state_dict

STOPS = {"layer2": 8, "layer3": 16}  # encoder_stop -> output stride
SKIP_CHANNELS = {8: 512, 4: 256, 2: 64}  # stride -> channels of the encoder feature there (layer2, layer1, stem)
DECODER_CHANNELS = {8: 256, 4: 128, 2: 64, 1: 32}  # stride a decoder block outputs at -> its width


def size_rule(encoder_stop: str = "layer3", **_builder_kwargs) -> SizeRule:
    """Sides must be multiples of the encoder's output stride, so every skip matches its upsampled map."""
    if encoder_stop not in STOPS:
        raise ValueError(f"encoder_stop must be one of {sorted(STOPS)}; got {encoder_stop!r}")
    return SizeRule(f"unet_resnet50 (encoder_stop={encoder_stop!r})", multiple=STOPS[encoder_stop],
                    minimum=STOPS[encoder_stop])


class ResNet50Encoder(ResNet):
    """torchvision's ResNet50 without fc, avgpool and the stages after ``stop``; parameter names unchanged."""

    def __init__(self, stop: str = "layer3") -> None:
        super().__init__(Bottleneck, [3, 4, 6, 3])
        del self.fc, self.avgpool, self.layer4  # unused parameters would get no gradient and waste memory
        if stop == "layer2":
            del self.layer3
        self.stop = stop

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Features from stride 2 to the output stride: [stem (B,64,H/2), layer1 (B,256,H/4), layer2, (layer3)]."""
        stem = self.relu(self.bn1(self.conv1(images)))
        features = [stem, self.layer1(self.maxpool(stem))]
        features.append(self.layer2(features[-1]))  # (B,512,H/8,W/8)
        if self.stop == "layer3":
            features.append(self.layer3(features[-1]))  # (B,1024,H/16,W/16)
        return features


class UpBlock(nn.Module):
    """2x nearest upsampling, concatenation of the encoder feature at that scale (if any), two 3x3 convs."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels + skip_channels  # what the first conv sees
        self.convs = nn.Sequential(conv_bn_relu(self.in_channels, out_channels),
                                   conv_bn_relu(out_channels, out_channels))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.convs(x)


class UNetResNet50(nn.Module):
    """ResNet50 encoder + U-Net decoder back to the input resolution; ``skip_concat=False`` drops the skips."""

    TAPS: dict[str, str]  # set per instance: the paths depend on encoder_stop

    def __init__(self, num_classes: int = 21, pretrained: bool = False, skip_concat: bool = True,
                 encoder_stop: str = "layer3") -> None:
        super().__init__()
        self.size_rule = size_rule(encoder_stop)
        self.skip_concat = skip_concat
        self.encoder = ResNet50Encoder(encoder_stop)
        if pretrained:
            state = torchvision_state_dict(PRETRAINED["unet_resnet50"], "unet_resnet50")
            load_prefixed(self.encoder, state)
        stride = STOPS[encoder_stop]
        channels = 1024 if encoder_stop == "layer3" else 512
        blocks = []
        while stride > 1:
            stride //= 2
            skip = SKIP_CHANNELS.get(stride, 0) if skip_concat else 0  # no skip at full resolution
            blocks.append(UpBlock(channels, skip, DECODER_CHANNELS[stride]))
            channels = DECODER_CHANNELS[stride]
        self.decoder = nn.ModuleList(blocks)
        self.head = nn.Conv2d(channels, num_classes, kernel_size=3, padding=1)
        # decoder_mid: the stride-4 block (fused with layer1), the same resolution for either encoder_stop.
        self.TAPS = {"encoder_out": f"encoder.{encoder_stop}",
                     "decoder_mid": f"decoder.{len(blocks) - 3}"}
        init_weights(self.decoder)  # the encoder keeps torchvision's own initialisation (or ImageNet weights)
        nn.init.normal_(self.head.weight, std=0.01)  # near-uniform class scores at the start, not ReLU-scaled ones
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) -> logits (B,num_classes,H,W)."""
        self.size_rule.check_input(images, 3)
        features = self.encoder(images)
        x, skips = features[-1], features[-2::-1]  # skips from the deepest (stride/2) to the stem (H/2)
        for i, block in enumerate(self.decoder):
            skip = skips[i] if self.skip_concat and i < len(skips) else None
            x = block(x, skip)
        return self.head(x)


def unet_resnet50(num_classes: int = 21, pretrained: bool = False, skip_concat: bool = True,
                  encoder_stop: str = "layer3") -> UNetResNet50:
    """U-Net on ResNet50 truncated after ``encoder_stop`` ("layer2": stride 8, "layer3": stride 16)."""
    return UNetResNet50(num_classes=num_classes, pretrained=pretrained, skip_concat=skip_concat,
                        encoder_stop=encoder_stop)
