"""One typed config: defaults in code, a YAML file on top, `--key value` on top of that.

    config = load_config(sys.argv[1:])          # raises UserError on any bad key or value
    save_config(config, "runs/x/config.yaml")    # the resolved config, next to the run

Every field carries a help text (shown by `--help`) and is checked in `validate`, so a bad
config stops the program before any data is read or any GPU is touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pet_pipeline.errors import UserError

SPECIES = ("cat", "dog", "all")
DATA_FORMATS = ("auto", "pets", "imagefolder", "csv", "hf")  # pet_pipeline/sources.py
AUGMENT_PRESETS = ("none", "standard", "strong")
AUGMENT_ON = ("auto", "device", "cpu")  # where augmentation runs (pet_pipeline/device_augment.py)
SCHEDULERS = ("cosine", "plateau", "constant")
MIXED_PRECISION = ("no", "fp16", "bf16")
REPORT_TO = ("wandb", "tensorboard", "all", "none")
CLASS_WEIGHTS = ("none", "balanced")


def _field(default, help: str, **kwargs):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class Config:
    # ---- data ----
    data_format: str = _field(
        "auto", "Where the images come from: pets (Oxford-IIIT Pet), imagefolder (data_dir/CLASS/*.jpg, "
        "optionally under train/ val/ test/), csv (a CSV of image paths and labels), hf (a Hub "
        "dataset or a save_to_disk folder); auto picks by what data_dir / dataset holds.",
    )
    dataset: str = _field(
        "timm/oxford-iiit-pet",
        "Hugging Face Hub dataset id (any, with an image and a label column), a save_to_disk "
        "folder, or 'synthetic' for generated Pets (no download).",
    )
    data_dir: str | None = _field(
        None,
        "Local data, wins over `dataset`: an Oxford-IIIT Pet copy (images/, annotations/, or "
        "its parent holding oxford-iiit-pet/), a folder of class folders, a .csv file or a "
        "save_to_disk folder.",
    )
    dataset_revision: str | None = _field(
        None, "Hub dataset revision (branch, tag or commit) to load, for a reproducible run."
    )
    image_column: str | None = _field(
        None, "csv / hf: the column of images (paths relative to the CSV); default: image, path, "
        "file, filename... or the dataset's Image column."
    )
    label_column: str | None = _field(
        None, "csv / hf: the column of labels; default: label, class, category... or the "
        "dataset's ClassLabel column."
    )
    split_column: str = _field("split", "csv: the column saying train, val or test (optional).")
    species: str = _field("cat", "Pets only: which pets to keep: cat (12 breeds), dog (25) or all (37).")
    breeds: list[str] | None = _field(
        None, "Pets only: explicit breed names to keep (official names, any case); "
        "comma-separated on the CLI."
    )
    classes: list[str] | None = _field(
        None, "Keep only these classes, of any source (names as the data spells them); "
        "comma-separated on the CLI."
    )
    val_fraction: float = _field(
        0.1, "Share of the training images held out, stratified by class, for model selection "
        "(0 = none), unless the data has its own validation split."
    )
    test_fraction: float = _field(
        0.2, "Share of the images held out, stratified, as the test split when the data has none."
    )
    max_train_samples: int | None = _field(
        None, "Debugging: train on at most this many images (stratified, seeded)."
    )
    max_eval_samples: int | None = _field(
        None, "Debugging: validate and test on at most this many images each (stratified, seeded)."
    )
    strict_data: bool = _field(
        False, "Treat any unreadable image or malformed annotation line as an error; an image "
        "that becomes unreadable during training then stops the run (with a checkpoint)."
    )
    max_unreadable_fraction: float = _field(
        0.01, "Share of the training images that may become unreadable during training (each "
        "replaced by a readable image of its class) before the run stops with a checkpoint."
    )
    synthetic_images_per_class: int = _field(
        24, "Images per breed generated for dataset: synthetic."
    )
    synthetic_image_size: int = _field(96, "Side in pixels of generated images.")
    image_size: int | None = _field(
        None, "Input side in pixels (default: the model's own input size)."
    )
    augment: str = _field(
        "standard",
        "Train augmentation preset: none (resize + crop only, like the old script), "
        "standard (RandomResizedCrop + flip), strong (+ RandAugment, colour jitter, random erasing).",
    )
    pre_resize: int | None = _field(
        None, "Decode every image once and keep it with this short side (px) for all epochs and "
        "runs: skips JPEG decoding, the largest input cost. About 1.15 x image_size, e.g. 256 "
        "for 224 (null = off)."
    )
    augment_on: str = _field(
        "auto", "Where training crops, flips and resizing run: device (the host copies uint8 regions "
        "of a decoded cache, the GPU resamples whole batches: for fast GPUs), cpu (PIL in the loader "
        "workers), or auto (device on a GPU unless augment is strong, whose RandAugment is CPU-only; "
        "cpu otherwise)."
    )
    num_workers: int | None = _field(
        None, "DataLoader worker processes per GPU (default: CPU cores per process minus one, at most 16)."
    )
    # ---- model ----
    model: str = _field("coatnet_0_rw_224", "Any timm model name.")
    pretrained: bool = _field(True, "Start from the model's ImageNet weights.")
    pretrained_path: str | None = _field(
        None, "Local weights file (safetensors, timm or PyTorch checkpoint) for offline nodes."
    )
    drop_path_rate: float = _field(0.1, "Stochastic depth rate.")
    # ---- optimisation ----
    auto_scale: bool = _field(
        False, "Choose val_fraction, batch_size, epochs, head_epochs, warmup_epochs and "
        "early_stopping_patience from the number of training images, classes and processes "
        "(pet_pipeline/recipe.py: e.g. a smaller batch and no validation split on a few photos a "
        "class), each only where neither the --config file nor the command line gives it. The "
        "start line says what it chose and why; the run's config.yaml holds the values."
    )
    epochs: int = _field(10, "Passes over the training split.")
    max_steps: int | None = _field(
        None, "Stop after this many optimizer steps (overrides epochs when reached first)."
    )
    batch_size: int = _field(
        32, "Images per device per micro-batch; lower it on out-of-memory, raise grad_accum_steps."
    )
    eval_batch_size: int | None = _field(None, "Images per device at evaluation (default: 2 x batch_size).")
    grad_accum_steps: int = _field(1, "Micro-batches accumulated per optimizer step.")
    lr: float = _field(1e-4, "Peak learning rate of AdamW.")
    min_lr: float = _field(1e-6, "Learning rate at the end of the cosine schedule.")
    weight_decay: float = _field(0.05, "AdamW weight decay (not applied to norms and biases).")
    warmup_epochs: float = _field(1.0, "Linear warmup length, in epochs (fractions allowed).")
    scheduler: str = _field("cosine", "LR schedule after warmup: cosine, plateau or constant.")
    clip_grad_norm: float | None = _field(1.0, "Clip the gradient norm to this value (null = off).")
    label_smoothing: float = _field(0.1, "Label smoothing of the cross-entropy loss.")
    mixup: float = _field(0.0, "Mixup alpha (0 = off).")
    cutmix: float = _field(0.0, "CutMix alpha (0 = off).")
    ema_decay: float | None = _field(
        None, "Largest decay of an EMA of the weights (e.g. 0.999), reached after ~30,000 steps: "
        "it warms up as 1 - (1 + step)^(-2/3), so a run of tens of steps averages its last few "
        "steps, not its initial weights. Evaluated and used for model selection."
    )
    layer_decay: float | None = _field(
        None, "Layer-wise lr decay (timm): the classifier trains at lr, each layer group below it "
        "at this factor times the one above (e.g. 0.8; null = one lr for all). How many groups "
        "a model has is timm's, so a value means more the deeper the grouping: 5 below the "
        "classifier for coatnet_0_rw_224, 17 for tf_efficientnet_lite0 (0.6 trains the first "
        "one's stem at 0.08 x lr, the second's at 0.0002 x). Wins over layer_decay_ratio."
    )
    layer_decay_ratio: float | None = _field(
        None, "Layer-wise lr decay that means the same on every model: the lowest layer group (the "
        "stem) trains at this fraction of the classifier's lr, the groups between at a geometric "
        "progression over the model's own timm groups (each ratio^(1/groups below the "
        "classifier) times the one above: 1e-5 is 0.1 a group on coatnet_0_rw_224's 5, 0.51 on "
        "tf_efficientnet_lite0's 17). Used when layer_decay is null."
    )
    head_epochs: int = _field(
        0, "LP-FT: train only the classifier on frozen features (backbone in eval mode) for this "
        "many epochs, then everything (0 = off)."
    )
    freeze_backbone: bool = _field(
        False, "Train only the classifier for the whole run: a linear probe on frozen features."
    )
    freeze_bn_stats: bool = _field(
        False, "Keep every batch norm in eval mode all run: it normalises with its pretrained "
        "running statistics instead of those of each small batch, and leaves them as they are "
        "(its scale and shift still train). For few images or small per-device batches."
    )
    class_weights: str = _field("none", "Loss class weights: none or balanced (inverse frequency).")
    early_stopping_patience: int | None = _field(
        None, "Stop when validation accuracy has not improved for this many epochs."
    )
    # ---- hardware ----
    mixed_precision: str | None = _field(
        None, "no, fp16 or bf16 (bf16 on GPUs that have it); null = the launcher's setting "
        "(accelerate config), else no."
    )
    channels_last: bool = _field(True, "Use the channels_last memory format on GPU (ignored on CPU).")
    compile: bool = _field(False, "torch.compile the model (pays off only on long runs).")
    sync_bn: bool = _field(False, "Convert BatchNorm to SyncBatchNorm when several processes train.")
    collective_timeout_s: int = _field(
        300, "Seconds a process waits for the others in a collective before the job ends (a frozen "
        "or stopped process); keep it below your scheduler's grace time."
    )
    # ---- run ----
    seed: int = _field(42, "Seed for the split, the initial weights, data order and augmentation.")
    output_dir: str = _field("runs/pets", "Where the run writes everything.")
    report_to: str = _field("wandb", "Tracker: wandb, tensorboard, all or none.")
    wandb_project: str = _field("pet-pipeline", "W&B project name.")
    wandb_init_timeout_s: float = _field(
        30.0, "Seconds W&B may try to reach its server at the start; then the run logs offline "
        "(upload later with `wandb sync`)."
    )
    wandb_finish_timeout_s: float = _field(
        300.0, "Seconds the end of the run waits for W&B to upload what is left; the rest stays "
        "on disk for `wandb sync` (0: wait for all of it)."
    )
    wandb_required: bool = _field(
        False, "Refuse to start (exit 2) rather than log offline when W&B can't log online."
    )
    run_name: str | None = _field(None, "Run name in the tracker (default: the output folder's name).")
    resume: str = _field(
        "auto", "auto (continue the run in output_dir from its newest valid checkpoint, or start "
        "one), none (a new run; refused where a run is), overwrite (move the run in output_dir "
        "to a sibling folder, then start a new one), or a checkpoint path."
    )
    checkpoint_steps: int | None = _field(
        None, "Also checkpoint every this many optimizer steps (epoch ends always are)."
    )
    keep_checkpoints: int = _field(2, "How many of the newest checkpoints to keep.")
    log_every: int = _field(10, "Optimizer steps between logged training losses.")
    gradcam_images: int = _field(
        8, "Misclassified test images shown with Grad-CAM maps in the final report (0 = none)."
    )
    # ---- Hugging Face Hub ----
    push_to_hub: bool = _field(
        False, "At the end of the run, upload model/ with its model card to hub_model_id (needs a "
        "token with write access: `hf auth login` or HF_TOKEN; checked at start-up)."
    )
    hub_model_id: str | None = _field(None, "The Hub repo for push_to_hub: user/name or org/name.")
    hub_private: bool = _field(
        True, "Create the Hub repo private (a repo that exists keeps its visibility)."
    )

    def __post_init__(self) -> None:
        validate(self)


# ----------------------------------------------------------------------------- validation


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise UserError(f"{key}: {value!r} is not allowed; choose one of {', '.join(allowed)}.")


def _at_least(key: str, value, minimum, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value < minimum:
        raise UserError(f"{key}: {value!r} is too small; it must be >= {minimum}.")


def _check_wandb_keys(c: Config) -> None:
    _at_least("wandb_init_timeout_s", c.wandb_init_timeout_s, 1)
    _at_least("wandb_finish_timeout_s", c.wandb_finish_timeout_s, 0)
    if c.wandb_required and c.report_to not in ("wandb", "all"):
        raise UserError(f"wandb_required: true means nothing with report_to: {c.report_to}; set "
                        "report_to: wandb (or all), or drop wandb_required.")


def validate(c: Config) -> None:
    for f in dataclasses.fields(c):  # also for configs built in code, not parsed
        value = getattr(c, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{f.name}: {value!r} is not a finite number.")
    _choice("species", c.species, SPECIES)
    _choice("augment", c.augment, AUGMENT_PRESETS)
    _choice("augment_on", c.augment_on, AUGMENT_ON)
    if c.augment_on == "device" and c.augment == "strong":
        raise UserError("augment_on: device has no batched RandAugment, which augment: strong needs; "
                        "use augment_on: cpu (or auto) for strong, or augment: standard on the device.")
    _choice("scheduler", c.scheduler, SCHEDULERS)
    if c.mixed_precision is not None:
        _choice("mixed_precision", c.mixed_precision, MIXED_PRECISION)
    _choice("report_to", c.report_to, REPORT_TO)
    _choice("class_weights", c.class_weights, CLASS_WEIGHTS)
    if not 0.0 <= c.val_fraction < 1.0:
        raise UserError(f"val_fraction: {c.val_fraction!r} must be in [0, 1), e.g. 0.1.")
    _check_data_keys(c)
    for key in ("epochs", "batch_size", "grad_accum_steps", "keep_checkpoints", "log_every",
                "collective_timeout_s",
                "synthetic_images_per_class"):
        _at_least(key, getattr(c, key), 1)
    _at_least("gradcam_images", c.gradcam_images, 0)
    for key in ("image_size", "synthetic_image_size", "pre_resize"):
        _at_least(key, getattr(c, key), 16, optional=True)
    for key in ("max_steps", "checkpoint_steps", "early_stopping_patience", "eval_batch_size"):
        _at_least(key, getattr(c, key), 1, optional=True)
    _at_least("num_workers", c.num_workers, 0, optional=True)
    for key in ("lr", "min_lr", "weight_decay", "warmup_epochs", "drop_path_rate",
                "label_smoothing", "mixup", "cutmix"):
        _at_least(key, getattr(c, key), 0)
    _at_least("clip_grad_norm", c.clip_grad_norm, 0, optional=True)
    if c.lr == 0:
        raise UserError("lr: 0 would not train; give a positive learning rate such as 1e-4.")
    if not 0.0 <= c.label_smoothing < 1.0:
        raise UserError(f"label_smoothing: {c.label_smoothing!r} must be in [0, 1).")
    _check_fine_tuning_keys(c)
    if (c.mixup > 0 or c.cutmix > 0) and c.batch_size % 2:
        raise UserError(f"batch_size: mixup/cutmix need an even batch size, not {c.batch_size}.")
    if c.scheduler == "plateau" and c.val_fraction == 0:
        raise UserError("scheduler: plateau follows the validation accuracy; set val_fraction > 0 "
                        "or use cosine.")
    if c.breeds is not None and not c.breeds:
        raise UserError("breeds: the list is empty; name at least one breed or leave it out.")
    if c.pretrained_path is not None and not Path(c.pretrained_path).is_file():
        raise UserError(f"pretrained_path: {c.pretrained_path} is not a file; give a weights file.")
    _check_hub_keys(c)
    _check_wandb_keys(c)
    if c.resume not in ("auto", "none", "overwrite") and not Path(c.resume).is_dir():
        raise UserError(f"resume: {c.resume} is not a checkpoint folder; use auto, none, overwrite "
                        "or a checkpoint path.")


def _check_fine_tuning_keys(c) -> None:
    """EMA, layer-wise lr decay and the head phase."""
    if c.ema_decay is not None and not 0.0 < c.ema_decay < 1.0:
        raise UserError(f"ema_decay: {c.ema_decay!r} must be in (0, 1), e.g. 0.999, or null.")
    if c.layer_decay is not None and not 0.0 < c.layer_decay <= 1.0:
        raise UserError(f"layer_decay: {c.layer_decay!r} must be in (0, 1], e.g. 0.8, or null.")
    if c.layer_decay_ratio is not None and not 0.0 < c.layer_decay_ratio <= 1.0:
        raise UserError(f"layer_decay_ratio: {c.layer_decay_ratio!r} must be in (0, 1], e.g. 1e-5, "
                        "or null.")
    _at_least("head_epochs", c.head_epochs, 0)
    if c.freeze_backbone and c.head_epochs:
        raise UserError("head_epochs: a head phase means nothing with freeze_backbone: true (the "
                        "backbone never trains); set head_epochs: 0 or freeze_backbone: false.")
    if c.head_epochs and c.head_epochs >= c.epochs:
        raise UserError(f"head_epochs: {c.head_epochs} leaves none of the {c.epochs} epochs to "
                        "fine-tune everything; use fewer, or freeze_backbone: true for a linear probe.")


def _check_data_keys(c) -> None:
    """The keys of the data source, for train.py and evaluate.py alike."""
    if not 0.0 <= getattr(c, "max_unreadable_fraction", 0.0) <= 1.0:
        raise UserError(f"max_unreadable_fraction: {c.max_unreadable_fraction!r} must be in [0, 1], "
                        "e.g. 0.01.")
    if c.data_format is not None:
        _choice("data_format", c.data_format, DATA_FORMATS)
    if c.test_fraction is not None and not 0.0 < c.test_fraction < 1.0:
        raise UserError(f"test_fraction: {c.test_fraction!r} must be in (0, 1), e.g. 0.2.")
    for key in ("max_train_samples", "max_eval_samples"):
        _at_least(key, getattr(c, key), 1, optional=True)
    if getattr(c, "classes", None) == []:  # evaluate.py: the model's classes, always
        raise UserError("classes: the list is empty; name at least two classes or leave it out.")


def _check_hub_keys(c) -> None:
    if c.push_to_hub and not c.hub_model_id:
        raise UserError("hub_model_id: push_to_hub needs the Hub repo to upload to; give "
                        "--hub_model_id user/name, or set push_to_hub: false.")


# ----------------------------------------------------------------------------- parsing

def _did_you_mean(key: str, fields) -> str:
    close = difflib.get_close_matches(key, list(fields), n=1)
    return f"; did you mean {close[0]!r}?" if close else "; see --help for the keys."


def _base_type(hint):
    """(type, optional) for hints such as `int | None` or `list[str] | None`."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in args if a is not type(None))
    return hint, optional


