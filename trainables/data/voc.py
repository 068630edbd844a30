"""Pascal VOC segmentation through torchvision's VOCSegmentation, with an upfront layout check."""
from __future__ import annotations

import logging
from pathlib import Path

from .checks import default_cache_dir, validate_segmentation
from .decoded import decoded
from .errors import download_failed, missing_data
from .segmentation import SegmentationSet

log = logging.getLogger(__name__)

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")
TRAIN_SPLITS = ("train", "trainval")
VOC_LAYOUT = """\
  {root}/VOCdevkit/VOC2012/JPEGImages/<id>.jpg
  {root}/VOCdevkit/VOC2012/SegmentationClass/<id>.png   (palette PNGs: labels 0..20, 255 = void border)
  {root}/VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt   (one <id> a line)
  optional test set, used for validation when present:
  {root}/VOCdevkit/VOC2007/{JPEGImages,SegmentationClass,ImageSets/Segmentation/test.txt}"""


def voc_palette() -> list[int]:
    """VOC's 256-colour palette (class i's colour from the bits of i; 255 is the cream void colour)."""
    palette = []
    for index in range(256):
        r = g = b = 0
        label = index
        for shift in range(7, -1, -1):
            r |= ((label >> 0) & 1) << shift
            g |= ((label >> 1) & 1) << shift
            b |= ((label >> 2) & 1) << shift
            label >>= 3
        palette += [r, g, b]
    return palette


def voc_source(root: Path, split: str, train_split: str = "trainval") -> tuple[str, str]:
    """(year, image set) read for a split: train = VOC2012 train_split; val = VOC2007 test if present, else 2012 val."""
    if split == "train":
        return "2012", train_split
    if (root / "VOCdevkit" / "VOC2007" / "ImageSets" / "Segmentation" / "test.txt").is_file():
        return "2007", "test"
    return "2012", "val"


def check_voc_layout(root: Path, year: str, image_set: str, name: str = "voc") -> None:
    """Raise FileNotFoundError naming the path and what is missing before torchvision gets a chance to."""
    base = root / "VOCdevkit" / f"VOC{year}"
    needed = [base / "JPEGImages", base / "SegmentationClass", base / "ImageSets" / "Segmentation" / f"{image_set}.txt"]
    missing = [path for path in needed if not path.exists()]
    if missing:
        raise missing_data(name, root, VOC_LAYOUT.replace("{root}", str(root)), missing)


def _download(root: Path, split: str) -> None:
    """Fetch VOC2012 trainval (and, for validation, the VOC2007 test set the report evaluates on)."""
    from torchvision.datasets import VOCSegmentation

    layout = VOC_LAYOUT.replace("{root}", str(root))
    try:
        VOCSegmentation(str(root), year="2012", image_set="train", download=True)
    except (OSError, RuntimeError) as err:
        raise download_failed("voc", root, layout, err) from err
    if split == "val":
        try:
            VOCSegmentation(str(root), year="2007", image_set="test", download=True)
        except (OSError, RuntimeError) as err:
            log.warning("VOC2007 test could not be downloaded (%s); validating on VOC2012 val instead", err)


def build_voc(root: Path, split: str, image_size: int, *, download: bool = False, train_split: str = "trainval",
              augment: bool = False, normalize: bool = True, name: str = "voc") -> SegmentationSet:
    """A VOC-format segmentation set: item = (image (3,S,S) ImageNet-normalised, mask int64 (S,S), 255 = ignore),
    read from its decoded cache (built on first use, which the driver's data check makes before any trial)."""
    from torchvision.datasets import VOCSegmentation  # here: importing this module (its palette) stays light

    if train_split not in TRAIN_SPLITS:
        raise ValueError(f"train_split must be one of {TRAIN_SPLITS}; got {train_split!r}")
    if download:
        _download(root, split)
    year, image_set = voc_source(root, split, train_split)
    check_voc_layout(root, year, image_set, name)
    dataset = VOCSegmentation(str(root), year=year, image_set=image_set)  # the file lists; decoding is ours
    if not dataset.images:
        raise missing_data(name, root, VOC_LAYOUT.replace("{root}", str(root)),
                           [f"any id in VOCdevkit/VOC{year}/ImageSets/Segmentation/{image_set}.txt (it is empty)"])
    cache_dir, described = default_cache_dir(root), f"{name} VOC{year} {image_set}"
    validate_segmentation(dataset, cache_dir, name=described)
    arrays = decoded(dataset.images, dataset.masks, cache_dir, described)
    log.info("%s %s: VOC%s %s, %d images", name, split, year, image_set, len(dataset))
    return SegmentationSet(arrays, dataset.images, dataset.masks, image_size, augment, normalize)
