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
    """Where and how tensors run: the device, the autocast dtype (None: fp32) and channels_last (CUDA only)."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    @classmethod
    def select(cls, gpu_ids: Sequence, amp: bool = True, where: str = "this machine") -> "Hardware":
        """cuda when the trial was given a GPU, else cpu: never ``torch.cuda.is_available()`` alone,
        since a GPU that the scheduler gave to another trial is visible too."""
        if len(gpu_ids) > 1:
            raise MultiGpuError(
                f"this trial was given {len(gpu_ids)} GPUs (ids {list(gpu_ids)}) on {where}, but a trial trains on one "
                "GPU and would leave the others idle: ask for 1 GPU per trial (or a fraction, to share one) and let "
                "Tune run one trial per GPU")
        if len(gpu_ids) == 1:
            problem = cuda_problem(gpu_ids, torch.version.cuda, torch.cuda.device_count(),
                                   os.environ.get("CUDA_VISIBLE_DEVICES"))
            if problem:
                raise CudaUnavailableError(
                    f"this trial was given GPU id(s) {list(gpu_ids)} on {where}, but {problem}. The node declares "
                    "GPUs it cannot use: give its node type the GPUs it really has (`resources:` in the cluster "
                    "config, `ray start --num-gpus`) or fix its driver (`nvidia-smi` must list them).")
            device = torch.device("cuda", 0)  # Ray's CUDA_VISIBLE_DEVICES shows the trial its one GPU as cuda:0
            capability = torch.cuda.get_device_capability(device)
            dtype = autocast_dtype(amp, capability, torch.version.hip)
            log.info("precision: %s on %s (compute capability %d.%d)%s", PRECISION[dtype],
                     torch.cuda.get_device_name(device), *capability, "" if amp else ", amp off in the config")
            return cls(device, dtype, channels_last=True)
        return cls(torch.device("cpu"))

    @property
    def precision(self) -> str:
        """What the forward pass computes in: 'bfloat16', 'float16' (with loss scaling) or 'float32'."""
        return PRECISION[self.amp_dtype]

    def autocast(self):
        # select() sets a dtype on CUDA only; on a CPU device it runs CPU autocast (the tests' way to run fp16)
        if self.amp_dtype is not None:
            return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)
        return contextlib.nullcontext()

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16, whose gradients underflow without it; bf16 has fp32's range and needs none
        (the scaler is then a pass-through)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

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


PRECISION = {None: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def autocast_dtype(amp: bool, capability: tuple[int, int], hip: str | None) -> torch.dtype | None:
    """The autocast dtype for a CUDA device of compute ``capability`` (``hip``: ``torch.version.hip``).

    bf16 only where the GPU runs it natively: compute capability >= 8.0 (Ampere on) or ROCm, the answer of
    ``torch.cuda.is_bf16_supported(including_emulation=False)``; that call's default counts the emulation of
    V100s and T4s, where bf16 runs slower than fp32. Those (7.x) get fp16 with a GradScaler; older GPUs have no
    tensor cores for fp16 either (a GTX 1080 runs fp16 at 1/64 of fp32) and stay in fp32."""
    if not amp:
        return None
    if hip or capability >= (8, 0):
        return torch.bfloat16
    if capability >= (7, 0):
        return torch.float16
    return None


class MultiGpuError(RuntimeError):
    """A trial got several GPUs: it trains on one, so it refuses instead of leaving the others idle."""


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
                    hw: Hardware, epoch: int, max_steps: int = 0, describe: str = "",
                    scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """One pass (or ``max_steps`` batches) of training; returns train/* means and images_per_s. ``scaler``: fp16's
    loss scale, kept across epochs by ``fit`` (a fresh one, ``hw.grad_scaler()``, when None)."""
    scaler = hw.grad_scaler() if scaler is None else scaler
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
        scaler.scale(out.loss).backward()  # as is, unless fp16
        scaler.step(optimizer)  # fp16: skipped when a gradient overflowed, and the scale halves
        scaler.update()
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
        on_epoch_end: Callable[[int, dict, ConfusionMatrix | None], None] | None = None,
        scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """Train epochs ``start_epoch..epochs`` (1-based), evaluating after each; returns the last metrics. ``scaler``:
    fp16's loss scale (the caller's, so that a checkpoint keeps it; a fresh one when None)."""
    metrics: dict[str, float] = {}
    scaler = hw.grad_scaler() if scaler is None else scaler
    generator = getattr(train_loader, "generator", None)
    for epoch in range(start_epoch, epochs + 1):
        torch.manual_seed(epoch_seed(seed, epoch))
        if generator is not None:
            generator.manual_seed(epoch_seed(seed, epoch))  # the shuffle order and worker seeds
        metrics = train_one_epoch(model, step, train_loader, optimizer, hw, epoch, max_steps, describe, scaler)
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
