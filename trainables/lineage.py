"""What a trial trained and validated on, as MLflow dataset inputs: name, split, size, digest, source.

A trial reports the descriptions once (a JSON string under ``DATASETS_KEY`` in its first report); the
driver's tracker turns them into MLflow dataset inputs, so the runs table's Dataset column names them.
The digest is of the files a split reads (relative path and size of each: a stat, not a read, so a
VOC-sized set costs milliseconds) or of the in-memory arrays of the embedded sets.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

DATASETS_KEY = "vision_tune/datasets"
CONTEXTS = {"train": "training", "val": "validation"}  # MLflow's context tag values, as its UI spells them


def _files(dataset: Dataset) -> list[str] | None:
    """The image and mask paths of a folder-backed set (torchvision's VOC keeps them as lists)."""
    files = [f for name in ("images", "masks") if isinstance(found := getattr(dataset, name, None), list)
             for f in found]
    return [str(f) for f in files] if files and all(isinstance(f, (str, Path)) for f in files) else None


def _arrays(dataset: Dataset) -> list:
    found = [getattr(dataset, name, None) for name in ("data", "images", "targets")]
    return [a for a in found if isinstance(a, (torch.Tensor, np.ndarray)) or (isinstance(a, list) and a
                                                                              and isinstance(a[0], int))]


def _file_digest(files: list[str], root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(files):
        file = Path(path)
        digest.update(f"{file.relative_to(root) if file.is_relative_to(root) else file}:{file.stat().st_size}\n"
                      .encode())
    return digest.hexdigest()[:16]


def _array_digest(arrays: list) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        if isinstance(array, torch.Tensor):
            array = array.numpy(force=True)
        digest.update(np.ascontiguousarray(np.asarray(array)).tobytes())
    return digest.hexdigest()[:16]


def _embedded_source(name: str) -> str:
    """The package file an embedded set is read from."""
    if name == "mnist5k":
        from trainables.data.classification import mnist5k_path

        return str(mnist5k_path())
    if name == "digits":
        from trainables.data.classification import digits_path

        return str(digits_path())
    return name


_DIGESTS: dict[tuple, tuple[str, str]] = {}  # a reused worker trains on the same sets again: digest them once


def _describe(name: str, split: str, root: str, dataset: Dataset) -> tuple[str, str]:
    key = (name, split, root, type(dataset).__name__, len(dataset))
    if key not in _DIGESTS:
        _DIGESTS[key] = _digest_and_source(name, root, dataset)
    return _DIGESTS[key]


def _digest_and_source(name: str, root: str, dataset: Dataset) -> tuple[str, str]:
    files = _files(dataset)
    if files:
        source = Path(getattr(dataset, "root", root))
        return _file_digest(files, source), str(source)
    arrays = _arrays(dataset)
    source = getattr(dataset, "root", None)
    return _array_digest(arrays), str(source) if source else _embedded_source(name)


def describe(name: str, split: str, dataset: Dataset, root: str, size: int, image_size: int) -> dict:
    """One split as a plain dict (the ``size`` items a trial uses of it, e.g. val_samples)."""
    inner = dataset.dataset if isinstance(dataset, Subset) else dataset
    digest, source = _describe(name, split, root, inner)
    return {"name": name, "split": split, "context": CONTEXTS[split], "size": int(size), "digest": digest,
            "source": source, "image_size": image_size}


def dataset_inputs(config, train_set: Dataset, val_set: Dataset) -> str:
    """The trial's train and validation sets, as the JSON string a report carries."""
    val_size = min(config.val_samples, len(val_set)) if getattr(config, "val_samples", 0) else len(val_set)
    root = str(Path(config.data_root).expanduser())
    return json.dumps([describe(config.dataset, "train", train_set, root, len(train_set), config.image_size),
                       describe(config.dataset, "val", val_set, root, val_size, config.image_size)])
