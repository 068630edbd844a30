"""Are our networks as fast and as lean as torchvision's at the same size? (target: ratio >= 1.0)

Forward + backward images/s and step memory of each model in MODELS against the closest torchvision
network, timed in alternating windows (ours, reference, ours, ...) so that load drift cancels:
  vgg16            vs torchvision vgg16_bn: features + global pool + the same small classifier (32x32)
  resnet18/34/50   vs torchvision resnet18/34/50 with the CIFAR stem (3x3 stride-1 conv1, no max-pool)
  unet_resnet50    its ResNet50 encoder vs torchvision resnet50 truncated after layer3 (and the whole U-Net)
  segnet_vgg16     its encoder (pooling with indices) vs torchvision vgg16_bn().features (and the whole SegNet)
  conv_vae         no torchvision counterpart: ours only
Memory is the peak above the built model during one step: CUDA max_memory_allocated, or on CPU the
resident set sampled every millisecond (after malloc_trim), so it counts activations, gradients, workspace.

    python benchmarks/model_throughput.py                         # CPU, small batches (a few minutes)
    python benchmarks/model_throughput.py --device cuda --amp both --channels-last both --batch-scale 8
    python benchmarks/model_throughput.py --smoke                 # one model of each kind, batch 2, one step
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import threading
import time
from functools import partial

from common import table, write_json  # first: puts the repository on sys.path

import torch
from torch import nn
from torchvision import models as tvm

from vision_models import build_model

# name -> (in_channels, image size, CPU batch, classes); the report's sizes, small batches for 2 cores
SHAPES = {"vgg16": (3, 32, 32, 10), "resnet18": (3, 32, 32, 10), "resnet34": (3, 32, 16, 10),
          "resnet50": (3, 32, 8, 10), "conv_vae": (1, 28, 64, 0), "unet_resnet50": (3, 64, 4, 21),
          "segnet_vgg16": (3, 64, 4, 21)}
SMOKE_MODELS = ["vgg16", "resnet18", "conv_vae", "unet_resnet50", "segnet_vgg16"]  # one of each kind of pair


def cifar_resnet(depth: str, num_classes: int) -> nn.Module:
    """torchvision's ResNet with the CIFAR stem swap."""
    model = getattr(tvm, depth)(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def vgg16_bn_32(num_classes: int) -> nn.Module:
    """torchvision's vgg16_bn features + global pool + our small classifier (its 4096-wide head assumes 224x224)."""
    return nn.Sequential(tvm.vgg16_bn().features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 512),
                         nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(512, num_classes))


def resnet50_to_layer3() -> nn.Module:
    net = tvm.resnet50()
    return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3)


class SegNetEncoder(nn.Module):
    """Our SegNet's encoder pass: the features with pooling indices kept, as SegNet.forward runs them."""

    def __init__(self, segnet: nn.Module) -> None:
        super().__init__()
        self.features = segnet.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.features:
            x = layer(x)[0] if isinstance(layer, nn.MaxPool2d) else layer(x)
        return x


class UNetEncoder(nn.Module):
    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.encoder = unet.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[-1]  # layer3 (B,1024,H/16,W/16): what the truncated reference returns


def pairs(names: list[str]) -> list[tuple]:
    """(row name, build ours, reference name, build reference or None, shape key) per measured network."""
    rows = []
    for name in names:
        ours = partial(build_model, name, **({"num_classes": SHAPES[name][3]} if SHAPES[name][3] else {}))
        if name == "vgg16":
            rows.append((name, ours, "vgg16_bn (32x32 head)", partial(vgg16_bn_32, 10), name))
        elif name.startswith("resnet"):
            rows.append((name, ours, f"{name} (CIFAR stem)", partial(cifar_resnet, name, 10), name))
        elif name == "unet_resnet50":
            rows.append(("unet_resnet50 encoder", lambda build=ours: UNetEncoder(build()), "resnet50 to layer3",
                         resnet50_to_layer3, name))
            rows.append((name, ours, "-", None, name))
        elif name == "segnet_vgg16":
            rows.append(("segnet_vgg16 encoder", lambda build=ours: SegNetEncoder(build()), "vgg16_bn features",
                         lambda: tvm.vgg16_bn().features, name))
            rows.append((name, ours, "-", None, name))
        else:
            rows.append((name, ours, "-", None, name))
    return rows


def loss_of(output) -> torch.Tensor:
    first = output[0] if isinstance(output, tuple) else output  # the VAE returns (recon, mu, logvar)
    return first.float().mean()


