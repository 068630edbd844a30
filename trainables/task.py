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
from trainables.data.batched import BatchedImages, DeviceBatches
from trainables.data.segmentation import SegmentationBatches, SegmentationSet
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


MAX_WORKERS = 8


def loader_workers(requested: int, cpus: float | None, device: torch.device) -> int:
    """Loader worker processes: ``--num-workers`` when given (>= 0); else, for a GPU trial, one per CPU of the
    trial (``--cpus-per-trial``) beyond the one that drives the GPU, at most MAX_WORKERS. A CPU trial keeps
    its CPUs as the model's threads (run_trial sets them): there a U-Net step costs ~1000x its data, and
    worker processes only take cores from the model (a 2-CPU shapes trial ran 2.5x slower with one)."""
    if requested >= 0:
        return requested
    if device.type != "cuda":
        return 0
    return max(0, min(int(cpus or 1) - 1, MAX_WORKERS))


def make_loaders(built: Built, config: TrainConfig, hw: Hardware, cpus: float | None = None) -> tuple:
    """Train batches drawn from a generator the loop reseeds per epoch, and fixed-order val batches.

    Classification sets are held on the device (no workers); VOC-format sets read their decoded cache with
    ``loader_workers`` workers; any other Dataset goes through a plain DataLoader.
    """
    val_indices = fixed_indices(len(built.val_set), config.val_samples) if config.val_samples else None
    drop_last = len(built.train_set) > config.batch_size  # keeps BatchNorm away from a last batch of one image
    if isinstance(built.train_set, BatchedImages):
        return (DeviceBatches(built.train_set.to(hw.device), config.batch_size, shuffle=True, drop_last=drop_last),
                DeviceBatches(built.val_set.to(hw.device), config.batch_size, shuffle=False, indices=val_indices))
    count = loader_workers(config.num_workers, cpus, hw.device)
    if isinstance(built.train_set, SegmentationSet):
        return (SegmentationBatches(built.train_set, config.batch_size, shuffle=True, device=hw.device,
                                    workers=count, drop_last=drop_last),
                SegmentationBatches(built.val_set, config.batch_size, shuffle=False, device=hw.device,
                                    workers=count, indices=val_indices))
    pin = hw.device.type == "cuda"
    workers = {"num_workers": count, "persistent_workers": count > 0}
    train = DataLoader(built.train_set, batch_size=config.batch_size, shuffle=True, pin_memory=pin,
                       drop_last=drop_last, generator=torch.Generator(), **workers)
    val_set = built.val_set if val_indices is None else Subset(built.val_set, val_indices)
    val = DataLoader(val_set, batch_size=config.batch_size, shuffle=False, pin_memory=pin, **workers)
    return train, val
