"""Pretrained torchvision weights through torchvision's own cache, with an offline message that says what to do."""
from __future__ import annotations

import os
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import WeightsEnum


def expected_checkpoint(weights: WeightsEnum) -> str:
    """Where torchvision looks for ``weights`` before downloading: $TORCH_HOME/hub/checkpoints/<file>."""
    filename = os.path.basename(urlparse(weights.url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def torchvision_state_dict(weights: WeightsEnum, model_name: str) -> dict[str, torch.Tensor]:
    """The state dict of ``weights``, read from the hub cache or downloaded by torchvision."""
    try:
        return weights.get_state_dict(progress=False)
    except OSError as err:  # URLError, DNS and socket errors all derive from OSError
        target = expected_checkpoint(weights)
        raise RuntimeError(
            f"{model_name}(pretrained=True) needs torchvision's {weights} weights and could not download them "
            f"({err}). Offline, fetch {weights.url} elsewhere and place the file at {target} "
            f"($TORCH_HOME/hub/checkpoints/, TORCH_HOME defaulting to ~/.cache/torch), or use pretrained=False."
        ) from err


def load_prefixed(module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Load the entries of ``state_dict`` that ``module`` keeps (under ``prefix``) with strict=True."""
    own = module.state_dict().keys()
    subset = {key[len(prefix):]: value for key, value in state_dict.items()
              if key.startswith(prefix) and key[len(prefix):] in own}
    module.load_state_dict(subset, strict=True)  # a key the checkpoint lacks fails instead of staying random
