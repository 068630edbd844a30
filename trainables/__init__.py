"""Typed configs, the one training loop and the three Ray Tune trainables (one per task)."""
from __future__ import annotations

from trainables.config import CONFIGS, ClassifyConfig, ConfigError, OptimConfig, SegmentConfig, TrainConfig, VAEConfig
from trainables.tune_io import run_trial


def train_classifier(config: dict, weights: list | None = None) -> None:
    """Tune trainable: image classification (CIFAR-10, MNIST, embedded digits). ``weights``: pretrained files
    from the driver (``trainables/pretrained.py``), put in Ray's object store by ``tune.with_parameters``."""
    from trainables.classify import TASK

    run_trial(config, TASK, weights=weights)  # returns None: a returned dict would count as one more Tune result


def train_vae(config: dict, weights: list | None = None) -> None:
    """Tune trainable: convolutional VAE."""
    from trainables.vae import TASK

    run_trial(config, TASK, weights=weights)  # returns None: a returned dict would count as one more Tune result


def train_segmenter(config: dict, weights: list | None = None) -> None:
    """Tune trainable: SegNet or ResNet50/U-Net segmentation."""
    from trainables.segment import TASK

    run_trial(config, TASK, weights=weights)  # returns None: a returned dict would count as one more Tune result


TRAINABLES = {ClassifyConfig: train_classifier, VAEConfig: train_vae, SegmentConfig: train_segmenter}


def trainable_for(config: TrainConfig):
    """The trainable that runs configs of this type."""
    return TRAINABLES[type(config)]


__all__ = ["CONFIGS", "ClassifyConfig", "ConfigError", "OptimConfig", "SegmentConfig", "TrainConfig", "VAEConfig",
           "TRAINABLES", "run_trial", "trainable_for", "train_classifier", "train_segmenter", "train_vae"]
