"""Convolutional VAE: conv encoder -> (mu, logvar) -> reparameterisation -> transposed-conv decoder (logits)."""
from __future__ import annotations

import torch
from torch import nn

from vision_models.sizes import SizeRule

HIDDEN = 256  # width of the fully connected layer on either side of the latent code


def size_rule(**_builder_kwargs) -> SizeRule:
    """Two stride-2 convs in, two stride-2 transposed convs out: sides must be multiples of 4."""
    return SizeRule("conv_vae", multiple=4, minimum=8)


class ConvVAE(nn.Module):
    """A VAE for square images (28x28 MNIST, 32x32 CIFAR-10, any multiple of 4 from 8)."""

    TAPS = {"mu": "fc_mu"}

    def __init__(self, in_channels: int = 1, image_size: int = 28, latent_dim: int = 16) -> None:
        super().__init__()
        self.size_rule = size_rule()
        self.size_rule.check(image_size, image_size)
        self.in_channels, self.image_size, self.latent_dim = in_channels, image_size, latent_dim
        side = image_size // 4
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, 32, 4, stride=2, padding=1), nn.ReLU(inplace=True),  # (B,32,S/2,S/2)
            nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.ReLU(inplace=True),  # (B,64,S/4,S/4)
            nn.Flatten(), nn.Linear(64 * side * side, HIDDEN), nn.ReLU(inplace=True))
        self.fc_mu = nn.Linear(HIDDEN, latent_dim)
        self.fc_logvar = nn.Linear(HIDDEN, latent_dim)
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, HIDDEN), nn.ReLU(inplace=True),
            nn.Linear(HIDDEN, 64 * side * side), nn.ReLU(inplace=True), nn.Unflatten(1, (64, side, side)),
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(inplace=True),  # (B,32,S/2,S/2)
            nn.ConvTranspose2d(32, in_channels, 4, stride=2, padding=1))  # (B,C,S,S) logits

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,C,S,S) -> (mu, logvar), each (B,latent_dim)."""
        expected = (self.in_channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            got = "x".join(map(str, images.shape[1:]))
            raise ValueError(f"conv_vae was built for {'x'.join(map(str, expected))} images "
                             f"(in_channels={self.in_channels}, image_size={self.image_size}); got {got}: "
                             "build it with the data's channels and image_size")
        hidden = self.encoder(images)
        return self.fc_mu(hidden), self.fc_logvar(hidden)

    def reparameterise(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """A sample of q(z|x) while training; its mean in eval, so evaluation is deterministic."""
        if not self.training:
            return mu
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B,latent_dim) -> reconstruction logits (B,C,S,S); logits keep BCE-with-logits exact."""
        return self.decoder(z)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B,C,S,S) -> (recon_logits (B,C,S,S), mu (B,L), logvar (B,L))."""
        mu, logvar = self.encode(images)
        return self.decode(self.reparameterise(mu, logvar)), mu, logvar

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` images drawn from the prior N(0, I), as probabilities in [0, 1]: (n,C,S,S)."""
        weight = self.fc_mu.weight
        z = torch.randn(n, self.latent_dim, generator=generator,
                        device=generator.device if generator is not None else weight.device)
        return torch.sigmoid(self.decode(z.to(device=weight.device, dtype=weight.dtype)))


def conv_vae(in_channels: int = 1, image_size: int = 28, latent_dim: int = 16) -> ConvVAE:
    """Convolutional VAE for ``image_size`` x ``image_size`` images (a multiple of 4, at least 8)."""
    return ConvVAE(in_channels=in_channels, image_size=image_size, latent_dim=latent_dim)


class Reconstruction(nn.Module):
    """A VAE as one image-to-image function, its mean reconstruction as probabilities (B,C,S,S): what an
    exported VAE serves (MLflow's pyfunc predicts one tensor; ``ConvVAE.forward`` returns three)."""

    def __init__(self, vae: ConvVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.vae(images)[0])
