"""The CUDA paths, on a CPU machine, each at its seam: what a trial does with the GPUs Ray gives it, which dtype
autocast runs in for a given GPU, how an out-of-memory error anywhere in a trial is reported and not retried,
and whose GPU utilisation a trial reports. The inputs are what torch, NVML and Tune would answer (a compute
capability, real torch and NVML exception objects, real NVML sample structs, a real Tune retry)."""
from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from trainables import VAEConfig, vae
from trainables.loop import Hardware, MultiGpuError, StepOutput, autocast_dtype, train_one_epoch
from trainables.memory import RECORD, TrialMemoryError, is_out_of_memory
from trainables.system import UTIL_KEYS, process_utilisation, utilisation_scope
from trainables.task import Built, Task
from trainables.tune_io import AMP_KEY, LocalSession, run_trial

OOM = "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 15.77 GiB"


# --- several GPUs: refused before any trial starts, and by the trial itself ---

def test_a_study_asking_for_several_gpus_per_trial_is_refused_in_one_line(monkeypatch, capsys, tmp_path):
    import ray

    from studies import vae_lr
    from studies.runner import run_study

    monkeypatch.setattr(sys, "argv", ["studies/vae_lr.py", "--quick", "--gpus-per-trial", "2",
                                      "--storage", str(tmp_path / "results")])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        run_study("vae_lr", vae_lr.BASE, vae_lr.SPACE, metric="val/loss", mode="min")
    lines = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2
    assert len(lines) == 1 and lines[0].startswith("error: --gpus-per-trial 2: a trial trains on one GPU"), lines
    assert "valid: 0 (CPU only), a fraction such as 0.5 or 0.25 (trials share a GPU), or 1" in lines[0]
    assert not ray.is_initialized() and not (tmp_path / "results").exists()


@pytest.mark.parametrize("gpus", ["0", "0.25", "1"])
def test_one_gpu_or_a_share_of_one_passes_the_check(gpus):
    from studies.runner.cli import build_parser
    from studies.runner.validate import check_args

    check_args(build_parser("vae_lr").parse_args(["--gpus-per-trial", gpus]))


def test_a_trial_given_two_gpus_refuses_instead_of_training_on_the_first():
    # before CUDA is asked anything: on this machine the one-GPU path would say that CUDA sees no device
    with pytest.raises(MultiGpuError, match=r"given 2 GPUs \(ids \['0', '1'\]\) on node 10.0.0.7, but a trial "
                                            r"trains on one GPU"):
        Hardware.select(["0", "1"], where="node 10.0.0.7")


# --- the autocast dtype ---

@pytest.mark.parametrize("capability,hip,amp,expected", [
    ((9, 0), None, True, torch.bfloat16),   # H100
    ((8, 0), None, True, torch.bfloat16),   # A100
    ((8, 6), None, True, torch.bfloat16),   # A10G, RTX 3090
    ((7, 5), None, True, torch.float16),    # T4: bf16 only emulated
    ((7, 0), None, True, torch.float16),    # V100: bf16 only emulated
    ((6, 1), None, True, None),             # P4, GTX 1080: no tensor cores for fp16 either
    ((9, 4), "6.2", True, torch.bfloat16),  # ROCm (MI300): native bf16, whatever the CUDA-style capability
    ((9, 0), None, False, None),            # amp off in the config
])
def test_bf16_only_where_the_gpu_runs_it_natively(capability, hip, amp, expected):
    assert autocast_dtype(amp, capability, hip) is expected


def test_a_cpu_trial_computes_in_fp32_and_its_scaler_passes_through():
    hw = Hardware.select([])
    assert hw.amp_dtype is None and hw.precision == "float32" and not hw.grad_scaler().is_enabled()
    assert Hardware(torch.device("cuda", 0), torch.bfloat16).precision == "bfloat16"
    assert not Hardware(torch.device("cuda", 0), torch.bfloat16).grad_scaler().is_enabled()  # bf16 needs no scaling


def _square_step(model: nn.Module, batch, seen: list) -> StepOutput:
    inputs, weight = batch
    outputs = model(inputs)  # (B,4)
    seen.append(outputs.dtype)
    return StepOutput((outputs.float() ** 2).mean() * weight[0])


