"""Pretrained weights for trials on nodes that share no disk with the driver.

The driver reads each weights file it found (or downloaded once) before Ray started (``Weights.read``); Tune puts
them in Ray's object store once (``tune.with_parameters``), and every trial writes the ones its node lacks into
its own ``$TORCH_HOME/hub/checkpoints/`` before building its model, checked against the driver's SHA-256 and
renamed into place, so torchvision then finds them there. No worker ever downloads, and nobody copies files to
every node by hand.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Weights:
    """One weights file as the driver had it: its name in the hub cache, its SHA-256 and its bytes."""

    name: str
    sha256: str
    data: bytes

    @classmethod
    def read(cls, path: str | Path) -> "Weights":
        data = Path(path).read_bytes()
        return cls(Path(path).name, hashlib.sha256(data).hexdigest(), data)


def hub_checkpoints() -> Path:
    """Where torchvision looks for weights on this node: $TORCH_HOME/hub/checkpoints/."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def install(files: list[Weights] | None, folder: Path | None = None) -> list[Path]:
    """Make each file present in this node's hub cache with the driver's content; returns the paths written."""
    if not files:
        return []
    folder = folder or hub_checkpoints()
    written = []
    for weights in files:
        target = folder / weights.name
        if target.is_file() and file_sha256(target) == weights.sha256:
            continue
        if hashlib.sha256(weights.data).hexdigest() != weights.sha256:
            raise RuntimeError(f"the driver's {weights.name} arrived damaged (SHA-256 differs from {weights.sha256}); "
                               "rerun the study")
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{weights.name}.")  # concurrent trials: rename is atomic
        with os.fdopen(fd, "wb") as stream:
            stream.write(weights.data)
        os.replace(tmp, target)
        log.info("wrote the driver's %s (sha256 %s) into %s", weights.name, weights.sha256[:12], folder)
        written.append(target)
    return written
