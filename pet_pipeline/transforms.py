"""Train and eval transforms from the model's data config, applied on the fly.

    data_config = model_data_config("coatnet_0_rw_224", image_size=None)
    train_transform = build_train_transform(data_config, augment="standard")
    eval_transform = build_eval_transform(data_config)
    ds = ds.with_transform(batch_transform(eval_transform, min_side=...))

Everything comes from timm (`resolve_data_config`, `create_transform`): input size,
interpolation, mean/std and crop_pct are the ones the pretrained weights were trained with.
"""

from __future__ import annotations

import itertools
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
# Pillow for 0 bits and fails (about 1 image in 600). strong's colour jitter and random
# erasing are not here: they run on the device, on whole batches (`DeviceTransform`).
AUGMENT_PRESETS = {
    "standard": dict(scale=(0.08, 1.0), hflip=0.5, color_jitter=None),
    "strong": dict(scale=(0.08, 1.0), hflip=0.5,
                   color_jitter=None,  # not here: DrawColorJitter + DeviceColorJitter
                   auto_augment="rand-m9-mstd0.5-mmax9-inc1"),
}
# Training crops and RandAugment's rotations, shears and translations interpolate
# bilinearly: Pillow's bicubic affine costs 3x as much (3.6 against 1.2 ms for a 224 px
# image, docs/PERFORMANCE.md). Evaluation resizes with the weights' own (bicubic) setting.
TRAIN_INTERPOLATION = "bilinear"
# strong: brightness, contrast and saturation factors in [0.6, 1.4], in a random order ...
COLOR_JITTER = 0.4
# ... and a patch replaced by noise in a quarter of the images.
RANDOM_ERASING = dict(probability=0.25, mode="pixel")


def build_train_transform(data_config: dict, augment: str):
    """The CPU half of the train transform: PIL image -> augmented uint8 (3, H, W) tensor,
    or for strong {"pixel_values": that tensor, "color_jitter": the sample's factors}.

    strong ends in `DrawColorJitter`, which adds the factors. The device half
    (`DeviceTransform`) applies the jitter, normalises and erases, on whole batches: PIL
    colour jitter alone cost ~0.9 ms an image in a worker, and uint8 hands over a quarter of
    the bytes float32 would. `none`
    resizes and crops like the eval transform, without augmentation (what the old script did).
    """
    if augment == "none":
        return create_transform(
            input_size=data_config["input_size"], is_training=False,
            interpolation=data_config["interpolation"], crop_pct=data_config["crop_pct"],
            crop_mode=data_config.get("crop_mode", "center"), use_prefetcher=True,
        )
    transform = transforms_imagenet_train(
        img_size=data_config["input_size"][-2:],
        interpolation=TRAIN_INTERPOLATION,
        use_prefetcher=True,  # timm's name for "stop at a uint8 tensor"
        **AUGMENT_PRESETS[augment],
    )
    if augment == "strong":
        transform.transforms.append(DrawColorJitter(COLOR_JITTER))
    return transform


# The six orders in which brightness (0), contrast (1) and saturation (2) can be applied.
_JITTER_ORDERS = tuple(itertools.permutations(range(3)))
_GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L") (torchvision: 0.2989)


class DrawColorJitter:
    """The random half of torchvision's ColorJitter(s, s, s), drawn per sample on the CPU.

    Draws from torch's generator, which the loader seeds for every sample, so the factors
    are a function of (seed, epoch, index) like the rest of the augmentation.
    `DeviceColorJitter` applies them to the batch on the device.
    """

    def __init__(self, strength: float):
        self.strength = strength

    def __call__(self, image: torch.Tensor) -> dict:
        factors = torch.empty(3).uniform_(1 - self.strength, 1 + self.strength)
        order = torch.randint(len(_JITTER_ORDERS), (1,)).float()
        return {"pixel_values": image, "color_jitter": torch.cat([factors, order])}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(brightness=contrast=saturation={self.strength}, on the device)"


class DeviceColorJitter:
    """Brightness, contrast and saturation per image, each in its own order, on a batch.

        jitter = DeviceColorJitter(device)
        images = jitter(images, params)  # float (N, 3, H, W) in 0..255; params (N, 4)

    params come from `DrawColorJitter`: the three factors, then the index of the order. The
    arithmetic of torchvision's ColorJitter on tensors (blend with black, with the mean grey,
    with the grey image), in float32 whatever comes in, without rounding between the ops. Its
    tables live on the device, so a call never waits for the host.
    """

    def __init__(self, device):
        self.orders = torch.tensor(_JITTER_ORDERS, device=device)
        self.grey_weights = torch.tensor(_GREY_WEIGHTS, device=device)

    def __call__(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        orders = self.orders[params[:, 3].long()]  # (N, 3): the op at each position
        factors = params[:, :3].gather(1, orders).float()  # (N, 3): its factor
        grey_weights = self.grey_weights.view(1, 3, 1, 1)
        images = images.to(torch.float32, copy=True)  # one copy; the caller's stays as it was
        for position in range(3):
            op = orders[:, position].view(-1, 1, 1, 1)
            grey = (images * grey_weights).sum(dim=1, keepdim=True)  # (N, 1, H, W)
            # what each image blends with: black (brightness), its mean grey (contrast) or
            # its grey image (saturation)
            mean_grey = grey.mean(dim=(2, 3), keepdim=True)
            other = torch.where(op == 2, grey, torch.where(op == 1, mean_grey, 0.0))
            factor = factors[:, position].view(-1, 1, 1, 1)
            # factor * images + (1 - factor) * other, in place
            images = images.sub_(other).mul_(factor).add_(other).clamp_(0, 255)
        return images


class DeviceNormalize:
    """uint8 or 0..255 float (N, 3, H, W) -> float normalised with the model's mean and std,
    on the batch's device."""

    def __init__(self, mean, std, device):
        self.scale = (255.0 * torch.tensor(std, device=device)).view(1, 3, 1, 1)
        self.shift = (255.0 * torch.tensor(mean, device=device)).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.shift) / self.scale


class DeviceTransform:
    """The device half of the train transform, on whole batches from the train loader:
    colour jitter (strong), normalisation to the model's mean and std, random erasing (strong).

        device_transform = DeviceTransform(data_config, config.augment, accelerator.device)
        images = device_transform(batch)  # batch["pixel_values"]: uint8 (N, 3, H, W)
    """

    def __init__(self, data_config: dict, augment: str, device):
        self.normalize = DeviceNormalize(data_config["mean"], data_config["std"], device)
        self.jitter = self.erase = None
        if augment == "strong":
            from timm.data.random_erasing import RandomErasing

            self.jitter = DeviceColorJitter(device)
            self.erase = RandomErasing(**RANDOM_ERASING, device=device)

    def __call__(self, batch: dict) -> torch.Tensor:
        images = batch["pixel_values"]  # uint8
        if self.jitter is not None:
            images = self.jitter(images, batch["color_jitter"])  # -> float32
        images = self.normalize(images)
        if self.erase is not None:
            images = self.erase(images)
        return images


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
        outputs = [transform(open_rgb(x, min_side)) for x in batch["image"]]
        if outputs and isinstance(outputs[0], dict):  # e.g. strong: pixels + colour jitter factors
            columns = {key: [output[key] for output in outputs] for key in outputs[0]}
        else:
            columns = {"pixel_values": outputs}
        return {**columns, "label": batch["label"]}

    return apply
