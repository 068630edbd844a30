"""Semantic segmentation (report sections IV and V): weighted pixel cross-entropy ignoring VOC's 255 border."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trainables.artifacts import (denormalize, fixed_indices, pooled_features, save_features, save_rows,
                                  stack_samples, write_meta)
from trainables.config import SegmentConfig
from trainables.data import build_dataset, class_frequencies
from trainables.data.voc import voc_palette
from trainables.loop import Hardware, StepOutput
from trainables.losses import IGNORE_INDEX, class_weight_vector, segmentation_loss
from trainables.task import Built, Task
from vision_models import build_model, extract

GRID_IMAGES = 6
MAP_CHANNELS = 16  # feature maps kept per tap for the decoder figure (report section IV)


def step(model: nn.Module, batch, weights: torch.Tensor | None) -> StepOutput:
    images, masks = batch
    logits = model(images)  # (B,K,H,W)
    return StepOutput(segmentation_loss(logits, masks, weights), preds=logits.argmax(1), targets=masks)


def build(config: SegmentConfig) -> Built:
    info = config.info
    data = {split: build_dataset(config.dataset, split, config.data_root, config.image_size,
                                 download=config.download, train_split=config.train_split)
            for split in ("train", "val")}
    frequencies = None
    if config.class_weights == "inverse_frequency":
        frequencies = class_frequencies(data["train"], info.num_classes, Path(config.data_root) / "cache")
    weights = class_weight_vector(config.class_weights, info.num_classes, frequencies)
    model = build_model(config.model, **config.model_kwargs())
    return Built(model, partial(step, weights=weights), data["train"], data["val"], info.num_classes,
                 info.class_names)


def dominant_class(mask: torch.Tensor) -> int:
    """The most frequent non-background, non-void class of a mask (0 when only background)."""
    labels = mask[(mask > 0) & (mask != IGNORE_INDEX)]
    return int(torch.bincount(labels.flatten()).argmax()) if labels.numel() else 0


def colorize(masks: torch.Tensor) -> torch.Tensor:
    """Class ids (N,H,W) -> VOC colours (N,3,H,W) in [0, 1]."""
    colors = torch.as_tensor(voc_palette(), dtype=torch.float32).view(-1, 3) / 255  # (256,3)
    return colors[masks.long().clamp(0, 255)].permute(0, 3, 1, 2)


@torch.no_grad()
def write_artifacts(config: SegmentConfig, built: Built, model: nn.Module, hw: Hardware, out: Path) -> None:
    """features.npz (every tap, pooled, for t-SNE), feature_maps.npz (one image), samples + predictions.png."""
    taps = list(model.TAPS)
    indices = fixed_indices(len(built.val_set), config.feature_samples)
    images, masks = stack_samples(built.val_set, indices)
    labels = np.asarray([dominant_class(m) for m in masks])
    save_features(out / "features.npz", pooled_features(model, images, taps, hw), labels, indices)

    model.eval()
    shown, truth = images[:GRID_IMAGES], masks[:GRID_IMAGES]
    with hw.autocast():
        maps = extract(model, hw.move([shown[:1]])[0], taps)
        preds = model(hw.move([shown])[0]).argmax(1).cpu()
    np.savez_compressed(out / "feature_maps.npz",
                        **{tap: value[0, :MAP_CHANNELS].float().cpu().numpy() for tap, value in maps.items()
                           if value.dim() == 4})
    display = denormalize(shown)
    np.savez_compressed(out / "samples.npz", images=display.numpy(), targets=truth.numpy(), preds=preds.numpy(),
                        indices=np.asarray(indices[:GRID_IMAGES]))
    save_rows(out / "predictions.png", [display, colorize(truth), colorize(preds)])
    write_meta(out, task=config.TASK, model=config.model, dataset=config.dataset,
               class_names=list(built.class_names), taps=taps)


TASK = Task("segmentation", SegmentConfig, build, write_artifacts)
