"""auto_scale: the keys of the fine-tuning recipe that depend on the data's size, chosen from it.

configs/gpu.yaml's recipe has to hold from ~5 photos a class (the shared sample, where it was
measured: docs/TRANSFER.md) to thousands. Fixed numbers can't: at batch 64 the sample's 61
cat photos make one optimizer step an epoch (15 steps in all, 5 of them the head phase, 1 of
warm-up), and a 10% validation split of them is 6 photos for 12 classes, which picks the
"best" epoch by noise. So with `auto_scale: true` six keys are chosen at the start, from the
number of training images, classes and processes, by the rule below; a key given in the
--config file or on the command line is never changed (`given_keys`).

    given = given_keys(argv, config)
    validation = choose_validation(pool_images=1188, classes=12)       # inside data loading
    plan = plan_schedule(config, given, train_images=1069, processes=1, validation=validation)
    apply_plan(config, plan)                                           # before the loaders
    plan_run(config, given, pool_images=61, classes=12, processes=1)   # the same from counts alone

The rule. The full-scale values are what configs/gpu.yaml set before auto_scale (RECIPE_*):
- validation split (val_fraction), from the training pool before the split (n images, K classes):
  v = max(round(0.1 n), 100) photos, or none when v > n / 5 (under 500 images) or when the
  n - v left would be under 10 a class. Without one there is no model selection: the last
  weights (the EMA's, with ema_decay) are the model, and early stopping is off.
- batch_size: from 64 per device, halved while an epoch would have fewer than 4 optimizer
  steps, as long as a step keeps at least 8 images (over all processes and accumulation);
- epochs: 15, raised so that the run has at least 60 optimizer steps (and so that a given
  head_epochs stays a third of the run);
- head_epochs: a third of the epochs (at least 1, at most epochs - 1; 0 with freeze_backbone);
- warmup_epochs: a fifteenth of the epochs;
- early_stopping_patience: 4/15 of the epochs with a validation split, else none.
What it chooses for 60, 600 and 6,000 images of 12 classes: docs/TRANSFER.md, "The rule".

The EMA needs no rule: timm's warm-up (pet_pipeline/optim.build_ema) makes its decay after T
steps 1 - T^(-2/3), an average over the last ~T^(2/3) steps: 15 of a 60-step run, 117 of
1,275, 292 of 5,000, never the initial weights; ema_decay (0.999) only caps it after ~31,600.
Nor does the learning rate: the small-data end was measured at batch 16 with the recipe's lr.

Pure functions of counts and config values (no torch, no data): tests/test_recipe.py checks
them as tables. pet_pipeline/builders.build_data applies them between loading and batching.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from pet_pipeline.schedule import Schedule

# ------------------------------------------------------------------ the recipe at full scale
# What configs/gpu.yaml set before auto_scale, for the full cats (~1,190 trainval photos):
# 15 epochs of ~17 steps at batch 64, a third of them head phase (LP-FT), one of warm-up.
RECIPE_BATCH = 64  # images per device per micro-batch: the most the rule uses
RECIPE_EPOCHS = 15
RECIPE_VAL_FRACTION = 0.1
HEAD_SHARE = 5 / 15  # head_epochs 5 of 15
WARMUP_SHARE = 1 / 15  # warmup_epochs 1 of 15
PATIENCE_SHARE = 4 / 15  # early_stopping_patience 4 of 15

# ------------------------------------------------------------------ the thresholds, and why
# The head phase, the warm-up, validation, early stopping and the plateau schedule all act at
# epoch ends; an epoch of 1 step makes a 15-epoch recipe 15 steps. 4 steps an epoch is what
# the measured small-data runs had (61 cats at batch 16: docs/TRANSFER.md).
MIN_EPOCH_STEPS = 4
# Those runs were 60 steps (15 epochs of 4), above the linear probe on 3 and 5 seeds; the zero-
# initialised head needs tens of steps at lr 2e-3 (loss 0.94 after 60, frozen backbone).
MIN_STEPS = 60
# The smallest optimizer step the rule goes down to, in images over all processes. A judgment,
# not measured: below it a step of 12 classes sees few of them and a GPU does little work.
MIN_BATCH = 8
# Accuracy on n photos has a standard error of sqrt(p (1 - p) / n): 4 points at p = 0.8 on
# 100, 16 on 6; late epochs differ by less than that, so on fewer photos the "best" epoch is
# chosen by noise, and the last weights (cosine down to min_lr, EMA) are the better model.
MIN_VAL_IMAGES = 100
# More than a fifth of the images spent on choosing an epoch cost more in training than the
# choice gains (a judgment): so a validation split starts at MIN_VAL_IMAGES / 0.2 = 500 images.
MAX_VAL_SHARE = 0.2
# A class keeps at least this many training images on average, or there is no split.
MIN_TRAIN_PER_CLASS = 10

RULE_KEYS = ("val_fraction", "batch_size", "epochs", "head_epochs", "warmup_epochs",
             "early_stopping_patience")


# ----------------------------------------------------------------------------- which keys are given


def given_keys(argv: list[str] | None, config=None) -> frozenset[str]:
    """The keys the user set: on the command line `argv`, or in its --config file. auto_scale
    never changes them. Without a command line (a Config built in code), the keys of `config`
    whose value is not the default count as given."""
    from pet_pipeline.config import Config, parse_cli, read_yaml

    if argv is None:
        defaults = Config.__dataclass_fields__
        return frozenset(key for key in RULE_KEYS if getattr(config, key) != defaults[key].default)
    config_file, overrides = parse_cli(argv, Config)
    return frozenset(overrides) | frozenset(read_yaml(config_file) if config_file else {})


# ----------------------------------------------------------------------------- the validation split


@dataclass(frozen=True)
class Validation:
    """The validation split a run has: its size, the val_fraction that gives it, and why."""

    images: int  # 0: none; the last weights are the model
    fraction: float  # data.load_data's val_fraction for `images` of the pool
    reason: str  # for the start line
    chosen: bool = False  # by the rule (then val_fraction is one of the keys it sets)


def choose_validation(pool_images: int, classes: int) -> Validation:
    """The split of `pool_images` training images (test split already out) of `classes`."""
    wanted = round(RECIPE_VAL_FRACTION * pool_images)
    images = max(wanted, MIN_VAL_IMAGES)
    none = "no validation split, so the last weights are the model"
    if images > MAX_VAL_SHARE * pool_images:
        return Validation(0, 0.0, f"{none}: {pool_images} images are under "
                          f"{math.ceil(MIN_VAL_IMAGES / MAX_VAL_SHARE)}, and the {MIN_VAL_IMAGES} a "
                          f"selection needs would be over a fifth of them", chosen=True)
    if (pool_images - images) / classes < MIN_TRAIN_PER_CLASS:
        return Validation(0, 0.0, f"{none}: {images} for validation would leave under "
                          f"{MIN_TRAIN_PER_CLASS} training images a class", chosen=True)
    # the recipe's own fraction where it gives that many: a plain 0.1 in the run's config.yaml
    fraction = RECIPE_VAL_FRACTION if images == wanted else images / pool_images
    return Validation(images, fraction, f"validation split of {images} of {pool_images} images "
                      f"({fraction:.3g}: at least {MIN_VAL_IMAGES} to select on)", chosen=True)


def given_validation(images: int, fraction: float, *, own: bool = False) -> Validation:
    """The split a run has without the rule's choice: val_fraction as given, or (`own`) the
    data's own validation split."""
    if own:
        return Validation(images, fraction, f"the data's own validation split ({images} images)")
    if not images:
        return Validation(0, fraction, "no validation split (val_fraction as given)")
    return Validation(images, fraction, f"validation split of {images} images (val_fraction "
                      f"{fraction:g} as given)")


