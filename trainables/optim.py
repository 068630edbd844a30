"""Optimizer and learning-rate schedule from an ``OptimConfig``."""
from __future__ import annotations

import torch

from trainables.config import OptimConfig


def build_optimizer(params, optim: OptimConfig) -> torch.optim.Optimizer:
    """SGD (momentum 0 = plain SGD) or Adam."""
    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    return torch.optim.Adam(params, lr=optim.lr, weight_decay=optim.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, epochs: int):
    """Stepped once per epoch; None for a constant learning rate."""
    if optim.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if optim.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=optim.step_size, gamma=optim.gamma)
    return None