def _convert(key: str, value, from_cli: bool, hint):
    """Turn a YAML or CLI value into the field's type, or raise UserError naming the key."""
    hint, optional = _base_type(hint)
    if value is None or (from_cli and isinstance(value, str) and value.lower() in ("null", "none")
                         and optional):
        if optional:
            return None
        raise UserError(f"{key}: a value is required here.")
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value, 10)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):  # nan passes every >= check; inf trains on NaN losses
                raise UserError(f"{key}: {value!r} is not a finite number; give a value such as "
                                f"{_default(Config.__dataclass_fields__.get(key)) or 0.1}.")
            return number
        if hint is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if origin is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError
            return value
    except (TypeError, ValueError):
        pass
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    wanted = names.get(hint, "a comma-separated list of names")
    raise UserError(f"{key}: {value!r} is not {wanted}" + (" (or null)." if optional else "."))


def parse_cli(argv: list[str], cls=None) -> tuple[str | None, dict[str, str]]:
    """Split `-c FILE --key value --flag=value --flag --no-flag` into the file and the
    overrides. A boolean key alone means true, `--no-key` false; an unknown key is named as
    such before any missing value."""
    hints = typing.get_type_hints(cls or Config)
    config_file, overrides = None, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-c", "--config"):
            if i + 1 >= len(argv):
                raise UserError("config: missing value; write --config FILE (or -c FILE).")
            config_file, i = argv[i + 1], i + 2
            continue
        if not arg.startswith("--") or arg == "--":
            raise UserError(f"unexpected argument {arg!r}; options look like --key value.")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        negated = not eq and key.startswith("no_") and _base_type(hints.get(key[3:], str))[0] is bool
        if negated:
            key, value = key[3:], "false"
        elif key == "config":
            config_file = value
            i += 1
            continue
        elif key not in hints:
            raise UserError(f"unknown key {key!r}{_did_you_mean(key, hints)}")
        elif not eq and _base_type(hints[key])[0] is bool:
            # `--compile` alone is true; `--compile false` still works (and `--compile maybe`
            # is an error naming the key: positional arguments don't exist here)
            if i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                value, i = argv[i + 1], i + 1
            else:
                value = "true"
        elif not eq:
            if i + 1 >= len(argv) or (argv[i + 1].startswith("--") and not _is_number(argv[i + 1])):
                raise UserError(f"{key}: missing value; write --{key} VALUE.")
            value = argv[i + 1]
            i += 1
        i += 1
        overrides[key] = value
    return config_file, overrides


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


