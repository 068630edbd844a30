"""The report's networks: a registry of builders, input-size checks and named feature taps (torch only)."""
from __future__ import annotations

import inspect
from functools import partial
from typing import Callable

from torch import nn

from vision_models import resnet, segnet, unet, vae, vgg
from vision_models.sizes import SizeRule, as_hw
from vision_models.taps import extract, tap_names

MODELS: dict[str, Callable[..., nn.Module]] = {
    "vgg16": vgg.vgg16,
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "conv_vae": vae.conv_vae,
    "segnet_vgg16": segnet.segnet_vgg16,
    "unet_resnet50": unet.unet_resnet50,
}

SIZE_RULES: dict[str, Callable[..., SizeRule]] = {
    "vgg16": vgg.size_rule,
    **{name: partial(resnet.size_rule, name) for name in resnet.DEPTHS},
    "conv_vae": vae.size_rule,
    "segnet_vgg16": segnet.size_rule,
    "unet_resnet50": unet.size_rule,
}

__all__ = ["MODELS", "SIZE_RULES", "SizeRule", "build_model", "check_image_size", "extract", "size_rule",
           "tap_names"]


def _known(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names are {', '.join(sorted(MODELS))}")


def build_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with explicit keyword arguments."""
    _known(name)
    return MODELS[name](**kwargs)


def size_rule(name: str, **kwargs) -> SizeRule:
    """The input-size rule of ``build_model(name, **kwargs)``."""
    _known(name)
    return SIZE_RULES[name](**kwargs)


def check_image_size(name: str, image_size: int | tuple[int, int], /, **kwargs) -> None:
    """Raise ValueError (with the nearest valid size) unless ``build_model(name, **kwargs)`` accepts this size.

    Builds nothing, so configs call it before any trial starts. Positional-only parameters let ``kwargs``
    carry the builder's own ``image_size`` (the VAE's), which must then equal the checked size.
    """
    _known(name)
    bound = inspect.signature(MODELS[name]).bind(**kwargs)  # an unknown keyword fails here, not in a trial
    bound.apply_defaults()
    height, width = as_hw(image_size)
    SIZE_RULES[name](**bound.arguments).check(height, width)
    built_for = bound.arguments.get("image_size")
    if built_for is not None and as_hw(built_for) != (height, width):
        raise ValueError(f"{name} is built for image_size={built_for}; got {height}x{width} images, "
                         f"pass image_size={height if height == width else (height, width)}")
