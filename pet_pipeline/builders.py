"""The parts of a run, built from the config: the Accelerator, the data and its loaders, the
model with everything that updates it, and the start line that describes them. Trainer
(pet_pipeline/trainer.py) calls these once, in this order.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, InitProcessGroupKwargs

from pet_pipeline.config import Config
from pet_pipeline.errors import UserError
from pet_pipeline.tracking import trackers_for


def build_accelerator(config: Config, project_dir) -> Accelerator:
    return Accelerator(
        # a frozen rank ends the job after this long in a collective (gloo raises, NCCL aborts)
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(seconds=config.collective_timeout_s)),
            # the head phase leaves the backbone without gradients: DDP must not wait for them
            # (auto_scale chooses head_epochs after this, from the data: assume a head phase)
            DistributedDataParallelKwargs(find_unused_parameters=config.head_epochs > 0 or config.auto_scale),
        ],
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.grad_accum_steps,
        log_with=trackers_for(config.report_to) or None,
        project_dir=str(project_dir),
        # our schedule counts optimizer steps itself, whatever the number of processes
        step_scheduler_with_optimizer=False,
        dynamo_backend="inductor" if config.compile else "no",
        # batches from pinned memory are copied to the GPU without the host waiting for it
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
    )


def check_launch(accelerator) -> None:
    """Stop at once when the launcher's processes did not become one job: a multi-GPU launch
    config on a machine without CUDA starts N lone single-process runs on one output_dir."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise UserError(
            f"launch: {launched} processes were started but Accelerate joined "
            f"{accelerator.num_processes} (no CUDA GPU for a multi-GPU launch?); on CPUs run "
            f"`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node {launched} train.py ...`, or "
            "`python train.py ...` for one process.")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if accelerator.device.type == "cuda" and local > torch.cuda.device_count():
        raise UserError(f"launch: {local} processes on this node but {torch.cuda.device_count()} "
                        f"GPU(s); launch with --num_processes {torch.cuda.device_count()} (per node).")


# ----------------------------------------------------------------------------- data


def load_data(config: Config, accelerator, val_rule=None):
    """The images as datasets.Dataset splits, checked; `pre_resize` caches them resized once.
    `val_rule` (auto_scale: pet_pipeline/recipe.ValidationRule) takes val_fraction's place and
    chooses it once the data knows how many training images there are."""
    from pet_pipeline.data import load_data, pre_resize

    # one process per node first: the synthetic folder and the Hub download are made once
    with accelerator.local_main_process_first():
        # a resumed run leaves out what its first start left out, without checking the files
        # again: the same rows, so the same data order and stand-ins (pet_pipeline/unreadable.py)
        keys = {**data_keys(config), **({"val_fraction": val_rule} if val_rule is not None else {})}
        pets = load_data(**keys, verdicts=first_verdicts(config))
    if pets.val is None and (config.scheduler == "plateau" or config.early_stopping_patience):
        why = pets.notes + ([f"auto_scale: {val_rule.choice.reason}"] if val_rule and val_rule.choice else [])
        raise UserError(f"val_fraction: the data is too small for a validation split "
                        f"({'; '.join(why)}), which scheduler: plateau and early stopping "
                        "need; use scheduler: cosine and no early_stopping_patience, or more images.")
    if config.pre_resize is not None and augment_on(config, accelerator) == "cpu":  # device: the pixel cache
        with accelerator.local_main_process_first():  # one process writes the cache, others read it
            for name in ("train", "val", "test"):
                if getattr(pets, name) is not None:
                    setattr(pets, name, pre_resize(getattr(pets, name), short_side=config.pre_resize,
                                                   num_proc=max(1, loader_workers(config, accelerator))))
    return pets


def first_verdicts(config):
    """The images the run this start resumes left out at its first start (sources.Verdicts)."""
    from pet_pipeline.checkpoint import list_checkpoints, read_train_state
    from pet_pipeline.sources import FRESH, Verdicts

    if config.resume == "auto":
        checkpoints = list_checkpoints(config.output_dir)
        checkpoint = checkpoints[-1] if checkpoints else None
    else:
        checkpoint = None if config.resume in ("none", "overwrite") else config.resume
    try:
        left_out = read_train_state(checkpoint).get("left_out") if checkpoint else None
    except (OSError, ValueError):  # a damaged checkpoint: the start decides about it, not this
        left_out = None
    return FRESH if left_out is None else Verdicts(frozenset(left_out))