class ValidationRule:
    """data.load_data's `val_fraction` under auto_scale: called with the size of the training
    pool and the class count once the data knows them (before the validation split), it
    returns the fraction `choose_validation` gives and remembers the choice (None if the data
    has a validation split of its own and never asks)."""

    def __init__(self):
        self.choice: Validation | None = None

    def __call__(self, pool_images: int, classes: int) -> float:
        self.choice = choose_validation(pool_images, classes)
        return self.choice.fraction


# ----------------------------------------------------------------------------- batch and schedule


def steps_per_epoch(train_images: int, *, batch_size: int, grad_accum_steps: int = 1,
                    processes: int = 1) -> int:
    """Optimizer steps an epoch, as the run counts them: Accelerate gives each process
    ceil(batches / processes) micro-batches, and pet_pipeline/schedule.py makes the steps."""
    batches_per_process = math.ceil(math.ceil(train_images / batch_size) / processes)
    return Schedule(batches_per_epoch=batches_per_process, epochs=1,
                    grad_accum_steps=grad_accum_steps).steps_per_epoch


def choose_batch(train_images: int, *, grad_accum_steps: int, processes: int, even: bool) -> int:
    """RECIPE_BATCH per device, halved while an epoch has under MIN_EPOCH_STEPS steps and a
    step keeps MIN_BATCH images; `even`: mixup and cutmix need an even batch."""
    batch = RECIPE_BATCH
    while steps_per_epoch(train_images, batch_size=batch, grad_accum_steps=grad_accum_steps,
                          processes=processes) < MIN_EPOCH_STEPS:
        half = batch // 2
        if batch % 2 or half * grad_accum_steps * processes < MIN_BATCH or (even and half % 2):
            break
        batch = half
    return batch


def choose_epochs(epoch_steps: int, *, head_epochs: int | None) -> int:
    """RECIPE_EPOCHS, raised to MIN_STEPS optimizer steps, and so that a given head phase
    stays HEAD_SHARE of the run."""
    epochs = max(RECIPE_EPOCHS, math.ceil(MIN_STEPS / epoch_steps))
    return max(epochs, math.ceil(head_epochs / HEAD_SHARE)) if head_epochs else epochs


