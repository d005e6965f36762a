"""auto_scale and layer_decay_ratio: configs/gpu.yaml's recipe holds from 5 photos a class to
thousands, on any timm model (pet_pipeline/recipe.py, pet_pipeline/optim.py).

The rule is checked as plans from counts alone (no data, no model): what it chooses for 60,
600 and 6,000 training images (the table of docs/TRANSFER.md), that every size in between
stays in the documented ranges, and that a key the user gave is never changed. Two tests go
through builders.build_data on 60 and 600 generated photos, where the plan becomes the loaders
and the validation split is chosen inside data loading (they need data._split to call a
callable val_fraction: pet_pipeline/recipe.ValidationRule).
"""

from __future__ import annotations

import dataclasses

import pytest
from conftest import REPO

from pet_pipeline.config import Config, load_config
from pet_pipeline.errors import UserError
from pet_pipeline.recipe import (
    MAX_VAL_SHARE,
    MIN_EPOCH_STEPS,
    MIN_STEPS,
    MIN_TRAIN_PER_CLASS,
    MIN_VAL_IMAGES,
    RULE_KEYS,
    apply_plan,
    given_keys,
    plan_run,
)

GPU_YAML = ["--config", str(REPO / "configs" / "gpu.yaml")]


def gpu_plan(images: int, classes: int = 12, processes: int = 1, argv: list[str] = ()):
    """What configs/gpu.yaml (plus `argv`) gets for `images` training images."""
    argv = [*GPU_YAML, *argv]
    return plan_run(load_config(argv), given_keys(argv), pool_images=images, classes=classes,
                    processes=processes)


# ----------------------------------------------------------------------------- the rule


# images -> validation images, batch, epochs, steps an epoch, head epochs, warmup epochs, patience
TABLE = {
    60: (0, 16, 15, 4, 5, 1.0, None),  # the sample: one step an epoch at batch 64 before
    600: (100, 64, 15, 8, 5, 1.0, 4),  # 10% would be 60 photos to select on: 100
    6000: (600, 64, 15, 85, 5, 1.0, 4),  # the recipe as configs/gpu.yaml set it before
}


@pytest.mark.parametrize("images", sorted(TABLE))
def test_the_rule_gives_the_documented_plan_for_60_600_and_6000_images(images):
    plan = gpu_plan(images)
    val, batch, epochs, epoch_steps, head, warmup, patience = TABLE[images]
    c = plan.chosen
    assert set(c) == set(RULE_KEYS)  # configs/gpu.yaml leaves all six to the rule
    assert plan.validation.images == val and c["val_fraction"] == pytest.approx(val / images)
    assert (c["batch_size"], c["epochs"], plan.epoch_steps) == (batch, epochs, epoch_steps)
    assert plan.total_steps == epochs * epoch_steps >= MIN_STEPS
    assert (c["head_epochs"], c["warmup_epochs"], c["early_stopping_patience"]) == (head, warmup, patience)
    assert plan.summary().startswith("auto_scale: ")


@pytest.mark.parametrize("classes", [2, 12, 37, 100])
@pytest.mark.parametrize("processes", [1, 2, 8])
def test_every_size_from_5_photos_a_class_to_thousands_stays_in_the_documented_ranges(classes, processes):
    for per_class in (5, 8, 12, 20, 40, 100, 300, 1000):
        images = per_class * classes
        plan, where = gpu_plan(images, classes, processes), f"{per_class} a class, {processes} process(es)"
        c, val = plan.chosen, plan.validation.images
        train_per_class = (images - val) / classes
        # a validation split selects on enough photos, takes at most a fifth, leaves enough a class
        assert val == 0 or (MIN_VAL_IMAGES <= val <= MAX_VAL_SHARE * images
                            and train_per_class >= MIN_TRAIN_PER_CLASS), where
        assert (c["early_stopping_patience"] is None) == (val == 0), where  # no split: no early stop
        # enough steps an epoch (unless the batch is down to its floor) and in all
        assert plan.epoch_steps >= MIN_EPOCH_STEPS or c["batch_size"] * processes <= 16, where
        assert plan.total_steps >= MIN_STEPS, where
        # head phase and warm-up are shares of the run, whatever its length
        assert 0.25 <= c["head_epochs"] / c["epochs"] <= 0.4 and c["head_epochs"] < c["epochs"], where
        assert c["warmup_epochs"] == pytest.approx(c["epochs"] / 15, abs=0.01), where
        # the EMA averages tens of steps or more, at most the run's last 30%: never the initial weights
        assert plan.ema_window >= 10 and plan.ema_window / plan.total_steps <= 0.3, where
        apply_plan(dataclasses.replace(load_config(GPU_YAML)), plan)  # a valid config