def data_keys(config) -> dict:
    """The config's keys that say which images, in which splits: data.load_data's arguments."""
    import inspect

    from pet_pipeline.data import load_data

    return {key: getattr(config, key) for key in inspect.signature(load_data).parameters
            if hasattr(config, key)}


def loader_workers(config: Config, accelerator) -> int:
    from pet_pipeline.loader import default_num_workers

    processes_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    return config.num_workers if config.num_workers is not None else default_num_workers(processes_per_node)


def build_data(config: Config, accelerator, data_config: dict, argv: list[str] | None = None):
    """The splits and their loaders: each image decoded and augmented (crop, flip) in a loader
    worker from a seed of (seed, epoch, index), so any worker count gives the same batches;
    prepared by the accelerator (each process its share).

    With auto_scale, the keys pet_pipeline/recipe.py chooses from the data's size are set on
    `config`, in place, before the loaders use batch_size. `argv`, the command line, says which
    keys the user gave, which it never changes (None: the keys off their defaults)."""
    from pet_pipeline.loader import PetTorchDataset, build_dataloader
    from pet_pipeline.recipe import ValidationRule, given_keys
    from pet_pipeline.trainer import RunData
    from pet_pipeline.transforms import build_eval_transform, build_train_transform, decode_size

    given = given_keys(argv, config) if config.auto_scale else None
    val_rule = ValidationRule() if given is not None and "val_fraction" not in given else None
    pets = load_data(config, accelerator, val_rule)
    if given is not None:
        scale_to_data(config, given, pets=pets, val_rule=val_rule, processes=accelerator.num_processes)
    num_workers = loader_workers(config, accelerator)
    common = dict(seed=config.seed, num_workers=num_workers, pin_memory=accelerator.device.type == "cuda")
    if augment_on(config, accelerator) == "device":
        return _device_data(config, accelerator, data_config, pets=pets, common=common)
    if config.augment_on == "auto" and accelerator.device.type == "cuda":  # strong: say why not
        pets.notes.append("augment_on: auto chose cpu: augment: strong's RandAugment runs in PIL")
    train_set = PetTorchDataset(pets.train, build_train_transform(data_config, config.augment),
                                seed=config.seed, min_side=decode_size(data_config, config.augment),
                                stand_in=True)  # an image damaged mid-run: pet_pipeline/unreadable.py
    mixing = config.mixup > 0 or config.cutmix > 0
    loaders = {"train": build_dataloader(train_set, batch_size=config.batch_size, train=True,
                                         drop_last=mixing and len(train_set) >= config.batch_size, **common)}
    eval_transform, eval_side = build_eval_transform(data_config), decode_size(data_config, None)
    for name in ("val", "test"):
        split = getattr(pets, name)
        loaders[name] = None if split is None else build_dataloader(
            PetTorchDataset(split, eval_transform, min_side=eval_side), train=False,
            batch_size=config.eval_batch_size or 2 * config.batch_size, **common)
    prepared = {name: accelerator.prepare(loader) if loader is not None else None
                for name, loader in loaders.items()}
    return RunData(pets=pets, num_workers=num_workers, data_config=data_config, **prepared)


def augment_on(config: Config, accelerator) -> str:
    """`augment_on` resolved: auto is device on a GPU unless augment is strong (RandAugment
    runs in PIL), else cpu, where the model's own arithmetic competes for the same cores."""
    if config.augment_on != "auto":
        return config.augment_on
    return "device" if accelerator.device.type == "cuda" and config.augment != "strong" else "cpu"


