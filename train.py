"""Fine-tune a timm CoAtNet on Oxford-IIIT Pet (by default the 12 cat breeds) with Accelerate.

The same script at every scale:

    # laptop CPU, no downloads (generated data), a few minutes:
    python train.py --config configs/quickstart.yaml
    # one GPU:
    python train.py --config configs/gpu.yaml
    # 8 GPUs of one node (bf16, one process per GPU; --num_processes N for another count):
    accelerate launch --config_file accelerate_config.yaml train.py --config configs/gpu.yaml
    # two CPU processes over gloo (what the tests do):
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 train.py --config configs/quickstart.yaml
    # SLURM, one node with all its GPUs:
    sbatch slurm/train.sbatch --config configs/gpu.yaml

Any key can be overridden on the command line (`--lr 3e-4 --batch_size 64`); `--help` lists
them. Started again, the same command continues a stopped run from its newest valid
checkpoint, or re-evaluates a finished one (resume: auto); what a start in a used output_dir
does is decided by pet_pipeline/rundir.py.
"""

from __future__ import annotations

import os
import sys
import warnings

from pet_pipeline.config import Config, load_config
from pet_pipeline.errors import PREEMPTED_EXIT_CODE, StoppedBeforeTraining, UserError, exit_with


def train(config: Config, argv: list[str]) -> int:
    # torch, timm and the rest are imported here rather than at the top, so that `--help`
    # and a mistyped key or value answer in a fraction of a second instead of after ~8 s.
    from datetime import timedelta

    import torch
    from accelerate import Accelerator
    from accelerate.utils import (
        DataLoaderConfiguration,
        DistributedDataParallelKwargs,
        InitProcessGroupKwargs,
        set_seed,
    )

    from pet_pipeline.checkpoint import Checkpointer, TrainState, load_checkpoint
    from pet_pipeline.config import to_dict
    from pet_pipeline.data import split_fingerprint
    from pet_pipeline.optim import freeze_batch_norm_statistics, set_backbone_trainable, trains_backbone
    from pet_pipeline.preemption import StopFlag, StopRequested
    from pet_pipeline.rundir import RunDirectory
    from pet_pipeline.tracking import (
        PhaseClock,
        RunLog,
        RunningLoss,
        init_trackers,
        trackers_for,
        wandb_sync_hint,
    )

    clock = PhaseClock()  # where the wall time goes, logged and printed at the end
    # ------------------------------------------------------------------ checks before heavy work
    data_config, class_names = check_before_heavy_work(config)
    run_dir = RunDirectory(config.output_dir)
    if int(os.environ.get("RANK", "0")) == 0:  # one lock per job, held by the global main process
        run_dir.lock()
    stop = StopFlag()  # SIGTERM / SIGUSR1 -> checkpoint and exit at the next step

    # ------------------------------------------------------------------ accelerator and the start
    # DDP warns "Grad strides do not match bucket view strides" at the first backward of every
    # multi-process run, from each rank. The grads it names (1x1 and depthwise conv weights,
    # e.g. [512, 2048, 1, 1] with strides [2048, 1, 2048, 2048] against the bucket's
    # [2048, 1, 1, 1]) differ from the parameter only in the strides of size-1 dimensions: the
    # same memory layout, so no copy is lost to it (the reducer copies every grad into its
    # bucket in any case). Neither a contiguous input nor gradient_as_bucket_view removes it.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    accelerator = Accelerator(
        # a frozen rank ends the job after this long in a collective (gloo raises, NCCL aborts)
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(seconds=config.collective_timeout_s)),
            # the head phase leaves the backbone without gradients: DDP must not wait for them
            DistributedDataParallelKwargs(find_unused_parameters=config.head_epochs > 0),
        ],
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.grad_accum_steps,
        log_with=trackers_for(config.report_to) or None,
        project_dir=str(run_dir.path),
        # our schedule counts optimizer steps itself, whatever the number of processes
        step_scheduler_with_optimizer=False,
        dynamo_backend="inductor" if config.compile else "no",
        # batches from pinned memory are copied to the GPU without the host waiting for it
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
    )
    check_launch(accelerator)  # every process of the launch joined this one job
    set_seed(config.seed)  # before the model: the seed also fixes the new head's weights

    # ------------------------------------------------------------------ data
    pets, loaders = build_data(config, accelerator, data_config)
    split_id = split_fingerprint(pets)  # a resumed run must train and select on the same images

    # ------------------------------------------------------------------ the start
    # after every check that can refuse it: the start may move a discarded lineage aside
    plan = decide_start(accelerator, run_dir, config, argv, split=split_id)  # new, resume or re-evaluate
    run_log = RunLog(accelerator, run_dir.path / "metrics.jsonl", resume_step=plan.step,
                     before_validation=plan.before_validation, clock=clock)
    if run_dir.took_over:
        run_log.print(f"took over the lock of process {run_dir.took_over.get('pid')} on "
                      f"{run_dir.took_over.get('host')}, which is no longer running")
    for message in plan.messages:
        run_log.print(message)

    # ------------------------------------------------------------------ model, optimizer, schedule
    parts = build_training(config, accelerator, loaders, data_config, resuming=bool(plan.checkpoint),
                           train_labels=pets.train["label"][:], num_classes=len(class_names))
    model, optimizer, scheduler, ema = parts.model, parts.optimizer, parts.scheduler, parts.ema
    train_loader = loaders.train

    # ------------------------------------------------------------------ resume
    state = TrainState(model=config.model, class_names=class_names, data_config=data_config,
                       split=split_id)
    checkpointer = Checkpointer(accelerator, run_dir.path, ema=ema, keep=config.keep_checkpoints)
    if plan.checkpoint:
        # plan.validated: the checkpoint's last validation was made since, only the report is left
        state = load_checkpoint(accelerator, plan.checkpoint, ema=ema, state=plan.validated,
                                forget_best_accuracy=plan.forget_best_accuracy)
        checkpointer.mark_saved(state)
        if state.scheduler is not None:
            scheduler.lr_scheduler.load_state_dict(state.scheduler)
        scheduler.step_update(state.global_step)
    state.config, state.num_processes, state.ema = to_dict(config), accelerator.num_processes, bool(ema)
    init_trackers(accelerator, report_to=config.report_to, project=config.wandb_project,
                  run_name=config.run_name or run_dir.path.name, run_id=state.wandb_run_id,
                  output_dir=str(run_dir.path), config=to_dict(config))
    run_log.print(start_summary(config, accelerator, pets, loaders, parts, plan, state))

    # ------------------------------------------------------------------ the epoch loop
    running_loss = RunningLoss(accelerator.device)
    progress = run_log.start_progress(parts.total_steps, state.global_step)
    run_log.clock.seconds["setup"] = run_log.clock.elapsed()  # everything before step 1
    exit_code = 0
    stop.arm(every=config.log_every)  # before this, a signal ended the process at once (nothing to save)
    try:
        while not state.finished(epochs=config.epochs, max_steps=config.max_steps):
            train_loader.set_epoch(state.epoch)
            batches = train_loader
            if state.validation_due and state.trained(epochs=config.epochs, max_steps=config.max_steps):
                batches = []  # saved before its last validation (a stop during it): that comes next
            elif state.step_in_epoch:  # resuming mid-epoch: same order, skip what was done
                batches = accelerator.skip_first_batches(train_loader, state.step_in_epoch)
                batches.set_epoch(state.epoch)
            # LP-FT: in the head phase the backbone is frozen and in eval mode (its batch-norm
            # statistics and drop path as pretrained), a linear probe on fixed features
            full_model = trains_backbone(state.epoch, head_epochs=config.head_epochs,
                                         freeze_backbone=config.freeze_backbone)
            set_backbone_trainable(parts.raw_model, full_model)
            model.train(full_model)
            if config.freeze_bn_stats:  # small batches: keep the pretrained normalisation
                freeze_batch_norm_statistics(model)
            for batch in batches:
                images, targets = parts.device_transform(batch), batch["label"]  # uint8 -> float
                if parts.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                if parts.mixup is not None:
                    images, targets = parts.mixup(images, targets)
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        loss = parts.loss_fn(model(images), targets)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.clip_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                state.step_in_epoch += 1
                running_loss.add(loss)  # stays on the device: no sync here
                run_log.count_images(images.shape[0] * accelerator.num_processes)
                if not accelerator.sync_gradients:
                    continue
                state.global_step += 1
                scheduler.step_update(state.global_step)
                if ema is not None:
                    ema.update(parts.raw_model, step=state.global_step)
                progress.update()
                if state.global_step % config.log_every == 0:
                    running_loss.move_into(state, accelerator)  # a host-device sync point
                    record = {"step": state.global_step, "epoch": state.epoch,
                              "train_loss": state.loss_sum / max(1, state.loss_count),
                              "lr": max(group["lr"] for group in optimizer.param_groups),  # the head's
                              "images_per_s": run_log.images_per_s(),
                              "time/elapsed_s": round(run_log.clock.elapsed(), 3)}
                    run_log.log(record)
                    progress.show(record)
                    state.loss_sum, state.loss_count = 0.0, 0
                if config.max_steps is not None and state.global_step >= config.max_steps:
                    break
                if config.checkpoint_steps and state.global_step % config.checkpoint_steps == 0:
                    save_checkpoint(checkpointer, state, running_loss, scheduler, run_log)
                stop.check(accelerator, state.global_step)  # StopRequested, on every rank
            running_loss.move_into(state, accelerator)  # a non-finite loss stops here, not in model/
            ended = state.step_in_epoch >= len(train_loader)  # else max_steps cut the epoch short
            if loaders.val is not None:
                if not ended and not state.validation_due:
                    # checkpointed before its validation, which a larger max_steps must not count
                    # (the epoch is validated at its end) and a stop during it must not lose
                    state.validation_due_at = state.global_step
                    save_checkpoint(checkpointer, state, running_loss, scheduler, run_log)
                validate_and_select(config, accelerator, parts, loaders.val, state, run_log,
                                    stop=stop, class_names=class_names, data_config=data_config)
                if not ended:  # beside the checkpoint taken before it: the same limits are done
                    checkpointer.record_validation(state)
            run_log.write_summary()  # summary.csv: a row per epoch, beside metrics.jsonl
            if ended:
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
            if ended or loaders.val is None:  # (a cut-short epoch was saved before its validation)
                save_checkpoint(checkpointer, state, running_loss, scheduler, run_log)
        final_report(config, accelerator, parts, loaders, pets, state, run_log, stop=stop,
                     class_names=class_names, data_config=data_config)
    except (FloatingPointError, RuntimeError) as error:  # a loss that blew up, a frozen rank
        raise explain_failure(error, config, accelerator, checkpointer) from None
    except StopRequested as request:
        exit_code = save_on_stop(request, config, accelerator, checkpointer, state, running_loss,
                                 scheduler, run_log)
    finally:
        progress.close()  # before any message of an error that ends the run
    run_log.log_timing(state.global_step)
    hint = wandb_sync_hint(accelerator) if accelerator.is_main_process else None
    accelerator.end_training()
    if hint and exit_code == 0:
        run_log.print(f"W&B ran offline; upload with: {hint}")
    if config.push_to_hub and exit_code == 0 and accelerator.is_main_process:
        push_model_dir(config, run_dir.path, step=state.global_step, run_log=run_log)
    return exit_code


