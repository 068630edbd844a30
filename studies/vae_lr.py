"""Which learning rate trains the VAE best (report section III: 0.0005)?

Adam at 5e-3, 1e-3, 5e-4, 1e-4, 5e-5 on MNIST, BCE + KL, latent size 16.

    python studies/vae_lr.py --quick
    python studies/vae_lr.py --data-root ~/data --download
"""
from ray import tune

from analysis.finding import Finding
from studies.runner import run_study
from trainables import VAEConfig

BASE = VAEConfig(dataset="mnist", loss="bce", latent_dim=16)
SPACE = {"optim": {"lr": tune.grid_search([5e-3, 1e-3, 5e-4, 1e-4, 5e-5])}}
FINDING = Finding("the optimal learning rate is 0.0005", "III", metric="val/loss", mode="min",
                  best={"optim/lr": 5e-4})

if __name__ == "__main__":
    run_study("vae_lr", BASE, SPACE, metric="val/loss", mode="min", doc=__doc__, finding=FINDING)
