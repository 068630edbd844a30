"""What a study costs on disk and how much of a GPU epoch its checkpoints would take, per model family.

    python benchmarks/storage_cost.py            # ~5 minutes on 2 cores: sizes, save rates, two real studies
    python benchmarks/storage_cost.py --smoke    # two families, no study: the code path in seconds

For each family at the report's sizes (its study's optimizer): the bytes of a mid-trial checkpoint (weights and
optimizer moments) and of the last one (weights only), measured by writing them here (``save_state``, the trial's
own code), with the save rate in MB/s. From those and each model's projected GPU throughput it projects the share
of a trial's time spent checkpointing under the default policy (``--checkpoint-every auto``: a checkpoint when the
training since the last took 19 times its cost and at least a minute, and one after the last epoch), for a write
to local disk (this machine's rate) and for an upload to S3 at ``S3_MBPS``.

GPU throughput: no GPU here, so each model's training rate is projected from one published anchor, scaled by the
forward FLOPs per image (``torch.utils.flop_counter`` at the report's input size): NVIDIA's ResNet-50 v1.5 for
PyTorch trains at ~2,700 img/s on one A100 80GB with AMP at 224x224 (NVIDIA DeepLearningExamples,
PyTorch/Classification/ConvNets/resnet50v1.5, "Training performance: NVIDIA DGX A100 (8x A100 80GB)",
per-GPU figure), capped at ``MAX_IPS`` for the small 28-32 px models, where FLOPs no longer set the pace.
``benchmarks/model_throughput.py --device cuda`` measures the real rates where a GPU is at hand.

Without --smoke it also runs two real studies through the runner and measures what they leave: the quick
``seg_optimizers`` study (goal <= 250 MB in all, from 1.4 GB) and a 5-trial ``vae_lr --epochs 1
--steps-per-epoch 1`` (bytes per trial, the figure of a 1,000-trial study; goal: a few MB, from 52 MB).
Last line: the worst projected share (goal <= 0.05).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, table, write_json  # first: puts the repository on sys.path

import torch

from trainables import ClassifyConfig, OptimConfig, SegmentConfig, VAEConfig
from trainables.checkpoints import CheckpointPolicy, model_bytes, save_state
from trainables.optim import build_optimizer
from vision_models import build_model

ANCHOR_IPS, ANCHOR_SIZE = 2700.0, 224  # ResNet-50 training img/s on one A100 80GB, AMP (see the docstring)
# FLOPs stop predicting speed for tiny inputs (launch and memory bound): no family is projected above this rate,
# about what well-tuned CIFAR-10 ResNet trainings report on one A100 (e.g. the airbench speedruns)
MAX_IPS = 50_000.0
S3_MBPS = 100.0  # a single-stream S3 upload from an EC2 instance, MB/s (Ray Tune uploads a checkpoint as one)
# the report's studies: (family, config at the report's size with its study's optimizer, images per epoch, epochs)
FAMILIES = {
    "vgg16": (ClassifyConfig(model="vgg16", dataset="cifar10", optim=OptimConfig("sgd", 0.1, 0.9)), 50_000, 30),
    "resnet18": (ClassifyConfig(model="resnet18", dataset="cifar10", optim=OptimConfig("sgd", 0.1, 0.9)), 50_000, 30),
    "conv_vae": (VAEConfig(dataset="mnist", image_size=28, latent_dim=16, optim=OptimConfig("adam", 5e-4)),
                 60_000, 20),
    "segnet_vgg16": (SegmentConfig(model="segnet_vgg16", dataset="voc", pretrained=False,
                                   optim=OptimConfig("adam", 1e-3)), 2_913, 100),
    "unet_resnet50": (SegmentConfig(model="unet_resnet50", dataset="voc", pretrained=False, steps_per_epoch=5,
                                    batch_size=32, optim=OptimConfig("adam", 1e-3)), 160, 582),
}


def flops_per_image(name: str, kwargs: dict, size: int, channels: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_model(name, **kwargs)
        images = torch.empty(1, channels, size, size)
    with FlopCounterMode(display=False) as counter:
        model(images)
    return float(counter.get_total_flops())


def measure(name: str, config, repeats: int) -> dict:
    """Write a mid-trial and a last checkpoint of the real model ``repeats`` times; sizes and the save rate."""
    kwargs = {**config.model_kwargs(), **({"pretrained": False} if "pretrained" in config.model_kwargs() else {})}
    model = build_model(config.model, **kwargs)
    optimizer = build_optimizer(model.parameters(), config.optim)
    if config.optim.name == "adam" or config.optim.momentum:  # the moments exist once a step was taken
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        optimizer.step()
    folder = Path(tempfile.mkdtemp(prefix="vt-storage-"))
    try:
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            save_state(folder, model, optimizer, None, epoch=1)
            seconds.append(time.perf_counter() - start)
        mid = (folder / "state.pt").stat().st_size
        save_state(folder, model, optimizer, None, epoch=2, final=True)
        last = (folder / "state.pt").stat().st_size
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    estimate = sum(model_bytes(config))
    return {"mid_mb": mid / 1e6, "last_mb": last / 1e6, "estimate_error": abs(estimate - mid) / mid,
            "save_mbps": mid / 1e6 / min(seconds)}


def projected_share(cost_s: float, last_s: float, epoch_s: float, epochs: int) -> float:
    """Checkpointing's share of a trial under the default policy, by running the trial's own ``CheckpointPolicy``
    over ``epochs`` epochs of ``epoch_s``: mid-trial checkpoints cost ``cost_s``, the last (weights only) ``last_s``."""
    policy = CheckpointPolicy.parse("auto", 0)
    spent, last_epoch, trained = 0.0, 0, 0.0
    for epoch in range(1, epochs + 1):
        trained += epoch_s
        if policy.due(epoch, last_epoch, epochs, trained):
            cost = last_s if epoch == epochs else cost_s
            policy.saved(cost)
            spent, last_epoch, trained = spent + cost, epoch, 0.0
    return spent / (epochs * epoch_s + spent)


def folder_bytes(path: Path) -> int:
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file()) if path.exists() else 0


def study_bytes(script: str, flags: list[str], work: Path) -> dict:
    """Run a study script as a user would and measure its results folder and MLflow artifacts."""
    work.mkdir(parents=True)
    done = subprocess.run([sys.executable, str(ROOT / "studies" / f"{script}.py"), *flags, "--storage",
                           str(work / "results"), "--mlflow-uri", f"sqlite:///{work / 'mlflow.db'}"], cwd=work,
                          capture_output=True, text=True, timeout=1200, env={"PYTHONPATH": str(ROOT), **_env()})
    if done.returncode != 0:
        raise SystemExit(f"{script} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    results, artifacts = folder_bytes(work / "results"), folder_bytes(work / "mlartifacts")
    trials = len(list((work / "results" / script).glob("*/result.json")))
    return {"study": script, "trials": trials, "results_mb": results / 1e6, "mlflow_mb": artifacts / 1e6,
            "total_mb": (results + artifacts) / 1e6, "per_trial_mb": (results + artifacts) / 1e6 / max(trials, 1)}


def _env() -> dict:
    import os

    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="two small families, no study: the code path only")
    args = parser.parse_args()
    names = ["resnet18", "conv_vae"] if args.smoke else list(FAMILIES)
    anchor = flops_per_image("resnet50", {"num_classes": 1000}, ANCHOR_SIZE, 3)
    rows = []
    for name in names:
        config, images, epochs = FAMILIES[name]
        size = config.image_size or 28
        flops = flops_per_image(config.model, {**config.model_kwargs(), **(
            {"pretrained": False} if "pretrained" in config.model_kwargs() else {})}, size, config.info.in_channels)
        ips = min(MAX_IPS, ANCHOR_IPS * anchor / flops)
        row = {"family": name, "size": size, **measure(name, config, 1 if args.smoke else 3), "gpu_img_s": ips,
               "gpu_epoch_s": images / ips}
        local = (row["mid_mb"] / row["save_mbps"], row["last_mb"] / row["save_mbps"])
        s3 = (local[0] + row["mid_mb"] / S3_MBPS, local[1] + row["last_mb"] / S3_MBPS)
        row.update(local_share=projected_share(*local, images / ips, epochs),
                   s3_share=projected_share(*s3, images / ips, epochs),
                   every_epoch_s3_share=s3[0] / (images / ips + s3[0]))
        rows.append(row)
    print(table(rows, ["family", "size", "mid_mb", "last_mb", "save_mbps", "gpu_img_s", "gpu_epoch_s",
                       "local_share", "s3_share", "every_epoch_s3_share"]))
    studies = []
    if not args.smoke:
        work = Path(tempfile.mkdtemp(prefix="vt-storage-study-"))
        try:
            studies.append(study_bytes("seg_optimizers", ["--quick"], work / "seg"))
            studies.append(study_bytes("vae_lr", ["--quick", "--epochs", "1", "--steps-per-epoch", "1"], work / "vae"))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(table(studies))
    worst = max(max(row["local_share"], row["s3_share"]) for row in rows)
    path = write_json("storage_cost", {"anchor": {"img_s": ANCHOR_IPS, "size": ANCHOR_SIZE, "model": "resnet50"},
                                       "s3_mbps": S3_MBPS, "families": rows, "studies": studies,
                                       "worst_share": worst}, smoke=args.smoke)
    print(f"JSON: {path}")
    print(f"worst projected checkpoint share: {worst:.4f} (goal <= 0.05)")


if __name__ == "__main__":
    main()
