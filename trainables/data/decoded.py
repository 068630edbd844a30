"""VOC-format images and masks decoded once into memory-mapped uint8 arrays beside the data.

JPEG + PNG decoding is most of a VOC sample's cost (115-160 img/s per loader worker at 256 px); read from
the cache, a sample is a slice of a memory map that every trial on the machine shares through the page
cache. The cache folder is keyed like the validation marker (paths, sizes, mtimes of every listed file), so
an edited, added or removed file builds a new one. It is written in a private folder, checksummed, and
renamed into place; one that fails its size or CRC check on opening is deleted and rebuilt, never used.
Caches do not pile up: building one removes the caches of an older layout (``VERSION``) and the older versions
of the same data set (its files edited, added or removed) that no process has used for ``STALE_S`` seconds.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from .checks import _fingerprint, _workers

log = logging.getLogger(__name__)

VERSION = 1  # bump when the layout below changes
FILES = ("images.u8", "masks.u8", "index.npy")
CRC_CHUNK = 64 * 2**20
STALE_S = 600.0  # an older version of a data set's cache unused this long is removed (a study may still map it)
USED = "last_used"  # touched by every process that opens the cache


class DecodedArrays:
    """Sample i: image uint8 (H,W,3) and mask uint8 (H,W), views into the memory maps (no copy)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.index = np.load(folder / "index.npy")  # (N,3): pixel offset, height, width
        self._maps: tuple[np.memmap, np.memmap] | None = None

    def __len__(self) -> int:
        return len(self.index)

    def _open(self) -> tuple[np.memmap, np.memmap]:
        # opened lazily, per process: a DataLoader worker maps the files itself instead of receiving a copy
        if self._maps is None:
            self._maps = (np.memmap(self.folder / "images.u8", dtype=np.uint8, mode="r"),
                          np.memmap(self.folder / "masks.u8", dtype=np.uint8, mode="r"))  # read-only: never written
        return self._maps

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}

    def shape(self, i: int) -> tuple[int, int]:
        return int(self.index[i, 1]), int(self.index[i, 2])

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        images, masks = self._open()
        offset, height, width = (int(v) for v in self.index[i])
        return (images[3 * offset:3 * (offset + height * width)].reshape(height, width, 3),
                masks[offset:offset + height * width].reshape(height, width))


def _crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(CRC_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _intact(folder: Path) -> bool:
    """True only for a complete cache whose files have the sizes and CRCs its manifest recorded."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        if manifest.get("version") != VERSION:
            return False
        for name in FILES:
            path = folder / name
            if path.stat().st_size != manifest["sizes"][name] or _crc(path) != manifest["crc32"][name]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def _decode_into(images: np.memmap, masks: np.memmap, offset: int, image_path: str, mask_path: str) -> None:
    # exactly what torchvision's VOCSegmentation reads: the JPEG as RGB, the palette PNG's indices as labels
    with Image.open(image_path) as image:
        rgb = np.asarray(image.convert("RGB"))
    with Image.open(mask_path) as mask:
        labels = np.asarray(mask)
    height, width = labels.shape
    images[3 * offset:3 * (offset + height * width)] = rgb.reshape(-1)
    masks[offset:offset + height * width] = labels.reshape(-1)


def _build(folder: Path, image_paths: Sequence[str], mask_paths: Sequence[str], name: str) -> None:
    """Decode every pair into a private folder next to ``folder``, then rename it into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        sizes = []
        for path in mask_paths:  # header reads only: the masks' sizes place every sample in the flat files
            with Image.open(path) as mask:
                sizes.append((mask.height, mask.width))
        pixels = np.array([h * w for h, w in sizes], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(pixels)[:-1]]).astype(np.int64)
        total = int(pixels.sum())
        images = np.memmap(tmp / "images.u8", dtype=np.uint8, mode="w+", shape=(max(3 * total, 1),))
        masks = np.memmap(tmp / "masks.u8", dtype=np.uint8, mode="w+", shape=(max(total, 1),))
        with ThreadPoolExecutor(_workers()) as pool:  # PIL decodes outside the GIL
            list(pool.map(_decode_into, [images] * len(sizes), [masks] * len(sizes), offsets.tolist(),
                          image_paths, mask_paths))
        images.flush()
        masks.flush()
        del images, masks
        np.save(tmp / "index.npy", np.column_stack([offsets, np.array(sizes, dtype=np.int64).reshape(-1, 2)]))
        manifest = {"version": VERSION, "name": name, "count": len(sizes),
                    "sizes": {n: (tmp / n).stat().st_size for n in FILES}, "crc32": {n: _crc(tmp / n) for n in FILES}}
        (tmp / "manifest.json").write_text(json.dumps(manifest))  # last: its presence means the rest is complete
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the shared cache from other users
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _intact(folder):  # not a lost race with another process: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def decoded(image_paths: Sequence[str], mask_paths: Sequence[str], cache_dir: Path, name: str) -> DecodedArrays:
    """The decoded arrays of these pairs, built on first use (the driver's data check does it before trials)."""
    key = _fingerprint(list(image_paths) + list(mask_paths), f"decoded-v{VERSION}")
    folder = Path(cache_dir) / f"decoded-{key}"
    if folder.is_dir() and not _intact(folder):
        log.warning("decoded cache %s is incomplete or corrupt (size or CRC mismatch): rebuilding it", folder)
        shutil.rmtree(folder, ignore_errors=True)
    if not folder.is_dir():
        start = time.perf_counter()
        _build(folder, image_paths, mask_paths, name)
        log.info("decoded %d images of %s into %s in %.1f s", len(image_paths), name, folder,
                 time.perf_counter() - start)
        prune(Path(cache_dir), folder, name)
    with contextlib.suppress(OSError):  # a read-only cache folder: it is simply never pruned
        (folder / USED).touch()
    return DecodedArrays(folder)


def prune(cache_dir: Path, keep: Path, name: str, stale_s: float = STALE_S) -> list[Path]:
    """Remove the decoded caches in ``cache_dir`` that can no longer be used: another layout version, or an older
    version of data set ``name`` unused for ``stale_s`` seconds. Returns what it removed."""
    removed = []
    for folder in Path(cache_dir).glob("decoded-*"):
        if folder == keep or not folder.is_dir():
            continue
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
            used = max((folder / USED).stat().st_mtime if (folder / USED).exists() else 0.0,
                       (folder / "manifest.json").stat().st_mtime)
        except (OSError, ValueError):
            continue  # being built by another process, or not ours
        if manifest.get("version") == VERSION and (manifest.get("name") != name or time.time() - used < stale_s):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        log.info("removed the decoded cache %s (%s)", folder, "an older layout" if manifest.get("version") != VERSION
                 else f"an older version of {name}")
        removed.append(folder)
    return removed
