"""The timm model: creation with pretrained weights (Hub or local file), export and reload."""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file

from pet_pipeline.errors import UserError

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"


def _size_kwargs(model_name: str, image_size: int | None) -> dict:
    """CoAtNet and other fixed-size models take `img_size`; CNNs accept any size as is."""
    cfg = timm.models.get_pretrained_cfg(model_name)
    if image_size is None or cfg is None or not cfg.fixed_input_size:
        return {}
    return {"img_size": image_size}


def build_model(
    model_name: str,
    *,
    num_classes: int,
    pretrained: bool,
    pretrained_path: str | None = None,
    drop_path_rate: float = 0.0,
    image_size: int | None = None,
) -> torch.nn.Module:
    """timm.create_model with a new `num_classes` head; never falls back to random weights.

    `pretrained_path` loads a local safetensors or PyTorch file (timm drops the old head).
    """
    kwargs = dict(num_classes=num_classes, drop_path_rate=drop_path_rate,
                  **_size_kwargs(model_name, image_size))
    if pretrained_path is not None:
        kwargs["pretrained_cfg_overlay"] = dict(file=str(pretrained_path))
    try:
        return timm.create_model(model_name, pretrained=pretrained or pretrained_path is not None,
                                 **kwargs)
    except TypeError as e:
        if "drop_path_rate" in str(e):  # families without stochastic depth
            kwargs.pop("drop_path_rate")
            return timm.create_model(model_name, pretrained=pretrained, **kwargs)
        raise
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        if not pretrained and pretrained_path is None:
            raise
        if pretrained_path is not None:
            raise UserError(
                f"pretrained_path: {pretrained_path} could not be loaded into {model_name} "
                f"({str(e).splitlines()[0][:120]}); give weights of that model."
            ) from None
        raise UserError(
            f"pretrained: the ImageNet weights of {model_name} can't be had "
            f"({str(e).splitlines()[0][:120]}); give a local file with pretrained_path, "
            "or train from scratch with pretrained: false."
        ) from None


def export_model(model: torch.nn.Module, out_dir: str | Path, *, model_name: str,
                 class_names: list[str], data_config: dict) -> None:
    """`model.safetensors` + `config.json` in the layout timm's Hub models use (pass the
    plain model: `accelerator.unwrap_model(model, keep_torch_compile=False)`).

    Load with evaluate.py, with `load_exported_model`, or with plain timm:
    `timm.create_model(name, num_classes=K, pretrained=True,
    pretrained_cfg_overlay={"file": ".../model.safetensors", "num_classes": K})` (without
    "num_classes" there, timm would drop the trained head as not matching ImageNet's 1000).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = out_dir / f".{EXPORT_WEIGHTS}.tmp"
    save_file(state, str(tmp))
    tmp.replace(out_dir / EXPORT_WEIGHTS)
    config = {
        "architecture": model_name,
        "num_classes": len(class_names),
        "label_names": list(class_names),
        "pretrained_cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
    }
    (out_dir / EXPORT_CONFIG).write_text(json.dumps(config, indent=2))


def read_export_config(model_dir: str | Path) -> dict:
    model_dir = Path(model_dir)
    config_path, weights = model_dir / EXPORT_CONFIG, model_dir / EXPORT_WEIGHTS
    if not config_path.is_file() or not weights.is_file():
        raise UserError(
            f"model_dir: {model_dir} lacks {EXPORT_CONFIG} or {EXPORT_WEIGHTS}; point it at "
            "the model/ folder of a finished run."
        )
    try:
        config = json.loads(config_path.read_text())
        config["architecture"], config["label_names"]  # noqa: B018 - required keys
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"model_dir: {config_path} is not a model config written by train.py.") from None
    return config


def load_exported_model(model_dir: str | Path) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, its config) from a folder written by `export_model`."""
    config = read_export_config(model_dir)
    size = config.get("pretrained_cfg", {}).get("input_size", [3, None, None])[-1]
    model = build_model(config["architecture"], num_classes=len(config["label_names"]),
                        pretrained=False, image_size=size)
    try:
        model.load_state_dict(load_file(str(Path(model_dir) / EXPORT_WEIGHTS)))
    except Exception as e:
        raise UserError(
            f"model_dir: {Path(model_dir) / EXPORT_WEIGHTS} can't be loaded ({str(e)[:120]}); "
            "re-export it from the run's checkpoint."
        ) from None
    return model.eval(), config
