"""Train and eval transforms from the model's data config, applied on the fly.

    data_config = model_data_config("coatnet_0_rw_224", image_size=None)
    train_transform = build_train_transform(data_config, augment="standard")
    eval_transform = build_eval_transform(data_config)
    ds = ds.with_transform(batch_transform(eval_transform, min_side=...))

Everything comes from timm (`resolve_data_config`, `create_transform`): input size,
interpolation, mean/std and crop_pct are the ones the pretrained weights were trained with.
"""

from __future__ import annotations

import math
import warnings

import timm
import torch
from timm.data import create_transform, resolve_data_config
from timm.data.transforms_factory import transforms_imagenet_train

from pet_pipeline.errors import UserError
from pet_pipeline.images import open_rgb


def model_data_config(model_name: str, image_size: int | None = None) -> dict:
    """timm's data config of `model_name` (input_size, interpolation, mean, std, crop_pct)."""
    if not timm.is_model(model_name):
        import difflib

        close = difflib.get_close_matches(model_name, timm.list_models(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "; see timm.list_models()."
        raise UserError(f"model: {model_name!r} is not a timm model{hint}")
    pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = resolve_data_config(
            {}, pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else {}
        )
    if image_size is not None:
        config["input_size"] = (3, image_size, image_size)
    return config


# The presets a user picks with `augment`. RandAugment's "m9-mstd0.5" is timm's default
# fine-tuning recipe; "mmax9" keeps the sampled magnitude below 10, where Posterize asks
# Pillow for 0 bits and fails (about 1 image in 600). force_color_jitter: timm otherwise
# drops colour jitter whenever RandAugment is on.
AUGMENT_PRESETS = {
    "standard": dict(scale=(0.08, 1.0), hflip=0.5, color_jitter=None),
    "strong": dict(scale=(0.08, 1.0), hflip=0.5, color_jitter=0.4, force_color_jitter=True,
                   auto_augment="rand-m9-mstd0.5-mmax9-inc1"),
}
# strong also replaces a patch by noise in a quarter of the images, on the device
RANDOM_ERASING = dict(probability=0.25, mode="pixel")


def build_train_transform(data_config: dict, augment: str):
    """PIL image -> augmented uint8 (3, H, W) tensor.

    Normalisation (and strong's random erasing) happen on the device in the training step
    (`DeviceNormalize`, `build_batch_augment`): workers send a quarter of the bytes float32
    would take, and the GPU does the arithmetic. `none` resizes and crops like the eval
    transform, without augmentation (what the old script did).
    """
    if augment == "none":
        return create_transform(
            input_size=data_config["input_size"], is_training=False,
            interpolation=data_config["interpolation"], crop_pct=data_config["crop_pct"],
            crop_mode=data_config.get("crop_mode", "center"), use_prefetcher=True,
        )
    return transforms_imagenet_train(
        img_size=data_config["input_size"][-2:],
        interpolation=data_config["interpolation"],
        use_prefetcher=True,  # timm's name for "stop at a uint8 tensor"
        **AUGMENT_PRESETS[augment],
    )


def build_batch_augment(augment: str, device):
    """The part of an augmentation preset that runs on whole batches on the device, or None."""
    if augment != "strong":
        return None
    from timm.data.random_erasing import RandomErasing

    return RandomErasing(**RANDOM_ERASING, device=device)


class DeviceNormalize:
    """uint8 (N, 3, H, W) from the train loader -> float normalised with the model's mean
    and std, on the batch's device."""

    def __init__(self, mean, std, device):
        self.scale = (255.0 * torch.tensor(std, device=device)).view(1, 3, 1, 1)
        self.shift = (255.0 * torch.tensor(mean, device=device)).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.shift) / self.scale


def build_eval_transform(data_config: dict):
    """Resize to size / crop_pct, center crop, normalise with the model's mean and std."""
    return create_transform(
        input_size=data_config["input_size"],
        is_training=False,
        interpolation=data_config["interpolation"],
        mean=data_config["mean"],
        std=data_config["std"],
        crop_pct=data_config["crop_pct"],
        crop_mode=data_config.get("crop_mode", "center"),
    )


def decode_size(data_config: dict, augment: str | None) -> int | None:
    """Smallest image side the transform needs, for JPEG draft decoding; None = full size.

    Random crops of down to 8% of the area need the full resolution, so only deterministic
    resizing (eval, augment none) decodes at reduced size.
    """
    if augment not in (None, "none"):
        return None
    return math.ceil(data_config["input_size"][-1] / data_config.get("crop_pct", 1.0))


def batch_transform(transform, min_side: int | None = None):
    """A function for `Dataset.with_transform`: decode to RGB, transform, keep the label.

    Expects the image column cast to `datasets.Image(decode=False)` so decoding (draft
    mode, mode conversion) happens here, in the DataLoader worker.
    """

    def apply(batch: dict) -> dict:
        return {
            "pixel_values": [transform(open_rgb(x, min_side)) for x in batch["image"]],
            "label": batch["label"],
        }

    return apply
