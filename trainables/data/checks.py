"""Once-per-data-set work on segmentation files: validation and class pixel frequencies, both cached."""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import bad_data

log = logging.getLogger(__name__)

VOID = 255
NUM_VOC_CLASSES = 21
CACHE_FOLDER = ".vision-tune-cache"


def default_cache_dir(root: Path) -> Path:
    """root/.vision-tune-cache when root is writable (kept beside the data), else the user's cache folder."""
    if os.access(root, os.W_OK):
        return root / CACHE_FOLDER
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vision-tune"


def _fingerprint(paths: Sequence[str], purpose: str) -> str:
    """Key of a file list: paths, sizes and mtimes, so an edited, added or removed file invalidates the cache."""
    digest = hashlib.sha256(purpose.encode())
    for path in paths:
        try:
            stat = os.stat(path)
            digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{os.path.abspath(path)}\0missing\n".encode())
    return digest.hexdigest()[:20]


def _write_atomic(path: Path, write) -> None:
    """Write through a temporary file and rename, so concurrent trials never read half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as err:  # a read-only cache only costs a re-check next time
        log.warning("could not write cache file %s: %s", path, err)


def _mask_paths(dataset) -> list[str]:
    masks = getattr(dataset, "masks", None)
    if masks is None:
        raise TypeError(f"expected a VOC-format segmentation dataset (with .masks); got {type(dataset).__name__}")
    return list(masks)


def _read_mask(mask_path: str) -> tuple[np.ndarray, tuple[int, int]]:
    """Pixel count of each of the 256 possible labels in a mask PNG, read as stored (no augmentation), and its size."""
    with Image.open(mask_path) as mask:
        if mask.mode not in ("P", "L"):
            raise ValueError(f"mode {mask.mode}; VOC masks are palette (P) PNGs whose indices are the labels")
        return np.bincount(np.asarray(mask, dtype=np.uint8).ravel(), minlength=256), mask.size


def _label_counts(mask_path: str) -> np.ndarray:
    return _read_mask(mask_path)[0]


def _check_pair(image_path: str, mask_path: str, num_classes: int) -> list[str]:
    """Problems of one listed image and its mask, each naming the file."""
    problems, image_size = [], None
    if not os.path.isfile(image_path):
        problems.append(f"{image_path}: listed in the split but the image is missing")
    else:
        try:
            with Image.open(image_path) as image:
                image_size = image.size
                # A JPEG decoded at 1/8 scale still reads every coded byte, so truncation is caught at 1/10 the cost.
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
        except Exception as err:  # PIL raises several types for corrupt files
            problems.append(f"{image_path}: unreadable image ({type(err).__name__}: {err})")
    if not os.path.isfile(mask_path):
        problems.append(f"{mask_path}: mask missing for listed image {image_path}")
        return problems
    try:
        counts, mask_size = _read_mask(mask_path)
    except Exception as err:
        return problems + [f"{mask_path}: unreadable mask ({type(err).__name__}: {err})"]
    counts[:num_classes] = counts[VOID] = 0
    if counts.any():
        problems.append(f"{mask_path}: labels {np.flatnonzero(counts).tolist()} outside 0..{num_classes - 1} "
                        f"and {VOID}")
    if image_size is not None and image_size != mask_size:
        problems.append(f"{mask_path}: mask is {mask_size[0]}x{mask_size[1]} but {image_path} is "
                        f"{image_size[0]}x{image_size[1]}")
    return problems


def _workers() -> int:
    return min(8, os.cpu_count() or 1)  # PIL decodes outside the GIL, so threads overlap the file work


def validate_segmentation(dataset, cache_dir: Path, name: str = "voc", num_classes: int = NUM_VOC_CLASSES) -> None:
    """Check every listed image/mask pair once (labels, presence, readability); a marker file caches success."""
    images, masks = list(dataset.images), _mask_paths(dataset)
    marker = cache_dir / f"valid-{_fingerprint(images + masks, f'validate-v1 {num_classes}')}.ok"
    if marker.is_file():
        return
    log.info("validating %d images of %s (once; cached in %s)", len(images), name, cache_dir)
    with ThreadPoolExecutor(_workers()) as pool:
        results = pool.map(_check_pair, images, masks, [num_classes] * len(images))
        problems = [problem for result in results for problem in result]
    if problems:
        raise bad_data(name, problems)
    _write_atomic(marker, lambda f: f.write(b"ok\n"))


def class_frequencies(dataset, num_classes: int, cache_dir: str | Path) -> np.ndarray:
    """Share of labelled (non-255) training pixels in each class (K,), summing to 1; cached as .npy."""
    masks = _mask_paths(dataset)
    path = Path(cache_dir) / f"class-frequencies-{_fingerprint(masks, f'frequencies-v1 {num_classes}')}.npy"
    if path.is_file():
        return np.load(path)
    with ThreadPoolExecutor(_workers()) as pool:
        counts = sum(pool.map(_label_counts, masks), np.zeros(256, dtype=np.int64))
    counts = counts[:num_classes].astype(np.float64)
    if counts.sum() == 0:
        raise ValueError(f"no labelled pixels in the {len(masks)} masks of this dataset")
    frequencies = counts / counts.sum()
    _write_atomic(path, lambda f: np.save(f, frequencies))
    return frequencies
