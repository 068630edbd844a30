"""Pretrained torchvision weights through torchvision's own cache, with an offline message that says what to do."""
from __future__ import annotations

import os
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import ResNet50_Weights, VGG16_BN_Weights, WeightsEnum

# The report's encoders: an ImageNet ResNet50 under the U-Net (sections V, VI), VGG16 (here with BN) under SegNet
PRETRAINED: dict[str, WeightsEnum] = {"unet_resnet50": ResNet50_Weights.IMAGENET1K_V2,
                                      "segnet_vgg16": VGG16_BN_Weights.IMAGENET1K_V1}


def expected_checkpoint(weights: WeightsEnum) -> str:
    """Where torchvision looks for ``weights`` before downloading: $TORCH_HOME/hub/checkpoints/<file>."""
    filename = os.path.basename(urlparse(weights.url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def _offline(weights: WeightsEnum, model_name: str, err: OSError, fix: str) -> RuntimeError:
    return RuntimeError(
        f"{model_name}(pretrained=True) needs torchvision's {weights} weights and could not download them "
        f"({err}). Offline, fetch {weights.url} elsewhere and place the file at {expected_checkpoint(weights)} "
        f"($TORCH_HOME/hub/checkpoints/, TORCH_HOME defaulting to ~/.cache/torch), or {fix}.")


def torchvision_state_dict(weights: WeightsEnum, model_name: str) -> dict[str, torch.Tensor]:
    """The state dict of ``weights``, read from the hub cache or downloaded by torchvision."""
    try:
        return weights.get_state_dict(progress=False)
    except OSError as err:  # URLError, DNS and socket errors all derive from OSError
        raise _offline(weights, model_name, err, "use pretrained=False") from err


def fetch_pretrained(model_name: str, fix: str = "use pretrained=False") -> str:
    """The cache file of ``model_name``'s ImageNet weights, downloaded once if missing. torch.hub writes a
    uniquely named partial file and renames it, so a reader never sees half a file; a study calls this on
    the driver before any trial, so that its trials only read the cache."""
    if model_name not in PRETRAINED:
        raise ValueError(f"{model_name} has no pretrained weights; models with them: {', '.join(sorted(PRETRAINED))}")
    weights = PRETRAINED[model_name]
    target = expected_checkpoint(weights)
    if not os.path.isfile(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            torch.hub.download_url_to_file(weights.url, target, progress=False)
        except OSError as err:
            raise _offline(weights, model_name, err, fix) from err
    return target


def load_prefixed(module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Load the entries of ``state_dict`` that ``module`` keeps (under ``prefix``) with strict=True."""
    own = module.state_dict().keys()
    subset = {key[len(prefix):]: value for key, value in state_dict.items()
              if key.startswith(prefix) and key[len(prefix):] in own}
    module.load_state_dict(subset, strict=True)  # a key the checkpoint lacks fails instead of staying random
