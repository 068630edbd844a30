"""How many DataLoader workers keep one U-Net training process busy?

Images/s of the VOC pipeline (JPEG + palette-PNG decode, random scale-crop, flip, to tensor, normalise:
the loader trials use) with 0, 1 and 2 loader workers, against the U-Net's training-step rate at the same
size. Two data sets in VOC's own format, read by the real VOC loader: a tree at VOC's usual 500x375 that
this script writes (generated scenes, JPEG quality 90 like VOC), and the embedded `shapes` set (96x96).
Windows alternate between settings (0, 1, 2, 2, 1, 0 workers, ...) so load drift cancels.

    python benchmarks/data_throughput.py                  # CPU (about 3 minutes)
    python benchmarks/data_throughput.py --device cuda --batch-size 32
"""
from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

from common import table, write_json  # first: puts the repository on sys.path

import numpy as np
import torch
from PIL import Image

from trainables.data import build_dataset
from trainables.data.shapes import render_scene
from trainables.data.voc import build_voc, voc_palette
from trainables.loop import Hardware
from trainables.losses import class_weight_vector, segmentation_loss
from vision_models import build_model

VOC_W, VOC_H = 500, 375


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


def loader_rate(dataset, workers: int, batch: int, batches: int, loaders: dict) -> float:
    """Images/s over ``batches`` batches from a warm loader (persistent workers, first batch not timed)."""
    if workers not in loaders:
        loaders[workers] = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                                       persistent_workers=workers > 0, drop_last=True,
                                                       prefetch_factor=2 if workers else None)
    iterator = iter(loaders[workers])
    next(iterator)  # workers started and one batch in flight: steady state
    start = time.perf_counter()
    count = 0
    for _ in range(batches):
        try:
            images, _ = next(iterator)
        except StopIteration:
            iterator = iter(loaders[workers])
            images, _ = next(iterator)
        count += images.shape[0]
    return count / (time.perf_counter() - start)


def unet_rate(images: torch.Tensor, masks: torch.Tensor, device: str, steps: int, rounds: int) -> float:
    """Images/s of U-Net training steps (SGD, background weight 0.1), as a trial runs them on this device."""
    hw = Hardware.select([0] if device == "cuda" else [], amp=True)
    model = hw.prepare(build_model("unet_resnet50", num_classes=21))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    weights = class_weight_vector(0.1, 21, None).to(hw.device)
    images, masks = hw.move([images, masks])

    def step() -> None:
        with hw.autocast():
            loss = segmentation_loss(model(images), masks, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up (cuDNN autotuning, allocator)
    total = 0.0
    for _ in range(rounds):
        if hw.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if hw.device.type == "cuda":
            torch.cuda.synchronize()
        total += time.perf_counter() - start
    return images.shape[0] * steps * rounds / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=256, help="training crop side (the report's 256)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--images", type=int, default=128, help="500x375 scenes to write")
    parser.add_argument("--batches", type=int, default=12, help="batches per timed window (fewer than an epoch holds)")
    parser.add_argument("--rounds", type=int, default=3, help="windows per setting (alternating order)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--unet-batch", type=int, default=0, help="U-Net batch (default: 2 on CPU, --batch-size on CUDA)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    root = Path(tempfile.mkdtemp(prefix="vt-data-bench-"))
    start = time.perf_counter()
    write_voc_tree(root / "voc500", args.images)
    sets = {"voc 500x375": build_voc(root / "voc500", "train", args.image_size, augment=True),
            "shapes 96x96": build_dataset("shapes", "train", root / "shapes", args.image_size)}
    print(f"wrote {args.images} 500x375 scenes and the shapes set in {time.perf_counter() - start:.1f} s", flush=True)
    rows, rates = [], {}
    for name, dataset in sets.items():
        loaders: dict = {}
        totals = {w: [] for w in args.workers}
        for round_ in range(args.rounds):
            for workers in (args.workers if round_ % 2 == 0 else args.workers[::-1]):
                totals[workers].append(loader_rate(dataset, workers, args.batch_size, args.batches, loaders))
        del loaders  # stops the persistent workers
        for workers, values in totals.items():
            rates[(name, workers)] = len(values) / sum(1 / v for v in values)  # harmonic mean = total images / time
    images, masks = next(iter(torch.utils.data.DataLoader(sets["voc 500x375"], batch_size=args.unet_batch or (
        args.batch_size if args.device == "cuda" else 2))))
    train = unet_rate(images, masks, args.device, steps=2 if args.device == "cpu" else 10, rounds=args.rounds)
    for (name, workers), rate in rates.items():
        per_worker = rate / max(workers, 1)
        rows.append({"data": name, "workers": workers, "img_s": rate, "img_s_per_worker": per_worker,
                     "unet_img_s": train, "loader_over_unet": rate / train})
    shutil.rmtree(root, ignore_errors=True)
    print(table(rows))
    one_worker = rates.get(("voc 500x375", 1)) or rates[("voc 500x375", max(args.workers))] / max(max(args.workers), 1)
    needed = max(1, math.ceil(train / one_worker))
    in_main = rates.get(("voc 500x375", 0), 0) >= train
    path = write_json("data_throughput", {"args": vars(args), "rows": rows, "unet_img_s": train,
                                          "workers_needed": needed, "main_process_suffices": in_main})
    print(f"json: {path}")
    print(f"U-Net at {args.image_size}px on {args.device}: {train:.1f} img/s; one loader worker gives "
          f"{one_worker:.1f} img/s (VOC 500x375): {needed} worker(s) keep one training process busy"
          + (" (num_workers=0 already keeps up)" if in_main else ""))


if __name__ == "__main__":
    main()