MAX_CONFIG_BYTES = 1 << 20  # every key of Config, commented, is a few KB


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, first_line: int, second_line: int):
        super().__init__(key)
        self.key, self.lines = key, (first_line, second_line)


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, except that a key given twice in one mapping is an error (PyYAML
    keeps the last one silently: a user who set lr twice trains with the one they forgot)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag in ("tag:yaml.org,2002:merge", "tag:yaml.org,2002:value"):
                    continue  # `<<: *defaults`: merged keys may be overridden, as YAML says
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                if isinstance(key, typing.Hashable):
                    if key in seen:
                        raise _DuplicateKey(key, seen[key], line)
                    seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config: {path} does not exist; give the path of a YAML file.")
    size = p.stat().st_size
    if size > MAX_CONFIG_BYTES:  # before reading it: a wrong file can be any size
        raise UserError(f"config: {path} is {size / 1e6:.1f} MB, not a config file (they hold a few KB "
                        f"of keys; the limit is {MAX_CONFIG_BYTES // 1024} KB); give the right file.")
    try:
        data = yaml.load(p.read_bytes(), Loader=_StrictLoader) or {}  # bytes: not text is a YAMLError
    except OSError as e:
        raise UserError(f"config: {path} can't be read ({e.strerror}); check its permissions.") from None
    except _DuplicateKey as e:
        first, second = e.lines
        raise UserError(f"config: {path} gives {e.key!r} twice (lines {first} and {second}); keep "
                        "the one you mean and delete the other.") from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise UserError(f"config: {path} is not valid YAML{where}; fix the file.") from None
    if not isinstance(data, dict):
        raise UserError(f"config: {path} must hold a mapping of keys to values.")
    return data


