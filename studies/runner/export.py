"""A trial's trained model as an MLflow PyTorch model folder, built by the driver from the trial's last
checkpoint (its weights and one real input, ``trainables/checkpoints.py``): trials write their weights once and
never import MLflow. The tracker's upload thread runs this, off Tune's event loop, and logs the folder as the
run's logged model ``model``, so ``mlflow.pytorch.load_model("runs:/<id>/model")`` loads it. The folder carries
``vision_models`` as code, so the pickled model loads where this project is not installed.
"""
from __future__ import annotations

import copy
import importlib.metadata
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

import vision_models
from analysis.mlflow_internals import requirements_check_skipped
from trainables import CONFIGS
from trainables.checkpoints import EXAMPLE_FILE, STATE_FILE
from vision_models.vae import ConvVAE, Reconstruction

log = logging.getLogger(__name__)
MODEL_DIR = "model"  # the logged model's name (and, in checkpoints written before 2026-12, a folder of theirs)


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
        with requirements_check_skipped():
            mlflow.pytorch.save_model(served, str(folder), signature=signature, input_example=inputs.numpy(),
                                      pip_requirements=requirements, serialization_format="pickle",
                                      code_paths=[str(Path(vision_models.__file__).parent)])
    finally:
        quiet.setLevel(level)
    return folder



def exportable(folder: Path) -> bool:
    """Whether a checkpoint folder holds a finished trial's weights and example input."""
    return (folder / STATE_FILE).is_file() and (folder / EXAMPLE_FILE).is_file()


def model_from_checkpoint(task: str, config: dict, folder: Path) -> tuple[nn.Module, torch.Tensor]:
    """The trial's model with its checkpoint's weights, on the CPU, and its example input (1,C,H,W)."""
    typed = CONFIGS[task].from_dict(config)
    kwargs = typed.model_kwargs()
    if kwargs.get("pretrained"):
        kwargs["pretrained"] = False  # the checkpoint holds every weight: nothing to read from ImageNet's
    model = vision_models.build_model(typed.model, **kwargs)
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    return model.eval(), torch.load(folder / EXAMPLE_FILE, map_location="cpu", weights_only=True)


def export_checkpoint(task: str, config: dict, folder: Path, out: Path) -> Path:
    """The MLflow model folder of a finished trial's checkpoint."""
    model, example = model_from_checkpoint(task, config, folder)
    return export_model(model, example, out)
