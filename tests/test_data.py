"""Data sets read from folders written here in the real on-disk formats (VOC tree, MNIST IDX), never mocks."""
import gzip
import os
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainables.data import BadDataError, build_dataset, class_frequencies, dataset_info
from trainables.data import checks
from trainables.data.shapes import generate_shapes
from trainables.data.transforms import IMAGENET_MEAN, IMAGENET_STD, JointRandomHFlip, JointResize

H, W = 40, 56  # non-square, like VOC photos
BACKGROUND_RGB, OBJECT_RGB = (30, 30, 30), {7: (230, 40, 40), 15: (40, 60, 230)}


def _voc_palette() -> list[int]:
    """The standard VOC colour map, written independently of the package's."""
    palette = []
    for i in range(256):
        r = g = b = 0
        for bit in range(8):
            r |= ((i >> (3 * bit)) & 1) << (7 - bit)
            g |= ((i >> (3 * bit + 1)) & 1) << (7 - bit)
            b |= ((i >> (3 * bit + 2)) & 1) << (7 - bit)
        palette += [r, g, b]
    return palette


def _scene(label: int) -> tuple[np.ndarray, np.ndarray]:
    """An object of `label` in the left part of the image, with a 255 border like VOC's."""
    image = np.full((H, W, 3), BACKGROUND_RGB, dtype=np.uint8)
    mask = np.zeros((H, W), dtype=np.uint8)
    image[8:32, 4:26] = OBJECT_RGB[label]
    mask[6:34, 2:28] = 255
    mask[8:32, 4:26] = label
    return image, mask


def _write_year(root, year, splits: dict[str, list[str]], label=7) -> None:
    base = root / "VOCdevkit" / f"VOC{year}"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for image_id in ids:
            image, mask = _scene(label)
            Image.fromarray(image).save(base / "JPEGImages" / f"{image_id}.jpg", quality=95)
            png = Image.fromarray(mask)
            png.putpalette(_voc_palette())
            png.save(base / "SegmentationClass" / f"{image_id}.png")


@pytest.fixture
def voc_root(tmp_path):
    _write_year(tmp_path, 2012, {"train": ["2008_000001", "2008_000002", "2008_000003"],
                                 "val": ["2008_000004", "2008_000005"],
                                 "trainval": [f"2008_00000{i}" for i in range(1, 6)]})
    _write_year(tmp_path, 2007, {"test": ["000001", "000002"]}, label=15)
    return tmp_path