def build_config(values: dict, from_cli: dict | None = None, cls=Config):
    """Check keys and types of `values` (file) and `from_cli` (strings), then build `cls`."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for source, from_cli_flag in ((values, False), (from_cli or {}, True)):
        for key, value in source.items():
            if key not in hints:
                raise UserError(f"unknown key {key!r}{_did_you_mean(key, hints)}")
            kwargs[key] = _convert(key, value, from_cli_flag, hints[key])
    return cls(**kwargs)


def help_text(cls=Config) -> str:
    lines = ["Options (--key value; booleans also --key / --no-key; a YAML file with -c/--config "
             "FILE, the command line wins):"]
    for f in dataclasses.fields(cls):
        lines.append(f"  --{f.name:<26} {f.metadata.get('help', '')} [default: {_default(f)}]")
    return "\n".join(lines)


def _default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def load_config(argv: list[str], cls=Config):
    """The config from the command line: defaults < --config FILE < --key value."""
    if "-h" in argv or "--help" in argv:  # before parsing: --help answers whatever else is wrong
        print(help_text(cls))
        raise SystemExit(0)
    config_file, overrides = parse_cli(argv, cls)
    file_values = read_yaml(config_file) if config_file else {}
    return build_config(file_values, overrides, cls=cls)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def save_config(config, path: str | Path) -> None:
    from pet_pipeline.files import replaced

    with replaced(path) as handle:  # a full disk: one sentence, the old file intact
        handle.write(yaml.safe_dump(to_dict(config), sort_keys=False))


# ----------------------------------------------------------------------------- evaluate.py

SPLITS = ("test", "val", "train")
TTA = ("none", "flip")  # test-time augmentation of evaluate.py and predict.py
# Data keys evaluate.py takes from the training run's config.yaml unless given.
RUN_DATA_KEYS = ("data_format", "dataset", "data_dir", "dataset_revision", "image_column",
                 "label_column", "split_column", "val_fraction", "test_fraction", "seed", "strict_data",
                 "max_train_samples", "max_eval_samples", "synthetic_images_per_class",
                 "synthetic_image_size")


def check_model_dir(model_dir: str | Path) -> None:
    """A model folder is a run's model/ (config.json) or a checkpoint (train_state.json).
    Torch-free, so that evaluate.py answers a wrong path at once."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"model_dir: {model_dir} is not a folder; give a run's model/ folder or one "
                        "of its checkpoints/step_N folders.")
    if not ((model_dir / "config.json").is_file() or (model_dir / "train_state.json").is_file()):
        raise UserError(f"model_dir: {model_dir} has neither config.json nor train_state.json; give a "
                        "run's model/ folder or one of its checkpoints/step_N folders.")


