"""The one command line every study shares, and how it rewrites the study's base config and space."""
from __future__ import annotations

import argparse
import dataclasses

from studies.runner.autoscaling import PENDING_TIMEOUT_S
from studies.runner.errors import UsageError
from studies.runner.tracking import LOG_MODELS
from trainables import ClassifyConfig, ConfigError, SegmentConfig, TrainConfig, VAEConfig

# --quick: embedded data, small images, two epochs, so each study ends in minutes on a 2-core laptop.
# Measured on one core: VGG16 26 img/s and ResNet18 17 img/s at 32x32, U-Net 7 img/s and SegNet 3 img/s
# at 64x64, the VAE ~1,000 img/s; so the big networks get a few batches per epoch.
QUICK = {
    ClassifyConfig: dict(dataset="digits", image_size=32, epochs=2, batch_size=32, steps_per_epoch=4,
                         val_samples=128),
    VAEConfig: dict(dataset="mnist5k", image_size=28, epochs=2, batch_size=64, steps_per_epoch=20),
    SegmentConfig: dict(dataset="shapes", image_size=64, epochs=2, batch_size=8, steps_per_epoch=4,
                        feature_samples=64, pretrained=False),  # from scratch: nothing to download
}


def resources_json(text: str) -> dict[str, float]:
    """``--resources-per-trial``: a JSON object of custom resource names to amounts > 0 (CPU and GPU have flags)."""
    import json

    example = "e.g. '{\"worker\": 1}'"
    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON; expected an object of resource amounts, {example}")
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, (int, float)) and
                                              not isinstance(v, bool) and v > 0 for k, v in value.items()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected an object of resource names to amounts > 0, {example}")
    taken = sorted(set(value) & {"CPU", "GPU", "cpu", "gpu", "memory"})
    if taken:
        raise argparse.ArgumentTypeError(f"{text!r}: {', '.join(taken)} have their own flags (--cpus-per-trial, "
                                         "--gpus-per-trial); list only custom resources here")
    return {key: float(amount) for key, amount in value.items()}


SCHEDULERS = ("fifo", "asha", "hyperband", "pbt")
# what every trial reports and an objective may name (the runner's summary keys, the model's size, its speed)
OBJECTIVES = ("val/loss", "val/accuracy", "val/precision", "val/recall", "val/miou", "val/recon", "val/kl",
              "val/elbo", "train/loss", "model/params_m", "images_per_s")


def objectives(args: argparse.Namespace, metric: str, mode: str) -> list[tuple[str, str]]:
    """The study's objectives as (metric, mode): its own, or what --metric says (one or two)."""
    if not args.metric:
        return [(metric, mode)]
    found = []
    for typed in args.metric:
        name, _, direction = typed.partition(":")
        direction = direction or (mode if name == metric else "min" if "loss" in name or name.endswith("_m") else "max")
        if name not in OBJECTIVES or direction not in ("min", "max"):
            raise UsageError(f"--metric {typed}: expected NAME[:max|min] with NAME one of {', '.join(OBJECTIVES)}")
        found.append((name, direction))
    if len(found) > 2:
        raise UsageError(f"--metric given {len(found)} times: one objective, or two for a Pareto search")
    if len(found) == 2 and args.scheduler != "fifo":
        raise UsageError(f"--metric twice --scheduler {args.scheduler}: ASHA, HyperBand and PBT rank trials on one "
                         "metric; drop --scheduler or one --metric")
    return found