def _pixels(image: torch.Tensor) -> np.ndarray:
    """Undo the ImageNet normalisation: (3,H,W) -> (H,W,3) in 0..255."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((image * std + mean) * 255).permute(1, 2, 0).numpy()


def test_voc_splits_and_item_format(voc_root):
    train = build_dataset("voc", "train", voc_root, 32)
    assert len(train) == 5 and len(build_dataset("voc", "train", voc_root, 32, train_split="train")) == 3
    val = build_dataset("voc", "val", voc_root, 64)
    assert len(val) == 2 and all("VOC2007" in path for path in val.images)
    image, mask = val[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert mask.shape == (64, 64) and mask.dtype == torch.int64
    (voc_root / "VOCdevkit" / "VOC2007" / "ImageSets" / "Segmentation" / "test.txt").unlink()
    assert all("VOC2012" in path for path in build_dataset("voc", "val", voc_root, 32).images)


@pytest.mark.parametrize("image_size", [32, 96])
def test_resize_keeps_void_and_labels(voc_root, image_size):
    _, mask = build_dataset("voc", "val", voc_root, image_size)[0]
    assert set(mask.unique().tolist()) == {0, 15, 255}  # nearest: no blended labels between 15 and 255
    # PIL forces nearest on palette images anyway; a greyscale mask shows the transform itself picks it.
    _, grey = JointResize(image_size)(Image.fromarray(_scene(7)[0]), Image.fromarray(_scene(7)[1]))
    assert set(np.unique(np.asarray(grey)).tolist()) == {0, 7, 255}


def test_flip_flips_image_and_mask_together():
    image, mask = _scene(7)
    flipped_image, flipped_mask = JointRandomHFlip(p=1.0)(Image.fromarray(image), Image.fromarray(mask))
    assert np.array_equal(np.asarray(flipped_image), image[:, ::-1])
    assert np.array_equal(np.asarray(flipped_mask), mask[:, ::-1])


def test_augmented_pairs_stay_aligned(voc_root):
    train = build_dataset("voc", "train", voc_root, 48, augment=True)
    sides = set()
    for seed in range(12):  # covers flipped and unflipped, up- and down-scaled crops
        torch.manual_seed(seed)
        image, mask = train[0]
        pixels = _pixels(image)
        for label, rgb in ((0, BACKGROUND_RGB), (7, OBJECT_RGB[7])):
            if (mask == label).any():
                assert np.abs(pixels[mask.numpy() == label] - rgb).mean() < 20, (seed, label)
        columns = (mask == 7).nonzero()[:, 1].float()
        if len(columns):
            sides.add(bool(columns.mean() > 24))
        assert set(mask.unique().tolist()) <= {0, 7, 255}
    assert sides == {True, False}  # the object ended up on both sides: flips happened


def test_missing_voc_names_path_layout_and_flag(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        build_dataset("voc", "train", tmp_path / "nothing-here", 32)
    message = str(error.value)
    assert str(tmp_path / "nothing-here") in message and "VOCdevkit/VOC2012/JPEGImages" in message
    assert "trainval.txt" in message and "--download" in message


def _voc_base(root):
    return root / "VOCdevkit" / "VOC2012"


def test_bad_label_names_the_mask(voc_root):
    path = _voc_base(voc_root) / "SegmentationClass" / "2008_000002.png"
    mask = np.array(Image.open(path))
    mask[0, 0] = 42
    png = Image.fromarray(mask)
    png.putpalette(_voc_palette())
    png.save(path)
    with pytest.raises(BadDataError, match=r"2008_000002\.png: labels \[42\]"):
        build_dataset("voc", "train", voc_root, 32)


def test_listed_image_without_mask_names_the_file(voc_root):
    (_voc_base(voc_root) / "SegmentationClass" / "2008_000003.png").unlink()
    with pytest.raises(BadDataError, match=r"2008_000003\.png: mask missing"):
        build_dataset("voc", "train", voc_root, 32)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_unreadable_jpeg_names_the_file(voc_root, damage):
    path = _voc_base(voc_root) / "JPEGImages" / "2008_000001.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a jpeg at all")
    with pytest.raises(BadDataError, match=r"2008_000001\.jpg: unreadable image"):
        build_dataset("voc", "train", voc_root, 32)


def test_validation_runs_once_and_reruns_when_files_change(voc_root, monkeypatch):
    build_dataset("voc", "train", voc_root, 32)
    real_check = checks._check_pair

    def must_not_run(*args):
        raise AssertionError("validated again")

    monkeypatch.setattr(checks, "_check_pair", must_not_run)
    build_dataset("voc", "train", voc_root, 32)  # cached marker: no file is opened
    path = _voc_base(voc_root) / "SegmentationClass" / "2008_000001.png"
    Image.fromarray(np.full((H, W), 99, dtype=np.uint8)).save(path)
    monkeypatch.setattr(checks, "_check_pair", real_check)
    with pytest.raises(BadDataError, match="2008_000001.png"):
        build_dataset("voc", "train", voc_root, 32)


def test_class_frequencies_cached_and_correct(voc_root, tmp_path, monkeypatch):
    train = build_dataset("voc", "train", voc_root, 32, train_split="train")
    _, mask = _scene(7)
    expected = np.zeros(21)
    expected[0], expected[7] = (mask == 0).sum(), (mask == 7).sum()
    frequencies = class_frequencies(train, 21, tmp_path / "cache")
    np.testing.assert_allclose(frequencies, expected / expected.sum())
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    monkeypatch.setattr(checks, "_label_counts", lambda path: pytest.fail("masks read again"))
    np.testing.assert_array_equal(class_frequencies(train, 21, tmp_path / "cache"), frequencies)


def _write_idx(path, array: np.ndarray, compress: bool) -> None:
    magic = 0x0800 | array.ndim  # unsigned bytes, ndim dimensions
    data = struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_reads_idx_files(tmp_path, compress):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (12, 28, 28)), "t10k": rng.integers(0, 256, (6, 28, 28))}
    labels = {"train": rng.integers(0, 10, 12), "t10k": rng.integers(0, 10, 6)}
    for prefix in ("train", "t10k"):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images[prefix], compress)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[prefix], compress)
    train = build_dataset("mnist", "train", tmp_path, 28, normalize=False, augment=False)
    assert len(train) == 12 and len(build_dataset("mnist", "val", tmp_path, 28)) == 6
    image, label = train[3]
    assert image.shape == (1, 28, 28) and label == labels["train"][3]
    np.testing.assert_allclose(image[0].numpy(), images["train"][3] / 255, atol=1e-6)
    assert build_dataset("mnist", "train", tmp_path, 32)[0][0].shape == (1, 32, 32)


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST/raw"), ("cifar10", "cifar-10-batches-py")])
def test_missing_real_data_names_folder_layout_and_flag(tmp_path, name, folder):
    with pytest.raises(FileNotFoundError) as error:
        build_dataset(name, "train", tmp_path, 32)
    assert str(tmp_path) in str(error.value) and folder in str(error.value) and "--download" in str(error.value)


SMALL = {"n_train": 4, "n_val": 2, "n_test": 3, "size": 64}


def _files(root) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_shapes_deterministic_by_seed(tmp_path):
    first = _files(generate_shapes(tmp_path / "a", seed=3, **SMALL))
    assert first == _files(generate_shapes(tmp_path / "b", seed=3, **SMALL))
    assert len(first) == 2 * (6 + 3) + 4 + 1  # jpg+png per image, 4 split lists, shapes.json
    other = _files(generate_shapes(tmp_path / "c", seed=4, **SMALL))
    assert other.keys() == first.keys() and other != first


def test_shapes_concurrent_generation_is_safe(tmp_path):
    results = []
    threads = [threading.Thread(target=lambda: results.append(generate_shapes(tmp_path, seed=1, **SMALL)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1 and os.listdir(tmp_path) == [results[0].name]  # no temp folder left


def test_shapes_like_voc(tmp_path):
    train = build_dataset("shapes", "train", tmp_path, 64)
    val = build_dataset("shapes", "val", tmp_path, 64)
    assert (len(train), len(val)) == (128, 64) and not set(train.images) & set(val.images)
    masks = np.stack([np.array(Image.open(path)) for path in train.masks])
    assert Image.open(train.masks[0]).mode == "P"
    assert 0.62 < (masks == 0).mean() < 0.78 and 0.02 < (masks == 255).mean() < 0.1
    assert set(np.unique(masks)) <= set(range(21)) | {255} and len(np.unique(masks)) == 22
    image, mask = val[0]
    assert image.shape == (3, 64, 64) and mask.dtype == torch.int64
    frequencies = class_frequencies(train, 21, tmp_path / "cache")
    assert frequencies.sum() == pytest.approx(1) and frequencies[1:].min() > 0


@pytest.mark.parametrize("name, sizes, image_size", [("digits", (1438, 359), 32), ("mnist5k", (4000, 1000), 28)])
def test_embedded_classification_sets(tmp_path, name, sizes, image_size):
    train = build_dataset(name, "train", tmp_path, image_size, normalize=False)
    val = build_dataset(name, "val", tmp_path, image_size, normalize=False)
    assert (len(train), len(val)) == sizes
    image, label = val[0]
    assert image.shape == (1, image_size, image_size) and isinstance(label, int)
    everything = val.batch(torch.arange(len(val)))[0]
    assert val.pixels.dtype == torch.uint8 and 0 <= everything.min() and everything.max() <= 1
    assert everything.max() == 1  # scaled by the set's own range (digits 0..16, MNIST 0..255)
    assert set(train.targets.tolist()) == set(range(10)) == set(val.targets.tolist())
    normalised = build_dataset(name, "train", tmp_path, image_size, augment=False)
    stacked = torch.stack([normalised[i][0] for i in range(0, len(normalised), 7)])
    assert abs(stacked.mean().item()) < 0.1 and abs(stacked.std().item() - 1) < 0.1
    assert dataset_info(name).in_channels == 1


def test_digits_are_scikit_learns_read_without_importing_it():
    """The digits are load_digits' images and labels, read from the same file; only the test imports sklearn."""
    from sklearn.datasets import load_digits

    from trainables.data.classification import _digits_arrays

    images, labels = _digits_arrays()
    reference = load_digits()
    assert images.dtype == np.uint8 and (images == reference.images).all() and (labels == reference.target).all()


