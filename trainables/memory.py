"""GPU memory caps for trials that share a GPU (``--gpus-per-trial`` < 1).

Ray divides GPUs only on paper (ray#5902): without a cap, one of four trials packed on a GPU can take the
memory the other three need. A trial given a fraction f caps its caching allocator at about f of the device;
running out inside the cap fails that trial alone, with a message that says what to change.
"""
from __future__ import annotations

import torch

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


def memory_cap_message(gpus: float, fraction: float | None, total_bytes: int, in_use_bytes: int,
                       batch_size: int, device_name: str = "the GPU") -> str:
    """What a trial that ran out of GPU memory reports instead of a CUDA trace."""
    gib = 2**30
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
    """The TrialMemoryError for a CUDA out-of-memory error on ``device`` (the peak the allocator held)."""
    properties = torch.cuda.get_device_properties(device)
    in_use = torch.cuda.max_memory_reserved(device)
    return TrialMemoryError(memory_cap_message(gpus, fraction, properties.total_memory, in_use, batch_size,
                                               properties.name))
