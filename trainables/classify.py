"""Image classification (report section II): cross-entropy on logits, accuracy/precision from the matrix."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch.nn.functional as F
from torch import nn

from trainables.artifacts import fixed_indices, pooled_features, save_features, save_rows, stack_samples, write_meta
from trainables.config import ClassifyConfig
from trainables.data import build_dataset
from trainables.loop import Hardware, StepOutput
from trainables.task import Built, Task
from vision_models import build_model

GRID_IMAGES = 16


def step(model: nn.Module, batch) -> StepOutput:
    images, labels = batch
    logits = model(images)  # (B,K)
    return StepOutput(F.cross_entropy(logits.float(), labels), preds=logits.argmax(1), targets=labels)


def build(config: ClassifyConfig) -> Built:
    data = {split: build_dataset(config.dataset, split, config.data_root, config.image_size,
                                 download=config.download) for split in ("train", "val")}
    model = build_model(config.model, **config.model_kwargs())
    return Built(model, step, data["train"], data["val"], config.info.num_classes, config.info.class_names)


def write_artifacts(config: ClassifyConfig, built: Built, model: nn.Module, hw: Hardware, out: Path) -> None:
    """features.npz (10-d outputs for t-SNE/PCA), samples.npz and predictions.png (images, truth, prediction)."""
    indices = fixed_indices(len(built.val_set), config.feature_samples)
    images, labels = stack_samples(built.val_set, indices)
    features = pooled_features(model, images, ["logits"], hw)
    save_features(out / "features.npz", features, labels.numpy(), indices)
    shown = images[:GRID_IMAGES]
    preds = features["logits"][:GRID_IMAGES].argmax(1)
    display = (shown - shown.amin(dim=(1, 2, 3), keepdim=True)) / (
        shown.amax(dim=(1, 2, 3), keepdim=True) - shown.amin(dim=(1, 2, 3), keepdim=True) + 1e-8)
    np.savez_compressed(out / "samples.npz", images=display.numpy(), targets=labels[:GRID_IMAGES].numpy(),
                        preds=preds, indices=np.asarray(indices[:GRID_IMAGES]))
    save_rows(out / "predictions.png", [display])
    write_meta(out, task=config.TASK, model=config.model, dataset=config.dataset,
               class_names=list(built.class_names), taps=["logits"])


TASK = Task("classification", ClassifyConfig, build, write_artifacts)