def test_fp16_trains_through_the_loss_scaler_and_skips_an_overflowing_step():
    """CPU autocast runs the loop's fp16 path for real: the step computes in fp16, a step whose scaled gradients
    overflow fp16 leaves the weights alone and halves the scale, and the next step trains."""
    torch.manual_seed(0)
    model = nn.Linear(64, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    hw = Hardware(torch.device("cpu"), torch.float16)
    scaler, seen = hw.grad_scaler(), []
    assert scaler.is_enabled() and scaler.get_scale() == 65536.0
    inputs = torch.randn(2, 64)
    before = model.weight.detach().clone()
    # loss 1e4 * mean(y^2): finite in fp32, but d/dy = 1e4 * y / 4 times the scale 65536 is far above fp16's 65504
    train_one_epoch(model, partial(_square_step, seen=seen), [(inputs, torch.tensor([1e4]))], optimizer, hw, 1,
                    scaler=scaler)
    assert seen == [torch.float16]
    assert torch.equal(model.weight, before) and scaler.get_scale() == 32768.0
    # the same scaler, now at 32768: a loss 1e6 times smaller has gradients that fit fp16 after scaling
    train_one_epoch(model, partial(_square_step, seen=seen), [(inputs, torch.tensor([1e-2]))], optimizer, hw, 2,
                    scaler=scaler)
    assert not torch.equal(model.weight, before) and torch.isfinite(model.weight).all()


# --- out of memory anywhere in a trial ---

def test_what_counts_as_running_out_of_memory():
    assert is_out_of_memory(torch.OutOfMemoryError(OOM))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously "
                                         "reported at some other API call"))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert not is_out_of_memory(RuntimeError("CUDA error: device-side assert triggered"))
    assert not is_out_of_memory(ValueError("CUDA out of memory"))  # only torch's errors speak for the device
    try:  # the host's allocator: memory other processes hold may be free on the retry, so it stays retryable
        torch.empty(2**62, dtype=torch.uint8)
    except RuntimeError as host:
        assert not is_out_of_memory(host)


class _Oom:
    """Raise a real torch.OutOfMemoryError at one stage of a trial."""

    def __init__(self, stage: str, calls: Path) -> None:
        self.stage, self.calls = stage, calls

    def build(self, config: VAEConfig) -> Built:
        with open(self.calls, "a") as f:
            f.write("build\n")
        if self.stage == "build":
            raise torch.OutOfMemoryError(OOM)
        built = vae.build(config)
        if self.stage == "loaders":  # the train set's copy to the device, in make_loaders
            built.train_set.to = self._raise
        if self.stage in ("step", "evaluation"):
            built.step = partial(self.step, inner=built.step)
        return built

    def step(self, model: nn.Module, batch, inner) -> StepOutput:
        if (self.stage == "step") == model.training:
            raise torch.OutOfMemoryError(OOM)
        return inner(model, batch)

    @staticmethod
    def _raise(*args, **kwargs):
        raise torch.OutOfMemoryError(OOM)


def _oom_task(stage: str, calls: Path) -> Task:
    return Task("generation", VAEConfig, _Oom(stage, calls).build, vae.write_artifacts)


def _small(data_root: Path, batch_size: int = 32) -> VAEConfig:
    return VAEConfig(dataset="mnist5k", image_size=28, epochs=1, batch_size=batch_size, steps_per_epoch=2,
                     latent_dim=4, data_root=str(data_root), feature_samples=32, val_samples=64)


@pytest.mark.parametrize("stage", ["build", "loaders", "step", "evaluation"])
def test_out_of_memory_anywhere_is_a_trial_memory_error_that_a_retry_does_not_repeat(stage, data_root, tmp_path):
    calls = tmp_path / "calls"
    session = LocalSession(tmp_path / "trial", cpus=1)
    with pytest.raises(TrialMemoryError) as failed:
        run_trial(_small(data_root).to_dict(), _oom_task(stage, calls), session)
    message = str(failed.value)
    assert message == "out of memory on cpu at batch size 32. To fit, lower --batch-size (or --image-size)."
    assert failed.value.__suppress_context__  # the trial's error says what to change, not the allocator's trace
    assert json.loads((session.trial_dir / RECORD).read_text())["message"] == message
    # Tune's retry: the same config and share, in the same trial folder, fails before building anything
    with pytest.raises(TrialMemoryError, match="^not retried: an earlier attempt of this trial with the same "
                                               "config and GPU share failed: out of memory on cpu at batch size 32"):
        run_trial(_small(data_root).to_dict(), _oom_task(stage, calls), LocalSession(tmp_path / "trial", cpus=1))
    assert calls.read_text().splitlines() == ["build"]
    # a changed config (a smaller batch) runs again
    with pytest.raises(TrialMemoryError, match="at batch size 16"):
        run_trial(_small(data_root, 16).to_dict(), _oom_task(stage, calls), LocalSession(tmp_path / "trial", cpus=1))
    assert calls.read_text().splitlines() == ["build", "build"]