def test_unknown_names_list_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="valid names: cifar10, mnist"):
        build_dataset("imagenet", "train", tmp_path, 32)
    with pytest.raises(ValueError, match="split"):
        build_dataset("digits", "test", tmp_path, 32)


# --- the decoded VOC cache -------------------------------------------------------------------------------

def _decoded_folders(root):
    return sorted(checks.default_cache_dir(root).glob("decoded-*"))


def test_decoded_cache_returns_the_decoded_pixels(voc_root):
    train = build_dataset("voc", "train", voc_root, 32)
    assert len(_decoded_folders(voc_root)) == 1
    for index, (jpg, png) in enumerate(zip(train.images, train.masks)):
        image, mask = train.arrays.sample(index)
        assert np.array_equal(image, np.asarray(Image.open(jpg).convert("RGB")))  # the JPEG decode, pixel for pixel
        assert np.array_equal(mask, np.asarray(Image.open(png)))  # the palette indices: labels and 255


def _relabel_a_mask(voc_root) -> Path:
    """Edit one mask (its object 7 becomes 12): a new version of the data set's files."""
    path = _voc_base(voc_root) / "SegmentationClass" / "2008_000002.png"
    mask = np.array(Image.open(path))
    mask[mask == 7] = 12
    png = Image.fromarray(mask)
    png.putpalette(_voc_palette())
    png.save(path)
    return path


