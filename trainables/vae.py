"""Image generation with a convolutional VAE (report section III): BCE / MSE / BCE+MSE plus beta * KL."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trainables.artifacts import fixed_indices, pooled_features, save_features, save_rows, stack_samples, write_meta
from trainables.config import VAEConfig
from trainables.data import build_dataset
from trainables.loop import Hardware, StepOutput
from trainables.losses import vae_loss
from trainables.task import Built, Task
from vision_models import build_model

GRID_IMAGES = 8
PRIOR_SAMPLES = 64


def step(model: nn.Module, batch, kind: str, beta: float) -> StepOutput:
    images, _ = batch
    recon_logits, mu, logvar = model(images)
    loss, recon, kl = vae_loss(recon_logits, images, mu, logvar, kind, beta)
    # elbo = -(reconstruction + KL): the true ELBO for "bce" on binary-ish pixels, comparable otherwise
    return StepOutput(loss, parts={"recon": recon.detach(), "kl": kl.detach(), "elbo": -(recon + kl).detach()})


def build(config: VAEConfig) -> Built:
    # normalize=False: pixels in [0, 1] are the BCE targets
    data = {split: build_dataset(config.dataset, split, config.data_root, config.image_size,
                                 download=config.download, normalize=False)
            for split in ("train", "val")}
    model = build_model(config.model, **config.model_kwargs())
    return Built(model, partial(step, kind=config.loss, beta=config.beta), data["train"], data["val"],
                 None, config.info.class_names)


@torch.no_grad()
def write_artifacts(config: VAEConfig, built: Built, model: nn.Module, hw: Hardware, out: Path) -> None:
    """features.npz (inputs vs latent means), reconstructions.png, prior_samples.png, samples.npz."""
    indices = fixed_indices(len(built.val_set), config.feature_samples)
    images, labels = stack_samples(built.val_set, indices)
    features = pooled_features(model, images, ["mu"], hw)
    features["input"] = images.flatten(1).numpy()
    save_features(out / "features.npz", features, labels.numpy(), indices)
    model.eval()
    shown = images[:GRID_IMAGES]
    with hw.autocast():
        recon_logits, _, _ = model(hw.move([shown])[0])
        prior = model.sample(PRIOR_SAMPLES)
    recon = torch.sigmoid(recon_logits.float()).cpu()
    prior = prior.float().cpu()
    save_rows(out / "reconstructions.png", [shown, recon])
    save_rows(out / "prior_samples.png", list(prior.view(8, PRIOR_SAMPLES // 8, *prior.shape[1:])))
    np.savez_compressed(out / "samples.npz", images=shown.numpy(), reconstructions=recon.numpy(),
                        prior=prior.numpy(), targets=labels[:GRID_IMAGES].numpy(),
                        indices=np.asarray(indices[:GRID_IMAGES]))
    write_meta(out, task=config.TASK, model=config.model, dataset=config.dataset,
               class_names=list(built.class_names), taps=["mu", "input"], latent_dim=config.latent_dim)


TASK = Task("generation", VAEConfig, build, write_artifacts)