def test_other_errors_pass_through_unrecorded(data_root, tmp_path):
    config = VAEConfig(dataset="mnist5k", image_size=28, epochs=1, batch_size=32, steps_per_epoch=20,
                       data_root=str(data_root), optim={"name": "sgd", "lr": 1e12})
    session = LocalSession(tmp_path, cpus=1)
    with pytest.raises(RuntimeError, match="loss became") as failed:
        run_trial(config.to_dict(), vae.TASK, session)
    assert not isinstance(failed.value, TrialMemoryError) and not (tmp_path / RECORD).exists()


def _oom_trainable(config: dict) -> None:
    run_trial(config["trial"], _oom_task("build", Path(config["calls"])))


def test_tune_retries_a_trial_that_ran_out_of_memory_only_as_a_refusal(ray_runtime, data_root, tmp_path):
    """Tune 2.60 retries every failed trial (--max-failures); the retries of one that ran out of memory end
    before building anything, each saying why."""
    from ray import tune

    calls = tmp_path / "calls"
    trainable = tune.with_resources(_oom_trainable, {"cpu": 1})
    grid = tune.Tuner(trainable, param_space={"trial": _small(data_root).to_dict(), "calls": str(calls)},
                      run_config=tune.RunConfig(storage_path=str(tmp_path / "results"), name="oom", verbose=0,
                                                failure_config=tune.FailureConfig(max_failures=2))).fit()
    assert grid.num_errors == 1
    assert calls.read_text().splitlines() == ["build"]  # the model was built once, by the first attempt
    error = str(grid[0].error)
    assert "TrialMemoryError: not retried: an earlier attempt" in error and "at batch size 32" in error
    failures = (Path(grid[0].path) / "error.txt").read_text()
    assert "Failure # 3" in failures and failures.count("TrialMemoryError: not retried") == 2


def test_every_report_names_the_dtype_the_trial_computed_in(data_root, tmp_path):
    config = VAEConfig(dataset="mnist5k", image_size=28, epochs=2, batch_size=32, steps_per_epoch=1,
                       latent_dim=4, data_root=str(data_root), feature_samples=32, val_samples=64)
    run_trial(config.to_dict(), vae.TASK, LocalSession(tmp_path, cpus=1))
    reports = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r[AMP_KEY] for r in reports] == ["float32", "float32"]


# --- whose GPU utilisation ---

def test_utilisation_is_the_processes_only_where_nvml_sees_this_process():
    assert utilisation_scope(41, [7, 41], per_process=True) == "process"
    assert utilisation_scope(41, [7, 3001], per_process=True) == "device"  # a container's PIDs: not NVML's
    assert utilisation_scope(41, None, per_process=True) == "device"  # NVML would not list the processes
    assert utilisation_scope(41, [41], per_process=False) == "device"  # no per-process sampling on this GPU
    assert UTIL_KEYS == {"process": "system/gpu_util_pct", "device": "system/device_gpu_util_pct"}


def test_process_utilisation_averages_this_pids_samples_only():
    import pynvml  # nvidia-ml-py: the [gpu] extra, installed from requirements.lock

    def sample(pid: int, stamp: int, sm: int):
        return pynvml.c_nvmlProcessUtilizationSample_t(pid=pid, timeStamp=stamp, smUtil=sm)

    asked = []

    def fetch(answer):
        def call(since: int):
            asked.append(since)
            if isinstance(answer, Exception):
                raise answer
            return answer
        return call

    samples = [sample(41, 1_000, 30), sample(7, 1_500, 90), sample(41, 2_000, 50)]
    assert process_utilisation(fetch(samples), 41, 500) == (40.0, 2_000)  # the other process's 90 % is not ours
    assert process_utilisation(fetch([sample(7, 3_000, 90)]), 41, 2_000) == (0.0, 3_000)  # ours ran nothing
    idle = pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)  # no process ran a kernel since `since`
    assert process_utilisation(fetch(idle), 41, 3_000) == (0.0, 3_000)
    assert asked == [500, 2_000, 3_000]
    with pytest.raises(pynvml.NVMLError_NotSupported):  # the monitor then reports the device's figure
        process_utilisation(fetch(pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)), 41, 0)
