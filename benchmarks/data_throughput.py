"""How much faster is the batched data path than the per-sample one, and does it keep the models fed?

Per data set at the full-budget settings (CIFAR-10 32x32 batch 128, MNIST 28x28 batch 128, VOC 256x256 batch
32), images/s of one CPU core (one torch thread, no loader workers) for
  per-sample  what trials used before: torchvision's PIL transforms item by item through a DataLoader
              (CIFAR-10/MNIST exactly as torchvision's datasets hand PIL images over; VOC decoded from JPEG/PNG)
  batched     what trials use now: the uint8 set augmented per batch; VOC read from its decoded cache
on the same data in the same run, in alternating windows (per-sample, batched, batched, per-sample, ...) so
that load drift cancels. CIFAR-10 and VOC are not available offline: random uint8 arrays of CIFAR-10's and
MNIST's exact shapes, and generated 500x375 scenes written as VOC JPEG/PNG files. Each rate is set against
the training-step rate of the model that consumes it (ResNet18, the VAE, the U-Net at the same size),
measured with benchmarks/model_throughput.py's runner: on this CPU with one thread and a small batch, or on
a GPU at the full batch with bf16 + channels_last as trials run (--model-device cuda).

    python benchmarks/data_throughput.py                       # CPU, about 3 minutes
    python benchmarks/data_throughput.py --model-device cuda   # the models' side on the GPU
    python benchmarks/data_throughput.py --smoke               # tiny sets and windows: the code path, seconds
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from common import table, write_json  # first: puts the repository on sys.path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import VOCSegmentation

from model_throughput import Runner
from trainables.data.batched import BatchedImages, DeviceBatches
from trainables.data.classification import CIFAR_MEAN, CIFAR_STD, MNIST_MEAN, MNIST_STD, shift_pad
from trainables.data.segmentation import SegmentationBatches
from trainables.data.shapes import render_scene
from trainables.data.transforms import classification_transform, segmentation_transform
from trainables.data.voc import build_voc, voc_palette
from vision_models import build_model

VOC_W, VOC_H = 500, 375
# data set -> (consumer model, image size, batch, train split shape (N,C,H,W))
SETS = {"cifar10": ("resnet18", 32, 128, (50_000, 3, 32, 32)), "mnist": ("conv_vae", 28, 128, (60_000, 1, 28, 28)),
        "voc": ("unet_resnet50", 256, 32, None)}
# --smoke: the same paths on a few hundred images, VOC at 64 px
SMOKE_SETS = {"cifar10": ("resnet18", 32, 8, (256, 3, 32, 32)), "mnist": ("conv_vae", 28, 8, (256, 1, 28, 28)),
              "voc": ("unet_resnet50", 64, 2, None)}


class PerSampleImages(torch.utils.data.Dataset):
    """What torchvision's CIFAR10/MNIST do per item: a PIL image from the array, then the transform."""

    def __init__(self, pixels: np.ndarray, transform) -> None:
        self.pixels, self.transform = pixels, transform  # (N,H,W,C) or (N,H,W) uint8

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.pixels[index])  # (H,W) -> "L", (H,W,3) -> "RGB", as torchvision's datasets
        return self.transform(image), 0


def write_voc_tree(root: Path, count: int) -> Path:
    """VOCdevkit/VOC2012 with ``count`` generated 500x375 scenes (train split = all of them)."""
    base = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    palette, ids = voc_palette(), [f"2012_{i:06d}" for i in range(count)]
    for index, image_id in enumerate(ids):
        image, labels = render_scene(np.random.default_rng([7, index]), VOC_W)
        Image.fromarray(image[:VOC_H]).save(base / "JPEGImages" / f"{image_id}.jpg", quality=90)
        mask = Image.fromarray(labels[:VOC_H])
        mask.putpalette(palette)
        mask.save(base / "SegmentationClass" / f"{image_id}.png")
    for split in ("train", "trainval", "val"):
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def paths(name: str, root: Path, images: int, sets: dict = SETS):
    """(per-sample loader, batched loader) of one data set, both shuffling, batch as in ``sets``."""
    _, size, batch, shape = sets[name]
    if name == "voc":
        write_voc_tree(root, images)
        per_sample = VOCSegmentation(str(root), year="2012", image_set="trainval",
                                     transforms=segmentation_transform(size, augment=True))
        batched = SegmentationBatches(build_voc(root, "train", size, augment=True), batch, shuffle=True,
                                      device=torch.device("cpu"), drop_last=True)
    else:
        pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)  # (N,C,H,W)
        stats, flip = ((CIFAR_MEAN, CIFAR_STD), True) if name == "cifar10" else ((MNIST_MEAN, MNIST_STD), False)
        as_stored = pixels.transpose(0, 2, 3, 1) if shape[1] == 3 else pixels[:, 0]  # how torchvision keeps them
        per_sample = PerSampleImages(as_stored, classification_transform(size, size, *stats, augment=True, flip=flip))
        batched = DeviceBatches(BatchedImages(torch.from_numpy(pixels), torch.zeros(shape[0], dtype=torch.long),
                                              image_size=size, pad=shift_pad(size, True), flip=flip,
                                              mean=stats[0], std=stats[1]), batch, shuffle=True, drop_last=True)
    loader = torch.utils.data.DataLoader(per_sample, batch_size=batch, shuffle=True, drop_last=True, num_workers=0)
    return loader, batched


