"""How should the loss weigh VOC's dominant background class (report section V-C, figs. 7 and 8)?

A: no weights, B: background 0.1, C: background 0.01, D: inverse class frequency of the training
masks; SGD lr 1e-4 momentum 0.9, the winner of section V-B.

    python studies/seg_class_weights.py --quick
    python studies/seg_class_weights.py --data-root ~/data --gpus-per-trial 1
"""
from ray import tune

from studies.runner import run_study
from trainables import OptimConfig, SegmentConfig

BASE = SegmentConfig(model="unet_resnet50", dataset="voc", optim=OptimConfig("sgd", 1e-4, 0.9), epochs=582,
                     steps_per_epoch=5, batch_size=32)
SPACE = {"class_weights": tune.grid_search(["none", 0.1, 0.01, "inverse_frequency"])}

if __name__ == "__main__":
    run_study("seg_class_weights", BASE, SPACE, metric="val/precision", mode="max", doc=__doc__)