# ---------------------------------------------------------------------------- the steps of train()


def check_before_heavy_work(config: Config) -> tuple[dict, list[str]]:
    """Mistakes found from the config alone, before the accelerator or any data; returns the
    model's data config and the class names."""
    import torch

    from pet_pipeline.breeds import kept_breeds
    from pet_pipeline.checkpoint import list_checkpoints
    from pet_pipeline.data import find_pet_root
    from pet_pipeline.model import check_weights_available
    from pet_pipeline.tracking import choose_wandb_mode, trackers_for
    from pet_pipeline.transforms import decode_size, model_data_config

    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("mixed_precision: fp16 needs a GPU; use bf16 or no on a CPU.")
    data_config = model_data_config(config.model, config.image_size)  # also checks the name
    class_names = kept_breeds(config.species, config.breeds)
    if config.data_dir is not None:
        find_pet_root(config.data_dir)  # the official layout is there
    resuming = config.resume not in ("none", "overwrite") and (
        config.resume != "auto" or list_checkpoints(config.output_dir))
    if not resuming:  # a resumed run's weights come from its checkpoint
        check_weights_available(config.model, pretrained=config.pretrained,
                                pretrained_path=config.pretrained_path)
    eval_side = decode_size(data_config, None)  # the short side the eval transform resizes to
    if config.pre_resize is not None and config.pre_resize < eval_side:
        raise UserError(f"pre_resize: {config.pre_resize} px is below the {eval_side} px that "
                        f"evaluation resizes to; use at least {eval_side}, or null.")
    if "wandb" in trackers_for(config.report_to):
        choose_wandb_mode()  # offline without credentials
    if config.push_to_hub:  # a token and the Hub now, not at the upload after the whole run
        from pet_pipeline.hub import check_hub_access

        check_hub_access(config.hub_model_id, ask_the_hub=int(os.environ.get("RANK", "0")) == 0)
    return data_config, class_names


