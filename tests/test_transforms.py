"""Transforms from the model's data config, augmentation presets, reproducible augmentation."""

from __future__ import annotations

import random

import numpy as np
import pytest
import timm
import torch
import torchvision.transforms as T
from PIL import Image

from pet_pipeline.config import AUGMENT_PRESETS
from pet_pipeline.data import load_pets
from pet_pipeline.errors import UserError
from pet_pipeline.loader import EpochSeededSampler, PetTorchDataset
from pet_pipeline.transforms import (
    COLOR_JITTER,
    DeviceColorJitter,
    DeviceNormalize,
    DeviceTransform,
    DrawColorJitter,
    batch_transform,
    build_eval_transform,
    build_train_transform,
    decode_size,
    model_data_config,
)

SIZE = 32  # px: small keeps these tests fast; the default size is checked once


def textured_image(width: int = 80, height: int = 60, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def coatnet_config():
    return model_data_config("coatnet_0_rw_224", image_size=SIZE)


@pytest.fixture(scope="module")
def cat_pets(synthetic_dir):
    return load_pets(data_dir=str(synthetic_dir), species="cat", val_fraction=0)


# ----------------------------------------------------------------------------- data config


def test_data_config_comes_from_the_model():
    config = model_data_config("coatnet_0_rw_224")
    pretrained = timm.models.get_pretrained_cfg("coatnet_0_rw_224")
    assert config["input_size"] == (3, 224, 224) == tuple(pretrained.input_size)
    assert config["mean"] == tuple(pretrained.mean) == (0.5, 0.5, 0.5)
    assert config["std"] == tuple(pretrained.std) == (0.5, 0.5, 0.5)
    assert config["interpolation"] == pretrained.interpolation
    assert config["crop_pct"] == pretrained.crop_pct
    assert model_data_config("coatnet_0_rw_224", image_size=96)["input_size"] == (3, 96, 96)


def test_unknown_model_suggests_the_closest():
    with pytest.raises(UserError, match=r"model: 'coatnet_0_rw_22' is not a timm model; did you mean"):
        model_data_config("coatnet_0_rw_22")


def test_eval_transform_shape_dtype_and_default_size():
    transform = build_eval_transform(model_data_config("coatnet_0_rw_224"))
    x = transform(textured_image(300, 200))
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32


@pytest.mark.parametrize("image_size", [32, 48])
def test_image_size_overrides_the_model_size(image_size):
    config = model_data_config("coatnet_0_rw_224", image_size=image_size)
    x = build_eval_transform(config)(textured_image())
    assert x.shape == (3, image_size, image_size) and x.dtype == torch.float32
    x = build_train_transform(config, "standard")(textured_image())
    assert x.shape == (3, image_size, image_size) and x.dtype == torch.uint8
    resize = build_eval_transform(config).transforms[0]
    assert isinstance(resize, T.Resize) and resize.size == int(image_size / config["crop_pct"])


def test_normalisation_uses_the_models_mean_and_std(coatnet_config):
    colour = (255, 0, 128)
    image = Image.new("RGB", (50, 40), colour)
    x = build_eval_transform(coatnet_config)(image)
    expected = [(c / 255 - 0.5) / 0.5 for c in colour]  # coatnet_0_rw_224: mean = std = 0.5
    assert torch.allclose(x.mean((1, 2)), torch.tensor(expected), atol=1e-2)
    assert torch.allclose(x[:, 0, 0], torch.tensor(expected), atol=2e-2)  # constant all over

    resnet = model_data_config("resnet18", image_size=SIZE)  # ImageNet mean/std
    assert resnet["mean"] == (0.485, 0.456, 0.406)
    y = build_eval_transform(resnet)(image)
    imagenet = [(c / 255 - m) / s for c, m, s in zip(colour, resnet["mean"], resnet["std"])]
    assert torch.allclose(y.mean((1, 2)), torch.tensor(imagenet), atol=1e-2)
    assert not torch.allclose(x, y, atol=0.1)


# ----------------------------------------------------------------------------- augmentation presets


def test_presets_match_the_config_choices():
    from pet_pipeline.transforms import AUGMENT_PRESETS as built

    assert set(built) | {"none"} == set(AUGMENT_PRESETS)


def pixels(output) -> torch.Tensor:
    """The image of a train transform's output (strong adds its colour jitter factors)."""
    return output["pixel_values"] if isinstance(output, dict) else output


@pytest.mark.parametrize("augment", AUGMENT_PRESETS)
def test_every_preset_gives_a_uint8_tensor_of_the_input_size(coatnet_config, augment):
    """Workers send uint8; DeviceTransform turns it into the model's input on the device."""
    transform = build_train_transform(coatnet_config, augment)
    for seed in range(3):
        x = pixels(transform(textured_image(seed=seed)))
        assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.uint8
    x = pixels(transform(Image.new("RGB", (SIZE // 2, SIZE * 3), (10, 200, 30))))  # small and thin
    assert x.shape == (3, SIZE, SIZE)


def test_none_is_deterministic_and_equals_eval(coatnet_config):
    image = textured_image()
    none = build_train_transform(coatnet_config, "none")
    torch.manual_seed(0)
    a = none(image)
    torch.manual_seed(1)
    assert torch.equal(a, none(image))
    normalize = DeviceNormalize(coatnet_config["mean"], coatnet_config["std"], "cpu")
    torch.testing.assert_close(normalize(a[None])[0], build_eval_transform(coatnet_config)(image),
                               atol=1e-5, rtol=0)


def test_device_normalize_matches_torchvision(coatnet_config):
    resnet = model_data_config("resnet18", image_size=SIZE)
    images = torch.randint(0, 256, (4, 3, SIZE, SIZE), dtype=torch.uint8)
    ours = DeviceNormalize(resnet["mean"], resnet["std"], "cpu")(images)
    reference = T.Normalize(resnet["mean"], resnet["std"])(images.float() / 255)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_strong_erases_patches_on_the_batch(coatnet_config):
    mid_grey = {"pixel_values": torch.full((64, 3, SIZE, SIZE), 128, dtype=torch.uint8)}
    standard = DeviceTransform(coatnet_config, "standard", "cpu")(mid_grey)
    assert torch.allclose(standard, torch.full_like(standard, 0.5 / 127.5))  # normalised only
    no_jitter = torch.tensor([1.0, 1.0, 1.0, 0.0]).repeat(64, 1)  # factors 1: colours kept
    torch.manual_seed(0)
    random.seed(0)
    erased = DeviceTransform(coatnet_config, "strong", "cpu")({**mid_grey, "color_jitter": no_jitter})
    changed = (erased != standard).flatten(1).any(1).float().mean().item()
    assert 0.05 < changed < 0.5  # probability 0.25 per image


def torchvision_jitter(image: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """One 0..255 image jittered by torchvision's functional ops, in the order params name."""
    import itertools

    import torchvision.transforms.functional as F

    ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
    x = image / 255
    for op in list(itertools.permutations(range(3)))[int(params[3])]:
        x = ops[op](x, float(params[op]))
    return x * 255


def test_device_colour_jitter_matches_torchvision_per_image():
    images = torch.rand(12, 3, 8, 10) * 255
    params = torch.cat([torch.empty(12, 3).uniform_(0.6, 1.4),
                        torch.arange(12).remainder(6).float()[:, None]], dim=1)  # every order
    ours = DeviceColorJitter("cpu")(images, params)
    for image, p, result in zip(images, params, ours):
        torch.testing.assert_close(result, torchvision_jitter(image, p), atol=1e-2, rtol=1e-4)  # of 255
    assert not torch.allclose(ours, images, atol=1.0)


def test_colour_jitter_order_matters_and_is_per_image():
    """Same factors, two orders: the results differ (contrast then brightness is not
    brightness then contrast), so a batch-wide order would be a different augmentation."""
    image = torch.rand(1, 3, 8, 8) * 255
    params = torch.tensor([[1.4, 0.6, 1.3, 0.0], [1.4, 0.6, 1.3, 5.0]])
    ours = DeviceColorJitter("cpu")(image.expand(2, -1, -1, -1), params)
    assert not torch.allclose(ours[0], ours[1], atol=1e-2)


def test_colour_jitter_factors_are_drawn_per_sample_in_range():
    torch.manual_seed(0)
    draws = torch.stack([DrawColorJitter(COLOR_JITTER)(torch.zeros(3, 2, 2))["color_jitter"]
                         for _ in range(600)])
    factors, orders = draws[:, :3], draws[:, 3]
    assert factors.min() >= 1 - COLOR_JITTER and factors.max() <= 1 + COLOR_JITTER
    assert factors.std(dim=0).min() > 0.15  # uniform on [0.6, 1.4] has std 0.23
    assert set(orders.long().tolist()) == set(range(6))


def test_strong_jitters_colours_on_the_device(coatnet_config):
    """The strong batch carries its factors; with them the device output changes colour."""
    image = Image.fromarray(np.full((40, 40, 3), (150, 90, 40), dtype=np.uint8))
    torch.manual_seed(0)
    outputs = [build_train_transform(coatnet_config, "strong")(image) for _ in range(8)]
    batch = {key: torch.stack([o[key] for o in outputs]) for key in outputs[0]}
    assert batch["color_jitter"].shape == (8, 4)
    device = DeviceTransform(coatnet_config, "strong", "cpu")
    device.erase = None  # look at the colours only
    jittered = device(batch)
    plain = DeviceTransform(coatnet_config, "standard", "cpu")(batch)  # normalised only
    assert (jittered - plain).abs().flatten(1).amax(1).gt(0.02).float().mean() > 0.7


def test_standard_and_strong_are_random(coatnet_config):
    image = textured_image()
    for augment in ("standard", "strong"):
        transform = build_train_transform(coatnet_config, augment)
        outputs = [pixels(transform(image)) for _ in range(4)]
        assert any(not torch.equal(outputs[0], o) for o in outputs[1:]), augment


def test_preset_contents(coatnet_config):
    standard = repr(build_train_transform(coatnet_config, "standard"))
    assert "RandomResizedCrop" in standard and "RandomHorizontalFlip" in standard
    assert "interpolation=bilinear)" in standard  # TRAIN_INTERPOLATION, not the eval bicubic
    strong = repr(build_train_transform(coatnet_config, "strong"))
    assert "RandAugment" in strong and "mmax=9" in strong


def test_strong_preset_defers_colour_jitter_to_the_device(coatnet_config):
    strong = build_train_transform(coatnet_config, "strong")
    assert isinstance(strong.transforms[-1], DrawColorJitter)
    assert not any(isinstance(t, T.ColorJitter) for t in strong.transforms)  # not twice


def test_decode_size(coatnet_config):
    assert decode_size(coatnet_config, None) == decode_size(coatnet_config, "none") == 34  # 32 / 0.95
    assert decode_size(coatnet_config, "standard") is None


def test_batch_transform_decodes_and_keeps_labels(coatnet_config):
    apply = batch_transform(build_eval_transform(coatnet_config))
    batch = apply({"image": [textured_image(), Image.new("L", (40, 40))], "label": [3, 5]})
    assert batch["label"] == [3, 5]
    assert [x.shape for x in batch["pixel_values"]] == [(3, SIZE, SIZE)] * 2


# ----------------------------------------------------------------------------- reproducible loading


@pytest.mark.parametrize("augment", ["standard", "strong"])  # strong: RandAugment draws from NumPy
def test_same_epoch_and_index_give_the_same_augmentation(cat_pets, coatnet_config, augment):
    transform = build_train_transform(coatnet_config, augment)
    dataset = PetTorchDataset(cat_pets.train, transform, seed=3)
    for index in range(6):
        first = dataset[(2, index)]
        np.random.seed(index + 100)  # whatever else happened in between must not matter
        torch.manual_seed(index + 100)
        second = dataset[(2, index)]
        assert first["index"] == second["index"] == index
        assert first["label"] == second["label"] == cat_pets.train[index]["label"]
        assert torch.equal(first["pixel_values"], second["pixel_values"]), index
        if augment == "strong":
            assert torch.equal(first["color_jitter"], second["color_jitter"]), index


def test_another_epoch_or_seed_gives_another_augmentation(cat_pets, coatnet_config):
    transform = build_train_transform(coatnet_config, "standard")
    dataset = PetTorchDataset(cat_pets.train, transform, seed=3)
    other_seed = PetTorchDataset(cat_pets.train, transform, seed=4)
    for index in range(3):
        x = dataset[(0, index)]["pixel_values"]
        assert not torch.equal(x, dataset[(1, index)]["pixel_values"])
        assert not torch.equal(x, other_seed[(0, index)]["pixel_values"])


def test_seeded_items_leave_the_callers_rng_alone(cat_pets, coatnet_config):
    dataset = PetTorchDataset(cat_pets.train, build_train_transform(coatnet_config, "standard"), seed=0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    dataset[(0, 0)]
    assert torch.equal(torch.rand(3), expected)


def test_plain_index_keys_for_evaluation(cat_pets, coatnet_config):
    dataset = PetTorchDataset(cat_pets.test, build_eval_transform(coatnet_config),
                              min_side=decode_size(coatnet_config, None))
    assert len(dataset) == len(cat_pets.test)
    item = dataset[5]
    assert item["index"] == 5 and item["label"] == cat_pets.test[5]["label"]
    assert item["pixel_values"].shape == (3, SIZE, SIZE) and item["pixel_values"].dtype == torch.float32
    assert torch.equal(item["pixel_values"], dataset[5]["pixel_values"])


def test_epoch_seeded_sampler():
    sampler = EpochSeededSampler(20, seed=5)
    sampler.set_epoch(3)
    order = list(sampler)
    assert len(sampler) == 20 and all(epoch == 3 for epoch, _ in order)
    assert sorted(i for _, i in order) == list(range(20))  # a permutation
    again = EpochSeededSampler(20, seed=5)
    again.set_epoch(3)
    assert list(again) == order  # same seed and epoch, same order
    sampler.set_epoch(4)
    assert [i for _, i in sampler] != [i for _, i in order]
    other = EpochSeededSampler(20, seed=6)
    other.set_epoch(3)
    assert list(other) != order
    assert [i for _, i in EpochSeededSampler(5, seed=0, shuffle=False)] == list(range(5))
