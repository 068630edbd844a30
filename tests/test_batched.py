"""The GPU-speed data path: batched augmentation against the per-sample one, epoch replay, loader workers,
the segmentation crops, and the GPU memory cap's numbers and message."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from trainables import ClassifyConfig, SegmentConfig
from trainables.data import build_dataset
from trainables.data.batched import BatchedImages, DeviceBatches
from trainables.data.classification import CIFAR_MEAN, CIFAR_STD, MNIST_MEAN, MNIST_STD
from trainables.data.segmentation import Crop, SegmentationBatches, finish, scale_crop_window
from trainables.loop import Hardware, epoch_seed
from trainables.memory import apply_cap, cap_fraction, memory_cap_message
from trainables.task import Built, loader_workers, make_loaders

GIB = 2**30


def _cifar_like(count: int = 6, size: int = 32, channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (count, channels, size, size), dtype=np.uint8))


def _per_sample(pixels: torch.Tensor, top: int, left: int, flip: bool, pad: int, size: int, mean, std) -> torch.Tensor:
    """Today's per-sample path on one image, with RandomCrop's and RandomHorizontalFlip's draws fixed."""
    array = pixels.permute(1, 2, 0).numpy()
    image = T.ToTensor()(Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array))
    if image.shape[-1] != size:
        image = T.Resize([size, size], antialias=True)(image)
    image = TF.crop(TF.pad(image, [pad]), top, left, size, size)  # what RandomCrop(size, padding=pad) returns
    if flip:
        image = TF.hflip(image)
    return TF.normalize(image, list(mean), list(std))


@pytest.mark.parametrize("size, channels, stats", [(32, 3, (CIFAR_MEAN, CIFAR_STD)), (28, 1, (MNIST_MEAN, MNIST_STD))])
def test_batched_shift_and_flip_equal_the_per_sample_transform_for_the_same_window(size, channels, stats):
    pixels = _cifar_like(6, size, channels)
    data = BatchedImages(pixels, torch.arange(6), image_size=size, pad=4, flip=True, mean=stats[0], std=stats[1])
    tops, lefts = torch.tensor([0, 8, 3, 4, 8, 1]), torch.tensor([8, 0, 5, 4, 8, 2])
    flips = torch.tensor([False, True, True, False, True, False])
    images, labels = data.batch(torch.arange(6), tops, lefts, flips)
    assert images.shape == (6, channels, size, size) and labels.tolist() == list(range(6))
    for i in range(6):
        expected = _per_sample(pixels[i], int(tops[i]), int(lefts[i]), bool(flips[i]), 4, size, *stats)
        torch.testing.assert_close(images[i], expected, rtol=0, atol=1e-6)


def test_batched_resize_equals_the_per_sample_resize():
    pixels = _cifar_like(3, 28, 1)  # MNIST at the classifier's 32 px
    data = BatchedImages(pixels, torch.arange(3), image_size=32, pad=4, mean=MNIST_MEAN, std=MNIST_STD)
    tops, lefts, flips = torch.tensor([0, 4, 8]), torch.tensor([8, 4, 0]), torch.zeros(3, dtype=torch.bool)
    images, _ = data.batch(torch.arange(3), tops, lefts, flips)
    for i in range(3):
        expected = _per_sample(pixels[i], int(tops[i]), int(lefts[i]), False, 4, 32, MNIST_MEAN, MNIST_STD)
        torch.testing.assert_close(images[i], expected, rtol=0, atol=1e-5)


def test_batched_draws_cover_randomcrops_windows_and_flip_half():
    data = BatchedImages(_cifar_like(1), torch.zeros(1), image_size=32, pad=4, flip=True)
    tops, lefts, flips = data.draw(36_000, torch.Generator().manual_seed(0))
    padded = torch.zeros(3, 40, 40)
    torch.manual_seed(0)
    reference = {T.RandomCrop.get_params(padded, (32, 32))[:2] for _ in range(2_000)}
    assert set(zip(tops.tolist(), lefts.tolist())) == reference  # the same 81 windows
    counts = np.bincount(tops.numpy() * 9 + lefts.numpy(), minlength=81)
    assert counts.min() > 0.75 * 36_000 / 81 and counts.max() < 1.25 * 36_000 / 81  # uniform over them
    assert abs(flips.float().mean().item() - 0.5) < 0.01


def _epoch(loader, epoch: int, seed: int = 5, steps: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.generator.manual_seed(epoch_seed(seed, epoch))  # what fit() does before each epoch
    batches = []
    for index, batch in enumerate(loader, start=1):
        batches.append(batch)
        if steps and index >= steps:
            break
    return batches


def _same(first, second) -> bool:
    return len(first) == len(second) and all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in
                                             zip(first, second))