def check_launch(accelerator) -> None:
    """Stop at once when the launcher's processes did not become one job: a multi-GPU launch
    config on a machine without CUDA starts N lone single-process runs on one output_dir."""
    import torch

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


def decide_start(accelerator, run_dir, config: Config, argv: list[str], *, split: str):
    """The main process decides what this start means (it holds the lock and may move
    files); every rank gets the same StartPlan, or the same UserError. `split`: the train/val
    fingerprint of the loaded data, which a resumed checkpoint must have been trained on."""
    from accelerate.utils import broadcast_object_list

    outcome = [None]
    if accelerator.is_main_process:
        try:
            outcome[0] = run_dir.begin(config, num_processes=accelerator.num_processes, argv=argv,
                                       split=split)
        except UserError as error:
            outcome[0] = error
    broadcast_object_list(outcome)  # nothing to do with one process
    if isinstance(outcome[0], UserError):
        raise outcome[0]
    return outcome[0]


def build_data(config: Config, accelerator, data_config: dict):
    """The pets as datasets.Dataset splits, and their loaders (not yet prepared)."""
    from types import SimpleNamespace

    from pet_pipeline.data import load_pets, pre_resize
    from pet_pipeline.loader import PetTorchDataset, build_dataloader, default_num_workers
    from pet_pipeline.transforms import build_eval_transform, build_train_transform, decode_size

    # one process per node first: the synthetic folder and the Hub download are made once
    with accelerator.local_main_process_first():
        pets = load_pets(
            dataset=config.dataset, data_dir=config.data_dir, species=config.species,
            breeds=config.breeds, val_fraction=config.val_fraction, seed=config.seed,
            strict_data=config.strict_data,
            synthetic_images_per_class=config.synthetic_images_per_class,
            synthetic_image_size=config.synthetic_image_size,
        )
    if pets.val is None and (config.scheduler == "plateau" or config.early_stopping_patience):
        raise UserError(f"val_fraction: the data is too small for a validation split "
                        f"({'; '.join(pets.notes)}), which scheduler: plateau and early stopping "
                        "need; use scheduler: cosine and no early_stopping_patience, or more images.")
    processes_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    num_workers = (config.num_workers if config.num_workers is not None
                   else default_num_workers(processes_per_node))
    if config.pre_resize is not None:
        with accelerator.local_main_process_first():  # one process writes the cache, others read it
            for name in ("train", "val", "test"):
                if getattr(pets, name) is not None:
                    setattr(pets, name, pre_resize(getattr(pets, name), short_side=config.pre_resize,
                                                   num_proc=max(1, num_workers)))
    eval_side = decode_size(data_config, None)
    eval_transform = build_eval_transform(data_config)
    train_set = PetTorchDataset(pets.train, build_train_transform(data_config, config.augment),
                                seed=config.seed, min_side=decode_size(data_config, config.augment))
    val_set = PetTorchDataset(pets.val, eval_transform, min_side=eval_side) if pets.val else None
    test_set = PetTorchDataset(pets.test, eval_transform, min_side=eval_side)
    mixing = config.mixup > 0 or config.cutmix > 0
    common = dict(seed=config.seed, num_workers=num_workers, pin_memory=accelerator.device.type == "cuda")
    eval_batch_size = config.eval_batch_size or 2 * config.batch_size
    loaders = SimpleNamespace(
        train=build_dataloader(train_set, batch_size=config.batch_size, train=True,
                               drop_last=mixing and len(train_set) >= config.batch_size, **common),
        val=build_dataloader(val_set, batch_size=eval_batch_size, train=False, **common) if val_set else None,
        test=build_dataloader(test_set, batch_size=eval_batch_size, train=False, **common),
        num_workers=num_workers,
    )
    return pets, loaders


