"""Which reconstruction loss suits the VAE: BCE, MSE or BCE+MSE, on MNIST and CIFAR-10 (section III)?

Each plus the KL term; Adam lr 5e-4, latent size 16. With --quick or --dataset the data set is fixed.

    python studies/vae_losses.py --quick
    python studies/vae_losses.py --data-root ~/data --download
"""
from ray import tune

from analysis.finding import Finding
from studies.runner import run_study
from trainables import VAEConfig

BASE = VAEConfig(dataset="mnist", latent_dim=16)
SPACE = {
    "loss": tune.grid_search(["bce", "mse", "bce+mse"]),
    "dataset": tune.grid_search(["mnist", "cifar10"]),
}
# Losses of different reconstruction terms compared as the report did, within one data set (MNIST)
FINDING = Finding("CE + MSE attains the smallest loss, followed closely by MSE", "III", metric="val/loss", mode="min",
                  best={"loss": "bce+mse"}, among={"dataset": "mnist"})

if __name__ == "__main__":
    run_study("vae_losses", BASE, SPACE, metric="val/loss", mode="min", doc=__doc__, finding=FINDING)