def test_device_batches_replay_an_epoch_exactly_after_a_resume(tmp_path):
    data = build_dataset("digits", "train", tmp_path, 32)  # augmented: shifts drawn per epoch
    running = DeviceBatches(data, 64, shuffle=True, drop_last=True)
    _epoch(running, 1, steps=3)  # epoch 1 cut short, as steps_per_epoch does
    second = _epoch(running, 2)
    resumed = _epoch(DeviceBatches(data, 64, shuffle=True, drop_last=True), 2)  # a fresh process resuming at 2
    assert _same(second, resumed) and len(second) == len(data) // 64
    assert not _same(second, _epoch(running, 3))  # another epoch: another order and other crops
    seen = torch.cat([labels for _, labels in second])
    assert len(seen) == 64 * (len(data) // 64)


def test_segmentation_batches_replay_exactly_whatever_the_workers(data_root):
    train = build_dataset("shapes", "train", data_root, 48, augment=True)
    run = {workers: SegmentationBatches(train, 8, shuffle=True, device=torch.device("cpu"), workers=workers,
                                        drop_last=True) for workers in (0, 1)}
    first = _epoch(run[0], 2, steps=4)
    assert _same(first, _epoch(run[1], 2, steps=4))  # draws are made in the main process
    assert _same(first, _epoch(run[0], 2, steps=4))
    images, masks = first[0]
    assert images.shape == (8, 3, 48, 48) and masks.dtype == torch.int64
    assert set(masks.unique().tolist()) <= set(range(21)) | {255}


def test_a_crop_smaller_than_the_canvas_is_padded_black_with_ignored_mask():
    # an image 60x80 scaled so its short side is 24 px (scale 0.5 at 48): the crop covers 24x32 of 48x48
    (y0, y1, x0, x1), (valid_h, valid_w) = scale_crop_window(60, 80, 48, 0.5, 0.3, 0.9)
    assert (y0, y1, x0, x1) == (0, 60, 0, 80) and (valid_h, valid_w) == (24, 32)
    image = torch.full((3, 60, 80), 200, dtype=torch.uint8)
    mask = torch.full((valid_h, valid_w), 7, dtype=torch.uint8)  # crop() resizes masks when it gathers them
    images, masks = finish([Crop(image, mask, valid_h, valid_w, flip=True)], 48)
    assert (images[0, :, :24, -32:] == 200).all() and (images[0, :, 24:] == 0).all()
    assert (masks[0, :24, -32:] == 7).all() and (masks[0, :, :-32] == 255).all()  # flipped: padding on the left
    # scaled up twice, the window stays inside the source at the extreme offsets
    for top_u, left_u in ((0.0, 0.0), (0.9999, 0.9999)):
        (y0, y1, x0, x1), landed = scale_crop_window(60, 80, 48, 2.0, top_u, left_u)
        assert 0 <= y0 < y1 <= 60 and 0 <= x0 < x1 <= 80 and landed == (48, 48)


def test_worker_default_follows_cpus_per_trial(data_root):
    from studies.runner.cli import apply_args, build_parser

    def config_for(*argv: str) -> tuple[SegmentConfig, float]:
        args = build_parser("test").parse_args(list(argv))
        base = SegmentConfig(dataset="shapes", image_size=32, data_root=str(data_root))
        return apply_args(base, {}, args)[0], args.cpus_per_trial

    train = build_dataset("shapes", "train", data_root, 32, augment=True)
    built = Built(torch.nn.Identity(), None, train, build_dataset("shapes", "val", data_root, 32), 21)
    gpu, cpu = Hardware(torch.device("cuda", 0)), Hardware(torch.device("cpu"))  # nothing touches the device here
    for argv, on_gpu, on_cpu in ((["--cpus-per-trial", "4"], 3, 0), (["--cpus-per-trial", "1"], 0, 0),
                                 (["--cpus-per-trial", "2.5"], 1, 0),
                                 (["--cpus-per-trial", "4", "--num-workers", "0"], 0, 0),
                                 (["--cpus-per-trial", "1", "--num-workers", "2"], 2, 2)):
        config, cpus = config_for(*argv)
        for hw, expected in ((gpu, on_gpu), (cpu, on_cpu)):
            train_batches, val_batches = make_loaders(built, config, hw, cpus)
            assert train_batches.loader.num_workers == val_batches.loader.num_workers == expected, (argv, hw)
            assert train_batches.loader.persistent_workers == (expected > 0)
            assert train_batches.loader.pin_memory == (hw is gpu)  # pinned host memory only feeds a GPU
    assert loader_workers(-1, 64, gpu.device) == 8  # capped: more workers than that only add start-up time


def test_classification_sets_need_no_workers(tmp_path):
    config = ClassifyConfig(dataset="digits", data_root=str(tmp_path), batch_size=100, val_samples=50)
    built = Built(torch.nn.Identity(), None, build_dataset("digits", "train", tmp_path, 32),
                  build_dataset("digits", "val", tmp_path, 32), 10)
    train, val = make_loaders(built, config, Hardware(torch.device("cpu")), cpus=4)
    assert isinstance(train, DeviceBatches) and len(train) == len(built.train_set) // 100
    assert sum(len(labels) for _, labels in val) == 50


def test_memory_cap_fraction_and_message():
    assert cap_fraction(1.0, 80 * GIB) is None and cap_fraction(0, 80 * GIB) is None
    fraction = cap_fraction(0.25, 80 * GIB)
    assert 0.24 < fraction < 0.25  # about f, less the CUDA context that lives outside the allocator
    assert 4 * fraction * 80 * GIB + 4 * 768 * 2**20 <= 80 * GIB  # four such trials fit together
    assert cap_fraction(0.01, 8 * GIB) == 0.005  # a tiny share keeps at least half of itself
    assert apply_cap(torch.device("cpu"), 0.25) is None
    message = memory_cap_message(0.25, fraction, 80 * GIB, int(19.8 * GIB), 512, "NVIDIA A100-SXM4-80GB")
    assert "--gpus-per-trial 0.25" in message and "24% of NVIDIA A100-SXM4-80GB's 80.0 GiB" in message
    assert f"{fraction * 80:.1f} GiB" in message and "19.8 GiB was in use at batch size 512" in message
    assert "raise --gpus-per-trial (e.g. 0.5" in message and "lower --batch-size" in message
    whole = memory_cap_message(1.0, None, 80 * GIB, 79 * GIB, 512)
    assert "whole of the GPU (80.0 GiB)" in whole and "--gpus-per-trial" not in whole and "--batch-size" in whole