def build_training(config: Config, accelerator, loaders, data_config: dict, *, resuming: bool,
                   train_labels, num_classes: int):
    """Model, optimizer, schedule, loss, EMA, mixup and the device half of the transform;
    prepares model, optimizer and loaders (in place in `loaders`) with the accelerator."""
    import math
    from types import SimpleNamespace

    import torch
    from timm.data import Mixup

    from pet_pipeline.model import build_model
    from pet_pipeline.optim import (
        balanced_class_weights,
        build_ema,
        build_loss,
        build_optimizer,
        build_scheduler,
        set_backbone_trainable,
    )
    from pet_pipeline.transforms import DeviceTransform

    # resuming: the checkpoint replaces every weight, so the pretrained ones need not be at hand
    model = build_model(config.model, num_classes=num_classes, pretrained=config.pretrained and not resuming,
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
                                layer_decay=config.layer_decay)
    model, optimizer, loaders.train, loaders.test = accelerator.prepare(
        model, optimizer, loaders.train, loaders.test)
    if loaders.val is not None:
        loaders.val = accelerator.prepare(loaders.val)

    steps_per_epoch = math.ceil(len(loaders.train) / config.grad_accum_steps)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    scheduler = build_scheduler(optimizer, name=config.scheduler, total_steps=total_steps,
                                warmup_steps=round(config.warmup_epochs * steps_per_epoch),
                                min_lr=config.min_lr, steps_per_epoch=steps_per_epoch)
    class_weights = (balanced_class_weights(train_labels, num_classes).to(accelerator.device)
                     if config.class_weights == "balanced" else None)
    mixing = config.mixup > 0 or config.cutmix > 0
    raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)  # what is saved, averaged
    ema = build_ema(raw_model, decay=config.ema_decay)  # warms up: sound for 30 steps or 30,000
    return SimpleNamespace(
        model=model, raw_model=raw_model, optimizer=optimizer, scheduler=scheduler, ema=ema,
        eval_model=ema.module if ema is not None else model,  # what validation and export use
        loss_fn=build_loss(label_smoothing=config.label_smoothing, class_weights=class_weights,
                           mixing=mixing),
        mixup=(Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                     label_smoothing=config.label_smoothing, num_classes=num_classes)
               if mixing else None),
        # colour jitter, normalisation and random erasing, on the whole batch
        device_transform=DeviceTransform(data_config, config.augment, accelerator.device),
        channels_last=channels_last, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
    )


