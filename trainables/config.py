"""The typed configs: one frozen dataclass per task, validated before any trial starts.

A wrong value raises ``ConfigError`` naming the field and what would be valid, so a study fails in the
driver within seconds instead of in every trial. Tune carries configs as plain dicts (``to_dict``);
the first line of a trial turns the dict back into the dataclass (``from_dict``).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from trainables.checkpoints import SPEC as CHECKPOINT_SPEC
from trainables.checkpoints import VALID_SPECS as VALID_CHECKPOINT_SPECS
from trainables.data import DATASETS, dataset_info
from vision_models import MODELS, check_image_size


class ConfigError(ValueError):
    """A config field holds a value that cannot work; the message names the field and the valid values."""


def _require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: {message}")


def _one_of(value: Any, field_name: str, allowed: tuple) -> None:
    _require(value in allowed, field_name, f"got {value!r}; valid values are {', '.join(map(repr, allowed))}")


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule (momentum 0 = plain SGD; Adam ignores it, its betas are the defaults)."""

    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: str = "none"
    step_size: int = 10  # epochs between decays of the "step" schedule
    gamma: float = 0.1

    NAMES: ClassVar[tuple] = ("sgd", "adam")
    SCHEDULES: ClassVar[tuple] = ("none", "cosine", "step")

    def __post_init__(self) -> None:
        _one_of(self.name, "optim.name", self.NAMES)
        _one_of(self.schedule, "optim.schedule", self.SCHEDULES)
        _require(_is_number(self.lr) and self.lr > 0 and math.isfinite(self.lr), "optim.lr",
                 f"must be a number > 0; got {self.lr!r}")
        _require(_is_number(self.momentum) and 0 <= self.momentum < 1, "optim.momentum",
                 f"must be in [0, 1); got {self.momentum!r}")
        _require(_is_number(self.weight_decay) and self.weight_decay >= 0, "optim.weight_decay",
                 f"must be >= 0; got {self.weight_decay!r}")
        _require(isinstance(self.step_size, int) and self.step_size >= 1, "optim.step_size",
                 f"must be an integer >= 1; got {self.step_size!r}")
        _require(_is_number(self.gamma) and 0 < self.gamma <= 1, "optim.gamma", f"must be in (0, 1]; got {self.gamma!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class TrainConfig:
    """Fields every task shares: data, budget, optimizer, reproducibility, hardware use."""

    model: str = ""
    dataset: str = ""
    data_root: str = "~/.cache/vision-tune/data"
    download: bool = False
    image_size: int = 32
    epochs: int = 10
    batch_size: int = 64
    steps_per_epoch: int = 0  # 0 = one full pass; the report's U-Net used 5 batches of 32 per "epoch"
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0
    num_workers: int = -1  # VOC loader workers; -1 = on a GPU, one per CPU of the trial beyond the first (task.loader_workers)
    amp: bool = True  # autocast on CUDA only: bf16 where the GPU runs it natively, else fp16 with a loss scaler
    feature_samples: int = 192  # val images whose features are saved for t-SNE/PCA, as the report
    val_samples: int = 0  # 0 = evaluate on the whole val split; else on a fixed subset (quick runs)
    checkpoint_every: str = "auto"  # epochs ("5"), seconds of training ("600s") or auto (trainables/checkpoints.py)

    TASK: ClassVar[str] = ""
    MODELS: ClassVar[tuple] = ()
    DATASETS: ClassVar[tuple] = ()

    def __post_init__(self) -> None:
        if isinstance(self.optim, dict):  # Tune hands nested configs over as dicts
            object.__setattr__(self, "optim", OptimConfig(**self.optim))
        object.__setattr__(self, "data_root", os.path.abspath(os.path.expanduser(self.data_root)))
        _one_of(self.model, "model", self.MODELS)
        _one_of(self.dataset, "dataset", self.DATASETS)
        for name in ("epochs", "batch_size", "image_size", "feature_samples"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, name, f"must be an integer >= 1; got {value!r}")
        _require(isinstance(self.num_workers, int) and self.num_workers >= -1, "num_workers",
                 f"must be an integer >= 0, or -1 for one per CPU of the trial; got {self.num_workers!r}")
        for name in ("steps_per_epoch", "seed", "val_samples"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 0, name, f"must be an integer >= 0; got {value!r}")
        _require(isinstance(self.checkpoint_every, str) and bool(CHECKPOINT_SPEC.match(self.checkpoint_every)),
                 "checkpoint_every", f"got {self.checkpoint_every!r}; valid: {VALID_CHECKPOINT_SPECS}")
        try:
            check_image_size(self.model, self.image_size, **self.model_kwargs())
        except ValueError as err:
            raise ConfigError(f"image_size: {err}") from None

    @property
    def info(self):
        """What the data set is: classes, channels, task."""
        return dataset_info(self.dataset)

    def model_kwargs(self) -> dict:
        """Explicit keyword arguments for ``build_model``; models never see the config object."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        """A plain nested dict (Tune's param space, MLflow params)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Rebuild the typed config from Tune's dict; unknown keys raise, naming the valid ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        _require(not unknown, "config", f"unknown field(s) {unknown}; valid fields are {sorted(known)}")
        return cls(**values)


@dataclass(frozen=True)
class ClassifyConfig(TrainConfig):
    """CIFAR-10 classification (report section II)."""

    model: str = "resnet18"
    dataset: str = "cifar10"
    image_size: int = 32
    epochs: int = 30
    batch_size: int = 128
    optim: OptimConfig = field(default_factory=lambda: OptimConfig("sgd", 0.1, 0.9, 5e-4, "cosine"))

    TASK: ClassVar[str] = "classification"
    MODELS: ClassVar[tuple] = ("vgg16", "resnet18", "resnet34", "resnet50")
    DATASETS: ClassVar[tuple] = ("cifar10", "mnist", "digits", "mnist5k")

    def model_kwargs(self) -> dict:
        info = dataset_info(self.dataset)
        return {"num_classes": info.num_classes, "in_channels": info.in_channels}


@dataclass(frozen=True)
class VAEConfig(TrainConfig):
    """Convolutional VAE on MNIST / CIFAR-10 (report section III)."""

    model: str = "conv_vae"
    dataset: str = "mnist"
    image_size: int = 0  # 0 = the data set's own size (MNIST 28, CIFAR-10 32)
    epochs: int = 20
    batch_size: int = 128
    optim: OptimConfig = field(default_factory=lambda: OptimConfig("adam", 5e-4))
    latent_dim: int = 16
    loss: str = "bce"
    beta: float = 1.0  # weight of the KL term

    TASK: ClassVar[str] = "generation"
    MODELS: ClassVar[tuple] = ("conv_vae",)
    DATASETS: ClassVar[tuple] = ("mnist", "cifar10", "digits", "mnist5k")
    LOSSES: ClassVar[tuple] = ("bce", "mse", "bce+mse")

    def __post_init__(self) -> None:
        _require(isinstance(self.latent_dim, int) and self.latent_dim >= 1, "latent_dim",
                 f"must be an integer >= 1; got {self.latent_dim!r}")
        _one_of(self.loss, "loss", self.LOSSES)
        _require(_is_number(self.beta) and self.beta >= 0, "beta", f"must be >= 0; got {self.beta!r}")
        if self.image_size == 0 and self.dataset in self.DATASETS:
            object.__setattr__(self, "image_size", dataset_info(self.dataset).native_size)
        super().__post_init__()

    def model_kwargs(self) -> dict:
        info = dataset_info(self.dataset)
        return {"in_channels": info.in_channels, "image_size": self.image_size, "latent_dim": self.latent_dim}


@dataclass(frozen=True)
class SegmentConfig(TrainConfig):
    """Semantic segmentation on PASCAL VOC (report sections IV and V)."""

    model: str = "unet_resnet50"
    dataset: str = "voc"
    image_size: int = 256
    epochs: int = 582
    batch_size: int = 32
    steps_per_epoch: int = 5
    optim: OptimConfig = field(default_factory=lambda: OptimConfig("sgd", 1e-4, 0.9))
    # "none", "inverse_frequency", or the weight of the background class in (0, 1] (others weigh 1).
    class_weights: str | float = 0.1
    train_split: str = "trainval"  # VOC2012 train+val (2,913 images, as the report) or "train" (1,464)
    skip_concat: bool = True
    encoder_stop: str = "layer3"
    pretrained: bool = False

    TASK: ClassVar[str] = "segmentation"
    MODELS: ClassVar[tuple] = ("unet_resnet50", "segnet_vgg16")
    DATASETS: ClassVar[tuple] = ("voc", "shapes")
    WEIGHTINGS: ClassVar[tuple] = ("none", "inverse_frequency")

    def __post_init__(self) -> None:
        weights = self.class_weights
        valid = weights in self.WEIGHTINGS or (_is_number(weights) and 0 < weights <= 1)
        _require(valid, "class_weights", f"got {weights!r}; valid values are 'none', 'inverse_frequency' "
                 "or a background weight in (0, 1], e.g. 0.1")
        _one_of(self.train_split, "train_split", ("trainval", "train"))
        _one_of(self.encoder_stop, "encoder_stop", ("layer2", "layer3"))
        super().__post_init__()

    def model_kwargs(self) -> dict:
        kwargs = {"num_classes": dataset_info(self.dataset).num_classes, "pretrained": self.pretrained}
        if self.model == "unet_resnet50":
            kwargs.update(skip_concat=self.skip_concat, encoder_stop=self.encoder_stop)
        return kwargs


CONFIGS = {cls.TASK: cls for cls in (ClassifyConfig, VAEConfig, SegmentConfig)}
assert set(DATASETS) >= {d for cls in CONFIGS.values() for d in cls.DATASETS}, "a config names an unknown data set"
assert set(MODELS) >= {m for cls in CONFIGS.values() for m in cls.MODELS}, "a config names an unknown model"
