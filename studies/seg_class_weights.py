"""How should the loss weigh VOC's dominant background class (report section V-C, figs. 7 and 8)?

A: no weights, B: background 0.1, C: background 0.01, D: inverse class frequency of the training
masks; SGD lr 1e-4 momentum 0.9, the winner of section V-B.
The ResNet50 encoder starts from torchvision's ImageNet weights, as the report's (--quick, --no-pretrained:
from scratch).

    python studies/seg_class_weights.py --quick
    python studies/seg_class_weights.py --data-root ~/data --gpus-per-trial 1
"""
from ray import tune

from analysis.finding import Finding
from studies.runner import run_study
from trainables import OptimConfig, SegmentConfig

BASE = SegmentConfig(model="unet_resnet50", dataset="voc", optim=OptimConfig("sgd", 1e-4, 0.9), epochs=582,
                     steps_per_epoch=5, batch_size=32, pretrained=True)
SPACE = {"class_weights": tune.grid_search(["none", 0.1, 0.01, "inverse_frequency"])}
FINDING = Finding("without class weights the model labels (nearly) every pixel as background (A)", "V-C, figs. 7-8",
                  metric="val/recall", mode="max", worst={"class_weights": "none"})

if __name__ == "__main__":
    run_study("seg_class_weights", BASE, SPACE, metric="val/precision", mode="max", doc=__doc__, finding=FINDING)
