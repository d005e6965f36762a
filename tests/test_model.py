"""build_model: the weights it is asked for, from the Hub or a local file, never random ones;
load_trained_model: a model folder's config is checked before anything is built from it."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from pet_pipeline.errors import UserError
from pet_pipeline.model import build_model, load_trained_model


def test_a_family_without_stochastic_depth_still_loads_pretrained_path(tmp_path):
    """GhostNet takes no drop_path_rate: the retry without it must still load the local file
    (it used to pass pretrained=False and silently start from random weights)."""
    torch.manual_seed(0)
    source = timm.create_model("ghostnet_050", num_classes=1000)
    weights = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(weights, str(tmp_path / "ghostnet.safetensors"))
    model = build_model("ghostnet_050", num_classes=3, pretrained=False, drop_path_rate=0.1,
                        pretrained_path=str(tmp_path / "ghostnet.safetensors"))
    loaded = model.state_dict()
    body = [k for k in weights if not k.startswith("classifier.")]  # the new head is 3 classes
    assert body and all(torch.equal(loaded[k], weights[k]) for k in body)
    assert loaded["classifier.weight"].shape == (3, 1280)


def test_a_new_head_on_pretrained_weights_starts_at_zero_so_predictions_start_uniform(tmp_path):
    """EfficientNet's own head init (uniform +-0.29 for 12 classes) gave logits of several
    units on ImageNet features, which a short fine-tune never undid (few-shot test accuracy
    at chance with a frozen backbone)."""
    torch.manual_seed(0)
    source = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    model = build_model("tf_efficientnet_lite0", num_classes=12, pretrained=False,
                        pretrained_path=str(tmp_path / "w.safetensors")).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(logits, torch.zeros(2, 12))  # softmax: 1/12 each, loss ln 12
    assert torch.equal(model.conv_stem.weight, source.conv_stem.weight)  # the body is the file's
    scratch = build_model("tf_efficientnet_lite0", num_classes=12, pretrained=False)
    assert scratch.get_classifier().weight.abs().sum() > 0  # from scratch: timm's own init


GOOD_EXPORT = {"architecture": "resnet18", "num_classes": 2, "label_names": ["Abyssinian", "Bengal"],
               "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}}


@pytest.mark.parametrize("change, fragment", [
    ({"architecture": "hf-hub:timm/resnet18"}, "not a plain timm model name"),
    ({"architecture": "local-dir:/elsewhere"}, "not a plain timm model name"),
    ({"architecture": "../../resnet18"}, "not a plain timm model name"),
    ({"architecture": 18}, "not a plain timm model name"),
    ({"label_names": "Abyssinian"}, "no list of class names"),
    ({"num_classes": 3}, "num_classes 3"),
    ({"pretrained_cfg": {"input_size": "big"}}, "input_size"),
])
def test_a_crafted_model_config_is_refused_in_one_sentence(tmp_path, change, fragment):
    """config.json is data: it never makes the loader reach for the Hub or other folders."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**GOOD_EXPORT, **change}))
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=fragment):
        load_trained_model(folder)


def test_a_crafted_train_state_is_refused_too(tmp_path):
    checkpoint = tmp_path / "checkpoints" / "step_00000001"
    checkpoint.mkdir(parents=True)
    (checkpoint / "train_state.json").write_text(json.dumps(
        {"model": "local-dir:/etc", "class_names": ["A"], "data_config": {"input_size": [3, 8, 8]}}))
    (checkpoint / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="not a plain timm model name"):
        load_trained_model(checkpoint)
