"""Do the U-Net skip concatenations help the ResNet50 segmenter (report section V-D, fig. 9)?

A: decoder concatenates encoder features at each scale; B: same decoder depth, no concatenation.
The ResNet50 encoder starts from torchvision's ImageNet weights, as the report's (--quick, --no-pretrained:
from scratch).

    python studies/seg_concat.py --quick
    python studies/seg_concat.py --data-root ~/data --gpus-per-trial 1
"""
from ray import tune

from analysis.finding import Finding
from studies.runner import run_study
from trainables import OptimConfig, SegmentConfig

BASE = SegmentConfig(model="unet_resnet50", dataset="voc", class_weights=0.1, optim=OptimConfig("sgd", 1e-4, 0.9),
                     epochs=582, steps_per_epoch=5, batch_size=32, pretrained=True)
SPACE = {"skip_concat": tune.grid_search([True, False])}
FINDING = Finding("the concatenation connections are a useful part of the network (A beats B)", "V-D, fig. 9",
                  metric="val/precision", mode="max", best={"skip_concat": True})

if __name__ == "__main__":
    run_study("seg_concat", BASE, SPACE, metric="val/precision", mode="max", doc=__doc__, finding=FINDING)
