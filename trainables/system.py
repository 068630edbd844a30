"""System figures of a trial, reported as metrics each epoch: peak CPU memory, and on CUDA peak GPU memory and
mean GPU utilisation, sampled through NVML (nvidia-ml-py, the ``[gpu]`` extra) when it is installed.

Utilisation is this trial's own where NVML can attribute GPU work to its process (``system/gpu_util_pct``:
the SM share of this pid, from ``nvmlDeviceGetProcessUtilization``). Where it cannot (a GPU or driver without
per-process sampling, a container whose PIDs NVML does not see), the whole device's figure is reported under
its own name, ``system/device_gpu_util_pct``: with trials sharing a GPU it counts their work too.
"""
from __future__ import annotations

import logging
import os
import resource
import threading
from pathlib import Path
from typing import Callable, Iterable

import torch

log = logging.getLogger(__name__)
SAMPLE_S = 0.5  # NVML's utilisation covers its last sample period (~1/6 s to 1 s)
UTIL_KEYS = {"process": "system/gpu_util_pct", "device": "system/device_gpu_util_pct"}


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


def utilisation_scope(pid: int, running_pids: Iterable[int] | None, per_process: bool) -> str:
    """'process' when NVML answers per-process queries and lists ``pid`` among the GPU's compute processes
    (``running_pids``, None when it would not list them), else 'device'. In a container with its own PID
    namespace NVML lists host PIDs: this process is not among them and its samples could not be found."""
    return "process" if per_process and running_pids is not None and pid in set(running_pids) else "device"


def process_utilisation(fetch: Callable[[int], list], pid: int, since: int) -> tuple[float, int]:
    """This process's mean SM utilisation over NVML's samples newer than ``since`` (µs), and the newest sample's
    time. ``fetch``: ``nvmlDeviceGetProcessUtilization`` for the device. A process without a sample ran no kernel:
    0 %; NVML says NOT_FOUND when no process did."""
    import pynvml

    try:
        samples = fetch(since)
    except pynvml.NVMLError as err:
        if err.value in (pynvml.NVML_ERROR_NOT_FOUND, pynvml.NVML_SUCCESS):  # SUCCESS: pynvml's "zero samples"
            return 0.0, since
        raise
    mine = [sample.smUtil for sample in samples if sample.pid == pid]
    newest = max((sample.timeStamp for sample in samples), default=since)
    return (sum(mine) / len(mine) if mine else 0.0), newest


class NvmlUtilisation:
    """GPU utilisation of one device through NVML, for this process or, where NVML cannot tell, the device."""

    def __init__(self, nvml, handle, pid: int, scope: str) -> None:
        self.nvml, self.handle, self.pid, self.scope = nvml, handle, pid, scope
        self.key = UTIL_KEYS[scope]
        self.since = 0

    @classmethod
    def open(cls, device: torch.device) -> "NvmlUtilisation":
        """Raises ModuleNotFoundError without nvidia-ml-py, NVMLError without a driver or device."""
        import pynvml

        pynvml.nvmlInit()
        handle = nvml_handle(pynvml, str(torch.cuda.get_device_properties(device).uuid))
        pid = os.getpid()
        try:
            running = [process.pid for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)]
        except pynvml.NVMLError:
            running = None
        try:  # the samples NVML holds now predate this trial (a reused worker has the same pid): skip them
            _, newest = process_utilisation(lambda since: pynvml.nvmlDeviceGetProcessUtilization(handle, since), pid, 0)
            per_process = True
        except pynvml.NVMLError as err:
            log.info("NVML gives no per-process GPU utilisation here (%s)", err)
            newest, per_process = 0, False
        reader = cls(pynvml, handle, pid, utilisation_scope(pid, running, per_process))
        reader.since = newest
        if reader.scope == "device":
            log.info("GPU utilisation is the whole device's (%s), this trial's work and any other process's on it",
                     reader.key)
        return reader

    def read(self) -> float:
        if self.scope == "device":
            return float(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
        value, self.since = process_utilisation(
            lambda since: self.nvml.nvmlDeviceGetProcessUtilization(self.handle, since), self.pid, self.since)
        return value


def nvml_handle(nvml, cuda_uuid: str):
    """NVML's handle of the device CUDA calls ``cuda_uuid``: by UUID, so that CUDA_VISIBLE_DEVICES (Ray's
    renumbering) cannot point it at another GPU. NVML prefixes a GPU's UUID with 'GPU-', a MIG slice's with 'MIG-'."""
    error = None
    for uuid in (f"GPU-{cuda_uuid}", f"MIG-{cuda_uuid}"):
        try:
            return nvml.nvmlDeviceGetHandleByUUID(uuid)
        except nvml.NVMLError as err:
            error = err
    raise error


class SystemMonitor:
    """Peaks since the trial started (on this process) and mean GPU utilisation per epoch."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rss_reset = _reset_peak_rss()
        self._samples: list[float] = []
        self._stop = threading.Event()
        self._sampler = None
        self.utilisation: NvmlUtilisation | None = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            try:
                self.utilisation = NvmlUtilisation.open(device)
            except Exception as err:  # ModuleNotFoundError without pynvml, NVMLError without a driver
                log.info("GPU utilisation not sampled: %s", err)
            else:
                self._sampler = threading.Thread(target=self._sample, name="gpu-util", daemon=True)
                self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            try:
                self._samples.append(self.utilisation.read())
            except Exception as err:  # the device went away: stop sampling, keep training
                log.info("GPU utilisation sampling stopped: %s", err)
                return

    def epoch_figures(self) -> dict[str, float]:
        """system/* metrics for the epoch that just ended."""
        figures = {"system/peak_rss_mib": peak_rss_mib()}
        if self.device.type == "cuda":
            figures["system/peak_gpu_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            samples, self._samples = self._samples, []
            if samples:
                figures[self.utilisation.key] = sum(samples) / len(samples)
        return figures

    def close(self) -> None:
        self._stop.set()
