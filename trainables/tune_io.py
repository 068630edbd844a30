"""The only in-trial Ray code: seed, restore, report and checkpoint around the one training loop.

``run_trial`` is the whole body of every trainable. Inside a Tune trial it talks to Tune; called
directly (tests, notebooks) it writes the same checkpoints into a local folder instead.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from trainables.checkpoints import (ARTIFACTS, EXAMPLE_FILE, CheckpointPolicy, load_state, save_state,
                                    state_bytes)
from trainables.lineage import DATASETS_KEY, dataset_inputs
from trainables.loop import Hardware, fit
from trainables.memory import apply_cap, memory_errors
from trainables.optim import build_optimizer, build_scheduler
from trainables.pretrained import Weights
from trainables.pretrained import install as install_weights
from trainables.system import SystemMonitor
from trainables.task import Task, make_loaders

log = logging.getLogger(__name__)
CHECKPOINT_KEY = "checkpoint_epoch"  # reported every epoch: the epoch of the trial's newest checkpoint
RESTORED_KEY = "restored_from"  # after a restore, once: the trial folder whose checkpoint it continues (PBT's lineage)
COST_KEY = "checkpoint_s"  # reported after a checkpoint: the seconds it took to write and report (upload included)
AMP_KEY = "amp_dtype"  # reported every epoch: 'bfloat16', 'float16' or 'float32', what the trial's GPU computes in


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
        self.trial_dir = tune.get_context().get_trial_dir()  # this node's folder of the trial, kept across retries

    def restore_dir(self):
        checkpoint = self._tune.get_checkpoint()
        if checkpoint is not None:  # whose: its own (a retry, a resume) or, under PBT, the trial it copies
            self.restored_from = PurePosixPath(checkpoint.path).parent.name
        return checkpoint.as_directory() if checkpoint else None

    def report(self, metrics: dict, folder: Path | None) -> None:
        checkpoint = self._tune.Checkpoint.from_directory(str(folder)) if folder is not None else None
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
        self.trial_dir = self.out_dir

    def restore_dir(self):
        return _PathContext(self.resume_from) if self.resume_from else None

    def report(self, metrics: dict, folder: Path | None) -> None:
        if folder is not None:
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
    """True inside a Tune trial (where ``tune.report`` works): Tune's context names a trial only there."""
    import warnings

    from ray import tune

    with warnings.catch_warnings():  # outside a trial Ray warns that the call is meant for trials, then says None
        warnings.simplefilter("ignore")
        return tune.get_context().get_trial_id() is not None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_trial(config_dict: dict, task: Task, session=None, weights: list[Weights] | None = None) -> dict:
    """Seed, build, restore, train with one report per epoch and a checkpoint when the policy says (always
    after the last epoch); returns the last metrics. ``weights``: the driver's pretrained files, written into
    this node's hub cache where it lacks them (a node that shares no disk with the driver)."""
    config = task.config_cls.from_dict(config_dict)  # nothing reads the raw dict after this line
    install_weights(weights)
    if session is None:
        session = TuneSession() if in_tune_trial() else LocalSession(tempfile.mkdtemp(prefix="vision-tune-"))
    if session.cpus:
        torch.set_num_threads(max(1, int(session.cpus)))
    hw = Hardware.select(session.gpu_ids, amp=config.amp, where=session.where)
    fraction = apply_cap(hw.device, session.gpus)
    # an OOM anywhere from here on is a TrialMemoryError, and Tune's retry of the same attempt fails before building
    with memory_errors(hw.device, session.gpus, fraction, config.batch_size, session.trial_dir,
                       {"config": config.to_dict(), "gpus": session.gpus}):
        return _train(config, task, session, hw)


def _train(config, task: Task, session, hw: Hardware) -> dict:
    """``run_trial`` once the hardware is chosen: build, restore, fit."""
    seed_everything(config.seed)
    built = task.build(config)
    model = hw.prepare(built.model)
    optimizer = build_optimizer(model.parameters(), config.optim)
    scheduler = build_scheduler(optimizer, config.optim, config.epochs)
    train_loader, val_loader = make_loaders(built, config, hw, session.cpus)

    scaler = hw.grad_scaler()  # fp16's loss scale: checkpointed with the weights, so a resume keeps it
    start_epoch = 1
    restore = session.restore_dir()
    lineage = {}
    if restore is not None:
        with restore as folder:
            start_epoch = load_state(folder, model, optimizer, scheduler, scaler) + 1
        log.info("resumed after epoch %d", start_epoch - 1)
        lineage = {RESTORED_KEY: getattr(session, "restored_from", "") or "", "restored_epoch": start_epoch - 1}

    datasets = dataset_inputs(config, built.train_set, built.val_set)
    monitor = SystemMonitor(hw.device)
    policy = CheckpointPolicy.parse(config.checkpoint_every, state_bytes(config))
    last = {"epoch": start_epoch - 1, "time": time.perf_counter()}  # the last checkpoint (or the restore)
    reported: list[int] = []

    params_m = sum(p.numel() for p in model.parameters()) / 1e6  # an objective beside the metric (--metric twice)

    def on_epoch_end(epoch: int, metrics: dict, matrix) -> None:
        metrics.update(monitor.epoch_figures(), **{"model/params_m": params_m})
        extra = {AMP_KEY: hw.precision}  # a string: not a metric, the driver's to log as a tag
        if not reported:  # the data sets travel once per (re)started trial: the driver logs them as the run's inputs
            extra.update({DATASETS_KEY: datasets, **lineage})
        if last.get("cost_s") is not None:  # the previous checkpoint's cost, write and upload: known only now
            extra[COST_KEY] = last.pop("cost_s")
        reported.append(epoch)
        if not policy.due(epoch, last["epoch"], config.epochs, time.perf_counter() - last["time"]):
            session.report({**metrics, **extra, CHECKPOINT_KEY: last["epoch"]}, None)
            return
        began = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="vt-ckpt-") as tmp:
            folder = Path(tmp)
            final = epoch == config.epochs
            save_state(folder, model, optimizer, scheduler, epoch, final=final, scaler=scaler)
            artifacts = folder / ARTIFACTS
            artifacts.mkdir()
            if matrix is not None:
                np.save(artifacts / "confusion_matrix.npy", matrix.matrix.cpu().numpy())
            if final:
                task.write_artifacts(config, built, model, hw, artifacts)
                torch.save(built.val_set[0][0].unsqueeze(0).cpu(), folder / EXAMPLE_FILE)  # (1,C,H,W): the model's input
            session.report({**metrics, **extra, CHECKPOINT_KEY: epoch}, folder)
        policy.saved(time.perf_counter() - began)
        last.update(epoch=epoch, time=time.perf_counter(), cost_s=policy.cost_s)

    describe = json.dumps(config.to_dict(), sort_keys=True)
    try:
        return fit(model, built.step, optimizer, scheduler, train_loader, val_loader, hw, scaler=scaler,
                   epochs=config.epochs, start_epoch=start_epoch, seed=config.seed, max_steps=config.steps_per_epoch,
                   num_classes=built.num_classes, describe=describe, on_epoch_end=on_epoch_end)
    finally:
        monitor.close()
