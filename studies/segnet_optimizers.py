"""Which optimizer trains SegNet (VGG16 encoder, unpooling decoder) best (report section IV)?

SGD, SGD with momentum 0.9, Adam; the report found Adam best (accuracy, smoother curves).
The VGG16-BN encoder starts from torchvision's ImageNet weights, as the report's (--quick, --no-pretrained:
from scratch).

    python studies/segnet_optimizers.py --quick
    python studies/segnet_optimizers.py --data-root ~/data --gpus-per-trial 1
"""
from ray import tune

from analysis.finding import Finding
from studies.runner import run_study
from trainables import SegmentConfig

BASE = SegmentConfig(model="segnet_vgg16", dataset="voc", class_weights=0.1, epochs=100, steps_per_epoch=0,
                     batch_size=16, pretrained=True)
SPACE = {"optim": tune.grid_search([
    {"name": "sgd", "lr": 1e-2},
    {"name": "sgd", "lr": 1e-2, "momentum": 0.9},
    {"name": "adam", "lr": 1e-3},
])}
FINDING = Finding("Adam gives the best accuracy (and less noisy curves)", "IV", metric="val/accuracy", mode="max",
                  best={"optim/name": "adam"})

if __name__ == "__main__":
    run_study("segnet_optimizers", BASE, SPACE, metric="val/accuracy", mode="max", doc=__doc__, finding=FINDING)
