"""`shapes`: generated scenes in VOC's exact on-disk format, so the real VOC loader reads them.

Each of VOC's 20 object classes has its own colour, shape and texture (so the task is learnable), drawn on a
textured background that covers about 70% of the pixels, as in VOC; masks are palette PNGs with 255 borders.
Layout: VOC2012 train/val/trainval (train = trainval by default) and a VOC2007 test set used for validation,
mirroring the report's VOC2012-trainval / VOC2007-test protocol without train/val overlap.
"""
from __future__ import annotations

import colorsys
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .voc import voc_palette

log = logging.getLogger(__name__)

VERSION = 1  # bump when the generator's output changes, so stale caches are never reused
SHAPES = ("rectangle", "ellipse", "triangle")
TEXTURES = ("solid", "stripes", "checks", "dots")
DEFAULTS = {"n_train": 96, "n_val": 32, "n_test": 64, "size": 96}


def _appearance(label: int) -> tuple[str, str, np.ndarray]:
    """Shape, texture and RGB colour of an object class 1..20: a fixed function of the class."""
    k = label - 1
    red, green, blue = colorsys.hsv_to_rgb(k / 20, 0.9, 0.95)  # 20 hues 18 degrees apart, all saturated
    return SHAPES[k % 3], TEXTURES[(k // 3) % 4], np.array([red, green, blue]) * 255


def _texture(name: str, size: int) -> np.ndarray:
    """(size, size) bool pattern; True pixels are drawn darker."""
    y, x = np.mgrid[:size, :size]
    if name == "stripes":
        return ((x + y) // 3) % 2 == 1
    if name == "checks":
        return ((x // 4) + (y // 4)) % 2 == 1
    if name == "dots":
        return (x % 5 < 2) & (y % 5 < 2)
    return np.zeros((size, size), dtype=bool)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted, low-saturation colour with smooth blotches and grain: texture the classes never use."""
    grey = rng.uniform(70, 170)
    tint = grey + 0.35 * (rng.uniform(40, 210, 3) - grey)
    blotches = np.clip(tint + rng.normal(0, 22, (5, 5, 3)), 0, 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(blotches).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)
    return smooth + rng.normal(0, 6, (size, size, 3))


def _object_mask(rng: np.random.Generator, shape: str, size: int) -> np.ndarray:
    """(size, size) bool silhouette of one object at a random place and size."""
    width, height = rng.uniform(0.3, 0.6, 2) * size  # tuned so ~70% of pixels are background, as in VOC
    cx, cy = rng.uniform(0.15, 0.85, 2) * size
    box = [cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2]
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "rectangle":
        draw.rectangle(box, fill=1)
    elif shape == "ellipse":
        draw.ellipse(box, fill=1)
    else:
        draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=1)
    return np.asarray(canvas, dtype=bool)


def render_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: image uint8 (size,size,3) and mask uint8 (size,size) with labels 0..20 and 255 borders."""
    image = _background(rng, size)
    labels = np.zeros((size, size), dtype=np.uint8)
    for _ in range(rng.integers(1, 4)):  # later objects occlude earlier ones, as in photos
        label = int(rng.integers(1, 21))
        shape, texture, colour = _appearance(label)
        silhouette = _object_mask(rng, shape, size)
        shade = colour * rng.uniform(0.85, 1.0)  # a little per-instance lighting
        darker = _texture(texture, size)[silhouette][:, None]  # (N,1) for the N object pixels
        image[silhouette] = np.where(darker, shade * 0.5, shade) + rng.normal(0, 6, (len(darker), 3))
        labels[silhouette] = label
    # VOC marks object outlines as void (255): every pixel with a differently labelled 8-neighbour.
    padded = np.pad(labels, 1, mode="edge")
    border = np.zeros_like(labels, dtype=bool)
    for dy in range(3):
        for dx in range(3):
            border |= padded[dy:dy + size, dx:dx + size] != labels
    return np.clip(image, 0, 255).round().astype(np.uint8), np.where(border, 255, labels).astype(np.uint8)


def _write_year(base: Path, seed: int, year: int, splits: dict[str, range], size: int, palette: list[int]) -> None:
    """Write VOC{year}'s JPEGImages, SegmentationClass and ImageSets/Segmentation lists."""
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / folder).mkdir(parents=True)
    written = set()
    for split, indices in splits.items():
        ids = [f"{year}_{index:06d}" for index in indices]
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for index, image_id in zip(indices, ids):
            if image_id in written:
                continue
            written.add(image_id)
            # One generator per image, keyed by (seed, year, index): scenes never depend on the split sizes.
            image, labels = render_scene(np.random.default_rng([seed, year, index]), size)
            Image.fromarray(image).save(base / "JPEGImages" / f"{image_id}.jpg", quality=90)
            mask = Image.fromarray(labels)
            mask.putpalette(palette)  # turns the L image into a P (palette) PNG, exactly as VOC stores masks
            mask.save(base / "SegmentationClass" / f"{image_id}.png")


def shapes_dir(root: Path, seed: int, **sizes: int) -> Path:
    """The cache folder of one generated data set: <root>/shapes-v1-seed<seed>[-<sizes> when not the defaults]."""
    params = {**DEFAULTS, **sizes}
    suffix = "" if params == DEFAULTS else "-{n_train}-{n_val}-{n_test}-{size}px".format(**params)
    return Path(root) / f"shapes-v{VERSION}-seed{seed}{suffix}"


def generate_shapes(root: str | Path, seed: int = 0, **sizes: int) -> Path:
    """Generate (or reuse) the data set and return its VOC root (the folder holding VOCdevkit)."""
    params = {**DEFAULTS, **sizes}
    if set(params) != set(DEFAULTS):
        raise ValueError(f"unknown shapes option(s) {sorted(set(params) - set(DEFAULTS))}; valid: {sorted(DEFAULTS)}")
    final = shapes_dir(Path(root), seed, **sizes)
    if final.is_dir():  # only ever created by the rename below, so it is complete
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # Build in a private folder and rename it into place: concurrent trials never see a half-written set.
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the shared cache from other users
    try:
        n_train, n_val, palette = params["n_train"], params["n_val"], voc_palette()
        _write_year(tmp / "VOCdevkit" / "VOC2012", seed, 2012, {
            "train": range(n_train), "val": range(n_train, n_train + n_val),
            "trainval": range(n_train + n_val)}, params["size"], palette)
        _write_year(tmp / "VOCdevkit" / "VOC2007", seed, 2007, {"test": range(params["n_test"])},
                    params["size"], palette)
        (tmp / "shapes.json").write_text(json.dumps({"version": VERSION, "seed": seed, **params}, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race with another trial: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("generated %s in %.2f s", final, time.perf_counter() - start)
    return final