@dataclass
class EvalConfig:
    model_dir: str | None = _field(
        None, "A run's model/ folder, or one of its checkpoints/step_N folders."
    )
    split: str = _field("test", "Which split to evaluate: test, val or train.")
    data_format: str | None = _field(None, "As in train.py (default: the training run's).")
    dataset: str | None = _field(None, "As in train.py (default: the training run's).")
    data_dir: str | None = _field(None, "As in train.py (default: the training run's).")
    dataset_revision: str | None = _field(None, "As in train.py (default: the training run's).")
    image_column: str | None = _field(None, "As in train.py (default: the training run's).")
    label_column: str | None = _field(None, "As in train.py (default: the training run's).")
    split_column: str | None = _field(None, "As in train.py (default: the training run's).")
    test_fraction: float | None = _field(None, "As in train.py (default: the training run's).")
    max_train_samples: int | None = _field(None, "As in train.py (default: the training run's).")
    max_eval_samples: int | None = _field(None, "As in train.py (default: the training run's).")
    species: str | None = _field(
        None, "As in train.py; default: exactly the model's classes. Must match the model."
    )
    breeds: list[str] | None = _field(None, "As in train.py; must match the model's classes.")
    val_fraction: float | None = _field(None, "As in train.py (default: the training run's).")
    seed: int | None = _field(None, "Seed of the val split (default: the training run's).")
    strict_data: bool | None = _field(None, "As in train.py.")
    synthetic_images_per_class: int | None = _field(None, "As in train.py.")
    synthetic_image_size: int | None = _field(None, "As in train.py.")
    batch_size: int = _field(64, "Images per device.")
    num_workers: int | None = _field(None, "DataLoader workers per process.")
    mixed_precision: str | None = _field(None, "no, fp16 or bf16 (default: the launcher's).")
    gradcam_images: int = _field(8, "Misclassified images shown with Grad-CAM maps (0 = none).")
    tta: str = _field(
        "none", "Test-time augmentation: none, or flip (the mean of the softmax of each image and of "
        "its mirror image; twice the compute)."
    )
    output_dir: str | None = _field(
        None, "Where the report goes (default: RUN/eval_SPLIT for model/, RUN/eval_SPLIT_step_N "
        "for a checkpoint)."
    )
    push_to_hub: bool = _field(
        False, "Upload the model with a model card (this evaluation's results) to hub_model_id."
    )
    hub_model_id: str | None = _field(None, "The Hub repo for push_to_hub: user/name or org/name.")
    hub_private: bool = _field(True, "Create the Hub repo private (a repo that exists keeps its visibility).")

    def __post_init__(self) -> None:
        if self.model_dir is None:
            raise UserError("model_dir: required; give a run's model/ folder, e.g. --model_dir runs/x/model.")
        _choice("split", self.split, SPLITS)
        if self.species is not None:
            _choice("species", self.species, SPECIES)
        if self.mixed_precision is not None:
            _choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("gradcam_images", self.gradcam_images, 0)
        _choice("tta", self.tta, TTA)
        _at_least("num_workers", self.num_workers, 0, optional=True)
        if self.val_fraction is not None and not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"val_fraction: {self.val_fraction!r} must be in [0, 1), e.g. 0.1.")
        _check_data_keys(self)
        _check_hub_keys(self)


