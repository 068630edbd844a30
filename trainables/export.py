"""The trained model as an MLflow PyTorch model folder, written inside the trial beside the last checkpoint.

The trial writes it (it holds the model and a real input; the work runs on the trial's own CPU or GPU,
not on the driver, whose event loop schedules every trial); the driver's tracker uploads the folder as
the run's logged model ``model``, so ``mlflow.pytorch.load_model("runs:/<id>/model")`` loads it.
The folder carries ``vision_models`` as code, so the pickled model loads where this project is not installed.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

import vision_models
from vision_models.vae import ConvVAE, Reconstruction

log = logging.getLogger(__name__)
MODEL_DIR = "model"  # in the checkpoint folder; also the logged model's name


def servable(model: nn.Module) -> nn.Module:
    """The module to serve: the model itself, a VAE wrapped to return one tensor."""
    return Reconstruction(model) if isinstance(model, ConvVAE) else model


def export_model(model: nn.Module, example: torch.Tensor, folder: Path) -> Path:
    """Save a CPU copy of ``model`` with a signature and ``example`` (1,C,H,W) as input example into ``folder``."""
    import mlflow.pytorch
    from mlflow.models import infer_signature

    served = servable(copy.deepcopy(model)).cpu().float().to(memory_format=torch.contiguous_format).eval()
    inputs = example[:1].detach().cpu().float().contiguous()
    with torch.no_grad():
        outputs = served(inputs)
    signature = infer_signature(inputs.numpy(), outputs.numpy())
    # torchvision's version from its metadata: a VAE's process never imports it (3.6 s); the pickled models of
    # the others need it installed where they load
    versions = {"torch": torch.__version__, "torchvision": importlib.metadata.version("torchvision"),
                "numpy": np.__version__}
    requirements = [f"{name}=={version.split('+')[0]}" for name, version in versions.items()]
    # explicit requirements: inferring them loads the model again in a subprocess (seconds per trial).
    # pickle, not MLflow 3's default pt2: torch.export traces for seconds and fixes the batch size at the
    # example's 1; the pickled module takes any batch, and its classes travel as code (vision_models).
    quiet = logging.getLogger("mlflow.pytorch")
    level, _ = quiet.level, quiet.setLevel(logging.ERROR)  # its per-save warning that pickles run code on load
    try:
        with _pins_of_this_process():
            mlflow.pytorch.save_model(served, str(folder), signature=signature, input_example=inputs.numpy(),
                                      pip_requirements=requirements, serialization_format="pickle",
                                      code_paths=[str(Path(vision_models.__file__).parent)])
    finally:
        quiet.setLevel(level)
    return folder


@contextlib.contextmanager
def _pins_of_this_process():
    """Skip MLflow's check that the model's pinned requirements are installed. It maps every installed
    distribution to its modules first (``importlib.metadata.packages_distributions``): 3.1 s of a 23 s quick
    SegNet trial here, paid once by every trial's worker process. The pins above are the running modules' own
    versions, so it cannot find a mismatch. MLflow has no switch for it (``MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK``
    skips another check); if the function moves, the check simply runs."""
    from mlflow.utils import environment

    name = "warn_dependency_requirement_mismatches"
    check = getattr(environment, name, None)
    if check is None:
        yield
        return
    setattr(environment, name, lambda requirements: None)
    try:
        yield
    finally:
        setattr(environment, name, check)
