"""build_model: the weights it is asked for, from the Hub or a local file, never random ones."""

from __future__ import annotations

import timm
import torch
from safetensors.torch import save_file

from pet_pipeline.model import build_model


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