def start_summary(config: Config, accelerator, pets, loaders, parts, plan, state) -> str:
    class_names = state.class_names
    effective_batch = config.batch_size * config.grad_accum_steps * accelerator.num_processes
    lines = [
        f"pet-pipeline: {accelerator.num_processes} process(es) on {accelerator.device.type}"
        f" ({accelerator.distributed_type.value}), precision {accelerator.mixed_precision},"
        f" {loaders.num_workers} loader worker(s) per process",
        f"data: train {len(pets.train)} / val {len(pets.val) if pets.val else 0} / test"
        f" {len(pets.test)} images, {len(class_names)} classes ({', '.join(class_names[:3])}"
        f"{', ...' if len(class_names) > 3 else ''}); {len(pets.skipped)} bad input(s) left out"
        f" ({pets.duplicates} duplicate line(s) kept once,"
        f" {pets.leaks} train/test leak(s) dropped from training)",
        f"batch: {config.batch_size} per device x {config.grad_accum_steps} accumulation x"
        f" {accelerator.num_processes} process(es) = {effective_batch} images per optimizer step;"
        f" {parts.steps_per_epoch} steps per epoch, {parts.total_steps} in all",
        f"model: {config.model} ({'pretrained' if config.pretrained else 'from scratch'}),"
        f" input {state.data_config['input_size'][-1]} px"
        + (", classifier only (frozen backbone)" if config.freeze_backbone else "")
        + (f", classifier only for {config.head_epochs} epoch(s), then everything"
           if config.head_epochs else "")
        + (f", layer-wise lr decay {config.layer_decay:g}" if config.layer_decay else "")
        + (", batch-norm statistics frozen" if config.freeze_bn_stats else ""),
        f"outputs: {config.output_dir}" + (
            f" ({'resuming' if plan.action == 'resume' else 're-evaluating'} from "
            f"{os.path.basename(plan.checkpoint)}, step {state.global_step})" if plan.checkpoint else ""),
    ]
    lines += [f"  left out: {problem}" for problem in pets.skipped[:20]]
    lines += [f"  note: {note}" for note in pets.notes]
    return "\n".join(lines)