def test_the_ema_and_early_stopping_behave_on_a_60_step_and_a_5000_step_run():
    short, long = gpu_plan(60), gpu_plan(23_700)  # 21,330 to train on: 15 epochs of 334 steps
    assert short.total_steps == 60 and 4900 <= long.total_steps <= 5100
    assert 12 <= short.ema_window <= 20  # ~15: the last quarter of the run
    assert 250 <= long.ema_window <= 320  # ~290: the last 6%
    assert short.chosen["early_stopping_patience"] is None  # nothing sound to stop on
    assert long.chosen["early_stopping_patience"] == 4  # 4 of 15 epochs


# ----------------------------------------------------------------------------- explicit settings win


def test_a_key_given_on_the_command_line_or_in_the_users_yaml_is_never_changed(tmp_path):
    # on the command line, over configs/gpu.yaml; 32 is batch_size's default and still counts
    plan = gpu_plan(60, argv=["--batch_size", "32", "--val_fraction", "0.3", "--warmup_epochs", "2"])
    assert plan.kept == {"batch_size": 32, "val_fraction": 0.3, "warmup_epochs": 2.0}
    assert not set(plan.kept) & set(plan.chosen)
    assert plan.validation.images == 18 and plan.epoch_steps == 2  # 42 images at 32
    assert plan.chosen["epochs"] == 30  # the others follow: 60 steps
    assert plan.chosen["early_stopping_patience"] == 8
    # in the user's own YAML, with auto_scale on
    own = tmp_path / "mine.yaml"
    own.write_text("auto_scale: true\nepochs: 9\nearly_stopping_patience: null\nlr: 1.0e-3\n")
    argv = ["--config", str(own), "--head_epochs", "0"]
    config = load_config(argv)
    plan = plan_run(config, given_keys(argv), pool_images=6000, classes=12, processes=1)
    assert plan.kept == {"epochs": 9, "head_epochs": 0, "early_stopping_patience": None}
    assert plan.chosen == {"val_fraction": 0.1, "batch_size": 64, "warmup_epochs": 0.6}
    apply_plan(config, plan)
    assert (config.epochs, config.head_epochs, config.early_stopping_patience) == (9, 0, None)
    assert (config.batch_size, config.warmup_epochs, config.lr) == (64, 0.6, 1e-3)


def test_configs_gpu_yaml_leaves_the_rules_keys_to_it_and_auto_scale_is_off_by_default():
    """A rule key written into gpu.yaml would be given, and silently no longer scaled."""
    assert load_config(GPU_YAML).auto_scale and not Config().auto_scale
    assert not given_keys(GPU_YAML) & set(RULE_KEYS)
    # a Config built in code: the keys off their defaults count as given
    assert given_keys(None, Config(auto_scale=True, epochs=3)) == {"epochs"}


# ----------------------------------------------------------------------------- one layer decay, all models


@pytest.mark.parametrize("values, fragment", [
    ({"layer_decay_ratio": 0.0}, "layer_decay_ratio"), ({"layer_decay_ratio": 1.5}, "layer_decay_ratio")])
def test_layer_decay_ratio_refuses_values_that_make_no_sense(values, fragment):
    with pytest.raises(UserError, match=fragment):
        Config(**values)