def pbt_interval(args: argparse.Namespace, epochs: int) -> int:
    return args.pbt_interval or max(1, epochs // 5)


def build_parser(name: str, doc: str | None = None) -> argparse.ArgumentParser:
    # a short usage line: argparse prints it above every flag error, and the full one is ~15 lines
    parser = argparse.ArgumentParser(prog=f"studies/{name}.py", description=doc, usage="%(prog)s [flags] (see --help)",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data and budget")
    data.add_argument("--quick", action="store_true", help="embedded data, small images, 2 epochs (minutes on a CPU)")
    data.add_argument("--dataset", help="override the data set (fixes any data-set dimension of the space)")
    data.add_argument("--data-root", help="folder of the real data sets (see README, 'Real data')")
    data.add_argument("--download", action="store_true", help="let torchvision download CIFAR-10/MNIST/VOC")
    data.add_argument("--epochs", type=int)
    data.add_argument("--batch-size", type=int)
    data.add_argument("--image-size", type=int)
    data.add_argument("--steps-per-epoch", type=int, help="batches per epoch (0 = a full pass)")
    data.add_argument("--num-workers", type=int, help="VOC loader workers per trial (default: GPU trials --cpus-per-trial - 1, CPU trials 0)")
    data.add_argument("--num-samples", type=int, help="trials per grid point (grid) or in total (optuna)")
    data.add_argument("--seed", type=int)
    data.add_argument("--no-pretrained", action="store_true", help="segmentation: train the encoder from scratch")
    res = parser.add_argument_group("resources and cluster")
    res.add_argument("--cpus-per-trial", type=float, default=1.0)
    res.add_argument("--gpus-per-trial", type=float, default=0.0, help="fractions allowed, e.g. 0.25")
    res.add_argument("--resources-per-trial", dest="extra_resources", type=resources_json, default={}, metavar="JSON",
                     help='custom Ray resources each trial needs, e.g. \'{"worker": 1}\' to place trials on the nodes '
                          'started with --resources=\'{"worker": N}\'')
    res.add_argument("--address", help="join a running Ray cluster ('auto' or host:port); default: start a local Ray")
    res.add_argument("--pending-timeout", type=float, default=PENDING_TIMEOUT_S, metavar="S",
                     help="seconds trials may wait for a node with none running (0: forever)")
    res.add_argument("--storage", default="results", help="results folder, a shared path or s3://... on clusters")
    search = parser.add_argument_group("search and scheduling")
    search.add_argument("--search", choices=("grid", "optuna"), default="grid")
    search.add_argument("--scheduler", choices=SCHEDULERS, default="fifo",
                        help="asha stops weak trials early; hyperband also pauses and resumes them; pbt perturbs the "
                             "space's real-valued grids (e.g. learning rates) and copies the best trials' weights")
    search.add_argument("--metric", action="append", metavar="NAME[:max|min]",
                        help="the study's objective instead of its own; twice: two objectives, searched by Optuna's "
                             "multi-objective sampler, the report drawing their Pareto front (e.g. --metric val/miou:max "
                             "--metric model/params_m:min)")
    search.add_argument("--pbt-interval", type=int, metavar="EPOCHS",
                        help="pbt: epochs between perturbations (default: a fifth of --epochs, at least 1)")
    search.add_argument("--max-concurrent", type=int, help="trials running at once (default: as resources allow)")
    track = parser.add_argument_group("tracking and recovery")
    track.add_argument("--mlflow-uri", help="default: sqlite:///<cwd>/mlflow.db; or http://host:5000")
    track.add_argument("--register-model", metavar="NAME", help="register the best trial's model as NAME in MLflow")
    track.add_argument("--resume", action="store_true", help="continue an interrupted study from its storage folder")
    track.add_argument("--overwrite", action="store_true", help="start over even if the study folder exists")
    track.add_argument("--max-failures", type=int, default=0, help="retries per trial, from its last checkpoint")
    track.add_argument("--checkpoint-every", metavar="N|Ns|auto", help="a checkpoint every N epochs or N seconds of "
                       "training (default auto: <= 5%% of the trial's time, at most one a minute; always one at the end)")
    track.add_argument("--log-models", choices=LOG_MODELS, default="best",
                       help="which trials' final models MLflow logs (built from their checkpoints; default: the best)")
    track.add_argument("--verbose", action="store_true", help="Tune's own status table and the trials' log lines")
    track.add_argument("--debug", action="store_true", help="show the traceback of an error (or VISION_TUNE_DEBUG=1)")
    return parser


def apply_args(base: TrainConfig, space: dict, args: argparse.Namespace) -> tuple[TrainConfig, dict]:
    """Rewrite the base config (quick mode, overrides) and drop space dimensions the flags fix."""
    overrides = dict(QUICK[type(base)]) if args.quick else {}
    flags = {"dataset": args.dataset, "data_root": args.data_root, "epochs": args.epochs,
             "batch_size": args.batch_size, "image_size": args.image_size, "seed": args.seed,
             "steps_per_epoch": args.steps_per_epoch, "download": args.download or None,
             "num_workers": args.num_workers, "checkpoint_every": args.checkpoint_every}
    flags = {key: value for key, value in flags.items() if value is not None}
    if args.no_pretrained:
        if not hasattr(base, "pretrained"):
            raise ConfigError(f"--no-pretrained: {type(base).__name__} models always train from scratch; only the "
                              "segmentation studies start from ImageNet encoders")
        flags["pretrained"] = False
    if isinstance(base, VAEConfig) and "dataset" in flags and "image_size" not in flags and not args.quick:
        flags["image_size"] = 0  # the VAE takes the new data set's own size (MNIST 28, CIFAR-10 32)
    overrides.update(flags)
    if args.scheduler in ("hyperband", "pbt") and not args.checkpoint_every:
        # a paused or exploited trial restarts from its last checkpoint: checkpoints where the scheduler acts
        epochs = overrides.get("epochs", base.epochs)
        overrides["checkpoint_every"] = "1" if args.scheduler == "hyperband" else str(pbt_interval(args, epochs))
    # a dimension of the space that a flag (or quick mode's embedded data set) fixes collapses to that value
    fixed = set(flags) | ({"dataset"} if args.quick else set())
    space = {key: value for key, value in space.items() if key not in fixed}
    return dataclasses.replace(base, **overrides), space