def _device_data(config: Config, accelerator, data_config: dict, *, pets, common: dict):
    """augment_on: device: each split decoded once into the pixel cache (one process per node
    builds it, the others map the same files); loaders of uint8 regions; the eval loaders
    resample on the device (pet_pipeline/device_augment.py)."""
    from pet_pipeline.device_augment import CachedImages, DeviceAugment, DeviceBatches, collate_regions
    from pet_pipeline.loader import build_dataloader
    from pet_pipeline.pixel_cache import open_or_build
    from pet_pipeline.synthetic import cache_root
    from pet_pipeline.trainer import RunData
    from pet_pipeline.transforms import decode_size

    short_side = config.pre_resize or decode_size(data_config, None)  # at least the eval resize
    splits = {name: getattr(pets, name) for name in ("train", "val", "test")
              if getattr(pets, name) is not None}
    with accelerator.local_main_process_first():
        built = {name: open_or_build(split, short_side=short_side, root=cache_root(),
                                     num_proc=max(1, common["num_workers"]),
                                     progress=accelerator.is_local_main_process)
                 for name, split in splits.items()}
    caches = "; ".join(f"{name} {'built' if was_built else 'reused'}: {cache.describe()}"
                       for name, (cache, was_built) in built.items())
    pets.notes.append(f"augment_on: device: crops resampled on the device from the pixel cache; {caches}")
    mixing = config.mixup > 0 or config.cutmix > 0
    train_set = CachedImages(pets.train, built["train"][0], data_config=data_config, augment=config.augment,
                             train=True, seed=config.seed, stand_in=True)
    loaders = {"train": build_dataloader(train_set, batch_size=config.batch_size, train=True,
                                         collate_fn=collate_regions,
                                         drop_last=mixing and len(train_set) >= config.batch_size, **common)}
    for name in ("val", "test"):
        loaders[name] = None if name not in splits else build_dataloader(
            CachedImages(splits[name], built[name][0], data_config=data_config, augment=config.augment,
                         train=False), train=False, collate_fn=collate_regions,
            batch_size=config.eval_batch_size or 2 * config.batch_size, **common)
    prepared = {name: accelerator.prepare(loader) if loader is not None else None
                for name, loader in loaders.items()}
    resample = DeviceAugment(data_config, accelerator.device)
    for name in ("val", "test"):
        if prepared[name] is not None:
            prepared[name] = DeviceBatches(prepared[name], resample)
    return RunData(pets=pets, num_workers=common["num_workers"], data_config=data_config,
                   augment_on="device", **prepared)


def scale_to_data(config: Config, given: frozenset[str], *, pets, val_rule, processes: int) -> None:
    """auto_scale once the splits are made: the batch and the schedule for the training images
    (pet_pipeline/recipe.py), set on `config`; the start line notes what was chosen and why."""
    from pet_pipeline.recipe import apply_plan, given_validation, plan_schedule

    if val_rule is not None and val_rule.choice is not None:
        validation = val_rule.choice
    else:  # val_fraction given, or (the rule never asked) the data's own validation split
        validation = given_validation(len(pets.val) if pets.val is not None else 0, config.val_fraction,
                                      own=val_rule is not None)
    plan = plan_schedule(config, given, train_images=len(pets.train), processes=processes,
                         validation=validation)
    apply_plan(config, plan)
    pets.notes.append(plan.summary())


# ----------------------------------------------------------------------------- model


def build_learner(config: Config, accelerator, data, *, resuming: bool):
    """Model, optimizer, schedule, loss, EMA, mixup and the device half of the transform;
    model and optimizer prepared by the accelerator."""
    from pet_pipeline.model import build_model
    from pet_pipeline.optim import build_optimizer, set_backbone_trainable
    from pet_pipeline.trainer import Learner

    # resuming: the checkpoint replaces every weight, so the pretrained ones need not be at hand
    model = build_model(config.model, num_classes=len(data.class_names),
                        pretrained=config.pretrained and not resuming,
                        pretrained_path=None if resuming else config.pretrained_path,
                        drop_path_rate=config.drop_path_rate, image_size=config.image_size)
    if config.sync_bn and accelerator.num_processes > 1:
        from timm.layers import convert_sync_batchnorm  # handles timm's BatchNormAct2d

        model = convert_sync_batchnorm(model)
    channels_last = config.channels_last and accelerator.device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.freeze_backbone:  # before the optimizer and DDP: both see only the classifier
        set_backbone_trainable(model, False)
    optimizer = build_optimizer(model, lr=config.lr, weight_decay=config.weight_decay,
                                layer_decay=config.layer_decay, layer_decay_ratio=config.layer_decay_ratio)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)  # what is saved, averaged
    updates = _updates(config, accelerator, data, optimizer=optimizer, raw_model=raw_model)
    return Learner(model=model, raw_model=raw_model, optimizer=optimizer, channels_last=channels_last,
                   eval_model=updates["ema"].module if updates["ema"] is not None else model, **updates)


