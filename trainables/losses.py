"""The report's losses: cross-entropy for labels, BCE / MSE / BCE+MSE plus beta-weighted KL for the VAE."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IGNORE_INDEX = 255  # VOC's "void" border label


def class_weight_vector(class_weights: str | float, num_classes: int,
                        frequencies: np.ndarray | None = None) -> torch.Tensor | None:
    """Per-class weights of the segmentation loss: none, a background weight, or inverse frequency.

    Inverse-frequency weights are normalised to mean 1 over the classes seen in training, so the loss
    keeps the scale of an unweighted one; a class never seen gets weight 0 (it cannot be learnt anyway).
    """
    if class_weights == "none":
        return None
    if class_weights == "inverse_frequency":
        if frequencies is None:
            raise ValueError("class_weights='inverse_frequency' needs the training set's class frequencies")
        freq = torch.as_tensor(frequencies, dtype=torch.float32)
        seen = freq > 0
        weights = torch.zeros(num_classes)
        weights[seen] = 1.0 / freq[seen]
        return weights * seen.sum() / weights.sum()
    weights = torch.ones(num_classes)
    weights[0] = float(class_weights)  # class 0 is the background in VOC
    return weights


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Weighted cross-entropy over pixels, ignoring the 255 border; logits (B,K,H,W), masks (B,H,W)."""
    if weights is not None:
        weights = weights.to(device=logits.device, dtype=torch.float32)
    return F.cross_entropy(logits.float(), masks, weight=weights, ignore_index=IGNORE_INDEX)


def vae_loss(recon_logits: torch.Tensor, images: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             kind: str, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (loss, recon, kl), each summed over pixels / latent units and averaged over the batch.

    Per-image sums (not means) keep reconstruction and KL on the scale of the ELBO, so beta=1 is the
    textbook VAE and values are comparable across image sizes of the same data set.
    """
    recon_logits, mu, logvar = recon_logits.float(), mu.float(), logvar.float()
    batch = images.shape[0]
    recon = recon_logits.new_zeros(())
    if kind in ("bce", "bce+mse"):
        recon = recon + F.binary_cross_entropy_with_logits(recon_logits, images, reduction="sum") / batch
    if kind in ("mse", "bce+mse"):
        recon = recon + F.mse_loss(torch.sigmoid(recon_logits), images, reduction="sum") / batch
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / batch
    return recon + beta * kl, recon, kl
