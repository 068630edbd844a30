"""Trials packed on one GPU, measured with torch alone (no Ray, MLflow or Optuna needed): the trainables'
own data path, loop and memory cap in separate processes, as Ray would run four trials at 0.25 GPU.

  (a) aggregate training img/s of one process alone on the GPU vs four at once capped at 0.25 each,
      for ResNet18 on CIFAR-shaped data (32x32, batch 128) and the U-Net at 256 (batch 32, VOC-format files
      read through the decoded cache); goal: packed >= 1.5x alone for ResNet18
  (b) the share of step time spent waiting for data: steps fed by the real loader vs the same steps
      fed one fixed batch, in alternating windows; goal <= 10%
  (c) bf16 autocast + channels_last vs fp32, per model, alone
  (e) the memory cap tripping: a U-Net trial (tune_io.run_trial) with an oversized batch at 0.25 GPU must
      fail with the trainables' named error while a neighbour U-Net trial at 0.25 finishes

    python benchmarks/gpu_packing.py                   # one CUDA GPU, about 3 minutes
    python benchmarks/gpu_packing.py --smoke           # the same code on the CPU, tiny: 2 packed, 1 window
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import tempfile
import traceback
from functools import partial
from itertools import repeat
from pathlib import Path

from common import table, write_json  # first: puts the repository on sys.path

import torch

# name -> (image size, batch, steps per timed window); --smoke shrinks them for a CPU run of the code path
MODELS = {"resnet18": (32, 128, 30), "unet_resnet50": (256, 32, 15)}
TINY = {"resnet18": (32, 8, 1), "unet_resnet50": (64, 2, 1)}
IMAGES = {False: 50_000, True: 512}  # CIFAR-shaped images a resnet18 'trial' holds (CIFAR-10's train split)
VOC_SCENES = {False: 64, True: 4}


def _setup(device: str, gpus: float, cpus: int):
    from trainables.loop import Hardware
    from trainables.memory import apply_cap

    torch.set_num_threads(max(1, cpus))
    torch.backends.cudnn.benchmark = True
    hw = Hardware.select([0] if device == "cuda" else [])
    return hw, apply_cap(hw.device, gpus)


def _loader(name: str, hw, size: int, batch: int, voc_root: str, cpus: int, images: int):
    """The trial's own training batches: CIFAR-shaped uint8 held on the device, or VOC files via the cache."""
    from trainables.data.batched import BatchedImages, DeviceBatches
    from trainables.data.segmentation import SegmentationBatches
    from trainables.data.voc import build_voc
    from trainables.task import loader_workers

    if name == "resnet18":
        pixels = torch.randint(0, 256, (images, 3, size, size), dtype=torch.uint8, device=hw.device)
        labels = torch.randint(0, 10, (images,), device=hw.device)
        data = BatchedImages(pixels, labels, image_size=size, pad=4, flip=True, mean=(0.49, 0.48, 0.45),
                             std=(0.25, 0.24, 0.26))
        return DeviceBatches(data, batch, shuffle=True, drop_last=True)
    data = build_voc(Path(voc_root), "train", size, augment=True)
    return SegmentationBatches(data, batch, shuffle=True, device=hw.device, workers=loader_workers(-1, cpus, hw.device),
                               drop_last=True)


def _model_and_step(name: str, hw):
    from trainables import classify, segment
    from trainables.losses import class_weight_vector
    from vision_models import build_model

    if name == "resnet18":
        return hw.prepare(build_model("resnet18", num_classes=10)), classify.step
    weights = class_weight_vector(0.1, 21, None).to(hw.device)
    return hw.prepare(build_model("unet_resnet50", num_classes=21)), partial(segment.step, weights=weights)