def _updates(config: Config, accelerator, data, *, optimizer, raw_model) -> dict:
    """The Learner's schedule, EMA, loss, mixup and device transform."""
    from timm.data import Mixup

    from pet_pipeline.device_augment import DeviceAugment
    from pet_pipeline.optim import balanced_class_weights, build_ema, build_loss, build_scheduler
    from pet_pipeline.schedule import Schedule
    from pet_pipeline.transforms import DeviceTransform

    schedule = Schedule.from_config(config, batches_per_epoch=len(data.train), validates=data.val is not None)
    num_classes = len(data.class_names)
    class_weights = (balanced_class_weights(data.pets.train["label"][:], num_classes).to(accelerator.device)
                     if config.class_weights == "balanced" else None)
    mixing = config.mixup > 0 or config.cutmix > 0
    ema = build_ema(raw_model, decay=config.ema_decay)  # warms up: sound for 30 steps or 30,000
    return dict(
        scheduler=build_scheduler(optimizer, name=config.scheduler, total_steps=schedule.total_steps,
                                  warmup_steps=schedule.warmup_steps, min_lr=config.min_lr,
                                  steps_per_epoch=schedule.steps_per_epoch),
        ema=ema,
        loss_fn=build_loss(label_smoothing=config.label_smoothing, class_weights=class_weights,
                           mixing=mixing),
        mixup=(Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                     label_smoothing=config.label_smoothing, num_classes=num_classes)
               if mixing else None),
        # on the whole batch: normalisation, and colour jitter and random erasing for strong
        # (augment_on: device: the crop, resize, flip and normalisation)
        device_transform=(DeviceAugment(data.data_config, accelerator.device)
                          if data.augment_on == "device" else
                          DeviceTransform(data.data_config, config.augment, accelerator.device)),
    )


# ----------------------------------------------------------------------------- the start line


def start_summary(trainer) -> str:
    """What this start is: processes, data, batch, model and outputs, a line each."""
    config, accelerator, state, data = trainer.config, trainer.accelerator, trainer.state, trainer.data
    pets, class_names, plan = data.pets, data.class_names, trainer.plan
    effective_batch = config.batch_size * config.grad_accum_steps * accelerator.num_processes
    lines = [
        f"pet-pipeline: {accelerator.num_processes} process(es) on {accelerator.device.type}"
        f" ({accelerator.distributed_type.value}), precision {accelerator.mixed_precision},"
        f" {data.num_workers} loader worker(s) per process",
        f"data: {pets.source}",
        f"  train {len(pets.train)} / val {len(pets.val) if pets.val else 0} / test"
        f" {len(pets.test)} images, {len(class_names)} classes ({', '.join(class_names[:3])}"
        f"{', ...' if len(class_names) > 3 else ''}); {len(pets.skipped)} bad input(s) left out"
        f" ({pets.duplicates} duplicate(s) kept once,"
        f" {pets.leaks} train/test leak(s) dropped from training)",
        f"batch: {config.batch_size} per device x {config.grad_accum_steps} accumulation x"
        f" {accelerator.num_processes} process(es) = {effective_batch} images per optimizer step;"
        f" {trainer.schedule.steps_per_epoch} steps per epoch, {trainer.schedule.total_steps} in all",
        f"model: {config.model} ({'pretrained' if config.pretrained else 'from scratch'}),"
        f" input {state.data_config['input_size'][-1]} px"
        + (", classifier only (frozen backbone)" if config.freeze_backbone else "")
        + (f", classifier only for {config.head_epochs} epoch(s), then everything"
           if config.head_epochs else "")
        + layer_decay_words(config, trainer.learner.raw_model)
        + (", batch-norm statistics frozen" if config.freeze_bn_stats else ""),
        f"outputs: {config.output_dir}" + (
            f" ({'resuming' if plan.action == 'resume' else 're-evaluating'} from "
            f"{os.path.basename(plan.checkpoint)}, step {state.global_step})" if plan.checkpoint else ""),
    ]
    lines += [f"  left out: {problem}" for problem in pets.skipped[:20]]
    lines += [f"  note: {note}" for note in pets.notes]
    return "\n".join(lines)


def layer_decay_words(config: Config, model) -> str:
    """The start line's layer-wise lr decay: per group, over how many groups, the stem's share."""
    from pet_pipeline.optim import layer_decay_depth, layer_decay_for_ratio

    if config.layer_decay is None and config.layer_decay_ratio is None:
        return ""
    depth = layer_decay_depth(model)
    if config.layer_decay is not None:
        decay, source = config.layer_decay, "layer_decay" + (
            ", which wins over layer_decay_ratio" if config.layer_decay_ratio is not None else "")
    else:
        decay, source = layer_decay_for_ratio(config.layer_decay_ratio, depth), "layer_decay_ratio"
    if decay is None:
        return f", no layer-wise lr decay ({config.model} has one layer group)"
    return (f", layer-wise lr decay {decay:.3g} a group over the {depth} groups below the classifier"
            f" (the stem at {decay ** depth:.2g} x lr; {source})")