# ----------------------------------------------------------------------------- predict.py

PREDICT_OUTPUTS = (".csv", ".json", ".jsonl")
_BOOLEAN_WORDS = ("true", "false", "1", "0", "yes", "no")


@dataclass
class PredictConfig:
    model_dir: str | None = _field(
        None, "A run's model/ folder or one of its checkpoints/step_N folders, local-dir:PATH (a "
        "folder in timm's format) or hf-hub:org/name (downloaded once, then from the cache)."
    )
    inputs: list[str] | None = _field(
        None, "The images: files, folders (searched recursively) or globs; usually given as PATH "
        "arguments."
    )
    output: str = _field(
        "predictions.csv", "Where the rows go: .csv, .json (a list of objects) or .jsonl (one object a line)."
    )
    top_k: int = _field(5, "Classes per image, most probable first (at most the model's class count).")
    batch_size: int = _field(64, "Images per device; lower it on out-of-memory.")
    num_workers: int | None = _field(
        None, "DataLoader workers per process (default: CPU cores per process minus one, at most 16)."
    )
    mixed_precision: str | None = _field(None, "no, fp16 or bf16 (default: the launcher's).")
    tta: str = _field(
        "none", "Test-time augmentation: none, or flip (the mean of the softmax of each image and of "
        "its mirror image; twice the compute)."
    )
    gradcam: str | None = _field(
        None, "A folder for one Grad-CAM overlay per readable image, of its top class, named "
        "ROW_NAME.png after its row."
    )

    def __post_init__(self) -> None:
        if self.model_dir is None:
            raise UserError("model_dir: required; give a run's model/ folder (e.g. --model_dir "
                            "runs/x/model), local-dir:PATH or hf-hub:org/name.")
        if not self.inputs:
            raise UserError("inputs: no images given; name image files, folders or globs after the "
                            "options, e.g. python predict.py --model_dir runs/x/model photos/.")
        _at_least("top_k", self.top_k, 1)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("num_workers", self.num_workers, 0, optional=True)
        if self.mixed_precision is not None:
            _choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _choice("tta", self.tta, TTA)
        suffix = Path(self.output).suffix.lower()
        if suffix not in PREDICT_OUTPUTS:
            raise UserError(f"output: {self.output} ends in {suffix or 'no extension'}; give a file "
                            "ending in .csv, .json or .jsonl.")