def save_checkpoint(checkpointer, state, running_loss, scheduler, run_log) -> None:
    """Every rank, at the same step. The loss not yet logged goes into the state."""
    from pet_pipeline.checkpoint import json_safe

    running_loss.move_into(state, checkpointer.accelerator)
    # cosine and constant are functions of the step; plateau remembers its best and its
    # epochs without improvement (torch's ReduceLROnPlateau inside timm's wrapper)
    inner = getattr(scheduler, "lr_scheduler", None)  # only timm's plateau wraps a torch one
    state.scheduler = json_safe(inner.state_dict()) if inner is not None else None
    with run_log.phase("checkpoints"):
        path = checkpointer.save(state)
    if path is not None:
        run_log.print(f"checkpoint: {path}")


def validate_and_select(config: Config, accelerator, parts, val_loader, state, run_log, *, stop,
                        class_names: list[str], data_config: dict) -> None:
    """Validation accuracy; the best weights so far become model/; plateau and early stopping."""
    from pet_pipeline.evaluation import compute_metrics, predict
    from pet_pipeline.model import export_model
    from pet_pipeline.preemption import StopRequested

    state.validation_due_at = state.global_step  # a stop from here on saves a checkpoint to validate
    with run_log.phase("validation"):
        predictions = predict(parts.eval_model, val_loader, accelerator,
                              should_stop=lambda batch: stop.poll(accelerator, batch))
    if predictions is None:
        raise StopRequested(stop.signal_name or "a signal")
    metrics = compute_metrics(predictions, class_names)
    accuracy = metrics["accuracy"]
    if state.best_accuracy is None or accuracy > state.best_accuracy:
        state.best_accuracy, state.epochs_since_best = accuracy, 0
        if accelerator.is_main_process:  # keep the best weights as the exported model
            with run_log.phase("checkpoints"):
                export_model(accelerator.unwrap_model(parts.eval_model, keep_torch_compile=False),
                             run_log.metrics.path.parent / "model", class_names=class_names,
                             data_config=data_config)
    else:
        state.epochs_since_best += 1
    run_log.log({"step": state.global_step, "epoch": state.epoch, "val_accuracy": accuracy,
                 "val_macro_f1": metrics["macro_f1"]})
    run_log.print(f"epoch {state.epoch}: val accuracy {accuracy:.4f} (best {state.best_accuracy:.4f})")
    parts.scheduler.step(state.epoch + 1, accuracy)
    patience = config.early_stopping_patience
    if patience is not None and state.epochs_since_best >= patience:
        run_log.print(f"early stopping: no improvement for {patience} epoch(s)")
        state.early_stopped = True
    state.validation_due_at = None


