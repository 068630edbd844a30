"""How does the VAE's latent size change its loss and samples (report section III)?

Latent size 2 to 64 on MNIST, BCE + KL, Adam lr 5e-4; the report: bigger latents, lower loss.

    python studies/vae_latent.py --quick
    python studies/vae_latent.py --data-root ~/data --download
"""
from ray import tune

from analysis.finding import Finding
from studies.runner import run_study
from trainables import VAEConfig

BASE = VAEConfig(dataset="mnist", loss="bce")
SPACE = {"latent_dim": tune.grid_search([2, 4, 8, 16, 32, 64])}
FINDING = Finding("with bigger latent dimensions the loss decreases", "III", metric="val/loss", trend="latent_dim",
                  direction="falls")

if __name__ == "__main__":
    run_study("vae_latent", BASE, SPACE, metric="val/loss", mode="min", doc=__doc__, finding=FINDING)
