"""Fine-tuning strategies: layer-wise lr decay, a head-first phase (LP-FT), a frozen backbone
(the linear probe inside train.py), and an EMA that suits runs of tens of steps.

The end-to-end tests run train.py on generated pets at 32 px from a local weights file, so
that "the backbone did not move" can be checked tensor by tensor against that file.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, ok, train_in_subprocess
from safetensors.torch import load_file, save_file

from pet_pipeline.checkpoint import list_checkpoints
from pet_pipeline.config import Config
from pet_pipeline.errors import UserError
from pet_pipeline.model import build_model
from pet_pipeline.optim import build_ema, build_optimizer, build_scheduler

MODEL = "coatnet_nano_rw_224"  # has batch norms: their running statistics must stay put too
CLASSIFIER = ("head.fc.weight", "head.fc.bias")  # timm's get_classifier() of a CoAtNet


# ----------------------------------------------------------------------------- unit


@pytest.mark.parametrize("model_name, groups", [("tf_efficientnet_lite0", 18), ("coatnet_nano_rw_224", 6)])
def test_layer_decay_gives_each_lower_layer_a_smaller_lr_through_the_schedule(model_name, groups):
    model = build_model(model_name, num_classes=12, pretrained=False)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=0.8)
    scheduler = build_scheduler(optimizer, name="cosine", total_steps=10, warmup_steps=0, min_lr=0.0)
    scheduler.step_update(0)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert set(lr_of) == {id(p) for p in model.parameters()}  # every parameter, once
    head = model.get_classifier().weight
    assert lr_of[id(head)] == pytest.approx(1e-3)  # the classifier trains at lr
    stem = next(model.parameters())  # the first layer: the smallest lr
    assert lr_of[id(stem)] == pytest.approx(1e-3 * 0.8 ** (groups - 1))
    # the schedule keeps the ratios: half way through the cosine every lr is halved
    scheduler.step_update(5)
    lr_later = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lr_later[id(stem)] / lr_later[id(head)] == pytest.approx(0.8 ** (groups - 1))
    assert lr_later[id(head)] == pytest.approx(0.5e-3)
    # without layer_decay: one lr for all, as before
    plain = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    assert {g["lr"] for g in plain.param_groups} == {1e-3}


def test_the_ema_of_a_short_run_follows_the_trained_weights_not_the_initial_ones():
    """30 optimizer steps with ema_decay 0.999: a fixed decay would leave 0.999^30 = 97% of the
    initial weights in the average; the warmed-up one must sit near the trained weights."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    initial = model.weight.detach().clone()
    ema = build_ema(model, decay=0.999)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    inputs, targets = torch.randn(64, 8), torch.randint(0, 4, (64,))
    for step in range(1, 31):
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model, step=step)
    trained, averaged = model.weight.detach(), ema.module.weight.detach()
    travelled = (trained - initial).norm()
    assert travelled > 0.5, "the weights did not move: nothing was tested"
    assert (averaged - trained).norm() < 0.2 * travelled, "the EMA is still mostly the initial weights"
    assert build_ema(model, decay=None) is None


