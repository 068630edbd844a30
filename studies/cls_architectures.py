"""Does ResNet beat VGG16 on CIFAR-10, and which learning rate suits each (report section II)?

VGG16 and ResNet18 x learning rate 0.1 / 0.05, SGD momentum 0.9 (the report: ResNet 87.6% at 0.05).

    python studies/cls_architectures.py --quick
    python studies/cls_architectures.py --data-root ~/data --download --gpus-per-trial 1
"""
from ray import tune

from analysis.finding import Finding
from studies.runner import run_study
from trainables import ClassifyConfig, OptimConfig

BASE = ClassifyConfig(dataset="cifar10", epochs=30, optim=OptimConfig("sgd", 0.1, 0.9, 5e-4, "cosine"))
SPACE = {
    "model": tune.grid_search(["vgg16", "resnet18"]),
    "optim": {"lr": tune.grid_search([0.1, 0.05])},
}
FINDING = Finding("ResNet beats VGG16 and lr 0.05 beats 0.1: ResNet at lr 0.05 is best (87.62%)", "II",
                  metric="val/accuracy", mode="max", best={"model": "resnet18", "optim/lr": 0.05})

if __name__ == "__main__":
    run_study("cls_architectures", BASE, SPACE, metric="val/accuracy", mode="max", doc=__doc__, finding=FINDING)