def rate(loader, batches: int, state: dict) -> float:
    """Images/s over ``batches`` batches, continuing the loader's current pass (a new one when it ends)."""
    start, count = time.perf_counter(), 0
    for _ in range(batches):
        try:
            images = next(state["it"])[0]
        except (KeyError, StopIteration):
            state["it"] = iter(loader)
            images = next(state["it"])[0]
        count += images.shape[0]
    return count / (time.perf_counter() - start)


def model_rate(name: str, size: int, batch: int, steps: int, device: str) -> float:
    """Training images/s of the consuming model (forward + backward); on CUDA with bf16 + channels_last."""
    kwargs = {"num_classes": 21} if name == "unet_resnet50" else {"num_classes": 10} if name == "resnet18" else {}
    channels = 1 if name == "conv_vae" else 3
    cuda = device == "cuda"
    runner = Runner(build_model(name, **kwargs), torch.rand(batch, channels, size, size, device=device), amp=cuda,
                    channels_last=cuda)
    runner.step()  # warm-up (cuDNN autotuning, allocator)
    return batch * steps / runner.seconds(steps)


def model_rates(device: str, sets: dict = SETS, smoke: bool = False) -> tuple[dict, str]:
    """{model: training img/s}: small batches and 2 steps on the CPU, the full batch and 10 steps on a GPU."""
    small = {"resnet18": 16, "conv_vae": 64, "unet_resnet50": 2}
    steps = 1 if smoke else 10 if device == "cuda" else 2
    rates = {model: model_rate(model, size, min(batch, 2) if smoke else batch if device == "cuda" else small[model],
                               steps, device) for model, size, batch, _ in sets.values()}
    return rates, ("this CPU, 1 thread, small batches" if device == "cpu" else f"{torch.cuda.get_device_name(0)}, "
                   "full batch, bf16 + channels_last")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--images", type=int, default=96, help="500x375 VOC scenes to write")
    parser.add_argument("--seconds", type=float, default=1.5, help="about how long each timed window lasts")
    parser.add_argument("--rounds", type=int, default=4, help="windows per path (alternating order)")
    parser.add_argument("--model-device", default="cpu", choices=("cpu", "cuda"),
                        help="where the models' rates are measured")
    parser.add_argument("--smoke", action="store_true", help="256-image sets, 4 VOC scenes at 64 px, one short "
                        "window per path, one model step: the code path, not a measurement")
    args = parser.parse_args()
    sets = SMOKE_SETS if args.smoke else SETS
    if args.smoke:
        args.images, args.seconds, args.rounds = 4, 0.0, 2
    if args.model_device == "cuda" and not torch.cuda.is_available():
        parser.error("--model-device cuda: no CUDA device is visible")
    torch.set_num_threads(1)  # per core: the batched path gets no more threads than the per-sample one
    root = Path(tempfile.mkdtemp(prefix="vt-data-bench-"))
    rows = []
    try:
        models, source = model_rates(args.model_device, sets, args.smoke)
        for name in args.sets:
            start = time.perf_counter()
            loaders = dict(zip(("per_sample", "batched"), paths(name, root / name, args.images, sets)))
            states = {key: {} for key in loaders}
            # one batch each first (warm caches), then size each window to about --seconds
            sizes = {key: max(1, round(args.seconds * rate(loader, 1, states[key]) / sets[name][2]))
                     for key, loader in loaders.items()}
            times = {key: 0.0 for key in loaders}
            images = {key: 0 for key in loaders}
            for round_ in range(args.rounds):
                for key in (list(loaders) if round_ % 2 == 0 else list(loaders)[::-1]):
                    measured = rate(loaders[key], sizes[key], states[key])
                    images[key] += sizes[key] * sets[name][2]
                    times[key] += sizes[key] * sets[name][2] / measured
            model, size, batch, _ = sets[name]
            per_sample, batched = (images[key] / times[key] for key in ("per_sample", "batched"))
            rows.append({"data": name, "size": size, "batch": batch, "per_sample_img_s": per_sample,
                         "batched_img_s": batched, "speedup": batched / per_sample, "model": model,
                         "model_img_s": models.get(model), "batched_over_model": batched / models[model]
                         if models.get(model) else None})
            print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(table(rows))
    slowest = min(rows, key=lambda row: row["speedup"])
    path = write_json("data_throughput", {"args": vars(args), "rows": rows, "model_rates_from": source,
                                          "slowest_speedup": slowest["speedup"]}, smoke=args.smoke)
    print(f"json: {path}")
    print(f"models' training rates from {source}; img/s are per CPU core (one thread, no workers)")
    print(f"data path speedup, slowest data set: {slowest['speedup']:.2f}")


if __name__ == "__main__":
    main()
