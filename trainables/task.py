"""What a task is: a ``build`` that turns a config into model, data and step, plus its artifacts."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from trainables.artifacts import fixed_indices

from trainables.config import TrainConfig
from trainables.loop import Hardware, Step


@dataclass
class Built:
    """Everything a trial trains with, built once per trial from its config."""

    model: nn.Module
    step: Step
    train_set: Dataset
    val_set: Dataset
    num_classes: int | None  # None: no confusion matrix (the VAE)
    class_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Task:
    """A task = its config class, a build function and an end-of-trial artifact writer."""

    name: str
    config_cls: type[TrainConfig]
    build: Callable[[TrainConfig], Built]
    # (config, built, trained model, hardware, output folder) -> None
    write_artifacts: Callable[[TrainConfig, Built, nn.Module, Hardware, Path], None]


def make_loaders(built: Built, config: TrainConfig, hw: Hardware) -> tuple[DataLoader, DataLoader]:
    """Train loader with its own generator (reseeded per epoch by the loop) and a fixed-order val loader."""
    pin = hw.device.type == "cuda"
    workers = {"num_workers": config.num_workers, "persistent_workers": config.num_workers > 0}
    # drop_last keeps BatchNorm away from a last batch of one image
    train = DataLoader(built.train_set, batch_size=config.batch_size, shuffle=True, pin_memory=pin,
                       drop_last=len(built.train_set) > config.batch_size, generator=torch.Generator(), **workers)
    val_set = built.val_set
    if config.val_samples:
        val_set = Subset(val_set, fixed_indices(len(val_set), config.val_samples))
    val = DataLoader(val_set, batch_size=config.batch_size, shuffle=False, pin_memory=pin, **workers)
    return train, val
