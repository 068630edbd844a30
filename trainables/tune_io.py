"""The only in-trial Ray code: seed, restore, report and checkpoint around the one training loop.

``run_trial`` is the whole body of every trainable. Inside a Tune trial it talks to Tune; called
directly (tests, notebooks) it writes the same checkpoints into a local folder instead.
"""
from __future__ import annotations

import errno
import json
import logging
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from trainables.export import MODEL_DIR, export_model
from trainables.lineage import DATASETS_KEY, dataset_inputs
from trainables.loop import Hardware, fit
from trainables.memory import apply_cap, out_of_memory
from trainables.optim import build_optimizer, build_scheduler
from trainables.system import SystemMonitor
from trainables.task import Task, make_loaders

log = logging.getLogger(__name__)
STATE_FILE = "state.pt"
ARTIFACTS = "artifacts"


class TuneSession:
    """Resources, checkpoint and reporting of the Tune trial this process runs."""

    def __init__(self) -> None:
        import ray
        from ray import tune

        self._tune = tune
        self.node_id = ray.get_runtime_context().get_node_id()  # reported, so a study shows where each trial ran
        self.where = f"node {ray.util.get_node_ip_address()} (id {self.node_id[:12]})"  # for errors about this node
        self.gpu_ids = ray.get_gpu_ids()
        resources = tune.get_context().get_trial_resources().required_resources
        self.cpus = resources.get("CPU", 1)
        self.gpus = resources.get("GPU", 0)  # a fraction < 1 caps this trial's GPU memory

    def restore_dir(self):
        checkpoint = self._tune.get_checkpoint()
        return checkpoint.as_directory() if checkpoint else None

    def report(self, metrics: dict, folder: Path) -> None:
        checkpoint = self._tune.Checkpoint.from_directory(str(folder))
        self._tune.report({**metrics, "node_id": self.node_id}, checkpoint=checkpoint)


class LocalSession:
    """The same contract without Ray: checkpoints as ``out_dir/checkpoint_000NNN``, metrics as JSON lines."""

    def __init__(self, out_dir: str | Path, resume_from: str | Path | None = None, cpus: int | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.resume_from = resume_from
        self.gpu_ids: list = []
        self.cpus = cpus
        self.where = "this machine"
        self.gpus = 0

    def restore_dir(self):
        return _PathContext(self.resume_from) if self.resume_from else None

    def report(self, metrics: dict, folder: Path) -> None:
        shutil.copytree(folder, self.out_dir / f"checkpoint_{int(metrics['epoch']):06d}", dirs_exist_ok=True)
        with open(self.out_dir / "results.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")


class _PathContext:
    def __init__(self, path) -> None:
        self.path = str(path)

    def __enter__(self) -> str:
        return self.path

    def __exit__(self, *exc) -> None:
        return None


def in_tune_trial() -> bool:
    """True inside a Tune trial (where ``tune.report`` works)."""
    try:
        from ray.tune.trainable.trainable_fn_utils import _in_tune_session
    except ImportError:
        return False
    return bool(_in_tune_session())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    # numpy's state as a tensor so that torch.load(weights_only=True) can read it back
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def state_bytes(config) -> int:
    """About what ``save_state`` writes for ``config``, without building anything real: the model on the
    meta device (no memory, well under a second) gives the weights and buffers; SGD with momentum keeps one
    more copy of the weights, Adam two. The disk check before a study multiplies this."""
    from vision_models import build_model

    kwargs = config.model_kwargs()
    if kwargs.get("pretrained"):
        kwargs["pretrained"] = False  # the same shapes; nothing to read on the meta device
    with torch.device("meta"):
        model = build_model(config.model, **kwargs)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    slots = 2 if config.optim.name == "adam" else int(config.optim.momentum > 0)
    return (1 + slots) * weights + buffers


def save_state(folder: Path, model, optimizer, scheduler, epoch: int) -> None:
    """Write the checkpoint's state file; a full disk is named as such (given a path, torch.save reports it
    as "enforce fail at inline_container.cc ... unexpected pos"; given a file, the OS error comes through)."""
    path = Path(folder) / STATE_FILE
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict() if scheduler else None, "epoch": epoch, "rng": _rng_state()}
    try:
        with open(path, "wb") as file:
            torch.save(state, file)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        free = shutil.disk_usage(path.parent).free
        raise OSError(errno.ENOSPC, f"no space left on device writing the checkpoint {path} ({free / 2**20:.0f} MiB "
                      f"free there). Trials stage checkpoints in the temporary folder ({tempfile.gettempdir()}) "
                      "before Tune copies them to --storage: free space there, or set TMPDIR to a larger disk"
                      ) from None


