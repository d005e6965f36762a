"""When a step, a validation, a save or a stop happens: pet_pipeline/schedule.py as tables,
without a model. `walk` drives a Schedule the way Trainer.fit does, micro-batch by micro-batch."""

from __future__ import annotations

import pytest

from pet_pipeline.checkpoint import TrainState
from pet_pipeline.schedule import Schedule, trained_under


@pytest.mark.parametrize("limits, lengths", [
    ((9, 1, 3, None, 0.0), (9, 27, 0)),
    ((9, 2, 3, None, 1.0), (5, 15, 5)),  # a remainder micro-batch makes its own step
    ((9, 3, 2, None, 0.5), (3, 6, 2)),
    ((9, 1, 3, 5, 0.0), (9, 5, 0)),  # max_steps cuts the run short
    ((9, 1, 1, 50, 0.0), (9, 9, 0)),  # ... but never lengthens it
    ((1, 4, 10, None, 2.0), (1, 10, 2)),  # one micro-batch an epoch, fewer than the accumulation
])
def test_lengths_follow_the_micro_batches_and_accumulation(limits, lengths):
    """limits: micro-batches an epoch, accumulation, epochs, max_steps, warmup_epochs;
    lengths: steps per epoch, total steps, warmup steps."""
    batches, accum, epochs, max_steps, warmup = limits
    schedule = Schedule(batches_per_epoch=batches, epochs=epochs, grad_accum_steps=accum,
                        max_steps=max_steps, warmup_epochs=warmup)
    assert (schedule.steps_per_epoch, schedule.total_steps, schedule.warmup_steps) == lengths


def test_an_optimizer_step_every_accumulation_and_at_the_end_of_the_epoch():
    schedule = Schedule(batches_per_epoch=7, epochs=1, grad_accum_steps=3)
    assert [n for n in range(1, 8) if schedule.optimizer_step_at(n)] == [3, 6, 7]
    assert len([n for n in range(1, 8) if schedule.optimizer_step_at(n)]) == schedule.steps_per_epoch


# states: (epoch, step_in_epoch, global_step, validation_due, early_stopped)
# columns: epoch_ended, trained, validation_point, counts_for_patience, trains_next, finished
STOPS = {
    "a new run": ((0, 0, 0, False, False), (False, False, False, False, True, False)),
    "mid-epoch": ((0, 2, 2, False, False), (False, False, False, False, True, False)),
    "an epoch's end, validation due": ((0, 3, 3, True, False), (True, False, True, True, False, False)),
    "an epoch's end, validated": ((0, 3, 3, False, False), (True, False, True, True, False, False)),
    "the next epoch": ((1, 0, 3, False, False), (False, False, False, False, True, False)),
    "cut by max_steps, due": ((1, 2, 5, True, False), (False, True, True, False, False, False)),
    "cut by max_steps, validated": ((1, 2, 5, False, False), (False, True, True, False, False, True)),
    "the last epoch ended, due": ((2, 3, 9, True, False), (True, False, True, True, False, False)),
    "all epochs done": ((3, 0, 9, False, False), (False, True, False, False, False, True)),
    "early stopped, the epoch open": ((1, 3, 6, False, True), (True, True, True, True, False, False)),
    "early stopped, the epoch closed": ((2, 0, 6, False, True), (False, True, False, False, False, True)),
}


@pytest.mark.parametrize("name", list(STOPS))
def test_where_training_stops_and_what_comes_next(name):
    (epoch, step_in_epoch, global_step, due, early), expected = STOPS[name]
    schedule = Schedule(batches_per_epoch=3, epochs=3, max_steps=5 if global_step <= 5 else None,
                        validates=True)
    state = TrainState(epoch=epoch, step_in_epoch=step_in_epoch, global_step=global_step,
                       validation_due=due, early_stopped=early)
    got = (schedule.epoch_ended(state), schedule.trained(state), schedule.validation_point(state),
           schedule.counts_for_patience(state), schedule.trains_next(state), schedule.finished(state))
    assert got == expected, name


def test_without_a_validation_split_nothing_is_ever_a_validation_point():
    schedule = Schedule(batches_per_epoch=3, epochs=2, max_steps=4, validates=False)
    for state in (TrainState(step_in_epoch=3, global_step=3),
                  TrainState(epoch=1, step_in_epoch=1, global_step=4)):
        assert not schedule.validation_point(state)
    assert schedule.finished(TrainState(epoch=1, step_in_epoch=1, global_step=4))