def train_worker(name: str, device: str, gpus: float, cpus: int, precision: str, voc_root: str, tiny: bool,
                 rounds: int, barrier, results) -> None:
    """One 'trial': real-loader and fixed-batch windows alternating; puts {"real", "fixed"} img/s on ``results``."""
    try:
        from trainables.loop import Hardware, train_one_epoch

        hw, fraction = _setup(device, gpus, cpus)
        if precision == "fp32":
            hw = Hardware(hw.device)
        size, batch, steps = (TINY if tiny else MODELS)[name]
        loader = _loader(name, hw, size, batch, voc_root, cpus, IMAGES[tiny])
        model, step = _model_and_step(name, hw)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        fixed = next(iter(loader))
        feeds = {"real": lambda: loader, "fixed": lambda: repeat(fixed, steps)}
        for feed in feeds.values():  # warm-up: cuDNN autotuning, allocator, loader workers
            train_one_epoch(model, step, feed(), optimizer, hw, 0, max_steps=min(2, steps))
        if barrier is not None:
            barrier.wait(timeout=600)  # packed processes time the same stretch
        seconds = {key: 0.0 for key in feeds}
        for round_ in range(rounds):
            for key in (list(feeds) if round_ % 2 == 0 else list(feeds)[::-1]):
                rate = train_one_epoch(model, step, feeds[key](), optimizer, hw, round_,
                                       max_steps=steps)["images_per_s"]
                seconds[key] += batch * steps / rate
        results.put({"name": name, "gpus": gpus, "precision": precision, "fraction": fraction,
                     **{key: batch * steps * rounds / total for key, total in seconds.items()}})
    except Exception:
        results.put({"name": name, "precision": precision, "error": traceback.format_exc()})


def trial_worker(kind: str, data_root: str, gpus: float, results) -> None:
    """A whole trial through tune_io.run_trial on the GPU with a memory share, as Ray would start it."""
    try:
        from trainables import SegmentConfig, segment
        from trainables.tune_io import LocalSession, run_trial

        session = LocalSession(tempfile.mkdtemp(prefix="vt-cap-"), cpus=2)
        session.gpu_ids, session.gpus = [0], gpus
        if kind == "hog":  # far more than 0.25 of any GPU: U-Net activations at 1024 px for all 128 images at once
            config = SegmentConfig(dataset="shapes", image_size=1024, batch_size=512, epochs=1, steps_per_epoch=2,
                                   data_root=data_root, feature_samples=8)
        else:  # the shapes set needs nothing beyond torch, torchvision, numpy and PIL on the GPU machine
            config = SegmentConfig(dataset="shapes", image_size=64, batch_size=16, epochs=3, steps_per_epoch=8,
                                   data_root=data_root, feature_samples=16)
        metrics = run_trial(config.to_dict(), segment.TASK, session)
        results.put({"kind": kind, "ok": True, "epoch": metrics["epoch"],
                     "peak_gib": torch.cuda.max_memory_reserved() / 2**30})
        shutil.rmtree(session.out_dir, ignore_errors=True)
    except Exception as err:
        results.put({"kind": kind, "ok": False, "error": f"{type(err).__name__}: {err}",
                     "peak_gib": torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_initialized() else 0})