class Runner:
    """One model's training step on fixed random input, on a device, with optional bf16 and channels_last."""

    def __init__(self, model: nn.Module, images: torch.Tensor, amp: bool, channels_last: bool) -> None:
        self.device = images.device
        memory = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=memory).train()
        self.images = images.contiguous(memory_format=memory)
        self.amp = amp and self.device.type == "cuda"

    def step(self) -> None:
        context = torch.autocast("cuda", torch.bfloat16) if self.amp else contextlib.nullcontext()
        with context:
            loss = loss_of(self.model(self.images))
        loss.backward()
        self.model.zero_grad(set_to_none=True)

    def seconds(self, steps: int) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync()
        return time.perf_counter() - start


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def step_memory_mib(runner: Runner) -> float:
    """Peak memory of one step above the built model (and its gradients freed), in MiB."""
    gc.collect()
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        runner.step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed blocks back, so the baseline is the model alone
    before, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    runner.step()
    done.set()
    sampler.join()
    return max(peak[0] - before, 0) / 2**20


def measure(ours: Runner, ref: Runner | None, steps: int, rounds: int, batch: int) -> dict:
    """images/s of each from alternating windows (ours, ref, ours, ref, ...) after one warm-up step each."""
    runners = {"ours": ours, **({"ref": ref} if ref else {})}
    for runner in runners.values():
        runner.step()
    totals = dict.fromkeys(runners, 0.0)
    for round_ in range(rounds):
        for key in (list(runners) if round_ % 2 == 0 else list(runners)[::-1]):
            totals[key] += runners[key].seconds(steps)
    result = {f"{key}_img_s": batch * steps * rounds / total for key, total in totals.items()}
    result.update({f"{key}_mem_mib": step_memory_mib(runner) for key, runner in runners.items()})
    if ref:
        result["ratio"] = result["ours_img_s"] / result["ref_img_s"]
        result["mem_ratio"] = result["ref_mem_mib"] / max(result["ours_mem_mib"], 1e-9)  # > 1: ours leaner
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--models", nargs="+", choices=list(SHAPES), help="default: all (--smoke: one of each kind)")
    parser.add_argument("--batch-scale", type=int, default=1, help="multiply the small CPU batches (e.g. 8 on a GPU)")
    parser.add_argument("--steps", type=int, default=1, help="steps per timed window")
    parser.add_argument("--rounds", type=int, default=16, help="timed windows per model (alternating)")
    parser.add_argument("--amp", default="off", choices=("off", "on", "both"), help="bf16 autocast (CUDA only)")
    parser.add_argument("--channels-last", default="off", choices=("off", "on", "both"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--smoke", action="store_true",
                        help="one model of each kind, batch 2 at 32x32, one window of one step: not a measurement")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.rounds = 1, 1
    args.models = args.models or (SMOKE_MODELS if args.smoke else list(SHAPES))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    device = torch.device(args.device)
    options = {"off": [False], "on": [True], "both": [False, True]}
    amps = options[args.amp] if device.type == "cuda" else [False]
    lasts = options[args.channels_last]
    rows = []
    for row_name, build_ours, ref_name, build_ref, shape_key in pairs(args.models):
        channels, size, batch, _ = SHAPES[shape_key]
        size, batch = (min(size, 32), min(batch, 2)) if args.smoke else (size, batch * args.batch_scale)
        torch.manual_seed(0)
        images = torch.rand(batch, channels, size, size, device=device)
        for amp in amps:
            for last in lasts:
                ours = Runner(build_ours(), images, amp, last)
                ref = Runner(build_ref(), images, amp, last) if build_ref else None
                result = measure(ours, ref, args.steps, args.rounds, batch)
                rows.append({"model": row_name, "reference": ref_name, "device": args.device, "amp": amp,
                             "channels_last": last, "batch": batch, "size": size, **result})
                ratio = f"ours/reference {result['ratio']:.3f}" if "ratio" in result else "no reference"
                print(f"{row_name} amp={amp} channels_last={last}: {ratio}", flush=True)
                del ours, ref
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    columns = ["model", "reference", "amp", "channels_last", "batch", "size", "ours_img_s", "ref_img_s", "ratio",
               "ours_mem_mib", "ref_mem_mib", "mem_ratio"]
    print(table(rows, columns))
    path = write_json("model_throughput", {"args": vars(args), "rows": rows}, smoke=args.smoke)
    ratios = [row["ratio"] for row in rows if "ratio" in row]
    print(f"json: {path}")
    print(f"lowest ratio ours/reference: {min(ratios):.3f}" if ratios else "no reference pairs measured")


if __name__ == "__main__":
    main()