def load_state(folder: str | Path, model, optimizer, scheduler) -> int:
    """Load a checkpoint into the objects; returns the epoch it was taken after."""
    state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return int(state["epoch"])


def run_trial(config_dict: dict, task: Task, session=None) -> dict:
    """Seed, build, restore, train with one report (and checkpoint) per epoch; returns the last metrics."""
    config = task.config_cls.from_dict(config_dict)  # nothing reads the raw dict after this line
    if session is None:
        session = TuneSession() if in_tune_trial() else LocalSession(tempfile.mkdtemp(prefix="vision-tune-"))
    if session.cpus:
        torch.set_num_threads(max(1, int(session.cpus)))
    hw = Hardware.select(session.gpu_ids, amp=config.amp, where=session.where)
    fraction = apply_cap(hw.device, session.gpus)
    seed_everything(config.seed)
    built = task.build(config)
    model = hw.prepare(built.model)
    optimizer = build_optimizer(model.parameters(), config.optim)
    scheduler = build_scheduler(optimizer, config.optim, config.epochs)
    train_loader, val_loader = make_loaders(built, config, hw, session.cpus)

    start_epoch = 1
    restore = session.restore_dir()
    if restore is not None:
        with restore as folder:
            start_epoch = load_state(folder, model, optimizer, scheduler) + 1
        log.info("resumed after epoch %d", start_epoch - 1)

    datasets = dataset_inputs(config, built.train_set, built.val_set)
    monitor = SystemMonitor(hw.device)
    reported: list[int] = []

    def on_epoch_end(epoch: int, metrics: dict, matrix) -> None:
        metrics.update(monitor.epoch_figures())
        with tempfile.TemporaryDirectory(prefix="vt-ckpt-") as tmp:
            folder = Path(tmp)
            save_state(folder, model, optimizer, scheduler, epoch)
            artifacts = folder / ARTIFACTS
            artifacts.mkdir()
            if matrix is not None:
                np.save(artifacts / "confusion_matrix.npy", matrix.matrix.cpu().numpy())
            if epoch == config.epochs:
                task.write_artifacts(config, built, model, hw, artifacts)
                export_model(model, built.val_set[0][0].unsqueeze(0), folder / MODEL_DIR)  # (1,C,H,W) example
            # the data sets travel once per (re)started trial: the driver logs them as the run's inputs
            session.report({**metrics, **({} if reported else {DATASETS_KEY: datasets})}, folder)
            reported.append(epoch)

    describe = json.dumps(config.to_dict(), sort_keys=True)
    try:
        return fit(model, built.step, optimizer, scheduler, train_loader, val_loader, hw, epochs=config.epochs,
                   start_epoch=start_epoch, seed=config.seed, max_steps=config.steps_per_epoch,
                   num_classes=built.num_classes, describe=describe, on_epoch_end=on_epoch_end)
    except torch.OutOfMemoryError:
        if hw.device.type != "cuda":
            raise
        # from None: the trial's error says what to change, not which CUDA kernel failed to allocate
        raise out_of_memory(hw.device, session.gpus, fraction, config.batch_size) from None
    finally:
        monitor.close()
