"""Optimizer, LR schedule and loss, from timm's factories."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float,
                    layer_decay: float | None = None, layer_decay_ratio: float | None = None):
    """AdamW over the parameters that require a gradient; timm leaves norms, biases and other
    1-d parameters out of weight decay. With `layer_decay`, timm groups the parameters by
    depth (the model's `group_matcher`) and gives each group an `lr_scale` of
    layer_decay^(groups above it), which timm's schedulers multiply into the lr. Without it,
    `layer_decay_ratio` is the stem's lr_scale, whatever the model's depth (below)."""
    if layer_decay is None and layer_decay_ratio is not None:
        layer_decay = layer_decay_for_ratio(layer_decay_ratio, layer_decay_depth(model))
    return create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=weight_decay,
                               filter_bias_and_bn=True, layer_decay=layer_decay)


# ------------------------------------------------------------------ layer decay across models
# timm's layer_decay d gives the classifier's group the lr and the group `depth - i` below it
# d^(depth - i), with the groups of the model's group_matcher: 5 below the classifier for
# coatnet_0_rw_224 (stem, 4 stages), 13 for convnext_atto and the ViTs, 17 for
# tf_efficientnet_lite0. So one d is a different recipe on each: 0.1 trains coatnet_0's stem at
# 1e-5 x lr, lite0's at 1e-17 x. A ratio r between the stem's lr and the classifier's, spread
# geometrically (d = r^(1/depth)), gives every model the same lr at the same fraction of its
# depth: the stem at r, the middle at sqrt(r), the classifier at 1.


def layer_decay_depth(model: torch.nn.Module) -> int:
    """How many of timm's layer-decay groups lie below the classifier's, found as timm finds
    them (timm.optim.param_groups_layer_decay): the model's group_matcher, else timm's
    automatic grouping. The stem's lr_scale is layer_decay ** this."""
    from timm.models import group_parameters
    from timm.optim import auto_group_layers

    if hasattr(model, "group_matcher"):
        layers = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    else:
        layers = auto_group_layers(model)
    return max(layers.values())


def layer_decay_for_ratio(ratio: float, depth: int) -> float | None:
    """timm's per-group layer_decay that trains the stem at `ratio` x the classifier's lr over
    `depth` groups: ratio ** (1 / depth); None (one lr for all) for a model of one group."""
    return ratio ** (1.0 / depth) if depth > 0 else None


def build_ema(model: torch.nn.Module, *, decay: float | None):
    """timm's ModelEmaV3 of `model`, or None. The decay warms up as 1 - (1 + step)^(-2/3)
    up to `decay` (0.9 after 30 steps, 0.99 after 1,000, 0.999 after ~31,600), so the EMA
    of a run of tens of steps averages its last steps instead of staying near the initial
    weights, as a fixed 0.999 would (0.999^60 = 94% initial weights after 60 steps). Call
    `update(model, step=global_step)` after each optimizer step."""
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay, use_warmup=True) if decay else None


# ------------------------------------------------------------------ head phase and frozen backbone
# freeze_backbone freezes the backbone before the optimizer is built: the optimizer, and DDP,
# know only the classifier. head_epochs (LP-FT, Kumar et al., ICLR 2022) builds one optimizer
# over every parameter for the whole run. While the backbone is frozen its parameters have
# requires_grad False: they get no gradient, so AdamW neither moves nor decays them nor keeps
# moments for them (it skips a None grad). The parameter groups are the same in both phases,
# so a checkpoint of either loads into the optimizer a resumed run builds; and the phase is a
# function of the epoch alone, so a resumed run is in the phase the uninterrupted one is in.
# Under DDP the head phase needs find_unused_parameters (train.py sets it when head_epochs > 0).


def trains_backbone(epoch: int, *, head_epochs: int, freeze_backbone: bool) -> bool:
    """Whether epoch `epoch` (0-based) trains the whole model or only the classifier."""
    return not freeze_backbone and epoch >= head_epochs


def set_backbone_trainable(model: torch.nn.Module, trainable: bool) -> None:
    """requires_grad on every parameter but the classifier's (timm's `get_classifier()`),
    which always trains. Pass the unwrapped model."""
    for parameter in model.parameters():
        parameter.requires_grad_(trainable)
    for parameter in model.get_classifier().parameters():
        parameter.requires_grad_(True)


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


def freeze_batch_norm_statistics(model: torch.nn.Module) -> None:
    """Every batch norm (timm's BatchNormAct2d and SyncBatchNorm included) in eval mode: it
    normalises with its running statistics and does not update them. Call after
    `model.train()`, which puts them back in training mode."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
