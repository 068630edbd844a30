"""What a trial's checkpoint holds and when it writes one (``--checkpoint-every``). No Ray here.

A checkpoint is ``state.pt`` (weights, optimizer, scheduler, RNG: what a resume needs), ``artifacts/`` (the
confusion matrix; at the end the figures' data) and, after the last epoch, ``example.pt`` (one input, from which
the driver builds the MLflow model). The last epoch's ``state.pt`` holds the weights only: a finished trial is
never resumed, and an optimizer's moments would double (Adam: triple) its size.

The policy: every N epochs, every S seconds of training, or ``auto``: whenever the training since the last
checkpoint has taken at least ``AUTO_RATIO`` times what the last checkpoint cost (its write and its upload to
storage, measured), and at least ``AUTO_MIN_S`` seconds, unless the end (and its checkpoint) is nearer than that;
so checkpointing costs at most 1/(1 + AUTO_RATIO) of a trial's time at any pace, a GPU's included, besides the
last checkpoint, and a crash loses at most that much work.
"""
from __future__ import annotations

import errno
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

STATE_FILE, EXAMPLE_FILE, ARTIFACTS = "state.pt", "example.pt", "artifacts"
AUTO_RATIO = 19.0  # training / checkpointing >= 19: checkpoints take <= 5% of the time
AUTO_MIN_S = 60.0  # and not more often than once a minute: bytes and storage requests stay bounded
ASSUMED_BYTES_PER_S = 100e6  # the first checkpoint's cost before one is measured (a network disk, an S3 upload)
SPEC = re.compile(r"^(auto|[1-9]\d*|\d+(?:\.\d+)?s)$")
VALID_SPECS = "'auto', a number of epochs (e.g. 5) or seconds of training (e.g. 600s)"


@dataclass
class CheckpointPolicy:
    """When ``run_trial`` writes a checkpoint; always after the last epoch."""

    epochs: int | None = None  # every N epochs
    seconds: float | None = None  # every S seconds of training
    cost_s: float | None = None  # what the last checkpoint took (auto), None before the first
    state_bytes: int = 0  # the expected size of one, for auto's first estimate

    @classmethod
    def parse(cls, spec: str, state_bytes: int = 0) -> "CheckpointPolicy":
        if not SPEC.match(spec):
            raise ValueError(f"got {spec!r}; valid: {VALID_SPECS}")
        if spec == "auto":
            return cls(state_bytes=state_bytes)
        if spec.endswith("s"):
            return cls(seconds=float(spec[:-1]))
        return cls(epochs=int(spec))

    def interval_s(self) -> float:
        """Auto's interval: the training time a checkpoint must follow."""
        cost = self.cost_s if self.cost_s is not None else self.state_bytes / ASSUMED_BYTES_PER_S
        return max(AUTO_MIN_S, AUTO_RATIO * cost)

    def due(self, epoch: int, last_epoch: int, final_epoch: int, trained_s: float) -> bool:
        """Whether to checkpoint after ``epoch``; the last checkpoint was after ``last_epoch``, followed by
        ``trained_s`` seconds of training."""
        if epoch >= final_epoch:
            return True
        if self.epochs is not None:
            return epoch - last_epoch >= self.epochs
        if self.seconds is not None:
            return trained_s >= self.seconds
        interval = self.interval_s()
        remaining = (final_epoch - epoch) * trained_s / max(epoch - last_epoch, 1)  # at this pace
        return trained_s >= interval and remaining >= interval  # else the last epoch's checkpoint comes first

    def saved(self, seconds: float) -> None:
        """What the checkpoint just written cost (write and report, the upload to storage included)."""
        self.cost_s = seconds


def rng_state() -> dict:
    # numpy's state as a tensor so that torch.load(weights_only=True) can read it back
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def model_bytes(config) -> tuple[int, int]:
    """(weights, optimizer slots) in bytes for ``config``, from the model on the meta device (no memory, well under
    a second): SGD with momentum keeps one more copy of the weights, Adam two."""
    from vision_models import build_model

    kwargs = config.model_kwargs()
    if kwargs.get("pretrained"):
        kwargs["pretrained"] = False  # the same shapes; nothing to read on the meta device
    with torch.device("meta"):
        model = build_model(config.model, **kwargs)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    slots = 2 if config.optim.name == "adam" else int(config.optim.momentum > 0)
    return weights + buffers, slots * weights


def state_bytes(config) -> int:
    """About what ``save_state`` writes mid-trial for ``config`` (the disk check multiplies it)."""
    return sum(model_bytes(config))


def save_state(folder: Path, model, optimizer, scheduler, epoch: int, final: bool = False, scaler=None) -> None:
    """Write the checkpoint's state file (``final``: the weights only); a full disk is named as such (given a
    path, torch.save reports it as "enforce fail at inline_container.cc ... unexpected pos")."""
    path = Path(folder) / STATE_FILE
    state = {"model": model.state_dict(), "epoch": epoch, "final": final}
    if not final:
        state.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict() if scheduler else None,
                     rng=rng_state(), scaler=scaler.state_dict() if scaler is not None else None)
    try:
        with open(path, "wb") as file:
            torch.save(state, file)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        free = shutil.disk_usage(path.parent).free
        raise OSError(errno.ENOSPC, f"no space left on device writing the checkpoint {path} ({free / 2**20:.0f} MiB "
                      f"free there). Trials stage checkpoints in the temporary folder ({tempfile.gettempdir()}) "
                      "before Tune copies them to --storage: free space there, or set TMPDIR to a larger disk"
                      ) from None


def load_state(folder: str | Path, model, optimizer, scheduler, scaler=None) -> int:
    """Load a checkpoint into the objects; returns the epoch it was taken after. The optimizer keeps the
    hyperparameters it was built with from the (new) config, so a learning rate that PBT or a resume changed
    survives: the checkpoint's moments come back, its learning rates are rescaled to the new base ones."""
    state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    if state.get("final"):  # weights only: the trial had finished
        return int(state["epoch"])
    fresh = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):  # fp16's loss scale goes on where it was, not from scratch
        scaler.load_state_dict(state["scaler"])
    for index, (group, wanted) in enumerate(zip(optimizer.param_groups, fresh)):
        base = group.get("initial_lr", wanted["lr"]) if scheduler is not None else None
        for key, value in wanted.items():
            if key not in ("lr", "initial_lr"):
                group[key] = value
        if scheduler is None:
            group["lr"] = wanted["lr"]
        elif base:  # the schedule's value at this epoch, on the new base learning rate
            group["lr"] = group["lr"] * wanted.get("initial_lr", wanted["lr"]) / base
            group["initial_lr"] = wanted.get("initial_lr", wanted["lr"])
            scheduler.base_lrs[index] = group["initial_lr"]
    set_rng_state(state["rng"])
    return int(state["epoch"])
