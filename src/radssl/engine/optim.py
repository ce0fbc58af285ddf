"""Optimisers (SGD, LARS, AdamW) and the warm-up + cosine learning-rate schedule.

The schedule is a pure function of the step, so a resumed run needs no scheduler state to continue exactly.
LARS is lightly's implementation (You et al., 2017), the SimCLR/BYOL default for large batches; as in those
papers, biases and normalisation parameters get neither weight decay nor LARS adaptation.
"""

from __future__ import annotations

import math

import torch
from lightly.utils.lars import LARS
from torch import nn

from radssl.config import OptimSection


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full names of parameters their own module exempts from weight decay (timm's ``no_weight_decay()``: a ViT's
    position embedding and class/register tokens), as MAE, DINO and timm's own recipes do."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        exempt = getattr(module, "no_weight_decay", None)
        if callable(exempt):
            try:
                local = exempt()
            except TypeError:  # a method with another signature: not the timm convention
                continue
            names |= {f"{prefix}.{name}" if prefix else str(name) for name in local}
    return names


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters: decayed weights vs. biases, norm parameters (1-D) and ViT tokens without decay."""
    exempt = no_weight_decay_names(model)
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim <= 1 or name in exempt else decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def effective_lr(config: OptimSection, global_batch_size: int) -> float:
    """Base LR scaled linearly with the global batch (lr × batch / 256) unless scaling is off."""
    if config.lr_scaling == "linear":
        return config.lr * global_batch_size / 256.0
    return config.lr


def build_optimizer(model: nn.Module, config: OptimSection, lr: float) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=config.betas)
    # lightly's LARS skips trust-ratio adaptation for groups whose weight decay is 0 (biases, norms).
    return LARS(groups, lr=lr, momentum=config.momentum)


def lr_at(step: int, max_steps: int, base_lr: float, config: OptimSection) -> float:
    """Linear warm-up over ``warmup_fraction`` of the steps, then cosine decay to ``min_lr_ratio × base``."""
    warmup = int(round(config.warmup_fraction * max_steps))
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    floor = base_lr * config.min_lr_ratio
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
