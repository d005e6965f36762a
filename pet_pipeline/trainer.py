"""The training job, top to bottom: one image from disk to the confusion matrix.

    with RunDirectory(config.output_dir).held() as run_dir, StopFlag.installed() as stop:
        trainer = Trainer(config, argv, run_dir=run_dir, stop=stop, checked=check_before_heavy_work(config))
        exit_code = trainer.fit()     # start or resume, the epochs, the final report
        trainer.close(exit_code)      # timing, trackers, the Hub upload

What `Trainer.__init__` builds, in the order the job needs it:
1. (given) the locked run directory and the stop flag (SIGTERM, SIGUSR1, Ctrl-C: a checkpoint
   at the next step);
2. the Accelerator (processes, precision, accumulation, trackers);
3. the data: `datasets` splits (pet_pipeline/data.py), decoded and augmented per sample in
   loader workers (pet_pipeline/loader.py, transforms.py), colour jitter and normalisation
   on the device (`DeviceTransform`);
4. the start: new, resume or re-evaluate, decided by the main process (pet_pipeline/rundir.py);
5. the model, optimizer, schedule, loss, EMA and mixup (`Learner`), and the train state,
   from the checkpoint when resuming.

`fit` then follows pet_pipeline/schedule.py: train steps until an epoch's end or max_steps,
validate when due (model/ holds the best weights so far), checkpoint, and at the end the test
split's predictions gathered from every rank into eval/ (pet_pipeline/evaluation.py).
A stop, a loss that blew up and a frozen rank each end in one method at the bottom.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from accelerate.utils import broadcast_object_list, set_seed

from pet_pipeline.checkpoint import Checkpointer, TrainState, json_safe, load_checkpoint
from pet_pipeline.config import Config, to_dict
from pet_pipeline.data import PetData, split_fingerprint
from pet_pipeline.errors import UserError, stop_exit_code
from pet_pipeline.preemption import StopFlag, StopRequested
from pet_pipeline.rundir import RunDirectory, StartPlan
from pet_pipeline.schedule import Schedule
from pet_pipeline.tracking import PhaseClock, RunLog, RunningLoss, init_trackers, wandb_sync_hint
from pet_pipeline.unreadable import DataGone, UnreadableSamples

# DDP warns "Grad strides do not match bucket view strides" at the first backward of every
# multi-process run, from each rank. The grads it names (1x1 and depthwise conv weights,
# e.g. [512, 2048, 1, 1] with strides [2048, 1, 2048, 2048] against the bucket's
# [2048, 1, 1, 1]) differ from the parameter only in the strides of size-1 dimensions: the
# same memory layout, so no copy is lost to it (the reducer copies every grad into its
# bucket in any case). Neither a contiguous input nor gradient_as_bucket_view removes it.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


@dataclass
class RunData:
    """The splits (datasets.Dataset) and their loaders, prepared by the accelerator."""

    pets: PetData
    train: torch.utils.data.DataLoader
    val: torch.utils.data.DataLoader | None
    test: torch.utils.data.DataLoader
    num_workers: int
    data_config: dict  # the model's input size, mean, std, interpolation, crop
    augment_on: str = "cpu"  # device: uint8 regions in the batches, resampled on the device

    @property
    def class_names(self) -> list[str]:
        return self.pets.class_names


@dataclass
class Learner:
    """The model and everything that updates it."""

    model: torch.nn.Module  # prepared (DDP-wrapped with several processes)
    raw_model: torch.nn.Module  # what is saved and averaged
    eval_model: torch.nn.Module  # what validation and export use: the EMA's, when on
    optimizer: torch.optim.Optimizer
    scheduler: object  # timm's, stepped per optimizer step (plateau: per validation too)
    ema: object | None
    loss_fn: torch.nn.Module
    mixup: object | None  # timm's Mixup / CutMix on the batch
    device_transform: object  # uint8 -> normalised float on the device, colour jitter, erasing
    channels_last: bool

    def inputs(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = self.device_transform(batch), batch["label"]
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        return images, targets


class Trainer:
    def __init__(self, config: Config, argv: list[str], *, run_dir: RunDirectory, stop: StopFlag,
                 checked: dict):
        from pet_pipeline.builders import build_accelerator, build_data, build_learner, check_launch

        data_config = checked  # the model's input size, mean/std...: train.check_before_heavy_work
        self.config, self.clock = config, PhaseClock()  # where the wall time goes
        self.run_dir = run_dir  # locked by the job's global main process (train.train)
        self.stop = stop  # SIGTERM / SIGUSR1 / Ctrl-C -> checkpoint and exit at the next step
        self.accelerator = accelerator = build_accelerator(config, self.run_dir.path)
        check_launch(accelerator)  # every process of the launch joined this one job
        set_seed(config.seed)  # before the model: the seed also fixes the new head's weights
        self.data = build_data(config, accelerator, data_config, argv=argv)  # argv: keys the user gave
        split = split_fingerprint(self.data.pets)  # a resumed run must train on the same images
        # after every check that can refuse the start: the start may move an old run aside
        self.plan = decide_start(accelerator, self.run_dir, config, argv, split=split)
        self.run_log = RunLog(accelerator, self.run_dir.path / "metrics.jsonl", resume_step=self.plan.step,
                              before_validation=self.plan.before_validation, clock=self.clock)
        self.learner = build_learner(config, accelerator, self.data, resuming=bool(self.plan.checkpoint))
        self.schedule = Schedule.from_config(config, batches_per_epoch=len(self.data.train),
                                             validates=self.data.val is not None)
        self.checkpointer = Checkpointer(accelerator, self.run_dir.path, ema=self.learner.ema,
                                         keep=config.keep_checkpoints)
        self.state = self._start_state(TrainState(model=config.model, class_names=self.data.class_names,
                                                  data_config=data_config, split=split))
        self.running_loss = RunningLoss(accelerator.device)  # summed on the device between logs
        # training images that became unreadable since the scan: named once, counted, a stand-in
        self.unreadable = UnreadableSamples(self.data.pets.train, known=self.state.unreadable)
        self.progress = None

    def _start_state(self, state: TrainState) -> TrainState:
        """A new run's state, or the checkpoint's (weights, optimizer, RNG, EMA and schedule)."""
        plan, learner = self.plan, self.learner
        if plan.checkpoint:
            state = load_checkpoint(self.accelerator, plan.checkpoint, ema=learner.ema,
                                    forget_best_accuracy=plan.forget_best_accuracy)
            state.wandb_run_id = plan.wandb_run_id or state.wandb_run_id  # another run's: a new one
            self.checkpointer.mark_saved(state)
            if state.scheduler is not None:  # plateau: its best and its epochs without improvement
                learner.scheduler.lr_scheduler.load_state_dict(state.scheduler)
            learner.scheduler.step_update(state.global_step)
        else:  # what a resume of this run leaves out, instead of checking the files again
            state.left_out = list(self.data.pets.bad_ids)
        state.config, state.num_processes = to_dict(self.config), self.accelerator.num_processes
        state.ema = learner.ema is not None
        return state

    # ---------------------------------------------------------------------------- the run

    def fit(self) -> int:
        """Start or resume; per epoch: train, validate when due, checkpoint; then the report.
        Returns the exit status (0; after a stop 75, or 130 for Ctrl-C)."""
        config, state, schedule = self.config, self.state, self.schedule
        self._say_how_it_starts()
        offline_instead = init_trackers(self.accelerator, config, run_id=state.wandb_run_id)
        if offline_instead:  # W&B's server did not answer: the run logs offline, said in one line
            self.run_log.print(offline_instead)
        self.progress = self.run_log.start_progress(schedule.total_steps, state.global_step)
        self.clock.seconds["setup"] = self.clock.elapsed()  # everything before step 1
        self.stop.arm(every=config.log_every)  # before this, a signal ended the process at once
        try:
            while not schedule.finished(state):
                if schedule.trains_next(state):
                    self.train_epoch()  # to the epoch's end, or to max_steps
                if state.validation_due:
                    self.validate()
                self.run_log.write_summary()  # summary.csv: a row per epoch, beside metrics.jsonl
                if schedule.epoch_ended(state):
                    state.next_epoch()
                self.save_checkpoint()  # after the validation: it holds what the validation chose
            self.final_report()
        except (FloatingPointError, RuntimeError) as error:  # a loss that blew up, a frozen rank
            raise self.explain_failure(error) from None
        except StopRequested as request:
            return self.save_on_stop(request)
        except DataGone as gone:  # strict_data, or too much of the data unreadable
            self.stop_on_data(gone)
        finally:
            self.progress.close()  # before any message of an error that ends the run
        return 0

    def train_epoch(self) -> None:
        state, loader = self.state, self.data.train
        loader.set_epoch(state.epoch)
        batches = loader
        if state.step_in_epoch:  # resuming mid-epoch: the same order, skipping what was done
            batches = self.accelerator.skip_first_batches(loader, state.step_in_epoch)
            batches.set_epoch(state.epoch)
        self._set_phase()
        for batch in batches:
            if self.train_step(batch) and not self.after_optimizer_step():
                break  # max_steps
        self.running_loss.move_into(state, self.accelerator)  # a non-finite loss stops here
        self.note_unreadable()

    def _set_phase(self) -> None:
        """LP-FT: in the head phase the backbone is frozen and in eval mode (its batch-norm
        statistics and drop path as pretrained), a linear probe on fixed features."""
        from pet_pipeline.optim import freeze_batch_norm_statistics, set_backbone_trainable, trains_backbone

        config, learner = self.config, self.learner
        full_model = trains_backbone(self.state.epoch, head_epochs=config.head_epochs,
                                     freeze_backbone=config.freeze_backbone)
        set_backbone_trainable(learner.raw_model, full_model)
        learner.model.train(full_model)
        if config.freeze_bn_stats:  # small batches: keep the pretrained normalisation
            freeze_batch_norm_statistics(learner.model)

    def train_step(self, batch) -> bool:
        """One micro-batch forward and backward; True when it ended with an optimizer step."""
        accelerator, learner = self.accelerator, self.learner
        images, targets = learner.inputs(batch)
        with accelerator.accumulate(learner.model):
            with accelerator.autocast():
                loss = learner.loss_fn(learner.model(images), targets)
            accelerator.backward(loss)
            if accelerator.sync_gradients and self.config.clip_grad_norm:
                accelerator.clip_grad_norm_(learner.model.parameters(), self.config.clip_grad_norm)
            learner.optimizer.step()  # a no-op between accumulation boundaries (Accelerate)
            learner.optimizer.zero_grad(set_to_none=True)
        self.state.step_in_epoch += 1
        self.running_loss.add(loss)  # stays on the device: no sync here
        self.unreadable.add(batch["unreadable"])  # the same: read at the log steps
        self.run_log.count_images(images.shape[0] * accelerator.num_processes)
        return accelerator.sync_gradients

    def after_optimizer_step(self) -> bool:
        """Schedule, EMA, log, checkpoint and stop requests; False when max_steps is reached."""
        state, schedule, learner = self.state, self.schedule, self.learner
        state.global_step += 1
        state.validation_due = schedule.validation_point(state)
        learner.scheduler.step_update(state.global_step)
        if learner.ema is not None:
            learner.ema.update(learner.raw_model, step=state.global_step)
        self.progress.update()
        if schedule.log_due(state):
            self.log_training()
        if schedule.max_reached(state):
            return False
        if schedule.checkpoint_due(state):
            self.save_checkpoint()
        self.stop.check(self.accelerator, state.global_step)  # StopRequested, on every rank
        return True

    def log_training(self) -> None:
        state = self.state
        self.running_loss.move_into(state, self.accelerator)  # a host-device sync point
        record = {"step": state.global_step, "epoch": state.epoch,
                  "train_loss": state.loss_sum / max(1, state.loss_count),
                  "lr": max(group["lr"] for group in self.learner.optimizer.param_groups),  # the head's
                  "images_per_s": self.run_log.images_per_s(),
                  "time/elapsed_s": round(self.clock.elapsed(), 3)}
        self.run_log.log(record)
        self.progress.show(record)
        state.loss_sum, state.loss_count = 0.0, 0
        self.note_unreadable()

    def note_unreadable(self) -> None:
        """Name the training images that could not be read since the last sync, once each
        (every rank at the same step); DataGone when the config says that ends the run."""
        new = self.unreadable.collect(self.accelerator)
        for entry in new:
            self.run_log.print(f"unreadable during training: {entry['unreadable_image']} "
                               f"({entry['reason']}); a readable image of its class stands in for it")
            self.run_log.log({"step": self.state.global_step, "epoch": self.state.epoch, **entry})
        self.unreadable.check(new, strict=self.config.strict_data,
                              max_fraction=self.config.max_unreadable_fraction)

    def validate(self) -> None:
        """Validation accuracy; the best weights so far become model/; at an epoch's end, the
        plateau schedule and early stopping count it."""
        from pet_pipeline.evaluation import compute_metrics, predict

        state, config = self.state, self.config
        with self.run_log.phase("validation"):
            predictions = predict(self.learner.eval_model, self.data.val, self.accelerator,
                                  should_stop=self._stop_polled)
        if predictions is None:  # the checkpoint of the stop validates first
            raise StopRequested(self.stop.signal_name or "a signal")
        metrics = compute_metrics(predictions, self.data.class_names)
        accuracy = metrics["accuracy"]
        improved = state.best_accuracy is None or accuracy > state.best_accuracy
        if improved:
            state.best_accuracy, state.epochs_since_best = accuracy, 0
            self.export_model()
        self.run_log.log({"step": state.global_step, "epoch": state.epoch, "val_accuracy": accuracy,
                          "val_macro_f1": metrics["macro_f1"]})
        self.run_log.print(f"epoch {state.epoch}: val accuracy {accuracy:.4f} "
                           f"(best {state.best_accuracy:.4f})")
        if self.schedule.counts_for_patience(state):
            state.epochs_since_best += 0 if improved else 1
            self.learner.scheduler.step(state.epoch + 1, accuracy)
            patience = config.early_stopping_patience
            if patience is not None and state.epochs_since_best >= patience:
                self.run_log.print(f"early stopping: no improvement for {patience} epoch(s)")
                state.early_stopped = True
        state.validation_due = False

    def export_model(self) -> None:
        """model/ in timm's format: the weights validation chose (or the last), main process."""
        from pet_pipeline.model import export_model

        if self.accelerator.is_main_process:
            with self.run_log.phase("checkpoints"):
                export_model(self.accelerator.unwrap_model(self.learner.eval_model, keep_torch_compile=False),
                             self.run_dir.path / "model", class_names=self.data.class_names,
                             data_config=self.data.data_config)

    def final_report(self) -> None:
        """model/'s weights on the test split, every rank's predictions gathered once;
        metrics, plots and the report under eval/, the model card in model/."""
        from safetensors.torch import load_file

        from pet_pipeline.evaluation import STOPPED, evaluate_and_report

        out, learner, data = self.run_dir.path, self.learner, self.data
        with self.run_log.phase("test evaluation and report"):
            if data.val is None or not (out / "model" / "model.safetensors").is_file():
                self.export_model()  # no validation split: the last weights are the model
            self.accelerator.wait_for_everyone()
            eval_model = self.accelerator.unwrap_model(learner.eval_model, keep_torch_compile=False)
            eval_model.load_state_dict(load_file(str(out / "model" / "model.safetensors")))
            test_metrics = evaluate_and_report(
                learner.eval_model, data.test, self.accelerator, dataset=data.pets.test,
                class_names=data.class_names, data_config=data.data_config, out_dir=out / "eval",
                step=self.state.global_step, gradcam_images=self.config.gradcam_images,
                should_stop=self._stop_polled)
            if test_metrics is STOPPED:  # the last checkpoint is complete: a rerun only re-evaluates
                raise StopRequested(self.stop.signal_name or "a signal")
            if self.accelerator.is_main_process:
                self._write_results(test_metrics)

    def _write_results(self, test_metrics: dict) -> None:
        from pet_pipeline.hub import write_model_card
        from pet_pipeline.plots import plot_training_curves
        from pet_pipeline.tracking import read_metrics

        out, data, config = self.run_dir.path, self.data, self.config
        self.run_log.log({"step": self.state.global_step, "test_accuracy": test_metrics["accuracy"],
                          "test_macro_f1": test_metrics["macro_f1"]})
        plot_training_curves(read_metrics(out / "metrics.jsonl"), out / "training_curves.png")
        write_model_card(
            out / "model", architecture=config.model, run_config=to_dict(config),
            class_names=data.class_names, data_config=data.data_config, metrics=test_metrics,
            split_sizes={name: len(getattr(data.pets, name) or []) for name in ("train", "val", "test")},
            repo_id=config.hub_model_id, confusion_matrix=out / "eval" / "confusion_matrix.png")
        self.run_log.print(f"test accuracy {test_metrics['accuracy']:.4f} on {test_metrics['n']} images;"
                           f" report in {out / 'eval'}")
        gone = {"in training": len(self.state.unreadable),
                "in the test split": len(test_metrics["unreadable"])}
        if any(gone.values()):
            self.run_log.print("unreadable images (named in metrics.jsonl and eval/metrics.json): "
                               + ", ".join(f"{n} {where}" for where, n in gone.items() if n))

    def save_checkpoint(self) -> None:
        """Every rank, at the same step. The loss not yet logged goes into the state."""
        state = self.state
        self.running_loss.move_into(state, self.accelerator)
        # cosine and constant are functions of the step; plateau remembers its best and its
        # epochs without improvement (torch's ReduceLROnPlateau inside timm's wrapper)
        inner = getattr(self.learner.scheduler, "lr_scheduler", None)  # only timm's plateau wraps one
        state.scheduler = json_safe(inner.state_dict()) if inner is not None else None
        with self.run_log.phase("checkpoints"):
            path = self.checkpointer.save(state)
        if path is not None:
            self.run_log.print(f"checkpoint: {path}")

    def _stop_polled(self, batch: int) -> bool:
        return self.stop.poll(self.accelerator, batch)

    # ---------------------------------------------------------------------------- the ends

    def stop_on_data(self, gone: DataGone) -> None:
        """Unreadable training data ends the run: a checkpoint (every rank), then one sentence."""
        self.run_log.print(f"stopping at step {self.state.global_step}: unreadable training data")
        try:
            self.save_checkpoint()
        except (FloatingPointError, RuntimeError) as error:
            raise self.explain_failure(error) from None
        raise UserError(str(gone)) from None

    def save_on_stop(self, request: StopRequested) -> int:
        """Every rank agreed to stop: checkpoint (unless the run is finished: its last
        checkpoint is final, and model/ may hold the best weights for the report) and say how
        to go on."""
        self.run_log.print(f"stopping on {request} at step {self.state.global_step}")
        if not self.schedule.finished(self.state):
            try:
                self.save_checkpoint()
            except (FloatingPointError, RuntimeError) as error:
                raise self.explain_failure(error) from None
        again = "the same command" if self.config.resume == "auto" else "with resume: auto"
        exit_code = stop_exit_code(self.stop.signal_name)  # Ctrl-C: 130, never requeued
        self.run_log.print(f"rerun {again} to resume (exit status {exit_code})")
        return exit_code

    def explain_failure(self, error: Exception) -> Exception:
        """The one sentence for a failure inside the loop that the user can act on, or the
        error itself (then a traceback: a bug to report)."""
        config, kept = self.config, self.checkpointer.newest_complete()
        if isinstance(error, FloatingPointError):  # nothing after the last checkpoint was kept
            return UserError(
                f"{error}: the run stopped without saving or exporting those weights"
                f"{f' ({kept.name} is kept)' if kept else ''}; lower lr (now {config.lr:g}), raise "
                "warmup_epochs or clip_grad_norm, or use bf16 instead of fp16, and start again with "
                "resume: overwrite or another output_dir.")
        if "timed out" in str(error).lower() or "timeout" in str(error).lower():  # gloo's collectives
            return UserError(
                f"process {self.accelerator.process_index} waited over {config.collective_timeout_s} s "
                "for the others in a collective (one is frozen, stopped or much slower: a hung "
                f"filesystem, a debugger, SIGSTOP); the job stops{f', {kept.name} is intact' if kept else ''}"
                ": rerun the same command to resume.")
        return error

    def close(self, exit_code: int) -> None:
        """Timing, the trackers' end, and (after a complete run) the Hub upload."""
        from pet_pipeline.hub import push_model_dir

        self.run_log.log_timing(self.state.global_step)
        hint = wandb_sync_hint(self.accelerator) if self.accelerator.is_main_process else None
        self.accelerator.end_training()
        if hint and exit_code == 0:
            self.run_log.print(f"W&B ran offline; upload with: {hint}")
        if self.config.push_to_hub and exit_code == 0 and self.accelerator.is_main_process:
            url = push_model_dir(self.run_dir.path, config=self.config, step=self.state.global_step)
            self.run_log.print(f"pushed model/ to the Hub: {url}")

    # ---------------------------------------------------------------------------- the start line

    def _say_how_it_starts(self) -> None:
        from pet_pipeline.builders import start_summary

        if self.run_dir.took_over:
            self.run_log.print(f"took over the lock of process {self.run_dir.took_over.get('pid')} on "
                               f"{self.run_dir.took_over.get('host')}, which is no longer running")
        for message in self.plan.messages:
            self.run_log.print(message)
        self.run_log.print(start_summary(self))


def decide_start(accelerator, run_dir: RunDirectory, config: Config, argv: list[str], *,
                 split: str) -> StartPlan:
    """The main process decides what this start means (it holds the lock and may move
    files); every rank gets the same StartPlan, or the same UserError. `split`: the train/val
    fingerprint of the loaded data, which a resumed checkpoint must have been trained on."""
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