def run_processes(target, arg_list: list[tuple], barrier_count: int = 0, timeout: float = 600) -> list[dict]:
    """Start one spawned process per argument tuple (CUDA cannot fork), wait, return what each reported."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    barrier = ctx.Barrier(barrier_count) if barrier_count else None
    processes = [ctx.Process(target=target, args=(*args, *((barrier,) if target is train_worker else ()), results))
                 for args in arg_list]
    for process in processes:
        process.start()
    found = [results.get(timeout=timeout) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda (--smoke: cpu)")
    parser.add_argument("--smoke", action="store_true", help="small batches and data, 1 step, 2 packed processes, "
                        "1 window; the goals are printed, not enforced: the code path, not a measurement")
    parser.add_argument("--packed", type=int, help="processes sharing the GPU (default 4; --smoke: 2)")
    parser.add_argument("--rounds", type=int, help="timed windows per feed, alternating (default 4; --smoke: 1)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--skip-cap", action="store_true", help="leave out (e), the memory cap check")
    args = parser.parse_args()
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    args.packed = args.packed or (2 if args.smoke else 4)
    args.rounds = args.rounds or (1 if args.smoke else 4)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    from data_throughput import write_voc_tree
    from trainables.data import build_dataset
    from trainables.data.voc import build_voc

    cores, share = os.cpu_count() or 1, 1 / args.packed
    tmp = Path(tempfile.mkdtemp(prefix="vt-pack-"))
    rows, checks = [], []
    try:
        write_voc_tree(tmp / "voc", VOC_SCENES[args.smoke])
        build_voc(tmp / "voc", "train", 64)  # the decoded cache, built once before any 'trial', as the driver does
        for name in args.models:
            threads = max(1, cores // 2) if args.smoke else cores
            alone, fp32 = ([(name, args.device, 1.0, threads, precision, str(tmp / "voc"), args.smoke, args.rounds)]
                           for precision in ("bf16", "fp32"))
            if args.smoke:  # side by side, half the cores each: the code path only, in half the time
                found = run_processes(train_worker, alone + fp32)
                alone, fp32 = ([r for r in found if r["precision"] == precision] for precision in ("bf16", "fp32"))
            else:
                alone, fp32 = run_processes(train_worker, alone), run_processes(train_worker, fp32)
            packed = run_processes(train_worker, [(name, args.device, share, max(1, cores // args.packed), "bf16",
                                                   str(tmp / "voc"), args.smoke, args.rounds)] * args.packed,
                                   barrier_count=args.packed)
            for result in alone + fp32 + packed:
                if "error" in result:
                    raise RuntimeError(f"{name} worker failed:\n{result['error']}")
            total = sum(r["real"] for r in packed)
            slowest = min(packed, key=lambda r: r["real"])
            wait = {label: max(0.0, 1 - r["real"] / r["fixed"]) for label, r in (("alone", alone[0]),
                                                                                  ("packed", slowest))}
            rows.append({"model": name, "alone_img_s": alone[0]["real"], "packed": args.packed, "packed_img_s": total,
                         "packed_over_alone": total / alone[0]["real"], "wait_alone": wait["alone"],
                         "wait_packed": wait["packed"], "fp32_img_s": fp32[0]["real"],
                         "bf16_cl_over_fp32": alone[0]["real"] / fp32[0]["real"],
                         "cap_fraction": packed[0]["fraction"]})
            if name == "resnet18":
                checks.append(("(a) resnet18 packed >= 1.5x alone", total / alone[0]["real"] >= 1.5))
            checks.append((f"(b) {name} data wait <= 10% (alone, packed)", max(wait.values()) <= 0.10))
        if args.device == "cuda" and not args.skip_cap:
            for split in ("train", "val"):  # the driver's data check (and decoded cache) first
                build_dataset("shapes", split, tmp / "data", 64)
            found = run_processes(trial_worker, [("hog", str(tmp / "data"), 0.25),
                                                 ("neighbour", str(tmp / "data"), 0.25)])
            by_kind = {r["kind"]: r for r in found}
            hog, neighbour = by_kind["hog"], by_kind["neighbour"]
            print(f"(e) hog: {hog.get('error', 'finished?!')}\n(e) neighbour: {neighbour}")
            cap_gib = 0.25 * torch.cuda.get_device_properties(0).total_memory / 2**30
            rows.append({"model": "cap check", "hog_error": hog.get("error", "")[:60],
                         "hog_peak_gib": hog["peak_gib"], "cap_gib": cap_gib, "neighbour_ok": neighbour["ok"]})
            named = "TrialMemoryError" in hog.get("error", "") and "--gpus-per-trial 0.25" in hog.get("error", "")
            checks.append(("(e) oversized trial fails with TrialMemoryError naming --gpus-per-trial",
                           not hog["ok"] and named))
            checks.append(("(e) the hog stayed inside its cap", hog["peak_gib"] <= cap_gib * 1.01))
            checks.append(("(e) the neighbour trial finished", neighbour["ok"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for row in rows:
        print(table([row]))
    path = write_json("gpu_packing", {"args": vars(args), "rows": rows, "checks": checks}, smoke=args.smoke)
    print(f"json: {path}")
    for label, ok in checks:
        print(f"{'ok  ' if ok else 'FAIL'} {label}")
    met = sum(ok for _, ok in checks)
    print(f"goals met: {met} of {len(checks)}" + (" (smoke: not enforced)" if args.smoke else ""))
    raise SystemExit(0 if args.smoke or all(ok for _, ok in checks) else 1)


if __name__ == "__main__":
    main()
