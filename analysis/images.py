"""Pictures from saved arrays: predictions per variant on the same val images (Figs. 7 and 9), SegNet's
decoder feature maps (section IV), VAE reconstructions and prior samples (section III)."""
from __future__ import annotations

from typing import Sequence

import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from trainables.data.voc import voc_palette  # noqa: E402

VOID = 255


def colorize(masks: np.ndarray) -> np.ndarray:
    """Class ids (..., H, W) -> VOC colours (..., H, W, 3) uint8; 255 (void) is VOC's cream border."""
    palette = np.asarray(voc_palette(), dtype=np.uint8).reshape(256, 3)
    return palette[np.clip(masks, 0, 255).astype(np.int64)]


def to_hwc(image: np.ndarray) -> np.ndarray:
    """(C, H, W) in [0, 1] -> what imshow wants: (H, W, 3) or (H, W) for one channel."""
    image = np.clip(np.asarray(image, dtype=np.float32), 0, 1)
    return image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)


def _name(text: str, width: int = 22) -> str:
    """A variant's 'A: optim/name=sgd, ...' wrapped to fit beside or above a thumbnail."""
    return textwrap.fill(text, width)


def _off(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def segmentation_samples(variants: Sequence[tuple[str, dict]], class_names: Sequence[str], count: int = 4,
                         title: str = "") -> plt.Figure:
    """Rows = val images; columns = image, ground truth, then each variant's prediction (same images)."""
    images, truth = variants[0][1]["images"], variants[0][1]["targets"]
    count = min(count, len(images))
    columns = 2 + len(variants)
    figure, axes = plt.subplots(count, columns, figsize=(2.0 * columns, 2.0 * count + 0.9), squeeze=False)
    for row in range(count):
        cells = [("image", to_hwc(images[row])), ("ground truth", colorize(truth[row]))]
        cells += [(f"prediction {name}", colorize(samples["preds"][row])) for name, samples in variants]
        for ax, (name, picture) in zip(axes[row], cells):
            ax.imshow(picture, interpolation="nearest", cmap="gray" if picture.ndim == 2 else None)
            _off(ax)
            if row == 0:
                ax.set_title(name, fontsize=9)
    present = np.unique(np.concatenate([truth[:count].ravel(), *[s["preds"][:count].ravel() for _, s in variants]]))
    palette = colorize(np.arange(256)) / 255
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette[k]) for k in present]
    names = [class_names[k] if k < len(class_names) else ("void" if k == VOID else str(k)) for k in present]
    figure.legend(handles, names, loc="lower center", ncol=min(6, len(names)), fontsize=8, frameon=False,
                  bbox_to_anchor=(0.5, -0.02))
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    return figure


def classification_samples(variants: Sequence[tuple[str, dict]], class_names: Sequence[str], count: int = 10,
                           title: str = "") -> plt.Figure:
    """A row per variant over the same val images; each title 'expected → predicted', red when wrong."""
    count = min(count, len(variants[0][1]["images"]))
    figure, axes = plt.subplots(len(variants), count, figsize=(1.25 * count + 0.8, 1.5 * len(variants) + 0.6),
                                squeeze=False)
    for row, (name, samples) in enumerate(variants):
        for col in range(count):
            ax = axes[row][col]
            picture = to_hwc(samples["images"][col])
            ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None)
            _off(ax)
            target, pred = int(samples["targets"][col]), int(samples["preds"][col])
            ax.set_title(f"{class_names[target]}→{class_names[pred]}", fontsize=7,
                         color="black" if target == pred else "red")
        axes[row][0].set_ylabel(_name(name, 16), fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def feature_maps(maps: dict[str, np.ndarray], taps: Sequence[str], image: np.ndarray | None = None,
                 channels: int = 8, title: str = "") -> plt.Figure:
    """A row per tap (e.g. SegNet decoder_block1..5), the first channels of one image, each on its own scale;
    the image itself in the first column when given."""
    channels = min(channels, max(maps[tap].shape[0] for tap in taps))
    first = 1 if image is not None else 0
    figure, axes = plt.subplots(len(taps), channels + first, figsize=(1.3 * (channels + first) + 1.2,
                                                                      1.4 * len(taps) + 0.5), squeeze=False)
    for row, tap in enumerate(taps):
        stack = maps[tap]  # (C,h,w)
        for col in range(channels):
            ax = axes[row][first + col]
            _off(ax)
            if col < len(stack):
                ax.imshow(stack[col], cmap="viridis", interpolation="nearest")
        axes[row][first].set_ylabel(f"{tap}\n{stack.shape[1]}×{stack.shape[2]}", fontsize=8)
        if first:
            axes[row][0].axis("off")
    if first:
        axes[0][0].imshow(to_hwc(image))
        axes[0][0].set_title("input", fontsize=7)
    for col in range(channels):
        axes[0][first + col].set_title(f"channel {col}", fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def reconstructions(variants: Sequence[tuple[str, dict]], count: int = 8, title: str = "") -> plt.Figure:
    """First row the val inputs, then one row of reconstructions per variant."""
    count = min(count, len(variants[0][1]["images"]))
    rows = [("input", variants[0][1]["images"])] + [(name, s["reconstructions"]) for name, s in variants]
    figure, axes = plt.subplots(len(rows), count, figsize=(1.1 * count + 1.0, 1.15 * len(rows) + 0.5), squeeze=False)
    for r, (name, images) in enumerate(rows):
        for c in range(count):
            picture = to_hwc(images[c])
            axes[r][c].imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=1)
            _off(axes[r][c])
        axes[r][0].set_ylabel(_name(name, 16), fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def prior_samples(variants: Sequence[tuple[str, dict]], per_side: int = 6, title: str = "") -> plt.Figure:
    """Decoded draws z ~ N(0, I): a tiled grid per variant."""
    figure, axes = plt.subplots(1, len(variants), figsize=(2.6 * len(variants), 3.0), squeeze=False)
    for ax, (name, samples) in zip(axes[0], variants):
        prior = samples["prior"][: per_side * per_side]  # (n,C,H,W)
        side = int(np.ceil(np.sqrt(len(prior))))
        tiles = [to_hwc(p) for p in prior] + [np.ones_like(to_hwc(prior[0]))] * (side * side - len(prior))
        grid = np.concatenate([np.concatenate(tiles[r * side:(r + 1) * side], axis=1) for r in range(side)], axis=0)
        ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=1)
        _off(ax)
        ax.set_title(_name(name, 30), fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    return figure
