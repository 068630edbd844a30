"""System figures of a trial, reported as metrics each epoch: peak CPU memory, and on CUDA peak GPU memory
and mean GPU utilisation (sampled through nvidia-ml-py when it is installed)."""
from __future__ import annotations

import logging
import resource
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SAMPLE_S = 0.5  # GPU utilisation is nvml's busy share over its last sample period (~1/6 s to 1 s)


def _reset_peak_rss() -> bool:
    """Linux resets a process's peak RSS (VmHWM) when '5' is written to /proc/self/clear_refs (since 4.0), so a
    reused worker reports this trial's peak, not an earlier trial's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """The process's peak resident memory since the last reset (VmHWM), else since it started (ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class SystemMonitor:
    """Peaks since the trial started (on this process) and the GPU's mean utilisation per epoch."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rss_reset = _reset_peak_rss()
        self._samples: list[float] = []
        self._stop = threading.Event()
        self._sampler = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            try:
                torch.cuda.utilization(device)  # needs nvidia-ml-py (pynvml)
            except Exception as err:  # ModuleNotFoundError without pynvml, NVMLError without a driver
                log.info("GPU utilisation not sampled: %s", err)
            else:
                self._sampler = threading.Thread(target=self._sample, name="gpu-util", daemon=True)
                self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            try:
                self._samples.append(float(torch.cuda.utilization(self.device)))
            except Exception:  # the device went away: stop sampling, keep training
                return

    def epoch_figures(self) -> dict[str, float]:
        """system/* metrics for the epoch that just ended."""
        figures = {"system/peak_rss_mib": peak_rss_mib()}
        if self.device.type == "cuda":
            figures["system/peak_gpu_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            samples, self._samples = self._samples, []
            if samples:
                figures["system/gpu_util_pct"] = sum(samples) / len(samples)
        return figures

    def close(self) -> None:
        self._stop.set()
