"""Download what a run needs from the Hugging Face Hub, on a machine with internet (a login
node), so that jobs on compute nodes without it can run with `HF_HUB_OFFLINE=1`.

    python -m pet_pipeline.prefetch --config configs/gpu.yaml
    python -m pet_pipeline.prefetch --config configs/gpu.yaml --weights_dir /shared/weights

It takes train.py's arguments (`--config`, `--dataset`, `--model`, `--pretrained`, ...) and
fetches exactly what that run would: the Hub dataset (all its splits) into the datasets
cache and the model's pretrained weights into the Hub cache, both under HF_HOME (default
~/.cache/huggingface; point it at a filesystem the compute nodes see). `--weights_dir` also
copies the weights file there, for `--pretrained_path` without any Hub cache. It ends by
printing the settings for the jobs. Run with HF_HUB_OFFLINE=1 it checks that everything is
already cached.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from pet_pipeline.config import load_config
from pet_pipeline.errors import UserError, exit_with


def split_own_arguments(argv: list[str]) -> tuple[Path | None, list[str]]:
    """(--weights_dir, the rest for load_config)."""
    weights_dir, rest, i = None, [], 0
    while i < len(argv):
        key, eq, value = argv[i].partition("=")
        if key.startswith("--") and key[2:].replace("-", "_") == "weights_dir":
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise UserError("weights_dir: missing value; write --weights_dir FOLDER.")
                value = argv[i + 1]
                i += 1
            weights_dir = Path(value)
        else:
            rest.append(argv[i])
        i += 1
    return weights_dir, rest


def first_sentence(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    text = text.split(". ")[0].rstrip(".")
    return text if len(text) <= 160 else text[:157] + "..."


def offline_hint() -> str:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return ("HF_HUB_OFFLINE is set, so nothing can be downloaded: run this where there is "
                "internet, without it")
    return "check the name and the network, or log in with `hf auth login` for a gated repository"


def fetch_dataset(dataset_id: str) -> str:
    """Every split of the Hub dataset into the datasets cache; a one-line description."""
    import datasets

    try:
        splits = datasets.load_dataset(dataset_id)
    except Exception as e:
        raise UserError(f"dataset: could not download {dataset_id!r} ({first_sentence(e)}); "
                        f"{offline_hint()}.") from None
    sizes = ", ".join(f"{name} {len(split)}" for name, split in splits.items())
    return f"dataset {dataset_id} ({sizes} images)"


def fetch_weights(model_name: str, weights_dir: Path | None) -> tuple[str, Path | None]:
    """The model's pretrained weights into the Hub cache (and a copy in `weights_dir`)."""
    import timm

    if not timm.is_model(model_name):
        raise UserError(f"model: {model_name!r} is not a timm model; see timm.list_models().")
    if not timm.models.get_pretrained_cfg(model_name):
        raise UserError(f"model: timm has no pretrained weights for {model_name}; use a model that "
                        "has some (timm.list_models(pretrained=True)) or pretrained: false.")
    try:
        model = timm.create_model(model_name, pretrained=True)
    except Exception as e:
        raise UserError(f"model: could not download the pretrained weights of {model_name} "
                        f"({first_sentence(e)}); {offline_hint()}.") from None
    hub_id = model.pretrained_cfg.get("hf_hub_id")
    description = f"weights of {model_name}" + (f" ({hub_id})" if hub_id else "")
    if weights_dir is None:
        return description, None
    weights_dir.mkdir(parents=True, exist_ok=True)
    cached = None
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(hub_id, filename)
            if isinstance(found, str):
                cached = Path(found)
                break
    if cached is not None:
        target = weights_dir / f"{model_name}{''.join(cached.suffixes)}"
        shutil.copyfile(cached, target)
    else:  # weights from a URL (torch hub cache): save what was loaded
        from safetensors.torch import save_file

        target = weights_dir / f"{model_name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(target))
    return description, target.resolve()


def prefetch(argv: list[str]) -> int:
    weights_dir, train_args = split_own_arguments(argv)
    config = load_config(train_args)  # the same keys, checks and defaults as train.py
    fetched, pretrained_path = [], None
    if config.data_dir is None and config.dataset != "synthetic":
        fetched.append(fetch_dataset(config.dataset))
    if config.pretrained and config.pretrained_path is None:
        description, pretrained_path = fetch_weights(config.model, weights_dir)
        fetched.append(description)
    if not fetched:
        print("nothing to download: this run uses local data (data_dir or dataset: synthetic) and "
              "no Hub weights (pretrained: false or pretrained_path).")
        return 0

    hf_home = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    print(f"cached under {hf_home} (HF_HOME):")
    for line in fetched:
        print(f"  {line}")
    print("\nOn the compute nodes, with this HF_HOME on a filesystem they see:\n"
          f"  export HF_HOME={hf_home} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1")
    if pretrained_path is not None:
        print(f"or, without the Hub cache for the weights: --pretrained_path {pretrained_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip())
        print("\nArguments: those of train.py (python train.py --help), and --weights_dir FOLDER.")
        return 0
    try:
        return prefetch(argv)
    except UserError as error:
        exit_with(error)


if __name__ == "__main__":
    raise SystemExit(main())
