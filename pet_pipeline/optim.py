"""Optimizer, LR schedule and loss, from timm's factories."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float):
    """AdamW; timm leaves norms, biases and other 1-d parameters out of weight decay."""
    return create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=weight_decay,
                               filter_bias_and_bn=True)


def build_scheduler(optimizer, *, name: str, total_steps: int, warmup_steps: int, min_lr: float,
                    steps_per_epoch: int = 1):
    """timm's schedule for `name`, with linear warmup to the full lr.

    cosine and constant count optimizer steps: call `step_update(global_step)` after each
    optimizer step. plateau (reduce the lr 10x after 2 epochs without a better validation
    accuracy) can only count epochs in timm: its warmup is rounded to whole epochs and it
    moves on `step(epoch, val_accuracy)` at each epoch end. Calling both every time is safe:
    each schedule ignores the call that is not its own.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm marks its plateau schedule deprecated
        if name == "plateau":
            scheduler, _ = create_scheduler_v2(
                optimizer, sched="plateau", num_epochs=max(1, math.ceil(total_steps / steps_per_epoch)),
                warmup_epochs=round(warmup_steps / steps_per_epoch), warmup_lr=min_lr, min_lr=min_lr,
                warmup_prefix=True, patience_epochs=2, decay_rate=0.1, plateau_mode="max",
                step_on_epochs=True,
            )
            return scheduler
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=name,
            num_epochs=max(1, total_steps - warmup_steps),
            warmup_epochs=warmup_steps,
            warmup_prefix=True,  # warm up to the full lr, then decay over the remaining steps
            warmup_lr=min_lr if warmup_steps else 0.0,
            min_lr=min_lr,
            step_on_epochs=False,
            updates_per_epoch=1,  # "epochs" here are optimizer steps
        )
    scheduler.step_update(0)
    return scheduler


def balanced_class_weights(labels, num_classes: int) -> torch.Tensor:
    """n / (K * n_k): scikit-learn's 'balanced' weighting, from the label column only."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
    weights = len(labels) / (num_classes * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32)


def build_loss(*, label_smoothing: float, class_weights: torch.Tensor | None, mixing: bool):
    """Cross-entropy; with mixup/cutmix the targets arrive as smoothed probabilities already."""
    return torch.nn.CrossEntropyLoss(weight=class_weights,
                                     label_smoothing=0.0 if mixing else label_smoothing)
