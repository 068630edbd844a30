"""GPU memory caps for trials that share a GPU (``--gpus-per-trial`` < 1).

Ray divides GPUs only on paper (ray#5902): without a cap, one of four trials packed on a GPU can take the
memory the other three need. A trial given a fraction f caps its caching allocator at about f of the device;
running out inside the cap fails that trial alone, with a message that says what to change.

An out-of-memory error anywhere in a trial (building the model, the loaders, a step, evaluation, a checkpoint)
becomes a ``TrialMemoryError``, recorded in the trial's folder. Tune 2.60 retries every failed trial alike
(``Trial.should_recover``: every error counts towards ``--max-failures``; no error type is exempt), so the retry
reads the record and, given the same config and GPU share, fails at once with the same message instead of
building the model and running out of memory again.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)
RECORD = "memory_error.json"  # in the trial's folder: what the last attempt ran out of memory with
# CUDA allocations outside PyTorch's caching allocator (cuBLAS/cuDNN workspaces, a pinned-memory copy, the CUDA
# context) fail as RuntimeError (torch.AcceleratorError) with one of these, not as torch.OutOfMemoryError
MEMORY_TEXTS = ("CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                "CUDA out of memory")

# Each process's CUDA context and cuDNN/cuBLAS workspaces live outside the allocator the cap limits.
CONTEXT_BYTES = 768 * 2**20


class TrialMemoryError(RuntimeError):
    """A trial ran out of GPU memory inside the share of the GPU it was given."""


def cap_fraction(gpus: float, total_bytes: int) -> float | None:
    """The allocator fraction for a trial given ``gpus`` of one GPU, None for a whole GPU (no cap): f less the
    context's share, so that 1/f trials fit together, never below half of f."""
    if not 0 < gpus < 1:
        return None
    return max(gpus / 2, gpus - CONTEXT_BYTES / total_bytes)


def apply_cap(device: torch.device, gpus: float) -> float | None:
    """Cap this process's allocator on ``device`` for a trial given ``gpus`` of it; returns the fraction set."""
    if device.type != "cuda":
        return None
    fraction = cap_fraction(gpus, torch.cuda.get_device_properties(device).total_memory)
    if fraction is not None:
        torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


def memory_cap_message(gpus: float, fraction: float | None, total_bytes: int | None, in_use_bytes: int,
                       batch_size: int, device_name: str = "the GPU") -> str:
    """What a trial that ran out of GPU memory reports instead of a CUDA trace (``total_bytes`` None: a device
    whose figures torch cannot give)."""
    gib = 2**30
    if total_bytes is None:
        return (f"out of memory on {device_name} at batch size {batch_size}. To fit, lower --batch-size "
                "(or --image-size).")
    if fraction is None:
        where = f"with the whole of {device_name} ({total_bytes / gib:.1f} GiB)"
        change = "lower --batch-size (or --image-size)"
    else:
        where = (f"inside its cap: --gpus-per-trial {gpus:g} gives it {fraction:.0%} of {device_name}'s "
                 f"{total_bytes / gib:.1f} GiB, {fraction * total_bytes / gib:.1f} GiB")
        change = (f"raise --gpus-per-trial (e.g. {min(1.0, 2 * gpus):g}: fewer trials share a GPU) "
                  f"or lower --batch-size")
    return (f"out of GPU memory {where}; {in_use_bytes / gib:.1f} GiB was in use at batch size {batch_size}. "
            f"To fit, {change}.")


def out_of_memory(device: torch.device, gpus: float, fraction: float | None, batch_size: int) -> TrialMemoryError:
    """The TrialMemoryError for an out-of-memory error on ``device`` (on CUDA with the peak the allocator held)."""
    if device.type != "cuda":
        return TrialMemoryError(memory_cap_message(gpus, fraction, None, 0, batch_size, str(device)))
    properties = torch.cuda.get_device_properties(device)
    in_use = torch.cuda.max_memory_reserved(device)
    return TrialMemoryError(memory_cap_message(gpus, fraction, properties.total_memory, in_use, batch_size,
                                               properties.name))


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says that a device ran out of memory: torch's own type, or a CUDA library's words."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in MEMORY_TEXTS)


def earlier_failure(folder: Path | None, attempt: dict) -> str | None:
    """The message of an earlier attempt of this trial that ran out of memory with the same ``attempt`` (config
    and GPU share), else None."""
    if folder is None:
        return None
    try:
        record = json.loads((Path(folder) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record.get("message") if record.get("attempt") == attempt else None


@contextlib.contextmanager
def memory_errors(device: torch.device, gpus: float, fraction: float | None, batch_size: int,
                  folder: Path | None, attempt: dict):
    """Around the whole of a trial: an out-of-memory error becomes a TrialMemoryError (recorded in ``folder``),
    and an attempt that repeats a recorded one (``attempt``: its config and GPU share, as JSON) fails before
    it starts: Tune's retry could only run out of memory again."""
    attempt = json.loads(json.dumps(attempt, sort_keys=True, default=str))  # as the record will read it back
    message = earlier_failure(folder, attempt)
    if message is not None:
        raise TrialMemoryError(f"not retried: an earlier attempt of this trial with the same config and GPU share "
                               f"failed: {message}")
    try:
        yield
    except RuntimeError as err:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(err):
            raise
        error = out_of_memory(device, gpus, fraction, batch_size)
        log.error("%s (%s)", error, str(err).splitlines()[0][:300])
        if folder is not None:
            try:
                (Path(folder) / RECORD).write_text(json.dumps({"attempt": attempt, "message": str(error)}))
            except OSError as why:  # the retry then runs again: worth a line, never worth hiding the error
                log.warning("could not record the memory failure in %s: %s", folder, why)
        # from None: the trial's error says what to change, not which CUDA kernel failed to allocate
        raise error from None