@dataclass(frozen=True)
class Plan:
    """What auto_scale sets (`chosen`: never a given key) and what it found."""

    chosen: dict
    kept: dict  # the rule's keys the user gave, as given
    train_images: int
    epoch_steps: int
    total_steps: int
    validation: Validation
    ema_window: float | None  # steps the EMA averages at the end (None: no EMA)

    def summary(self) -> str:
        """The start line: what the rule chose, and why."""
        c, words = self.chosen, []
        if "batch_size" in c:
            words.append(f"batch {c['batch_size']}" + (f" (so that an epoch of {self.train_images} "
                         f"images has >= {MIN_EPOCH_STEPS} steps)" if c["batch_size"] < RECIPE_BATCH else ""))
        if "epochs" in c:
            words.append(f"{c['epochs']} epochs" + (f" (so that the run has >= {MIN_STEPS} steps)"
                                                    if c["epochs"] > RECIPE_EPOCHS else ""))
        words.append(f"{self.epoch_steps} steps an epoch, {self.total_steps} in all")
        for key, name in (("head_epochs", "head phase"), ("warmup_epochs", "warm-up")):
            if key in c:
                words.append(f"{name} {c[key]:g} epoch{'' if c[key] == 1 else 's'}")
        if "early_stopping_patience" in c:
            patience = c["early_stopping_patience"]
            words.append(f"early stopping after {patience} epochs without a better validation accuracy"
                         if patience else "no early stopping")
        if self.ema_window is not None:
            words.append(f"EMA over the last ~{self.ema_window:.0f} steps")
        kept = {k: v for k, v in self.kept.items() if k != "val_fraction"}  # the reason says it
        given = f"; given, kept: {', '.join(f'{k} {v}' for k, v in kept.items())}" if kept else ""
        return f"auto_scale: {self.validation.reason}; " + ", ".join(words) + given


def ema_window(total_steps: int, ceiling: float | None) -> float | None:
    """Steps the EMA averages after `total_steps`: 1 / (1 - decay), the decay warming up as
    1 - T^(-2/3) (timm's ModelEmaV3, pet_pipeline/optim.build_ema) up to `ceiling`."""
    if ceiling is None:
        return None
    decay = min(ceiling, 1.0 - max(1, total_steps) ** (-2 / 3))
    return 1.0 / (1.0 - decay)


def plan_schedule(config, given: frozenset[str], *, train_images: int, processes: int,
                  validation: Validation) -> Plan:
    """The batch and the schedule for `train_images` (after the validation split), on
    `processes` processes, for the keys not in `given`; a given key keeps its value and the
    others follow it (a given epochs gets a third of it as head phase)."""
    def value(key, rule):
        return getattr(config, key) if key in given else rule()

    batch = value("batch_size", lambda: choose_batch(
        train_images, grad_accum_steps=config.grad_accum_steps, processes=processes,
        even=config.mixup > 0 or config.cutmix > 0))
    epoch_steps = steps_per_epoch(train_images, batch_size=batch, grad_accum_steps=config.grad_accum_steps,
                                  processes=processes)
    epochs = value("epochs", lambda: choose_epochs(
        epoch_steps, head_epochs=config.head_epochs if "head_epochs" in given else None))
    values = {
        "val_fraction": validation.fraction, "batch_size": batch, "epochs": epochs,
        "head_epochs": value("head_epochs", lambda: 0 if config.freeze_backbone
                             else min(epochs - 1, max(1, round(HEAD_SHARE * epochs)))),
        "warmup_epochs": value("warmup_epochs", lambda: round(WARMUP_SHARE * epochs, 2)),
        "early_stopping_patience": value("early_stopping_patience", lambda: max(
            1, round(PATIENCE_SHARE * epochs)) if validation.images else None),
    }
    total = epochs * epoch_steps if config.max_steps is None else min(epochs * epoch_steps, config.max_steps)
    if not validation.chosen:  # given, or the data's own split
        del values["val_fraction"]
    chosen = {k: v for k, v in values.items() if k not in given}
    return Plan(chosen=chosen, kept={k: getattr(config, k) for k in RULE_KEYS if k in given},
                train_images=train_images, epoch_steps=epoch_steps, total_steps=total,
                validation=validation, ema_window=ema_window(total, config.ema_decay))


def plan_run(config, given: frozenset[str], *, pool_images: int, classes: int, processes: int) -> Plan:
    """The whole rule from counts alone, as a run applies it: the validation split of the
    `pool_images` training images (unless val_fraction is given), then the schedule for what
    is left. (A run's split is data.stratified_split's, which may move a few images.)"""
    if "val_fraction" in given:
        validation = given_validation(round(pool_images * config.val_fraction), config.val_fraction)
    else:
        validation = choose_validation(pool_images, classes)
    return plan_schedule(config, given, train_images=pool_images - validation.images,
                         processes=processes, validation=validation)


def apply_plan(config, plan: Plan) -> None:
    """Set the chosen keys on `config`, in place: the Trainer, the start decision (config.yaml,
    which evaluate.py's --split val rebuilds the split from) and the checkpoints all read this
    one object. The result is validated as a whole first, like any config."""
    dataclasses.replace(config, **plan.chosen)  # Config.__post_init__ validates; UserError if not
    for key, value in plan.chosen.items():
        setattr(config, key, value)
