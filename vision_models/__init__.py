"""The report's networks: a registry of builders, input-size checks and named feature taps (torch only)."""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator, Mapping
from functools import partial
from typing import Callable

from torch import nn

from vision_models.sizes import SizeRule, as_hw
from vision_models.taps import extract, tap_names


class _OnFirstUse(Mapping):
    """name -> the function ``vision_models.<module>.<attribute>`` (with leading arguments), imported when looked
    up: the ResNet, SegNet and U-Net modules build on torchvision, whose import costs a process 3.6 s here (its ops
    pull in torch._dynamo), and a VAE trial or study needs none of them."""

    def __init__(self, entries: dict[str, tuple]) -> None:
        self._entries = entries

    def __getitem__(self, name: str) -> Callable:
        module, attribute, *leading = self._entries[name]
        found = getattr(importlib.import_module(f"vision_models.{module}"), attribute)
        return partial(found, *leading) if leading else found

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


_RESNETS = ("resnet18", "resnet34", "resnet50")
MODELS: Mapping[str, Callable[..., nn.Module]] = _OnFirstUse({
    "vgg16": ("vgg", "vgg16"),
    **{name: ("resnet", name) for name in _RESNETS},
    "conv_vae": ("vae", "conv_vae"),
    "segnet_vgg16": ("segnet", "segnet_vgg16"),
    "unet_resnet50": ("unet", "unet_resnet50"),
})

SIZE_RULES: Mapping[str, Callable[..., SizeRule]] = _OnFirstUse({
    "vgg16": ("vgg", "size_rule"),
    **{name: ("resnet", "size_rule", name) for name in _RESNETS},
    "conv_vae": ("vae", "size_rule"),
    "segnet_vgg16": ("segnet", "size_rule"),
    "unet_resnet50": ("unet", "size_rule"),
})

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
