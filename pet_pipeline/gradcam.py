"""Grad-CAM heat maps for timm classifiers, with pytorch-grad-cam.

    target_layers, reshape_transform = gradcam_setup(model)
    cams = compute_gradcams(model, pixel_values, target_classes=[3, 0, 7])  # (N, H, W) in [0, 1]
    overlays_from = denormalize(pixel_values, mean=data_config["mean"], std=data_config["std"])

Target layer per family (pytorch-grad-cam wants a layer whose output is (B, C, h, w)):
- CoAtNet / MaxViT (timm `MaxxVit`): `stages[-1]`. Its transformer blocks
  (`TransformerBlock2d`, `MaxxVitBlock`) take and return NCHW, whatever layout they use
  inside, so no reshape is needed (checked with a forward hook: (B, C, H/32, W/32)). Below
  64 px that map is 1x1, so `stages[-2]` (H/16) is used instead.
- ResNet: `layer4[-1]`; ConvNeXt: `stages[-1]`; EfficientNet: `bn2` (the activation after
  `conv_head`, the last spatial map before pooling).
- ViT / DeiT: `blocks[-1].norm1`, with a reshape_transform that drops the prefix tokens
  (class, distillation, register) and folds the patch tokens back into their grid.
- Any other model: the last module whose output is 4-D with a spatial size above 1x1, found
  with forward hooks on one dummy input (1x1 outputs are the pooled head, no heat map left).
  If that output looks channels-last (last dim == `model.num_features`, e.g. Swin), it is
  permuted to NCHW. A guess: check a few heat maps before trusting it for a new family.

Run on the main process with the unwrapped model (`accelerator.unwrap_model`): Grad-CAM
calls backward, which in a DDP-wrapped model would wait for gradients from the other ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from timm.models import ConvNeXt, EfficientNet, MaxxVit, ResNet, VisionTransformer


def _vit_reshape_transform(model: VisionTransformer) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B, prefix + h*w, C) tokens -> (B, C, h, w) feature map."""
    prefix = getattr(model, "num_prefix_tokens", 1)
    grid = tuple(model.patch_embed.grid_size)

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, prefix:, :]
        h, w = grid
        if h * w != patches.shape[1]:  # dynamic_img_size models: another input size, square
            h = w = math.isqrt(patches.shape[1])
        return patches.reshape(tokens.shape[0], h, w, tokens.shape[2]).permute(0, 3, 1, 2)

    return reshape


def _nhwc_to_nchw(features: torch.Tensor) -> torch.Tensor:
    return features.permute(0, 3, 1, 2)


def _last_spatial_module(model: torch.nn.Module, input_size: tuple[int, int, int]):
    """(module, output shape) of the last module to produce a 4-D output larger than 1x1."""
    found: list[tuple[torch.nn.Module, tuple]] = []

    def remember(module, _inputs, output):
        if torch.is_tensor(output) and output.dim() == 4:
            found.append((module, tuple(output.shape)))

    handles = [m.register_forward_hook(remember) for m in model.modules() if m is not model]
    was_training = model.training
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    # Hooks fire when a module finishes, so a stage comes after its own last block: the
    # last entry is the outermost module that produced the final spatial map.
    # (B, C, 1, 1) is pooled: spatial neither as NCHW (dims 2, 3) nor as NHWC (dims 1, 2).
    spatial = [(m, s) for m, s in found if min(s[2:4]) > 1 or min(s[1:3]) > 1]
    if not spatial:
        raise ValueError(f"{type(model).__name__}: no module with a 4-D output larger than 1x1; "
                         "pass target_layers to pytorch-grad-cam yourself.")
    return spatial[-1]


def gradcam_setup(model: torch.nn.Module, *, input_size: tuple[int, int, int] | None = None
                  ) -> tuple[list[torch.nn.Module], Callable | None]:
    """(target_layers, reshape_transform) for pytorch-grad-cam's CAM classes.

    `input_size` (C, H, W) is only used by the fallback's dummy forward pass; by default the
    model's data config (fixed-size models built with another img_size need the real one).
    """
    if isinstance(model, MaxxVit):
        # The last stage works at 1/32 of the input: below 64 px that is 1x1, a map with
        # nothing to localise, so small inputs (quick CPU runs) use the stage before (1/16).
        if input_size is not None and min(input_size[-2:]) < 64:
            return [model.stages[-2]], None
        return [model.stages[-1]], None
    if isinstance(model, ResNet):
        return [model.layer4[-1]], None
    if isinstance(model, ConvNeXt):
        return [model.stages[-1]], None
    if isinstance(model, EfficientNet):
        return [model.bn2], None
    if isinstance(model, VisionTransformer):
        return [model.blocks[-1].norm1], _vit_reshape_transform(model)

    if input_size is None:
        from timm.data import resolve_model_data_config

        input_size = tuple(resolve_model_data_config(model)["input_size"])
    module, shape = _last_spatial_module(model, input_size)
    channels = getattr(model, "num_features", None)
    channels_last = channels is not None and shape[-1] == channels and shape[1] != channels
    return [module], _nhwc_to_nchw if channels_last else None


def compute_gradcams(model: torch.nn.Module, pixel_values: torch.Tensor, target_classes: list[int],
                     *, batch_size: int = 16) -> np.ndarray:
    """Grad-CAM of `target_classes[i]` for image i: float32 (N, H, W), each map in [0, 1].

    pytorch-grad-cam min-max scales every map on its own, so the maps show where the evidence
    is within an image, not how much of it there is. An all-zero map means no positive
    evidence for that class at the target layer. Chunks of `batch_size` bound the memory of
    the backward pass. The model's train/eval mode is put back and its .grad cleared after.
    """
    if len(target_classes) != len(pixel_values):
        raise ValueError(f"{len(pixel_values)} images but {len(target_classes)} target classes")
    from pytorch_grad_cam import GradCAM  # imported here: the rest of the report works without it
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    was_training = model.training
    target_layers, reshape_transform = gradcam_setup(model, input_size=tuple(pixel_values.shape[1:]))
    cams = []
    try:
        # predict() runs under no_grad; Grad-CAM needs the backward pass.
        with torch.enable_grad(), GradCAM(model=model, target_layers=target_layers,
                                          reshape_transform=reshape_transform) as cam:
            for start in range(0, len(pixel_values), batch_size):
                # an input that requires grad gives the activations a backward path even when
                # no weight requires one (freeze_backbone: a frozen backbone's layers)
                chunk = pixel_values[start:start + batch_size].detach().requires_grad_(True)
                targets = [ClassifierOutputTarget(int(c)) for c in target_classes[start:start + batch_size]]
                cams.append(cam(input_tensor=chunk, targets=targets))
    finally:
        model.zero_grad(set_to_none=True)  # Grad-CAM's backward leaves gradients on the weights
        model.train(was_training)
    height, width = pixel_values.shape[-2:]
    if not cams:
        return np.zeros((0, height, width), dtype=np.float32)
    return np.concatenate(cams).astype(np.float32)


def denormalize(pixel_values: torch.Tensor, mean, std) -> np.ndarray:
    """Undo the eval transform's normalisation: float32 HWC (or NHWC for a batch) in [0, 1].

    The model's input, not the original file, is what the heat map lines up with.
    """
    values = pixel_values.detach().float().cpu()
    shape = (-1, 1, 1)
    images = values * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)
    images = images.clamp(0.0, 1.0).movedim(-3, -1)
    return images.numpy().astype(np.float32)
