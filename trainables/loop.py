"""The only training loop. Tasks bring a model and a ``step``; the loop owns everything else.

The loop moves batches to the device, runs mixed precision, zero_grad/backward/step, epochs,
evaluation and metric names. It never imports Ray: ``fit`` calls ``on_epoch_end`` and the caller
(``tune_io``) decides what reporting and checkpointing mean.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from trainables.metrics import ConfusionMatrix

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """What a task's step returns: the loss to minimise and what the metrics need."""

    loss: torch.Tensor  # scalar
    preds: torch.Tensor | None = None  # class ids, any shape, for the confusion matrix
    targets: torch.Tensor | None = None  # same shape as preds; labels outside [0, K) are ignored
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # extra scalars averaged per epoch


Step = Callable[[nn.Module, Sequence[torch.Tensor]], StepOutput]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: the trial stops instead of training on garbage."""


@dataclass(frozen=True)
class Hardware:
    """Where and how tensors run: the device, bf16 autocast and channels_last (both CUDA only)."""

    device: torch.device
    amp: bool = False
    channels_last: bool = False

    @classmethod
    def select(cls, gpu_ids: Sequence, amp: bool = True, where: str = "this machine") -> "Hardware":
        """cuda when the trial was given a GPU, else cpu: never ``torch.cuda.is_available()`` alone,
        since a GPU that the scheduler gave to another trial is visible too."""
        if len(gpu_ids) > 0:
            problem = cuda_problem(gpu_ids, torch.version.cuda, torch.cuda.device_count(),
                                   os.environ.get("CUDA_VISIBLE_DEVICES"))
            if problem:
                raise CudaUnavailableError(
                    f"this trial was given GPU id(s) {list(gpu_ids)} on {where}, but {problem}. The node declares "
                    "GPUs it cannot use: give its node type the GPUs it really has (`resources:` in the cluster "
                    "config, `ray start --num-gpus`) or fix its driver (`nvidia-smi` must list them).")
            return cls(torch.device("cuda", 0), amp=amp, channels_last=True)
        return cls(torch.device("cpu"))

    def autocast(self):
        if self.amp and self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def move(self, batch: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        moved = []
        for tensor in batch:
            tensor = tensor.to(self.device, non_blocking=True)  # async when the loader pins memory
            if self.channels_last and tensor.dim() == 4:
                tensor = tensor.contiguous(memory_format=torch.channels_last)
            moved.append(tensor)
        return moved


class CudaUnavailableError(RuntimeError):
    """A trial got GPUs from Ray on a node where CUDA cannot reach them: fail at once, not with a CUDA trace."""


def cuda_problem(gpu_ids: Sequence, cuda_build: str | None, devices: int, visible: str | None) -> str | None:
    """Why the GPUs Ray gave a trial cannot be used here (None when they can), from what torch reports."""
    if cuda_build is None:
        return f"this PyTorch ({torch.__version__}) is built without CUDA"
    if devices == 0:
        return (f"CUDA sees no device (PyTorch built for CUDA {cuda_build}; CUDA_VISIBLE_DEVICES={visible!r}): no "
                "NVIDIA driver or GPU is found")
    if devices < len(gpu_ids):
        return f"CUDA sees only {devices} device(s) (CUDA_VISIBLE_DEVICES={visible!r})"
    return None


def epoch_seed(seed: int, epoch: int) -> int:
    """Every epoch draws from its own seed, so a run resumed at epoch e replays epoch e exactly."""
    return seed * 100_003 + epoch


class _Averages:
    """Running means of the loss and parts, weighted by batch size."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, out: StepOutput, n: int) -> None:
        for name, value in {"loss": out.loss, **out.parts}.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value) * n
        self.count += n

    def means(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/{name}": total / max(self.count, 1) for name, total in self.sums.items()}


def train_one_epoch(model: nn.Module, step: Step, loader: Iterable, optimizer: torch.optim.Optimizer,
                    hw: Hardware, epoch: int, max_steps: int = 0, describe: str = "") -> dict[str, float]:
    """One pass (or ``max_steps`` batches) of training; returns train/* means and images_per_s."""
    model.train()
    averages = _Averages()
    start = time.perf_counter()
    for index, batch in enumerate(loader, start=1):
        batch = hw.move(batch)
        with hw.autocast():
            out = step(model, batch)
        loss = out.loss.item()  # one sync per step, also the NaN check
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"loss became {loss} at epoch {epoch}, step {index}; config: {describe}")
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        averages.add(StepOutput(out.loss.detach(), parts={k: v.detach() for k, v in out.parts.items()}),
                     batch[0].shape[0])
        if max_steps and index >= max_steps:
            break
    seconds = time.perf_counter() - start
    return {**averages.means("train"), "images_per_s": averages.count / max(seconds, 1e-9)}


@torch.no_grad()
def evaluate(model: nn.Module, step: Step, loader: Iterable, hw: Hardware,
             num_classes: int | None) -> tuple[dict[str, float], ConfusionMatrix | None]:
    """val/* means, and for labelled tasks accuracy, precision, recall and mIoU from one confusion matrix."""
    model.eval()
    averages = _Averages()
    matrix = ConfusionMatrix(num_classes) if num_classes else None
    for batch in loader:
        batch = hw.move(batch)
        with hw.autocast():
            out = step(model, batch)
        averages.add(out, batch[0].shape[0])
        if matrix is not None:
            matrix.update(out.targets, out.preds)
    metrics = averages.means("val")
    if matrix is not None:
        metrics.update({
            "val/accuracy": float(matrix.accuracy()),
            "val/precision": float(matrix.mean_precision()),
            "val/recall": float(matrix.mean_recall()),
            "val/miou": float(matrix.miou()),
        })
    return metrics, matrix


def fit(model: nn.Module, step: Step, optimizer: torch.optim.Optimizer, scheduler, train_loader,
        val_loader, hw: Hardware, *, epochs: int, start_epoch: int = 1, seed: int = 0, max_steps: int = 0,
        num_classes: int | None = None, describe: str = "",
        on_epoch_end: Callable[[int, dict, ConfusionMatrix | None], None] | None = None) -> dict[str, float]:
    """Train epochs ``start_epoch..epochs`` (1-based), evaluating after each; returns the last metrics."""
    metrics: dict[str, float] = {}
    generator = getattr(train_loader, "generator", None)
    for epoch in range(start_epoch, epochs + 1):
        torch.manual_seed(epoch_seed(seed, epoch))
        if generator is not None:
            generator.manual_seed(epoch_seed(seed, epoch))  # the shuffle order and worker seeds
        metrics = train_one_epoch(model, step, train_loader, optimizer, hw, epoch, max_steps, describe)
        val_metrics, matrix = evaluate(model, step, val_loader, hw, num_classes)
        metrics.update(val_metrics)
        metrics["epoch"] = epoch
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step()
        log.info("epoch %d/%d %s", epoch, epochs,
                 " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"))
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics, matrix)
    return metrics
