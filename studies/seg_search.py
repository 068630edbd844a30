"""Beyond the report: what do optimizer, learning rate, background weight and skip concatenations
give when searched jointly, with Optuna's TPE proposing trials and ASHA stopping poor ones early?
The ResNet50 encoder starts from torchvision's ImageNet weights, as the report's (--quick, --no-pretrained:
from scratch).

    python studies/seg_search.py --quick
    python studies/seg_search.py --data-root ~/data --gpus-per-trial 1 --num-samples 32
"""
from ray import tune

from studies.runner import run_study
from trainables import OptimConfig, SegmentConfig

BASE = SegmentConfig(model="unet_resnet50", dataset="voc", optim=OptimConfig("sgd", 1e-4, 0.9), epochs=582,
                     steps_per_epoch=5, batch_size=32, pretrained=True)
SPACE = {
    "optim": {"name": tune.choice(["sgd", "adam"]), "lr": tune.loguniform(1e-5, 1e-2)},
    "class_weights": tune.choice([1.0, 0.3, 0.1, 0.03, 0.01]),
    "skip_concat": tune.choice([True, False]),
}

if __name__ == "__main__":
    run_study("seg_search", BASE, SPACE, metric="val/precision", mode="max", num_samples=16, doc=__doc__,
              default_args=["--search", "optuna", "--scheduler", "asha"])
