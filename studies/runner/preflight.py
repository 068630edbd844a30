"""Pre-flight: the checks that must fail in seconds, before Ray starts or before any trial is scheduled.

Each check takes plain data (the parsed flags, the space, what ``ray.nodes()`` returned) and raises an
error that names the flag, the value and what would be valid; the runner decides when to call them.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from studies.runner.autoscaling import (AUTOSCALER_CONFIG, PENDING_TIMEOUT_S, Autoscaler, from_bootstrap,  # noqa: F401
                                 learn, shape)
from studies.runner.space import grid_size, variants
from studies.runner.mlflow_uri import local_artifact_root
from trainables import TrainConfig
from trainables.data import build_dataset
from vision_models import build_model


KEEP_CHECKPOINTS = 2  # per trial: the newest two, so a crash while writing one leaves the other


class StorageError(RuntimeError):
    """The study's checkpoints cannot fit on the disk they would be written to."""


class ResourceError(RuntimeError):
    """The per-trial request can never be met by this cluster (Tune would leave trials PENDING forever)."""


class PendingTimeoutError(ResourceError):
    """Trials waited longer than --pending-timeout for a node that could host them."""


def launchable_nodes(config: str = AUTOSCALER_CONFIG) -> list[dict]:
    """Resources of the node types ``ray up``'s config lets the autoscaler still start."""
    return list((from_bootstrap(config) or {}).values())


def fits(request: dict, resources: dict) -> bool:
    return all(resources.get(kind, 0) >= wanted for kind, wanted in request.items() if wanted > 0)


def check_resources(nodes: list[dict], cpus: float, gpus: float, scaler: Autoscaler | None = None,
                    timeout: float = PENDING_TIMEOUT_S, extra: dict | None = None) -> str | None:
    """None when a live node can host one trial; a note when none can yet but the autoscaler may add one
    (the trials wait, up to ``timeout`` seconds); ResourceError at once when neither holds.

    ``nodes`` as ``ray.nodes()`` returns them; ``scaler`` what Ray publishes about its autoscaler (default:
    only what ``ray up``'s config on this machine says)."""
    scaler = scaler if scaler is not None else learn()
    request = {"CPU": cpus, "GPU": gpus, **(extra or {})}
    live = [node["Resources"] for node in nodes if node["Alive"]]
    if any(fits(request, node) for node in live):
        return None
    types = scaler.node_types if scaler else {}
    if scaler and (types is None or any(fits(request, kind) for kind in types.values())):
        until = f" up to --pending-timeout {timeout:g} s." if timeout > 0 else " (--pending-timeout 0: forever)."
        return (f"no live node of this Ray cluster can host a trial yet ({_asks(cpus, gpus)}; {_offered(live)}), but "
                f"{scaler.describe()}: the trials wait for it{until}")
    flags = (("CPU", cpus, "--cpus-per-trial"), ("GPU", gpus, "--gpus-per-trial"))
    candidates = live + list((types or {}).values())
    scope = " (nor any node type its autoscaler can add)" if types else ""
    for kind, wanted, flag in flags:
        largest = max((node.get(kind, 0) for node in candidates), default=0)
        if wanted > largest:
            total = sum(node.get(kind, 0) for node in live)
            raise ResourceError(
                f"{flag} {wanted:g} asks for {wanted:g} {kind}(s) per trial, but no node of this Ray cluster{scope} "
                f"has more than {largest:g} ({total:g} {kind}s on {len(live)} node(s)); trials would stay PENDING "
                "forever. "
                f"Lower {flag}" + (" or add GPU worker nodes (see cluster.yaml)." if kind == "GPU" else "."))
    for kind, wanted in (extra or {}).items():
        if not any(node.get(kind, 0) >= wanted for node in candidates):
            raise ResourceError(
                f"--resources-per-trial asks for {wanted:g} {kind!r} per trial, but no node of this Ray cluster{scope} "
                f"has that much ({'; '.join(shape(node) for node in candidates)}); trials would stay PENDING forever. "
                f"Start a node with --resources='{{\"{kind}\": N}}', or drop it from --resources-per-trial.")
    raise ResourceError(
        f"--cpus-per-trial {cpus:g} --gpus-per-trial {gpus:g}: no single node of this Ray cluster{scope} has both "
        f"({'; '.join(shape(node) for node in candidates)}); trials would stay PENDING forever. Lower one of them.")


def _asks(cpus: float, gpus: float) -> str:
    return f"--cpus-per-trial {cpus:g} --gpus-per-trial {gpus:g} ask for {shape({'CPU': cpus, 'GPU': gpus})} per trial"


def _offered(live: list[dict]) -> str:
    if not live:
        return "it has no live node"
    shapes = sorted({shape(node) for node in live})
    return f"its {len(live)} live node(s) have " + " / ".join(shapes)


def pending_timeout_message(pending: int, cpus: float, gpus: float, timeout: float, nodes: list[dict],
                            scaler: Autoscaler | None) -> str:
    """Why the study ends: what the trials asked for and what the cluster offered while they waited."""
    live = [node["Resources"] for node in nodes if node["Alive"]]
    offer = scaler.describe() if scaler else "no autoscaler runs (nothing in Ray's GCS, no ~/ray_bootstrap_config.yaml)"
    return (f"{pending} trial(s) still PENDING after --pending-timeout {timeout:g} s with no trial running: "
            f"{_asks(cpus, gpus)}; {_offered(live)}; {offer}. No node that fits arrived: check `ray status` and "
            "the autoscaler's log on the head (/tmp/ray/session_latest/logs/monitor.*), lower the per-trial "
            "request, or raise --pending-timeout when nodes take longer to start.")


