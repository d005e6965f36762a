"""Fine-tune a timm CoAtNet on Oxford-IIIT Pet (by default the 12 cat breeds) with Accelerate.

The same script at every scale:

    # laptop CPU, no downloads (generated data), a few minutes:
    python train.py --config configs/quickstart.yaml
    # one GPU:
    python train.py --config configs/gpu.yaml
    # all GPUs of one node (bf16, one process per GPU):
    accelerate launch --config_file accelerate_config.yaml train.py --config configs/gpu.yaml
    # two CPU processes over gloo (what the tests do):
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 train.py --config configs/quickstart.yaml
    # SLURM, one node with all its GPUs:
    sbatch slurm/train.sbatch --config configs/gpu.yaml

Any key can be overridden on the command line (`--lr 3e-4 --batch_size 64`); `--help` lists
them. A stopped run continues from its newest checkpoint when started again (resume: auto).
"""

from __future__ import annotations

import sys

from pet_pipeline.config import Config, load_config
from pet_pipeline.errors import UserError, exit_with


def train(config: Config) -> int:
    # torch, timm and the rest are imported here rather than at the top, so that `--help`
    # and a mistyped key or value answer in a fraction of a second instead of after ~8 s.
    import math
    import os
    import time
    from pathlib import Path

    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from safetensors.torch import load_file
    from timm.data import Mixup
    from timm.utils import ModelEmaV3
    from tqdm.auto import tqdm

    from pet_pipeline.breeds import kept_breeds
    from pet_pipeline.checkpoint import (
        check_compatible,
        check_same_split,
        find_resume_checkpoint,
        json_safe,
        load_checkpoint,
        read_train_state,
        save_checkpoint,
    )
    from pet_pipeline.config import save_config, to_dict
    from pet_pipeline.data import load_pets, pre_resize, split_fingerprint
    from pet_pipeline.evaluation import STOPPED, compute_metrics, evaluate_and_report, predict
    from pet_pipeline.loader import PetTorchDataset, build_dataloader, default_num_workers
    from pet_pipeline.model import build_model, export_model
    from pet_pipeline.optim import balanced_class_weights, build_loss, build_optimizer, build_scheduler
    from pet_pipeline.plots import plot_training_curves
    from pet_pipeline.preemption import PREEMPTED_EXIT_CODE, StopFlag
    from pet_pipeline.tracking import (
        MetricsLog,
        PhaseClock,
        choose_wandb_mode,
        init_trackers,
        new_run_id,
        read_metrics,
        trackers_for,
        wandb_sync_hint,
    )
    from pet_pipeline.transforms import (
        DeviceTransform,
        build_eval_transform,
        build_train_transform,
        decode_size,
        model_data_config,
    )

    clock = PhaseClock()  # where the wall time goes, logged and printed at the end
    out = Path(config.output_dir)
    # ------------------------------------------------------------------ checks before heavy work
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("mixed_precision: fp16 needs a GPU; use bf16 or no on a CPU.")
    data_config = model_data_config(config.model, config.image_size)  # also checks the name
    class_names = kept_breeds(config.species, config.breeds)
    eval_side = decode_size(data_config, None)  # the short side the eval transform resizes to
    if config.pre_resize is not None and config.pre_resize < eval_side:
        raise UserError(f"pre_resize: {config.pre_resize} px is below the {eval_side} px that "
                        f"evaluation resizes to; use at least {eval_side}, or null.")
    checkpoint = find_resume_checkpoint(config.resume, out)
    saved_state = read_train_state(checkpoint) if checkpoint is not None else None
    if saved_state is not None:
        check_compatible(saved_state, model_name=config.model, class_names=class_names,
                         checkpoint=checkpoint)
    if "wandb" in trackers_for(config.report_to):
        choose_wandb_mode()
    stop = StopFlag()  # SIGTERM / SIGUSR1 -> checkpoint and exit at the next step

    # ------------------------------------------------------------------ accelerator
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.grad_accum_steps,
        log_with=trackers_for(config.report_to) or None,
        project_dir=str(out),
        # our schedule counts optimizer steps itself, whatever the number of processes
        step_scheduler_with_optimizer=False,
        dynamo_backend="inductor" if config.compile else "no",
        # batches from pinned memory are copied to the GPU without the host waiting for it
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
    )

    def print0(message: str) -> None:  # once per job; tqdm.write keeps the progress bar intact
        if accelerator.is_main_process:
            tqdm.write(message)

    on_gpu = accelerator.device.type == "cuda"
    channels_last = config.channels_last and on_gpu
    set_seed(config.seed)  # before the model: the seed also fixes the new head's weights
    if accelerator.is_main_process:
        save_config(config, out / "config.yaml")

    # ------------------------------------------------------------------ data
    # one process per node first: the synthetic folder and the Hub download are made once
    with accelerator.local_main_process_first():
        pets = load_pets(
            dataset=config.dataset, data_dir=config.data_dir, species=config.species,
            breeds=config.breeds, val_fraction=config.val_fraction, seed=config.seed,
            strict_data=config.strict_data,
            synthetic_images_per_class=config.synthetic_images_per_class,
            synthetic_image_size=config.synthetic_image_size,
        )
    split_id = split_fingerprint(pets)  # a resumed run must train and select on the same images
    if saved_state is not None:
        check_same_split(saved_state, split_id, checkpoint=checkpoint)
    processes_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    num_workers = (config.num_workers if config.num_workers is not None
                   else default_num_workers(processes_per_node))
    if config.pre_resize is not None:
        with accelerator.local_main_process_first():  # one process writes the cache, others read it
            for name in ("train", "val", "test"):
                if getattr(pets, name) is not None:
                    setattr(pets, name, pre_resize(getattr(pets, name), short_side=config.pre_resize,
                                                   num_proc=max(1, num_workers)))
    eval_transform = build_eval_transform(data_config)
    train_set = PetTorchDataset(pets.train, build_train_transform(data_config, config.augment),
                                seed=config.seed, min_side=decode_size(data_config, config.augment))
    val_set = PetTorchDataset(pets.val, eval_transform, min_side=eval_side) if pets.val else None
    test_set = PetTorchDataset(pets.test, eval_transform, min_side=eval_side)
    mixing = config.mixup > 0 or config.cutmix > 0
    loader_args = dict(seed=config.seed, num_workers=num_workers, pin_memory=on_gpu)
    train_loader = build_dataloader(train_set, batch_size=config.batch_size, train=True,
                                    drop_last=mixing and len(train_set) >= config.batch_size,
                                    **loader_args)
    eval_batch_size = config.eval_batch_size or 2 * config.batch_size
    val_loader = (build_dataloader(val_set, batch_size=eval_batch_size, train=False, **loader_args)
                  if val_set else None)
    test_loader = build_dataloader(test_set, batch_size=eval_batch_size, train=False, **loader_args)

    # ------------------------------------------------------------------ model
    model = build_model(config.model, num_classes=len(class_names), pretrained=config.pretrained,
                        pretrained_path=config.pretrained_path,
                        drop_path_rate=config.drop_path_rate, image_size=config.image_size)
    if config.sync_bn and accelerator.num_processes > 1:
        from timm.layers import convert_sync_batchnorm  # handles timm's BatchNormAct2d

        model = convert_sync_batchnorm(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------------ optimizer and schedule
    optimizer = build_optimizer(model, lr=config.lr, weight_decay=config.weight_decay)
    model, optimizer, train_loader, test_loader = accelerator.prepare(
        model, optimizer, train_loader, test_loader)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)
    steps_per_epoch = math.ceil(len(train_loader) / config.grad_accum_steps)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    scheduler = build_scheduler(optimizer, name=config.scheduler, total_steps=total_steps,
                                warmup_steps=round(config.warmup_epochs * steps_per_epoch),
                                min_lr=config.min_lr, steps_per_epoch=steps_per_epoch)
    class_weights = (balanced_class_weights(pets.train["label"][:], len(class_names)).to(accelerator.device)
                     if config.class_weights == "balanced" else None)
    loss_fn = build_loss(label_smoothing=config.label_smoothing, class_weights=class_weights,
                         mixing=mixing)
    # the device half of the train transform: colour jitter, normalisation, random erasing
    device_transform = DeviceTransform(data_config, config.augment, accelerator.device)
    mixup = (Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                   label_smoothing=config.label_smoothing, num_classes=len(class_names))
             if mixing else None)
    def unwrapped(module):  # without DDP and torch.compile wrappers: what is saved and averaged
        return accelerator.unwrap_model(module, keep_torch_compile=False)

    raw_model = unwrapped(model)
    # warmup: the decay grows with the step count, so a short run's EMA is not mostly the
    # initial weights (decay 0.999 alone averages over ~1,000 steps)
    ema = (ModelEmaV3(raw_model, decay=config.ema_decay, use_warmup=True)
           if config.ema_decay else None)
    eval_model = ema.module if ema is not None else model  # what validation and export use

    # ------------------------------------------------------------------ resume
    state = {
        "epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_accuracy": None,
        "epochs_since_best": 0, "loss_sum": 0.0, "loss_count": 0, "finished": False,
        "wandb_run_id": new_run_id(), "model": config.model, "class_names": class_names,
        "scheduler": None, "data_config": data_config, "split": split_id,
    }
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint, ema=ema)
        if state["scheduler"] is not None:
            scheduler.lr_scheduler.load_state_dict(state["scheduler"])
        scheduler.step_update(state["global_step"])
    init_trackers(accelerator, report_to=config.report_to, project=config.wandb_project,
                  run_name=config.run_name or out.name, run_id=state["wandb_run_id"],
                  output_dir=str(out), config=to_dict(config))
    metrics_log = MetricsLog(out / "metrics.jsonl", enabled=accelerator.is_main_process,
                             resume_step=state["global_step"] if checkpoint else None)

    def log(record: dict) -> None:
        metrics_log.write(record)
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def log_timing() -> None:
        """Where this process's wall time went, from train() on (imports not counted; a
        resumed run accounts for its own process only). training is the rest: the loop
        itself, with worker start-up and any compilation."""
        timing = clock.summary()
        if accelerator.is_main_process:
            log({"step": state["global_step"], **timing})
            print0("time: " + ", ".join(f"{key[5:-2].replace('_', ' ')} {seconds:.1f} s"
                                        for key, seconds in timing.items()))

    running_loss = torch.zeros((), device=accelerator.device)  # summed over micro-batches
    running_micro_batches = 0

    def flush_running_loss() -> None:
        """Move the device-side loss sum into `state`, which checkpoints carry."""
        nonlocal running_micro_batches
        state["loss_sum"] += accelerator.reduce(running_loss, "mean").item()
        state["loss_count"] += running_micro_batches
        running_loss.zero_()
        running_micro_batches = 0

    def checkpoint_now() -> None:
        flush_running_loss()
        # cosine and constant are functions of the step; plateau remembers its best and its
        # epochs without improvement (torch's ReduceLROnPlateau inside timm's wrapper)
        state["scheduler"] = (json_safe(scheduler.lr_scheduler.state_dict())
                              if config.scheduler == "plateau" else None)
        with clock.phase("checkpoints"):
            path = save_checkpoint(accelerator, out, state, ema=ema, keep=config.keep_checkpoints)
        print0(f"checkpoint: {path}")

    effective_batch = config.batch_size * config.grad_accum_steps * accelerator.num_processes
    print0(
        f"pet-pipeline: {accelerator.num_processes} process(es) on {accelerator.device.type}"
        f" ({accelerator.distributed_type.value}), precision {accelerator.mixed_precision},"
        f" {num_workers} loader worker(s) per process\n"
        f"data: train {len(pets.train)} / val {len(pets.val) if pets.val else 0} / test"
        f" {len(pets.test)} images, {len(class_names)} classes ({', '.join(class_names[:3])}"
        f"{', ...' if len(class_names) > 3 else ''}); {len(pets.skipped)} bad input(s) left out\n"
        f"batch: {config.batch_size} per device x {config.grad_accum_steps} accumulation x"
        f" {accelerator.num_processes} process(es) = {effective_batch} images per optimizer step;"
        f" {steps_per_epoch} steps per epoch, {total_steps} in all\n"
        f"model: {config.model} ({'pretrained' if config.pretrained else 'from scratch'}),"
        f" input {data_config['input_size'][-1]} px\n"
        f"outputs: {out}"
        + (f" (resuming from {checkpoint.name}, step {state['global_step']})" if checkpoint else "")
    )
    for problem in pets.skipped[:20]:
        print0(f"  left out: {problem}")

    # ------------------------------------------------------------------ the epoch loop
    def should_stop() -> bool:
        return stop.agreed(accelerator)

    def stop_on_signal() -> int:
        print0(f"stopping on {stop.signal_name or 'a signal'} at step {state['global_step']}")
        checkpoint_now()
        log_timing()
        accelerator.end_training()
        print0(f"rerun the same command to resume (exit status {PREEMPTED_EXIT_CODE})")
        return PREEMPTED_EXIT_CODE

    progress = tqdm(total=total_steps, initial=state["global_step"], unit="step",
                    disable=not accelerator.is_main_process, dynamic_ncols=True)
    t_last, images_since = time.perf_counter(), 0
    clock.seconds["setup"] = clock.elapsed()  # data, model, resume: everything before step 1
    while state["epoch"] < config.epochs and not state["finished"]:
        train_loader.set_epoch(state["epoch"])
        batches = train_loader
        if state["step_in_epoch"]:  # resuming mid-epoch: same order, skip what was done
            batches = accelerator.skip_first_batches(train_loader, state["step_in_epoch"])
            batches.set_epoch(state["epoch"])
        model.train()
        for batch in batches:
            images, targets = device_transform(batch), batch["label"]  # uint8 -> float here
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if mixup is not None:
                images, targets = mixup(images, targets)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss = loss_fn(model(images), targets)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.clip_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state["step_in_epoch"] += 1
            running_loss += loss.detach()  # stays on the device: no sync here
            running_micro_batches += 1
            images_since += images.shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            state["global_step"] += 1
            scheduler.step_update(state["global_step"])
            if ema is not None:
                ema.update(raw_model, step=state["global_step"])
            progress.update(1)
            if state["global_step"] % config.log_every == 0:
                flush_running_loss()  # a host-device sync point, once per log_every steps
                loss_value = state["loss_sum"] / max(1, state["loss_count"])
                now = time.perf_counter()
                record = {"step": state["global_step"], "epoch": state["epoch"],
                          "train_loss": loss_value, "lr": optimizer.param_groups[0]["lr"],
                          "images_per_s": images_since / (now - t_last)}
                log(record)
                progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{record['lr']:.2e}",
                                     img_s=f"{record['images_per_s']:.0f}")
                state["loss_sum"], state["loss_count"] = 0.0, 0
                t_last, images_since = now, 0
            if config.max_steps is not None and state["global_step"] >= config.max_steps:
                state["finished"] = True
                break
            if config.checkpoint_steps and state["global_step"] % config.checkpoint_steps == 0:
                checkpoint_now()
                t_last, images_since = time.perf_counter(), 0
            if should_stop():
                progress.close()
                return stop_on_signal()

        # -------------------------------------------------------------- validation
        if val_loader is not None:
            with clock.phase("validation"):
                val_predictions = predict(eval_model, val_loader, accelerator, should_stop=should_stop)
            if val_predictions is None:
                progress.close()
                return stop_on_signal()
            val_metrics = compute_metrics(val_predictions, class_names)
            accuracy = val_metrics["accuracy"]
            improved = state["best_accuracy"] is None or accuracy > state["best_accuracy"]
            if improved:
                state["best_accuracy"], state["epochs_since_best"] = accuracy, 0
                if accelerator.is_main_process:  # keep the best weights as the exported model
                    with clock.phase("checkpoints"):
                        export_model(unwrapped(eval_model), out / "model",
                                     model_name=config.model, class_names=class_names,
                                     data_config=data_config)
            else:
                state["epochs_since_best"] += 1
            log({"step": state["global_step"], "epoch": state["epoch"], "val_accuracy": accuracy,
                 "val_macro_f1": val_metrics["macro_f1"]})
            print0(f"epoch {state['epoch']}: val accuracy {accuracy:.4f}"
                   f" (best {state['best_accuracy']:.4f})")
            scheduler.step(state["epoch"] + 1, accuracy)
            patience = config.early_stopping_patience
            if patience is not None and state["epochs_since_best"] >= patience:
                print0(f"early stopping: no improvement for {patience} epoch(s)")
                state["finished"] = True
        state["epoch"] += 1
        state["step_in_epoch"] = 0
        checkpoint_now()
        t_last, images_since = time.perf_counter(), 0  # images/s measures training, not this
    progress.close()

    # ------------------------------------------------------------------ final evaluation
    with clock.phase("test evaluation and report"):
        if val_loader is None or not (out / "model" / "model.safetensors").is_file():
            if accelerator.is_main_process:  # no validation split: the last weights are the model
                export_model(unwrapped(eval_model), out / "model", model_name=config.model,
                             class_names=class_names, data_config=data_config)
        accelerator.wait_for_everyone()
        best_weights = load_file(str(out / "model" / "model.safetensors"))  # to CPU, then copied
        unwrapped(eval_model).load_state_dict(best_weights)
        test_metrics = evaluate_and_report(
            eval_model, test_loader, accelerator, dataset=pets.test, class_names=class_names,
            data_config=data_config, out_dir=out / "eval", step=state["global_step"],
            gradcam_images=config.gradcam_images, should_stop=should_stop)
        if test_metrics is not STOPPED and accelerator.is_main_process:
            log({"step": state["global_step"], "test_accuracy": test_metrics["accuracy"],
                 "test_macro_f1": test_metrics["macro_f1"]})
            plot_training_curves(read_metrics(out / "metrics.jsonl"), out / "training_curves.png")
            print0(f"test accuracy {test_metrics['accuracy']:.4f} on {test_metrics['n']} images;"
                   f" report in {out / 'eval'}")
    log_timing()
    if test_metrics is STOPPED:  # the last checkpoint is complete: a rerun only re-evaluates
        accelerator.end_training()
        return PREEMPTED_EXIT_CODE
    hint = wandb_sync_hint(accelerator) if accelerator.is_main_process else None
    accelerator.end_training()
    if hint:
        print0(f"W&B ran offline; upload with: {hint}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(sys.argv[1:] if argv is None else argv)
        return train(config)
    except UserError as error:
        exit_with(error)


if __name__ == "__main__":
    raise SystemExit(main())
