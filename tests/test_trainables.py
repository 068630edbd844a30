"""The one loop and the three trainables: direct runs, Tune runs, exact resume, losses, GPU allocation."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import LABEL_KEYS, ROOT, VAE_KEYS
from trainables import ClassifyConfig, SegmentConfig, VAEConfig, classify, segment, vae
from trainables.checkpoints import CheckpointPolicy, load_state, model_bytes, save_state
from trainables.data import build_dataset, class_frequencies
from trainables.loop import CudaUnavailableError, Hardware, NonFiniteLossError, cuda_problem
from trainables.losses import class_weight_vector, segmentation_loss, vae_loss
from trainables.tune_io import LocalSession, run_trial



def small_configs(root: Path) -> dict:
    """Each task at the smallest size that still exercises everything (2 epochs, a few batches)."""
    root = str(root)
    return {
        "classification": (ClassifyConfig(model="resnet18", dataset="digits", epochs=2, batch_size=16,
                                          steps_per_epoch=2, data_root=root, feature_samples=32, val_samples=32),
                           classify.TASK),
        "generation": (VAEConfig(dataset="mnist5k", image_size=28, epochs=2, batch_size=32, steps_per_epoch=4,
                                 latent_dim=4, data_root=root, feature_samples=32, val_samples=128), vae.TASK),
        "segmentation": (SegmentConfig(model="unet_resnet50", dataset="shapes", image_size=32, epochs=2,
                                       batch_size=4, steps_per_epoch=2, data_root=root, feature_samples=16,
                                       class_weights="inverse_frequency"), segment.TASK),
    }


@pytest.mark.parametrize("task_name", ["classification", "generation", "segmentation"])
def test_direct_run_reports_every_key_and_writes_artifacts(task_name, data_root, tmp_path):
    config, task = small_configs(data_root)[task_name]
    run_trial(config.to_dict(), task, LocalSession(tmp_path, cpus=2))
    results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in results] == [1, 2]
    expected = VAE_KEYS if task_name == "generation" else LABEL_KEYS
    for result in results:
        assert expected <= set(result), expected - set(result)
        assert all(math.isfinite(result[k]) for k in expected)
    assert not (tmp_path / "checkpoint_000001").exists()  # auto: an epoch of seconds is not worth a checkpoint
    state = (tmp_path / "checkpoint_000002" / "state.pt").stat().st_size  # the last: the weights only
    assert abs(model_bytes(config)[0] - state) < 0.02 * state + 2**16  # the disk check's estimate of this file
    assert (tmp_path / "checkpoint_000002" / "example.pt").is_file()
    artifacts = tmp_path / "checkpoint_000002" / "artifacts"
    features = dict(__import__("numpy").load(artifacts / "features.npz"))
    assert features["labels"].shape == (config.feature_samples,)
    assert json.loads((artifacts / "meta.json").read_text())["task"] == config.TASK
    if task_name == "generation":
        assert features["mu"].shape == (config.feature_samples, config.latent_dim)
        assert (artifacts / "reconstructions.png").stat().st_size > 0
        assert (artifacts / "prior_samples.png").stat().st_size > 0
    else:
        matrix = __import__("numpy").load(artifacts / "confusion_matrix.npy")
        assert matrix.shape == (config.info.num_classes,) * 2 and matrix.sum() > 0
        assert (artifacts / "predictions.png").stat().st_size > 0
    if task_name == "segmentation":
        assert set(features) >= {"encoder_out", "decoder_mid"}
        # every evaluated pixel of the val set is counted once: the image count times the pixels of each
        val = build_dataset("shapes", "val", data_root, 32)
        labelled = sum(int(((m >= 0) & (m < 21)).sum()) for _, m in (val[i] for i in range(len(val))))
        assert matrix.sum() == labelled


def test_a_full_disk_while_checkpointing_is_named(tmp_path):
    from torch import nn

    from trainables.checkpoints import STATE_FILE, save_state

    model = nn.Linear(512, 512)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    (tmp_path / STATE_FILE).symlink_to("/dev/full")  # the kernel's always-full device: writes fail with ENOSPC
    with pytest.raises(OSError, match=r"no space left on device writing the checkpoint .*state.pt .*TMPDIR"):
        save_state(tmp_path, model, optimizer, None, epoch=1)


class _StopAfter(LocalSession):
    """A session whose process 'dies' right after the checkpoint of epoch ``stop``."""

    def __init__(self, out_dir, stop: int) -> None:
        super().__init__(out_dir, cpus=2)
        self.stop = stop

    def report(self, metrics, folder) -> None:
        super().report(metrics, folder)
        if metrics["epoch"] == self.stop:
            raise KeyboardInterrupt("stopped after epoch %d" % self.stop)


@pytest.mark.parametrize("task_name,every,stop", [("generation", "1", 1), ("segmentation", "1", 1),
                                                   ("generation", "2", 3)])
def test_resume_from_checkpoint_is_exact(task_name, every, stop, data_root, tmp_path):
    """Killed after epoch ``stop``, a trial resumes from its newest checkpoint (every ``every`` epochs) and ends
    where an undisturbed one does; it loses only the epochs since that checkpoint."""
    config, task = small_configs(data_root)[task_name]
    config = config.__class__(**{**config.__dict__, "epochs": 4 if every == "2" else 3, "checkpoint_every": every})
    whole = run_trial(config.to_dict(), task, LocalSession(tmp_path / "whole", cpus=2))
    with pytest.raises(KeyboardInterrupt):
        run_trial(config.to_dict(), task, _StopAfter(tmp_path / "cut", stop=stop))
    saved = sorted((tmp_path / "cut").glob("checkpoint_*"))
    assert [p.name for p in saved] == [f"checkpoint_{e:06d}" for e in range(int(every), stop + 1, int(every))]
    reports = [json.loads(line) for line in (tmp_path / "cut" / "results.jsonl").read_text().splitlines()]
    assert [r["checkpoint_epoch"] for r in reports] == [e - e % int(every) for e in range(1, stop + 1)]
    resumed = run_trial(config.to_dict(), task, LocalSession(tmp_path / "resumed", cpus=2, resume_from=saved[-1]))
    again = [json.loads(line)["epoch"] for line in (tmp_path / "resumed" / "results.jsonl").read_text().splitlines()]
    assert again == list(range(int(saved[-1].name[-6:]) + 1, config.epochs + 1))  # only the work since the checkpoint
    assert resumed["epoch"] == whole["epoch"] == config.epochs
    for key in ("train/loss", "val/loss"):
        assert resumed[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-6), key


def test_checkpoint_policy_by_epochs_seconds_and_measured_cost():
    by_epochs, by_seconds = CheckpointPolicy.parse("3"), CheckpointPolicy.parse("90s")
    assert [by_epochs.due(e, 0, 10, 0.0) for e in (1, 2, 3)] == [False, False, True]
    assert by_epochs.due(5, 3, 5, 0.0)  # the last epoch always
    assert not by_seconds.due(1, 0, 10, 89.0) and by_seconds.due(1, 0, 10, 90.0)
    auto = CheckpointPolicy.parse("auto", state_bytes=10**9)  # 1 GB: 10 s at the assumed 100 MB/s before measuring
    assert auto.interval_s() == pytest.approx(190.0) and not auto.due(1, 0, 10, 189.0)
    auto.saved(0.5)  # measured: half a second, write and upload
    assert auto.interval_s() == 60.0  # the floor: not more often than once a minute
    assert auto.due(9, 0, 10, 600.0) and not auto.due(9, 0, 10, 300.0)  # not when the end's is nearer (33 s)
    auto.saved(20.0)
    assert auto.interval_s() == pytest.approx(380.0)  # 19 x 20 s: checkpoints take 5% of the time
    for bad in ("0", "-1", "1.5", "every", "10m"):
        with pytest.raises(ValueError, match="valid: 'auto'"):
            CheckpointPolicy.parse(bad)


def test_a_restored_optimizer_takes_the_new_learning_rate_and_keeps_its_moments(tmp_path):
    """PBT and resumes change the learning rate: the restored optimizer runs at the new one (its schedule too)."""
    from torch import nn

    from trainables import OptimConfig
    from trainables.optim import build_optimizer, build_scheduler

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    for schedule in ("none", "step"):
        old = OptimConfig("adam", lr=1e-3, schedule=schedule, step_size=1, gamma=0.5)
        optimizer, scheduler = build_optimizer(model.parameters(), old), None
        scheduler = build_scheduler(optimizer, old, 5)
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        save_state(tmp_path, model, optimizer, scheduler, epoch=1)
        new = OptimConfig("adam", lr=4e-3, schedule=schedule, step_size=1, gamma=0.5)
        restored = build_optimizer(model.parameters(), new)
        restored_scheduler = build_scheduler(restored, new, 5)
        assert load_state(tmp_path, model, restored, restored_scheduler) == 1
        expected = 4e-3 * (0.5 if schedule == "step" else 1)  # the schedule's value at epoch 1, on the new base
        assert restored.param_groups[0]["lr"] == pytest.approx(expected), schedule
        moments = restored.state_dict()["state"][0]["exp_avg"]
        assert torch.equal(moments, optimizer.state_dict()["state"][0]["exp_avg"])
        if restored_scheduler is not None:
            restored_scheduler.step()
            assert restored.param_groups[0]["lr"] == pytest.approx(expected * 0.5)


def test_inverse_frequency_weights_come_from_the_training_masks(data_root):
    train = build_dataset("shapes", "train", data_root, 32)
    frequencies = class_frequencies(train, 21, data_root / "cache")
    weights = class_weight_vector("inverse_frequency", 21, frequencies)
    seen = frequencies > 0
    # rarer classes weigh more, in exact inverse proportion, with mean 1 over the classes seen
    ratio = weights[seen].numpy() * frequencies[seen]
    assert ratio == pytest.approx([ratio[0]] * int(seen.sum()), rel=1e-5)
    assert float(weights[seen].mean()) == pytest.approx(1.0, rel=1e-5)
    assert weights[0] < weights[seen].max()  # background is the most frequent class


def test_background_weight_changes_the_loss_by_the_hand_computed_amount():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]], [[1.0, 3.0]]]])  # (1,K=3,1,2)
    masks = torch.tensor([[[0, 2]]])
    nll = [-F.log_softmax(logits[0, :, 0, 0], 0)[0], -F.log_softmax(logits[0, :, 0, 1], 0)[2]]
    plain = segmentation_loss(logits, masks, class_weight_vector("none", 3))
    weighted = segmentation_loss(logits, masks, class_weight_vector(0.1, 3))
    assert plain == pytest.approx(float((nll[0] + nll[1]) / 2))
    assert weighted == pytest.approx(float((0.1 * nll[0] + nll[1]) / 1.1))
    ignored = segmentation_loss(logits, torch.tensor([[[255, 2]]]), None)
    assert ignored == pytest.approx(float(nll[1]))


@pytest.mark.parametrize("kind", ["bce", "mse", "bce+mse"])
def test_vae_losses_match_hand_computed_values(kind):
    logits = torch.tensor([[[[0.0, 2.0]]], [[[-1.0, 1.0]]]])  # (2,1,1,2)
    images = torch.tensor([[[[0.0, 1.0]]], [[[0.5, 0.25]]]])
    mu, logvar = torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0], [math.log(2.0)]])
    probs = torch.sigmoid(logits)
    bce = -(images * probs.log() + (1 - images) * (1 - probs).log()).sum() / 2
    mse = ((probs - images) ** 2).sum() / 2
    kl = (0.5 * (1.0 ** 2) + 0.5 * (2.0 - 1 - math.log(2.0))) / 2  # per image: (mu^2 + var - 1 - log var) / 2
    recon = {"bce": bce, "mse": mse, "bce+mse": bce + mse}[kind]
    loss, got_recon, got_kl = vae_loss(logits, images, mu, logvar, kind, beta=0.5)
    assert got_recon == pytest.approx(float(recon), rel=1e-6)
    assert got_kl == pytest.approx(kl, rel=1e-6)
    assert loss == pytest.approx(float(recon) + 0.5 * kl, rel=1e-6)


def test_nan_loss_stops_the_trial_naming_epoch_step_and_config(data_root, tmp_path):
    config = VAEConfig(dataset="mnist5k", image_size=28, epochs=1, batch_size=32, steps_per_epoch=20,
                       data_root=str(data_root), optim={"name": "sgd", "lr": 1e12})
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step \d+; config: .*1000000000000"):
        run_trial(config.to_dict(), vae.TASK, LocalSession(tmp_path, cpus=2))


def test_device_comes_from_the_trials_gpu_ids():
    assert Hardware.select([]).device.type == "cpu"
    if torch.cuda.device_count() == 0:  # this machine: GPU ids without CUDA are a diagnosis, not a CUDA trace
        with pytest.raises(CudaUnavailableError, match=r"GPU id\(s\) \['0'\] on node 10.0.0.7, but CUDA sees no "):
            Hardware.select(["0"], amp=True, where="node 10.0.0.7")
        return
    gpu = Hardware.select(["0"], amp=True)
    assert gpu.device == torch.device("cuda", 0) and gpu.channels_last
    # bf16 exactly where torch says the GPU runs it natively; fp16 on the tensor-core GPUs before that
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert (gpu.amp_dtype == torch.bfloat16) == native
    assert Hardware.select(["0"], amp=False).amp_dtype is None


def test_cuda_problem_names_what_is_missing():
    assert "built without CUDA" in cuda_problem(["0"], None, 0, None)
    assert "no NVIDIA driver or GPU" in cuda_problem(["0"], "13.0", 0, "0")
    assert "CUDA_VISIBLE_DEVICES='0'" in cuda_problem(["0"], "13.0", 0, "0")
    assert "only 1 device(s)" in cuda_problem(["0", "1"], "13.0", 1, "0,1")
    assert cuda_problem(["0", "1"], "13.0", 2, "0,1") is None


def _report_device(config: dict) -> None:
    import os

    import ray
    from ray import tune

    from trainables.tune_io import TuneSession

    session = TuneSession()
    try:
        device = Hardware.select(session.gpu_ids, where=session.where).device.type
    except CudaUnavailableError as err:  # the logical GPUs of the test's runtime, on a machine without CUDA
        device = f"unusable: {err}"
    tune.report({"device": device, "gpu_ids": ",".join(map(str, ray.get_gpu_ids())),
                 "visible": os.environ.get("CUDA_VISIBLE_DEVICES", ""), "gpus": session.gpus})


def test_each_trial_sees_its_own_logical_gpu(ray_runtime):
    from ray import tune

    def run(gpus: float, trials: int):
        trainable = tune.with_resources(_report_device, {"cpu": 0.5, "gpu": gpus})
        grid = tune.Tuner(trainable, param_space={"i": tune.grid_search(list(range(trials)))},
                          run_config=tune.RunConfig(verbose=0)).fit()
        return [r.metrics for r in grid]

    shared = run(0.5, 4)
    if torch.cuda.device_count() == 0:
        assert all(m["device"].startswith("unusable: ") and " on node " in m["device"] for m in shared), shared
    else:
        assert [m["device"] for m in shared] == ["cuda"] * 4
    assert sorted(m["gpu_ids"] for m in shared) == ["0", "0", "1", "1"]  # two half-GPU trials per GPU
    assert all(m["visible"] == m["gpu_ids"] for m in shared)
    assert [m["gpus"] for m in shared] == [0.5] * 4  # the share each trial caps its GPU memory to
    assert [(m["device"], m["gpus"]) for m in run(0, 1)] == [("cpu", 0)]


def test_image_grid_is_torchvisions_pixel_for_pixel(tmp_path):
    """save_rows writes what torchvision's make_grid + save_image would (the VAE's trials no longer import it)."""
    import numpy as np
    from PIL import Image
    from torchvision.utils import make_grid, save_image

    from trainables.artifacts import save_rows

    generator = torch.Generator().manual_seed(0)
    rows = [torch.rand(5, 1, 7, 9, generator=generator), torch.rand(5, 3, 7, 9, generator=generator)]
    save_rows(tmp_path / "ours.png", rows, padding=2)
    tiles = torch.cat([row.expand(-1, 3, -1, -1) for row in rows])
    save_image(make_grid(tiles, nrow=5, padding=2, pad_value=1.0), str(tmp_path / "theirs.png"))
    ours, theirs = (np.asarray(Image.open(tmp_path / f"{name}.png")) for name in ("ours", "theirs"))
    assert ours.shape == theirs.shape == (2 * 9 + 2, 5 * 11 + 2, 3) and (ours == theirs).all()


def test_a_trial_process_imports_no_driver_code(data_root):
    """A trial trains with torch and its data only: no pandas, scipy, MLflow, scikit-learn or matplotlib, and none
    of the runner's or the analysis' modules (STYLE.md: studies -> analysis -> trainables)."""
    code = ("import sys; from trainables import VAEConfig, run_trial; from trainables.vae import TASK; "
            "from trainables.tune_io import LocalSession; "
            f"config = VAEConfig(dataset='mnist5k', image_size=28, epochs=1, steps_per_epoch=1, data_root={str(data_root)!r}); "
            f"run_trial(config.to_dict(), TASK, LocalSession({str(data_root / 'footprint')!r})); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'pandas', 'scipy', 'mlflow', 'analysis', 'studies', "
            "'sklearn', 'matplotlib'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr[-2000:]


def test_fp16s_loss_scale_is_checkpointed_and_restored(tmp_path):
    """A resumed fp16 trial goes on with the loss scale it had, not a fresh one (its first steps would be skipped)."""
    from torch import nn

    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=True)
    save_state(tmp_path, model, optimizer, None, epoch=3, scaler=scaler)
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0**16, enabled=True)
    assert load_state(tmp_path, model, optimizer, None, fresh) == 3
    assert fresh.get_scale() == 2.0**10