def test_frozen_batch_norm_statistics_stay_pretrained_while_the_weights_train():
    from pet_pipeline.optim import freeze_batch_norm_statistics

    torch.manual_seed(0)
    model = build_model("tf_efficientnet_lite0", num_classes=3, pretrained=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    freeze_batch_norm_statistics(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    images = torch.randn(4, 3, 64, 64) * 3 + 1  # statistics unlike the running ones
    loss = torch.nn.functional.cross_entropy(model(images), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    statistics = [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert statistics and all(torch.equal(after[k], before[k]) for k in statistics)
    assert not torch.equal(after["bn1.weight"], before["bn1.weight"])  # scale and shift still train
    assert model.training and model.blocks.training  # only the norms left training mode


@pytest.mark.parametrize("values, fragment", [
    ({"layer_decay": 0.0}, "layer_decay"),
    ({"layer_decay": 1.5}, "layer_decay"),
    ({"head_epochs": -1}, "head_epochs"),
    ({"head_epochs": 10, "epochs": 10}, "head_epochs"),
    ({"head_epochs": 2, "freeze_backbone": True}, "head_epochs"),
])
def test_finetuning_keys_refuse_values_that_make_no_sense(values, fragment):
    with pytest.raises(UserError, match=fragment):
        Config(**values)


# ----------------------------------------------------------------------------- train.py


@pytest.fixture
def initial_weights(tmp_path):
    """A local weights file of MODEL at 32 px, as pretrained_path: the backbone's starting point."""
    torch.manual_seed(1)
    source = build_model(MODEL, num_classes=12, pretrained=False, image_size=32)
    path = tmp_path / "initial.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    return path


def backbone_moved(weights: dict, initial: dict) -> list[str]:
    """Names of the backbone tensors (batch-norm statistics included) that differ from `initial`."""
    return [k for k in initial if k not in CLASSIFIER and not torch.equal(weights[k], initial[k])]


@pytest.mark.slow
def test_freeze_backbone_trains_only_the_classifier(tmp_path, train_run, initial_weights):
    out = tmp_path / "probe"
    result = ok(train_run({**TINY, "model": MODEL, "pretrained_path": initial_weights,
                           "freeze_backbone": True, "epochs": 2, "output_dir": out}))
    assert "classifier only (frozen backbone)" in result.stdout
    initial, trained = load_file(str(initial_weights)), load_file(str(out / "model/model.safetensors"))
    assert backbone_moved(trained, initial) == []
    first = load_file(str(list_checkpoints(out)[0] / "model.safetensors"))
    assert not torch.equal(first["head.fc.weight"], trained["head.fc.weight"]), "the classifier did not train"


@pytest.mark.slow
def test_head_epochs_train_the_classifier_first_then_everything_and_resume_exactly(
        tmp_path, train_run, initial_weights):
    out = tmp_path / "lpft"
    values = {**TINY, "model": MODEL, "pretrained_path": initial_weights, "head_epochs": 1, "epochs": 2,
              "layer_decay": 0.8, "drop_path_rate": 0.1, "keep_checkpoints": 5, "output_dir": out}
    ok(train_run(values))
    head_phase_end, last = list_checkpoints(out)
    assert json.loads((head_phase_end / "train_state.json").read_text())["epoch"] == 1
    initial = load_file(str(initial_weights))
    after_head_phase = load_file(str(head_phase_end / "model.safetensors"))
    assert backbone_moved(after_head_phase, initial) == [], "the backbone moved in the head phase"
    assert not torch.equal(after_head_phase["head.fc.weight"], initial["head.fc.weight"])
    final = load_file(str(last / "model.safetensors"))
    assert len(backbone_moved(final, initial)) > len(initial) // 2, "the backbone did not train after it"

    # a new output_dir started from the checkpoint at the phase switch (resume: PATH, which
    # never changes PATH) gives the uninterrupted run's weights
    uninterrupted = {k: v.clone() for k, v in final.items()}
    branch = tmp_path / "from-the-head-phase"
    ok(train_run({**values, "output_dir": branch, "resume": head_phase_end}))
    resumed = load_file(str(list_checkpoints(branch)[-1] / "model.safetensors"))
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.cluster  # several processes: pytest -m cluster
def test_head_phase_under_two_processes(tmp_path, env, initial_weights):
    """DDP expects a gradient for every parameter it knows; in the head phase the backbone
    has none (train.py asks DDP to find unused parameters when head_epochs > 0)."""
    import sys

    out = tmp_path / "ddp"
    env2 = {**env, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = ok(train_in_subprocess({**TINY, "model": MODEL, "pretrained_path": initial_weights,
                                     "head_epochs": 1, "epochs": 2, "output_dir": out}, env2,
                                    launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone",
                                              "--nproc_per_node", "2")))
    assert "2 process(es)" in result.stdout
    final = load_file(str(out / "model/model.safetensors"))
    assert len(backbone_moved(final, load_file(str(initial_weights)))) > 0
