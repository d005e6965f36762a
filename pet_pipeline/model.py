"""The timm model: creation with pretrained weights (Hub or local file), export, and loading
a trained one from a run's model/ folder or a checkpoint."""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from timm.data import resolve_data_config

from pet_pipeline.checkpoint import EMA_FILE, MODEL_FILE, STATE_FILE, umask, write_error_reason
from pet_pipeline.config import check_model_dir
from pet_pipeline.errors import UserError

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


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
    On pretrained weights the new classifier starts at zero, so the first predictions are
    uniform (loss ln K) and the first gradients come from the features, not from a random
    head: timm initialises some heads at a scale meant for training from scratch
    (EfficientNet's uniform +-1/sqrt(num_classes), +-0.29 for 12 classes, gives logits of
    several units on ImageNet features, and a few dozen fine-tuning steps at lr 2e-4 can't
    undo it). A zero start is what a linear probe (logistic regression) begins from too.
    """
    kwargs = dict(num_classes=num_classes, drop_path_rate=drop_path_rate,
                  **_size_kwargs(model_name, image_size))
    if pretrained_path is not None:
        kwargs["pretrained_cfg_overlay"] = dict(file=str(pretrained_path))
    load_weights = pretrained or pretrained_path is not None
    try:
        try:
            model = timm.create_model(model_name, pretrained=load_weights, **kwargs)
        except TypeError as e:
            if "drop_path_rate" not in str(e):
                raise
            kwargs.pop("drop_path_rate")  # families without stochastic depth: same call without it
            model = timm.create_model(model_name, pretrained=load_weights, **kwargs)
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        if not load_weights:
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
    if load_weights and num_classes > 0:
        with torch.no_grad():
            for parameter in model.get_classifier().parameters():
                parameter.zero_()
    return model


def check_weights_available(model_name: str, *, pretrained: bool, pretrained_path: str | None) -> None:
    """Before any data is read: the weights a run will start from can be had. A local file's
    header must read; Hub weights must be in the cache or, online, on the Hub."""
    if pretrained_path is not None:
        try:
            if str(pretrained_path).endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(str(pretrained_path), "pt") as f:
                    f.keys()
            else:  # torch.save writes a zip archive (a pickle before torch 1.6)
                with open(pretrained_path, "rb") as f:
                    legacy_pickle = f.read(1) == b"\x80"
                if not (legacy_pickle or zipfile.is_zipfile(pretrained_path)):
                    raise ValueError("neither a zip archive nor a pickle")
        except Exception as e:
            raise UserError(f"pretrained_path: {pretrained_path} is not a readable weights file "
                            f"({str(e).splitlines()[0][:90]}); give a safetensors or PyTorch file.") from None
        return
    if not pretrained:
        return
    cfg = timm.models.get_pretrained_cfg(model_name)
    unavailable = (f"pretrained: the ImageNet weights of {model_name} can't be had ({{}}); give a local "
                   "file with pretrained_path, or train from scratch with pretrained: false.")
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise UserError(unavailable.format("timm has none for it"))
    if not cfg.hf_hub_id:
        return  # a URL download: torch.hub's cache decides later
    import huggingface_hub
    from huggingface_hub.utils import HfHubHTTPError, OfflineModeIsEnabled

    names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    if any(isinstance(huggingface_hub.try_to_load_from_cache(cfg.hf_hub_id, name), str) for name in names):
        return
    try:
        if not any(huggingface_hub.file_exists(cfg.hf_hub_id, name) for name in names):
            raise UserError(unavailable.format(f"{cfg.hf_hub_id} holds no weights file"))
    except (OfflineModeIsEnabled, HfHubHTTPError, OSError) as e:
        why = "offline and not in the Hugging Face cache" if isinstance(e, OfflineModeIsEnabled) \
            else f"the Hub can't be reached: {type(e).__name__}"
        raise UserError(unavailable.format(why)) from None


def export_model(model: torch.nn.Module, out_dir: str | Path, *, class_names: list[str],
                 data_config: dict) -> None:
    """`model.safetensors` + `config.json` in timm's own layout, the one `save_for_hf` writes
    and the Hub's timm models use (pass the plain model:
    `accelerator.unwrap_model(model, keep_torch_compile=False)`).

    config.json is written by timm (`architecture`, `num_classes`, `num_features`,
    `global_pool`, `label_names`, `model_args` such as `img_size`, and `pretrained_cfg` with
    the data config: input size, interpolation, mean/std, crop), so that

        timm.create_model("local-dir:runs/x/model", pretrained=True)

    builds the model at the run's size with its weights and class names, and
    `timm.data.resolve_model_data_config` gives the run's eval transform; the same for
    "hf-hub:user/repo" once pushed. The weights are written here rather than by
    `save_for_hf`: on a GPU the model is channels_last, whose tensors safetensors refuses
    until they are made contiguous (on the CPU, a copy of the weights, not of the model).
    Each file is written aside and renamed into place, weights first.
    """
    from timm.models._hub import save_config_for_hf  # save_for_hf's config half

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mode = 0o666 & ~umask()  # safetensors writes 0600; the run's files follow the umask
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    weights_tmp, config_tmp = out_dir / f".{EXPORT_WEIGHTS}.tmp", out_dir / f".{EXPORT_CONFIG}.tmp"
    try:
        save_file(state, str(weights_tmp))
        save_config_for_hf(model, str(config_tmp), model_config={"label_names": list(class_names)},
                           data_config=dict(data_config))
    except Exception as error:  # OSError; SafetensorError on a full disk ("os error 28")
        for tmp in (weights_tmp, config_tmp):
            tmp.unlink(missing_ok=True)
        kept = " and kept the previous model/" if (out_dir / EXPORT_WEIGHTS).is_file() else ""
        raise UserError(f"model/ could not be written to {out_dir}: {write_error_reason(error, out_dir)}; "
                        f"freed the partial copy{kept}; free some space (or fix the folder) and rerun the "
                        "same command to resume from the last checkpoint.") from None
    for tmp, name in ((weights_tmp, EXPORT_WEIGHTS), (config_tmp, EXPORT_CONFIG)):
        os.chmod(tmp, mode)
        tmp.replace(out_dir / name)


def unwrap_state_dict(state: dict) -> dict:
    """Keys without the prefixes that wrappers add, in any order and number: `module.` (DDP,
    and timm's ModelEmaV3) and `_orig_mod.` (torch.compile)."""
    unwrapped = {}
    for key, value in state.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        unwrapped[key] = value
    return unwrapped


_PLAIN_MODEL_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?$")  # name or name.tag


def check_description(description: dict, source: Path) -> dict:
    """A model description read from disk is data, not instructions: the architecture is a
    plain timm name (no `hf-hub:` or `local-dir:` prefix, no path), the classes a list of
    names, the data config a mapping with a 3-number input size."""
    name = description.get("architecture")
    if not isinstance(name, str) or not _PLAIN_MODEL_NAME.match(name):
        raise UserError(f"model_dir: {source} names the architecture {name!r}, which is not a plain "
                        "timm model name (no hf-hub:, local-dir: or paths); fix or re-export it.")
    labels = description.get("label_names")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise UserError(f"model_dir: {source} has no list of class names (label_names); re-export it.")
    if description.get("num_classes", len(labels)) != len(labels):
        raise UserError(f"model_dir: {source} says num_classes {description['num_classes']!r} but "
                        f"names {len(labels)} classes; re-export it.")
    data_config = description.get("pretrained_cfg")
    size = data_config.get("input_size") if isinstance(data_config, dict) else None
    if not (isinstance(size, list) and len(size) == 3 and all(isinstance(x, int) and x > 0 for x in size)):
        raise UserError(f"model_dir: {source} has no valid pretrained_cfg.input_size (3 positive "
                        "integers); re-export it.")
    return description


def _describe_export(model_dir: Path) -> dict:
    config_path = model_dir / EXPORT_CONFIG
    try:
        config = json.loads(config_path.read_text())
        config["architecture"], config["label_names"]  # noqa: B018 - required keys
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise UserError(f"model_dir: {config_path} is not a model config written by train.py; "
                        "point model_dir at a run's model/ folder.") from None
    check_description(config, config_path)
    return {**config, "weights": model_dir / EXPORT_WEIGHTS, "run_dir": model_dir.parent}


def _describe_checkpoint(checkpoint: Path) -> dict:
    state_path = checkpoint / STATE_FILE
    try:
        state = json.loads(state_path.read_text())
        model_name, class_names = state["model"], state["class_names"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise UserError(f"model_dir: {state_path} is not a train state written by train.py; "
                        "point model_dir at another checkpoint or at the run's model/ folder.") from None
    if "data_config" not in state:
        raise UserError(f"model_dir: {checkpoint} is a checkpoint without a data config (from an "
                        "older pet-pipeline); use the run's model/ folder instead.")
    ema = checkpoint / EMA_FILE
    description = {"architecture": model_name, "label_names": class_names,
                   "pretrained_cfg": state["data_config"]}
    check_description(description, state_path)
    return {**description, "num_classes": len(class_names),
            "weights": ema if ema.is_file() else checkpoint / MODEL_FILE,
            "run_dir": checkpoint.parent.parent}


def load_trained_model(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, its description) from a run's `model/` folder (`export_model`) or
    one of its `checkpoints/step_N` folders, whose EMA weights are used when it has some.

    Checkpoints of any process count and of compiled models load (`unwrap_state_dict`), and
    so do model/ folders of earlier versions (config.json without `model_args`). The
    description holds `architecture`, `num_classes`, `label_names`, `pretrained_cfg`,
    `data_config` (input size, interpolation, mean/std, crop: the eval transform's),
    `weights` (the file loaded) and `run_dir` (the run's output_dir).
    """
    path = Path(path)
    check_model_dir(path)
    description = (_describe_checkpoint(path) if (path / STATE_FILE).is_file()
                   else _describe_export(path))
    # the data keys of pretrained_cfg, read the way timm reads them for a pretrained model
    data_config = resolve_data_config(pretrained_cfg=description["pretrained_cfg"])
    description["data_config"] = {**data_config, "input_size": tuple(data_config["input_size"])}
    weights, name = description["weights"], description["architecture"]
    num_classes = len(description["label_names"])
    if not weights.is_file():
        raise UserError(f"model_dir: {path} has no {weights.name}; give a run's model/ folder or "
                        "another of its checkpoints.")
    size = description["pretrained_cfg"].get("input_size", [3, None, None])[-1]
    try:
        model = build_model(name, num_classes=num_classes, pretrained=False, image_size=size)
    except RuntimeError as e:  # unknown to this timm
        raise UserError(f"model_dir: {path} holds a {name}, which timm {timm.__version__} can't "
                        f"build ({str(e).splitlines()[0][:100]}); install the timm the run used.") from None
    try:
        model.load_state_dict(unwrap_state_dict(load_file(str(weights))))
    except Exception as e:
        raise UserError(f"model_dir: {weights} does not fit {name} with {num_classes} classes "
                        f"({str(e).splitlines()[0][:100]}); give a run's model/ folder or another "
                        "of its checkpoints.") from None
    return model.eval(), description