def test_log_and_checkpoint_cadence_and_no_mid_epoch_checkpoint_at_max_steps():
    schedule = Schedule(batches_per_epoch=20, epochs=1, max_steps=6, log_every=2, checkpoint_steps=3)
    states = [TrainState(global_step=step) for step in range(1, 7)]
    assert [s.global_step for s in states if schedule.log_due(s)] == [2, 4, 6]
    assert [s.global_step for s in states if schedule.checkpoint_due(s)] == [3]  # 6: the end saves
    at_epoch_end = Schedule(batches_per_epoch=3, epochs=2, checkpoint_steps=3)
    assert not at_epoch_end.checkpoint_due(TrainState(step_in_epoch=3, global_step=3))  # saved anyway
    assert [s.global_step for s in states if schedule.max_reached(s)] == [6]
    assert not Schedule(batches_per_epoch=20, epochs=1).checkpoint_due(TrainState(global_step=3))


def walk(schedule: Schedule, state: TrainState) -> list[tuple]:
    """What Trainer.fit does, event by event: ("step", n), ("validate", step, counted),
    ("checkpoint", step), ("report",)."""
    events = []
    while not schedule.finished(state):
        if schedule.trains_next(state):
            while state.step_in_epoch < schedule.batches_per_epoch:
                state.step_in_epoch += 1
                if not schedule.optimizer_step_at(state.step_in_epoch):
                    continue
                state.global_step += 1
                state.validation_due = schedule.validation_point(state)
                events.append(("step", state.global_step))
                if schedule.max_reached(state):
                    break
                if schedule.checkpoint_due(state):
                    events.append(("checkpoint", state.global_step))
        if state.validation_due:
            events.append(("validate", state.global_step, schedule.counts_for_patience(state)))
            state.validation_due = False
        if schedule.epoch_ended(state):
            state.next_epoch()
        events.append(("checkpoint", state.global_step))
    return events + [("report",)]


def test_a_run_cut_short_by_max_steps_validates_each_epoch_end_and_the_cut():
    schedule = Schedule(batches_per_epoch=3, epochs=3, max_steps=5, validates=True)
    assert walk(schedule, TrainState()) == [
        ("step", 1), ("step", 2), ("step", 3), ("validate", 3, True), ("checkpoint", 3),
        ("step", 4), ("step", 5), ("validate", 5, False), ("checkpoint", 5), ("report",)]


def test_a_larger_max_steps_goes_on_with_the_cut_epoch_and_counts_it_at_its_end():
    schedule = Schedule(batches_per_epoch=3, epochs=3, max_steps=7, validates=True)
    after_the_cut = TrainState(epoch=1, step_in_epoch=2, global_step=5)  # as max_steps 5 saved it
    assert walk(schedule, after_the_cut) == [
        ("step", 6), ("validate", 6, True), ("checkpoint", 6), ("step", 7), ("validate", 7, False),
        ("checkpoint", 7), ("report",)]


def test_a_stop_during_a_validation_resumes_with_that_validation_and_trains_nothing():
    schedule = Schedule(batches_per_epoch=3, epochs=3, max_steps=5, validates=True)
    stopped = TrainState(epoch=1, step_in_epoch=2, global_step=5, validation_due=True)
    assert walk(schedule, stopped) == [("validate", 5, False), ("checkpoint", 5), ("report",)]
    at_epoch_end = TrainState(epoch=0, step_in_epoch=3, global_step=3, validation_due=True)
    assert walk(schedule, at_epoch_end)[:3] == [("validate", 3, True), ("checkpoint", 3), ("step", 4)]


def test_resuming_mid_epoch_with_accumulation_and_mid_epoch_checkpoints():
    schedule = Schedule(batches_per_epoch=5, epochs=2, grad_accum_steps=2, checkpoint_steps=2)
    mid_epoch = TrainState(epoch=0, step_in_epoch=2, global_step=1)  # a checkpoint after step 1
    assert walk(schedule, mid_epoch) == [
        ("step", 2), ("checkpoint", 2), ("step", 3), ("checkpoint", 3),  # 3: the epoch's end
        ("step", 4), ("checkpoint", 4), ("step", 5), ("step", 6), ("checkpoint", 6), ("report",)]


def test_a_finished_run_only_reports_and_a_larger_epochs_trains_on():
    finished = TrainState(epoch=2, global_step=6)
    assert walk(Schedule(batches_per_epoch=3, epochs=2), finished) == [("report",)]
    assert walk(Schedule(batches_per_epoch=3, epochs=3), TrainState(epoch=2, global_step=6))[0] == ("step", 7)
    assert trained_under(finished, epochs=2, max_steps=None)
    assert not trained_under(finished, epochs=3, max_steps=None)
    assert trained_under(finished, epochs=3, max_steps=6)