def final_report(config: Config, accelerator, parts, loaders, pets, state, run_log, *, stop,
                 class_names: list[str], data_config: dict) -> None:
    """The best weights (or the last, without validation) on the test split, every rank's
    predictions gathered once; metrics, plots and the report under eval/."""
    from safetensors.torch import load_file

    from pet_pipeline.config import to_dict
    from pet_pipeline.evaluation import STOPPED, evaluate_and_report
    from pet_pipeline.hub import write_model_card
    from pet_pipeline.model import export_model
    from pet_pipeline.plots import plot_training_curves
    from pet_pipeline.preemption import StopRequested
    from pet_pipeline.tracking import read_metrics

    out = run_log.metrics.path.parent
    eval_model = accelerator.unwrap_model(parts.eval_model, keep_torch_compile=False)
    with run_log.phase("test evaluation and report"):
        if loaders.val is None or not (out / "model" / "model.safetensors").is_file():
            if accelerator.is_main_process:  # no validation split: the last weights are the model
                export_model(eval_model, out / "model", class_names=class_names,
                             data_config=data_config)
        accelerator.wait_for_everyone()
        eval_model.load_state_dict(load_file(str(out / "model" / "model.safetensors")))
        test_metrics = evaluate_and_report(
            parts.eval_model, loaders.test, accelerator, dataset=pets.test, class_names=class_names,
            data_config=data_config, out_dir=out / "eval", step=state.global_step,
            gradcam_images=config.gradcam_images, should_stop=lambda batch: stop.poll(accelerator, batch))
        if test_metrics is STOPPED:  # the last checkpoint is complete: a rerun only re-evaluates
            raise StopRequested(stop.signal_name or "a signal")
        if accelerator.is_main_process:
            run_log.log({"step": state.global_step, "test_accuracy": test_metrics["accuracy"],
                         "test_macro_f1": test_metrics["macro_f1"]})
            plot_training_curves(read_metrics(out / "metrics.jsonl"), out / "training_curves.png")
            write_model_card(
                out / "model", architecture=config.model, run_config=to_dict(config),
                class_names=class_names, data_config=data_config, metrics=test_metrics,
                split_sizes={name: len(getattr(pets, name) or []) for name in ("train", "val", "test")},
                repo_id=config.hub_model_id, confusion_matrix=out / "eval" / "confusion_matrix.png")
            run_log.print(f"test accuracy {test_metrics['accuracy']:.4f} on {test_metrics['n']} images;"
                          f" report in {out / 'eval'}")


def push_model_dir(config: Config, out, *, step: int, run_log) -> None:
    """model/ (weights, timm's config.json, the model card) to the Hub, in one commit."""
    from pet_pipeline.hub import push_folder

    later = (f"python evaluate.py --model_dir {out / 'model'} --push_to_hub "
             f"--hub_model_id {config.hub_model_id}")
    url = push_folder(out / "model", repo_id=config.hub_model_id, private=config.hub_private,
                      commit_message=f"pet-pipeline: {config.model}, step {step}",
                      retry=f"the run is complete in {out}; upload it with `{later}`")
    run_log.print(f"pushed model/ to the Hub: {url}")


def save_on_stop(request, config: Config, accelerator, checkpointer, state, running_loss, scheduler,
                 run_log) -> int:
    """Every rank agreed to stop: checkpoint (unless the run is finished: its last checkpoint
    is final, and the model may hold the best weights for the report) and say how to go on."""
    run_log.print(f"stopping on {request} at step {state.global_step}")
    if not state.finished(epochs=config.epochs, max_steps=config.max_steps):
        try:
            save_checkpoint(checkpointer, state, running_loss, scheduler, run_log)
        except (FloatingPointError, RuntimeError) as error:
            raise explain_failure(error, config, accelerator, checkpointer) from None
    again = "the same command" if config.resume == "auto" else "with resume: auto"
    run_log.print(f"rerun {again} to resume (exit status {PREEMPTED_EXIT_CODE})")
    return PREEMPTED_EXIT_CODE


def explain_failure(error: Exception, config: Config, accelerator, checkpointer) -> Exception:
    """The one sentence for a failure inside the loop that the user can act on, or the error
    itself (then a traceback: a bug to report)."""
    kept = checkpointer.newest_complete()
    if isinstance(error, FloatingPointError):  # nothing after the last checkpoint was kept
        return UserError(
            f"{error}: the run stopped without saving or exporting those weights"
            f"{f' ({kept.name} is kept)' if kept else ''}; lower lr (now {config.lr:g}), raise "
            "warmup_epochs or clip_grad_norm, or use bf16 instead of fp16, and start again with "
            "resume: overwrite or another output_dir.")
    if "timed out" in str(error).lower() or "timeout" in str(error).lower():  # gloo's collectives
        return UserError(
            f"process {accelerator.process_index} waited over {config.collective_timeout_s} s for "
            "the others in a collective (one is frozen, stopped or much slower: a hung filesystem, "
            f"a debugger, SIGSTOP); the job stops{f', {kept.name} is intact' if kept else ''}: "
            "rerun the same command to resume.")
    return error


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return train(load_config(argv), argv)
    except UserError as error:
        exit_with(error)
    except StoppedBeforeTraining as signal_name:
        print(f"stopped on {signal_name} before the first step: nothing to save; rerun the same "
              f"command to start (exit status {PREEMPTED_EXIT_CODE})", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT_CODE


if __name__ == "__main__":
    raise SystemExit(main())
