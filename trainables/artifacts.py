"""End-of-trial artifacts shared by the tasks: fixed samples, pooled tap features, image grids.

Arrays, not figures: ``analysis/`` draws the report's plots from them (this package never plots).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from trainables.loop import Hardware
from vision_models import extract

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def fixed_indices(total: int, count: int) -> list[int]:
    """The same ``count`` val samples in every trial of every study (a fixed permutation, seed 0)."""
    order = torch.randperm(total, generator=torch.Generator().manual_seed(0))
    return order[: min(count, total)].tolist()  # unsorted: the first few (shown in grids) mix the classes


def stack_samples(dataset: Dataset, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N,C,H,W), targets) of the given val samples."""
    items = [dataset[i] for i in indices]
    return torch.stack([item[0] for item in items]), torch.stack([torch.as_tensor(item[1]) for item in items])


@torch.no_grad()
def pooled_features(model: nn.Module, images: torch.Tensor, taps: Sequence[str], hw: Hardware,
                    batch_size: int = 32) -> dict[str, np.ndarray]:
    """Each tap's output per image, feature maps averaged over space: {tap: (N, C)} float32."""
    model.eval()
    chunks: dict[str, list[np.ndarray]] = {tap: [] for tap in taps}
    for start in range(0, len(images), batch_size):
        batch = hw.move([images[start:start + batch_size]])[0]
        with hw.autocast():
            features = extract(model, batch, list(taps))
        for tap, value in features.items():
            value = value.float()
            pooled = value.mean(dim=(2, 3)) if value.dim() == 4 else value.flatten(1)  # (B,C)
            chunks[tap].append(pooled.cpu().numpy())
    return {tap: np.concatenate(parts) for tap, parts in chunks.items()}


def save_features(path: Path, features: dict[str, np.ndarray], labels: np.ndarray, indices: Sequence[int]) -> None:
    """features.npz: one (N, D) array per tap, plus labels and the val indices they came from."""
    np.savez_compressed(path, labels=labels, indices=np.asarray(indices), **features)


def save_rows(path: Path, rows: Sequence[torch.Tensor], padding: int = 2) -> None:
    """A PNG grid, one row per tensor of (N, 3|1, H, W) images in [0, 1]."""
    count, (height, width) = rows[0].shape[0], rows[0].shape[-2:]
    # torchvision.utils.make_grid + save_image, written out: a VAE trial needs nothing else of torchvision
    grid = torch.ones(3, len(rows) * (height + padding) + padding, count * (width + padding) + padding)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row.float().cpu().expand(-1, 3, -1, -1)):
            top, left = padding + r * (height + padding), padding + c * (width + padding)
            grid[:, top:top + height, left:left + width] = tile
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()  # save_image's rounding
    Image.fromarray(pixels).save(path, format="PNG")


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised images back to [0, 1] for display."""
    return (images.cpu() * IMAGENET_STD + IMAGENET_MEAN).clamp(0, 1)


def write_meta(out_dir: Path, **fields) -> None:
    """meta.json: what produced the artifacts (task, model, data set, class names, taps)."""
    (out_dir / "meta.json").write_text(json.dumps(fields, indent=2, default=str))


def labels_of(targets: torch.Tensor, label_fn: Callable[[torch.Tensor], int] | None = None) -> np.ndarray:
    """One class per sample: the label itself, or ``label_fn`` of a mask."""
    if label_fn is None:
        return targets.cpu().numpy().astype(np.int64)
    return np.asarray([label_fn(t) for t in targets], dtype=np.int64)
