"""When things happen in a run: a pure function of the train state and the config.

    schedule = Schedule.from_config(config, batches_per_epoch=len(train_loader), validates=True)
    schedule.steps_per_epoch          # optimizer steps an epoch (accumulation included)
    schedule.epoch_ended(state)       # every micro-batch of the epoch is done
    schedule.validation_point(state)  # training stops here for a validation
    schedule.finished(state)          # trained and validated: only the final report is left

The rules, in one place (Trainer.fit follows them; tests/test_schedule.py checks them as a
table, without a model):
- an epoch is `batches_per_epoch` micro-batches per process; an optimizer step every
  `grad_accum_steps` of them, and one at the epoch's end for a remainder (Accelerate's rule);
- training stops at the end of the last epoch, at `max_steps` (which may cut an epoch short)
  or when early stopping says so;
- with a validation split, training stops for a validation at the end of every epoch and
  where `max_steps` cuts an epoch short. Both choose model/ by accuracy; only an epoch's end
  counts for patience and the plateau schedule, so a larger `max_steps` that goes on with a
  cut-short epoch counts that epoch once, at its end;
- the train state says when a validation is due (`TrainState.validation_due`, set at the
  optimizer step that reaches a validation point, cleared by the validation): a stop during
  it saves a checkpoint that validates first, and a finished run is never validated again;
- a log line every `log_every` optimizer steps, a mid-epoch checkpoint every
  `checkpoint_steps` (and one after every epoch and every validation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    batches_per_epoch: int  # micro-batches per process and epoch (len of the train loader)
    epochs: int
    grad_accum_steps: int = 1
    max_steps: int | None = None
    validates: bool = False  # there is a validation split
    log_every: int = 10
    checkpoint_steps: int | None = None
    warmup_epochs: float = 0.0

    @classmethod
    def from_config(cls, config, *, batches_per_epoch: int, validates: bool) -> Schedule:
        return cls(batches_per_epoch=batches_per_epoch, epochs=config.epochs,
                   grad_accum_steps=config.grad_accum_steps, max_steps=config.max_steps,
                   validates=validates, log_every=config.log_every,
                   checkpoint_steps=config.checkpoint_steps, warmup_epochs=config.warmup_epochs)

    # ------------------------------------------------------------------ lengths

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.batches_per_epoch / self.grad_accum_steps)

    @property
    def total_steps(self) -> int:
        total = self.epochs * self.steps_per_epoch
        return min(total, self.max_steps) if self.max_steps is not None else total

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_epochs * self.steps_per_epoch)

    def optimizer_step_at(self, step_in_epoch: int) -> bool:
        """Micro-batch number `step_in_epoch` (from 1) ends with an optimizer step."""
        return step_in_epoch % self.grad_accum_steps == 0 or step_in_epoch >= self.batches_per_epoch

    # ------------------------------------------------------------------ after an optimizer step

    def log_due(self, state) -> bool:
        return state.global_step % self.log_every == 0

    def max_reached(self, state) -> bool:
        return self.max_steps is not None and state.global_step >= self.max_steps

    def checkpoint_due(self, state) -> bool:
        """A mid-epoch checkpoint (the end of an epoch and of the training save their own)."""
        return bool(self.checkpoint_steps) and state.global_step % self.checkpoint_steps == 0 \
            and not (self.max_reached(state) or self.epoch_ended(state))

    # ------------------------------------------------------------------ where training stops

    def epoch_ended(self, state) -> bool:
        return state.step_in_epoch >= self.batches_per_epoch

    def trained(self, state) -> bool:
        """No training step left under these limits (a larger epochs or max_steps goes on)."""
        return trained_under(state, epochs=self.epochs, max_steps=self.max_steps)

    def validation_point(self, state) -> bool:
        """Training has stopped here for a validation: an epoch's end, or a cut by max_steps."""
        return self.validates and (self.epoch_ended(state) or self.max_reached(state))

    def counts_for_patience(self, state) -> bool:
        """A validation at the end of an epoch; one where max_steps cut the epoch short only
        chooses model/ (the epoch may go on under a larger max_steps and is counted then)."""
        return self.epoch_ended(state)

    def trains_next(self, state) -> bool:
        """The next thing to do is training (not a validation, not the end of an epoch)."""
        return not (self.trained(state) or self.epoch_ended(state) or state.validation_due)

    def finished(self, state) -> bool:
        """Trained and validated under these limits, the epoch closed: only the report is left."""
        return self.trained(state) and not state.validation_due and not self.epoch_ended(state)


def trained_under(state, *, epochs: int, max_steps: int | None) -> bool:
    """What a start can tell from a checkpoint alone, without the data's length."""
    return state.early_stopped or state.epoch >= epochs or (max_steps is not None
                                                             and state.global_step >= max_steps)