def test_a_changed_mask_builds_a_new_cache(voc_root):
    build_dataset("voc", "train", voc_root, 32)
    path = _relabel_a_mask(voc_root)
    train = build_dataset("voc", "train", voc_root, 32)
    assert len(_decoded_folders(voc_root)) == 2
    assert set(np.unique(train.arrays.sample(train.masks.index(str(path)))[1])) == {0, 12, 255}


def test_old_caches_do_not_pile_up(voc_root):
    """A new version of a data set's files removes its cache's older versions once unused for STALE_S, and any
    cache of an older layout; a recently used older version (a study may still map it) and other sets stay."""
    import json
    import os
    import time

    from trainables.data import decoded as decoded_module

    build_dataset("voc", "train", voc_root, 32)
    (old,) = _decoded_folders(voc_root)
    other = old.parent / "decoded-otherset"
    shutil.copytree(old, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "name": "another data set"}))
    layout = old.parent / "decoded-oldlayout"
    shutil.copytree(old, layout)
    (layout / "manifest.json").write_text(json.dumps({**manifest, "version": decoded_module.VERSION - 1}))
    long_ago = time.time() - decoded_module.STALE_S - 60
    for folder in (old, other):
        for name in ("last_used", "manifest.json"):
            os.utime(folder / name, (long_ago, long_ago))
    _relabel_a_mask(voc_root)
    build_dataset("voc", "train", voc_root, 32)
    folders = set(_decoded_folders(voc_root))
    assert old not in folders and layout not in folders and other in folders and len(folders) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip bytes"])
def test_a_damaged_cache_is_rebuilt_not_trusted(voc_root, damage, caplog):
    build_dataset("voc", "train", voc_root, 32)
    (folder,) = _decoded_folders(voc_root)
    data = bytearray((folder / "images.u8").read_bytes())
    if damage == "truncate":  # a copy cut short, or a build killed mid-write that somehow got renamed
        data = data[: len(data) // 2]
    else:
        data[100:110] = bytes(255 - b for b in data[100:110])
    (folder / "images.u8").write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        train = build_dataset("voc", "train", voc_root, 32)
    assert "rebuilding" in caplog.text
    assert np.array_equal(train.arrays.sample(0)[0], np.asarray(Image.open(train.images[0]).convert("RGB")))


def test_the_driver_data_check_builds_the_cache_before_trials(data_root):
    from studies.runner.preflight import check_data
    from trainables import SegmentConfig

    check_data(SegmentConfig(dataset="shapes", data_root=str(data_root), image_size=32))
    root = generate_shapes(data_root, 0)
    assert len(_decoded_folders(root)) == 2  # train (VOC2012 trainval) and val (VOC2007 test)


@pytest.mark.parametrize("image_size", [32, 96])
def test_cached_resize_matches_the_per_sample_pil_path(voc_root, image_size):
    from trainables.data.transforms import segmentation_transform

    val = build_dataset("voc", "val", voc_root, image_size)
    reference = segmentation_transform(image_size, augment=False)
    for index in range(len(val)):
        image, mask = val[index]
        expected_image, expected_mask = reference(Image.open(val.images[index]).convert("RGB"),
                                                  Image.open(val.masks[index]))
        assert torch.equal(mask, expected_mask)  # nearest pixel centres, as PIL: the very same labels
        # bilinear with antialiasing in torch vs PIL: within a grey level or two, not a shifted image
        assert (_pixels(image) - _pixels(expected_image)).__abs__().mean() < 1.5