def test_gpu_yamls_layer_decay_gives_every_model_the_same_stem_to_classifier_lr_ratio():
    """coatnet_0 (5 groups below the classifier), a ViT (13), a ConvNeXt (13) and lite0 (17):
    the stem trains at the same fraction of lr on each; timm's per-group layer_decay does not."""
    import timm

    from pet_pipeline.builders import layer_decay_words
    from pet_pipeline.optim import build_optimizer

    recipe = load_config(GPU_YAML)
    assert recipe.layer_decay is None and recipe.layer_decay_ratio is not None

    def stem_and_classifier(model, **decay) -> tuple[float, float]:
        optimizer = build_optimizer(model, lr=recipe.lr, weight_decay=0.05, **decay)
        scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
        return scale[id(next(model.parameters()))], scale[id(model.get_classifier().weight)]

    ratios, per_group = {}, {}
    for name in ("coatnet_0_rw_224", "tf_efficientnet_lite0", "convnext_atto", "vit_tiny_patch16_224"):
        model = timm.create_model(name, pretrained=False, num_classes=12)
        stem, classifier = stem_and_classifier(model, layer_decay_ratio=recipe.layer_decay_ratio)
        assert classifier == 1.0
        ratios[name] = stem
        per_group[name] = stem_and_classifier(model, layer_decay=0.1)[0]
        assert "the stem at 1e-05 x lr" in layer_decay_words(recipe, model)
        # layer_decay, when set, wins over the ratio (as the start line says)
        assert stem_and_classifier(model, layer_decay=0.1, layer_decay_ratio=0.5) == (per_group[name], 1.0)
    assert ratios == pytest.approx(dict.fromkeys(ratios, recipe.layer_decay_ratio), rel=1e-9)
    assert per_group["coatnet_0_rw_224"] == pytest.approx(1e-5) and per_group["tf_efficientnet_lite0"] < 1e-16


# ----------------------------------------------------------------------------- the seam in builders


@pytest.mark.parametrize("extra, val_images", [(["--val_fraction", "0"], 0), ([], 0)])
def test_build_data_sets_the_chosen_keys_before_the_loaders(make_pet_folder, tmp_path, extra, val_images):
    """60 trainval photos of the 12 cats through builders.build_data with configs/gpu.yaml: the
    loader batches 16, config (what config.yaml and the checkpoints hold) has the plan. Without
    a given val_fraction the rule chooses it inside data loading (data._split calls it)."""
    from accelerate import Accelerator

    from pet_pipeline.breeds import CAT_BREEDS
    from pet_pipeline.builders import build_data
    from pet_pipeline.transforms import model_data_config

    root = make_pet_folder(tmp_path / "pets", {breed: (5, 2) for breed in CAT_BREEDS})
    argv = [*GPU_YAML, "--data_dir", str(root), "--model", "resnet18", "--image_size", "32",
            "--pre_resize", "null", "--num_workers", "0", "--output_dir", str(tmp_path / "run"), *extra]
    config = load_config(argv)
    data = build_data(config, Accelerator(cpu=True), model_data_config("resnet18", 32), argv=argv)
    assert (len(data.pets.train), data.val) == (60, None)
    assert (config.batch_size, config.epochs, config.head_epochs, config.val_fraction) == (16, 15, 5, 0.0)
    assert config.early_stopping_patience is None
    assert data.train.total_batch_size == 16 and len(data.train) == 4
    chosen = "auto_scale: no validation split, so the last weights are the model: 60 images are under 500"
    assert any(note.startswith(chosen) for note in data.pets.notes) == (not extra)


def test_the_split_the_rule_chose_is_the_one_the_saved_val_fraction_rebuilds(make_pet_folder, tmp_path):
    """600 trainval photos: the rule holds out 100 (1/6) inside data loading; the val_fraction it
    leaves in the config (config.yaml) gives evaluate.py's --split val the same images."""
    from accelerate import Accelerator

    from pet_pipeline.breeds import CAT_BREEDS
    from pet_pipeline.builders import build_data, data_keys
    from pet_pipeline.data import load_data, split_fingerprint
    from pet_pipeline.transforms import model_data_config

    root = make_pet_folder(tmp_path / "pets", {breed: (50, 1) for breed in CAT_BREEDS}, image_size=16)
    argv = [*GPU_YAML, "--data_dir", str(root), "--model", "resnet18", "--image_size", "32",
            "--pre_resize", "null", "--num_workers", "0", "--output_dir", str(tmp_path / "run")]
    config = load_config(argv)
    data = build_data(config, Accelerator(cpu=True), model_data_config("resnet18", 32), argv=argv)
    assert (len(data.pets.train), len(data.pets.val)) == (500, 100)
    assert config.val_fraction == pytest.approx(1 / 6)
    assert (config.batch_size, config.early_stopping_patience) == (64, 4)
    rebuilt = load_data(**data_keys(config))  # what evaluate.py does with the run's config.yaml
    assert split_fingerprint(rebuilt) == split_fingerprint(data.pets)
