"""Named feature taps: forward hooks on the submodules a model lists in its ``TAPS`` dict."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def tap_names(model: nn.Module) -> list[str]:
    """The taps a model declares (``model.TAPS``: tap name -> dotted submodule path)."""
    taps = getattr(model, "TAPS", None)
    if not taps:
        raise ValueError(f"{type(model).__name__} declares no TAPS, so it has no features to extract")
    return list(taps)


@torch.no_grad()
def extract(model: nn.Module, images: torch.Tensor, names: Iterable[str] | str) -> dict[str, torch.Tensor]:
    """Run ``model`` once in eval mode and return {tap: output of its submodule}; the training flag is restored."""
    names = [names] if isinstance(names, str) else list(names)
    valid = tap_names(model)
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise ValueError(f"unknown tap(s) {unknown} for {type(model).__name__}; valid taps are {valid}")
    captured: dict[str, torch.Tensor] = {}

    def capture(name: str):
        def hook(module: nn.Module, inputs: tuple, output) -> None:
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"tap {name!r} ({model.TAPS[name]}) returned {type(output).__name__}, not a tensor")
            captured[name] = output.detach()
        return hook

    handles = [model.get_submodule(model.TAPS[name]).register_forward_hook(capture(name)) for name in names]
    was_training = model.training
    try:
        model.eval()  # features for analysis use running BN statistics and the VAE's mean, not a sample
        model(images)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: captured[name] for name in names}