def _takes_value(option: str, rest: list[str], hints: dict) -> bool:
    """Whether `--key` (without =) takes the next argument as its value, as parse_cli reads it;
    a boolean key only takes a true/false word, so `--flag photo.jpg` leaves the photo a PATH."""
    key = option[2:].replace("-", "_")
    if not rest or key not in hints:
        return False  # parse_cli names an unknown key or a missing value itself
    if _base_type(hints[key])[0] is bool:
        return rest[0].lower() in _BOOLEAN_WORDS
    return not rest[0].startswith("--") or _is_number(rest[0])


def split_paths(argv: list[str], cls) -> tuple[list[str], list[str]]:
    """(the options, the PATH arguments) of `--model_dir m a.jpg photos/ --top_k 3`: an option's
    value follows it (or is given as --key=value); after `--` everything is a PATH."""
    hints = typing.get_type_hints(cls)
    options, paths = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            paths += argv[i + 1:]
            break
        if arg in ("-c", "--config") or (arg.startswith("--") and "=" not in arg
                                         and _takes_value(arg, argv[i + 1:], hints)):
            options += argv[i:i + 2]
            i += 2
            continue
        (options if arg.startswith("-") else paths).append(arg)
        i += 1
    return options, paths


def load_predict_config(argv: list[str]) -> PredictConfig:
    """predict.py's config: defaults < --config FILE < --key value, the PATH arguments as `inputs`."""
    if "-h" in argv or "--help" in argv:
        print("usage: python predict.py --model_dir MODEL PATH... [--output predictions.csv] [--key value]\n"
              "PATH: an image file, a folder (searched recursively) or a glob.\n"
              + help_text(PredictConfig))
        raise SystemExit(0)
    options, paths = split_paths(argv, PredictConfig)
    config_file, overrides = parse_cli(options, PredictConfig)
    values = read_yaml(config_file) if config_file else {}
    if paths:
        if "inputs" in overrides:
            raise UserError("inputs: give the images either as PATH arguments or with --inputs, not both.")
        overrides["inputs"] = paths  # the command line wins over a file's inputs, as for any key
    return build_config(values, overrides, cls=PredictConfig)