class PendingClock:
    """Measures how long trials have waited with none running: Tune itself would wait forever."""

    def __init__(self, timeout: float, note_every: float = 60.0) -> None:
        self.timeout, self.since, self.note_every, self.noted = timeout, None, note_every, 0

    def expired(self, statuses: list[str], now: float) -> int:
        """The number of PENDING trials once they have waited ``timeout`` seconds with none running, else 0."""
        pending = statuses.count("PENDING")
        if self.timeout <= 0 or not pending or "RUNNING" in statuses:
            self.since = None
            return 0
        self.since = now if self.since is None else self.since
        return pending if now - self.since >= self.timeout else 0

    def note_due(self, now: float) -> bool:
        """True once per ``note_every`` seconds of waiting: time to say again what the trials wait for."""
        if self.since is None:
            self.noted = 0
            return False
        due = int((now - self.since) // self.note_every)
        if due > self.noted:
            self.noted = due
            return True
        return False


def _free_space(path: Path) -> tuple[int, int]:
    """(free bytes, device id) of the file system that holds ``path`` or would hold it once created."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free, path.stat().st_dev


def study_bytes(state: int, weights: int, trials: int, epochs: int, every: str, log_models: str) -> tuple[int, int]:
    """(bytes under --storage, bytes of MLflow models) at the study's peak, by the checkpoint policy: a trial keeps
    KEEP_CHECKPOINTS checkpoints of ``state`` bytes mid-trial (only its final weights when --checkpoint-every
    spans the whole budget); MLflow holds the logged models of ``weights`` bytes (--log-models)."""
    per_trial = weights if every.isdigit() and int(every) >= epochs else KEEP_CHECKPOINTS * state
    models = {"best": 1, "all": trials, "none": 0}[log_models]
    return trials * per_trial, models * weights


def check_disk(results: int, models: int, trials: int, storage: str, uri: str) -> None:
    """Fail before Ray starts when the checkpoints cannot fit, rather than trials dying mid-epoch with
    "No space left on device" (torch.save then reports a corrupt zip): ``results`` bytes of checkpoints under
    --storage (a local folder), ``models`` bytes in a local MLflow store's artifacts (``study_bytes``)."""
    state = results // max(trials, 1)
    needs = [("--storage", Path(storage), results)]
    if "://" in storage:  # the bucket has room; trials stage each checkpoint in this node's TMPDIR before uploading
        needs = [("the local staging folder (TMPDIR)", Path(tempfile.gettempdir()),
                  min(trials, os.cpu_count() or 1) * state)]
    artifacts = local_artifact_root(uri)
    if artifacts is not None:
        needs.append(("--mlflow-uri's artifacts", artifacts, models))
    by_disk: dict[int, list] = {}
    for what, path, size in needs:
        free, device = _free_space(path.expanduser().resolve())
        by_disk.setdefault(device, [free, []])[1].append((what, path, size))
    for free, users in by_disk.values():
        needed = sum(size for _, _, size in users)
        if needed > free:
            parts = " + ".join(f"{what} {path} {size / 2**30:.2f} GiB" for what, path, size in users)
            raise StorageError(
                f"not enough disk for this study's checkpoints: {trials} trial(s) keeping up to {state / 2**20:.0f} "
                f"MiB of checkpoints each need {needed / 2**30:.2f} GiB ({parts}) but only {free / 2**30:.2f} GiB "
                "is free there. Free space, point --storage (or --mlflow-uri) at a larger disk, checkpoint less "
                "often (--checkpoint-every), or run fewer trials.")


def trial_count(args, space: dict, default_samples: int | None) -> int:
    """How many trials the study will run: the grid times --num-samples, or Optuna's sample count."""
    if args.search == "optuna":
        return args.num_samples or default_samples or grid_size(space)
    return grid_size(space) * (args.num_samples or 1)


def check_data(config: TrainConfig) -> None:
    """Open both splits once in the driver: a missing root, a wrong layout or bad files fail before any
    trial, and ``--download`` downloads once instead of once per trial."""
    for split in ("train", "val"):
        kwargs = {"train_split": config.train_split} if hasattr(config, "train_split") else {}
        build_dataset(config.dataset, split, config.data_root, config.image_size, download=config.download, **kwargs)


def shipped_weights(files: list[str], address: str | None) -> list | None:
    """The weights files, read for Ray's object store, when the study joins a cluster (whose other nodes may
    share no disk with this one); None for a local Ray, whose trials read this machine's cache."""
    if not files or not (address or os.environ.get("RAY_ADDRESS")):
        return None
    from trainables.pretrained import Weights

    return [Weights.read(path) for path in files]


def check_weights(base: TrainConfig, space: dict) -> list[str]:
    """Find (or download, once) the ImageNet weights of every pretrained model the study builds, on the driver
    before Ray starts: offline without the file this fails naming it, and trials then only read the cache.
    Each model is built once on the meta device from the file, so a wrong or truncated file fails here too.
    Returns the weight files used."""
    files: dict[str, str] = {}
    for values in variants(base, space):
        config = type(base).from_dict(values)
        kwargs = config.model_kwargs()
        if not kwargs.get("pretrained") or config.model in files:
            continue
        from vision_models.weights import fetch_pretrained  # torchvision's: imported by studies that pretrain

        files[config.model] = fetch_pretrained(config.model, fix="pass --no-pretrained to train from scratch")
        try:  # keys and shapes checked against the file on the meta device: no memory, no copies
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "copying ... to a meta parameter is a no-op"
                build_model(config.model, **kwargs)
        except (RuntimeError, OSError, KeyError) as err:
            raise RuntimeError(f"{files[config.model]} does not hold {config.model}'s ImageNet weights "
                               f"({str(err)[:300]}...); delete it to download it again, or pass --no-pretrained"
                               ) from err
    return list(files.values())
