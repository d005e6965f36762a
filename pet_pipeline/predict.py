"""predict.py's parts: which files, reading them without ever raising, top-k rows, writers.

    paths = find_images(["photos/", "more/*.png", "cat.jpg"])  # UserError for a PATH without images
    check_model_source("runs/x/model"); check_output_file("out/predictions.csv")  # before torch
    model, class_names, data_config = load_model("runs/x/model")
    images = ImageFiles(paths, data_config)           # items never raise: "readable" says 0 instead
    probabilities, readable = predict_files(model, loader, accelerator, count=len(paths), tta="none")
    rows = prediction_rows(paths, probabilities, class_names=..., top_k=5, reasons=...)
    write_rows(rows, "out/predictions.csv")            # .csv, .json or .jsonl

Images go through exactly evaluate.py's path (images.open_rgb at transforms.decode_size, then
transforms.build_eval_transform), so a file predicted here and evaluated there gets the same
probabilities. torch and timm are imported in the functions that need them: the checks that
run first answer a wrong path in a fraction of a second.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import tempfile
from pathlib import Path

from pet_pipeline.errors import UserError
from pet_pipeline.images import IMAGE_SUFFIXES, check_image_file, open_rgb

TIMM_PREFIXES = ("hf-hub:", "local-dir:")
# The weights files that model.py and checkpoint.py write (and timm's local-dir: reads), named
# here so that the checks before torch need not import those modules.
EXPORT_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
CHECKPOINT_WEIGHTS = ("ema.safetensors", "model.safetensors")
_HUB_REPO = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")  # org/name[@revision]


# ----------------------------------------------------------------------------- inputs


def _expand(pattern: str) -> list[str]:
    """The images of one PATH argument: a file as it is, a folder's images (recursively), or a
    glob's matching images and folders' images; each list sorted."""
    path = Path(pattern)
    if path.is_file():
        return [pattern]
    if path.is_dir():
        # sorted by path components (a/b/c before a/b-c), whatever Python's Path ordering
        return [str(p) for p in sorted(path.rglob("*"), key=lambda p: p.relative_to(path).parts)
                if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if not any(char in pattern for char in "*?["):
        return []
    found = []
    for match in sorted(glob.glob(pattern, recursive=True)):
        if Path(match).is_dir():
            found += _expand(match)
        elif Path(match).suffix.lower() in IMAGE_SUFFIXES and Path(match).is_file():
            found.append(match)
    return found


def find_images(patterns: list[str]) -> list[str]:
    """Every image the PATH arguments name, in their order, each file once (the first time it
    comes); a UserError naming the first PATH that yields no image."""
    paths, seen = [], set()
    for pattern in patterns:
        found = _expand(pattern)
        if not found:
            raise UserError(f"inputs: {pattern} matches no image ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                            "give image files, folders holding images, or globs such as 'photos/*.jpg'.")
        for path in found:
            key = os.path.realpath(path)  # photos/ and photos/*.jpg name the same files
            if key not in seen:
                seen.add(key)
                paths.append(path)
    return paths


# ----------------------------------------------------------------------------- checks before torch


def _check_writable_place(path: Path, key: str) -> None:
    """`path` can be created: its nearest existing ancestor is a folder where a file can be
    written (tried for real: permission bits say nothing for root or a read-only mount)."""
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{key}: {path} can't be created: {ancestor} is a file, not a folder; "
                        "choose another place.")
    try:
        with tempfile.NamedTemporaryFile(dir=ancestor, prefix=".predict-check-"):
            pass
    except OSError as e:
        raise UserError(f"{key}: {path} can't be written: {ancestor} does not take new files "
                        f"({e.strerror}); choose a writable place.") from None


def check_output_file(output: str, key: str = "output") -> None:
    """The output file can be written: not a folder, not a read-only file, in a writable place
    (its missing parent folders are created when it is written)."""
    path = Path(output)
    if path.is_dir():
        raise UserError(f"{key}: {path} is a folder; give a file name such as {path / 'predictions.csv'}.")
    if path.exists():
        if not path.is_file():
            raise UserError(f"{key}: {path} is not a regular file; give another file name.")
        try:
            with open(path, "r+b"):  # opened for writing, not changed
                pass
        except OSError as e:
            raise UserError(f"{key}: {path} can't be overwritten ({e.strerror}); choose another file "
                            "or make it writable.") from None
    _check_writable_place(path, key)


def check_output_folder(folder: str, key: str = "gradcam") -> None:
    """A folder that is there and writable, or that can be created."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise UserError(f"{key}: {path} is a file; give a folder for the Grad-CAM overlays.")
    _check_writable_place(path / "overlay.png", key)


def _read_json(path: Path, given: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        data = None
    if not isinstance(data, dict):
        raise UserError(f"model_dir: {path} is not a readable JSON model description; point "
                        f"model_dir ({given}) at a run's model/ folder.")
    return data


def _check_model_folder(folder: Path, given: str) -> None:
    """A model/ folder (timm's format) or a checkpoint names its classes and has its weights."""
    if not folder.is_dir():
        raise UserError(f"model_dir: {folder} is not a folder; give a run's model/ folder, one of its "
                        "checkpoints/step_N folders, local-dir:PATH or hf-hub:org/name.")
    if (folder / "train_state.json").is_file() and not given.startswith("local-dir:"):  # a checkpoint
        description, key, weights = "train_state.json", "class_names", CHECKPOINT_WEIGHTS
    elif (folder / "config.json").is_file():
        description, key, weights = "config.json", "label_names", EXPORT_WEIGHTS
    else:
        raise UserError(f"model_dir: {folder} has no config.json (nor train_state.json); give a run's "
                        "model/ folder or one of its checkpoints/step_N folders.")
    classes = _read_json(folder / description, given).get(key)
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise UserError(f"model_dir: {folder} names no classes ({key} in {description}); give a model "
                        f"saved by train.py, or add the class names to its {description}.")
    if not any((folder / name).is_file() for name in weights):
        raise UserError(f"model_dir: {folder} has no weights ({' or '.join(weights)}); give a folder "
                        "that holds the trained model.")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _check_hub_model(given: str) -> None:
    """An hf-hub: id is well formed and, offline, already in the Hugging Face cache."""
    repo = given[len("hf-hub:"):]
    if not _HUB_REPO.match(repo):
        raise UserError(f"model_dir: {given} is not a Hub model id; write hf-hub:org/name (or "
                        "hf-hub:org/name@revision).")
    if not _hub_offline():
        return  # the download, and what can go wrong with it, comes in load_model
    from huggingface_hub import try_to_load_from_cache

    repo_id, _, revision = repo.partition("@")
    if not isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision or None), str):
        raise UserError(f"model_dir: {given} is not in the Hugging Face cache and HF_HUB_OFFLINE is "
                        "set, so it can't be downloaded; run once where the Hub can be reached, or "
                        "give a local copy as local-dir:PATH.")


def check_model_source(model_dir: str) -> None:
    """What can be checked of `--model_dir` without torch: the folder, its classes and weights,
    or an hf-hub: id (offline: in the cache)."""
    if model_dir.startswith("hf-hub:"):
        _check_hub_model(model_dir)
    else:
        _check_model_folder(Path(model_dir.removeprefix("local-dir:")), model_dir)


# ----------------------------------------------------------------------------- the model


def _load_timm_model(model_dir: str):
    """timm's own loading of hf-hub:org/name or local-dir:PATH, with the class names and data
    config the folder's config.json holds."""
    import timm

    from pet_pipeline.prefetch import first_sentence

    try:
        model = timm.create_model(model_dir, pretrained=True)
    except Exception as e:  # hub, network, file and format errors all end the same way
        raise UserError(f"model_dir: {model_dir} could not be loaded ({first_sentence(e)}); check the "
                        "id or folder, and for hf-hub: the network or HF_TOKEN.") from None
    class_names = model.pretrained_cfg.get("label_names")
    if not isinstance(class_names, (list, tuple)) or len(class_names) != model.num_classes:
        raise UserError(f"model_dir: {model_dir} has no class names for its {model.num_classes} "
                        "outputs (label_names in config.json); give a classifier saved with them.")
    return model.eval(), list(class_names), dict(timm.data.resolve_model_data_config(model))


def load_model(model_dir: str):
    """(model in eval mode, class names, eval data config) of anything `--model_dir` takes."""
    if model_dir.startswith(TIMM_PREFIXES):
        return _load_timm_model(model_dir)
    from pet_pipeline.model import load_trained_model

    model, description = load_trained_model(model_dir)
    return model, list(description["label_names"]), description["data_config"]


# ----------------------------------------------------------------------------- reading images


class ImageFiles:
    """Image files as a map-style dataset: {"pixel_values", "index", "readable"} items.

    A file that can't be read gives zeros and readable 0 instead of raising: one broken photo
    among thousands must not end the run (or a DataLoader worker); its row says why
    (`why_unreadable`, asked again on the main process, which only sees tensors from the ranks).
    """

    def __init__(self, paths: list[str], data_config: dict):
        from pet_pipeline.transforms import build_eval_transform, decode_size

        self.paths = paths
        self.data_config = data_config
        self.transform = build_eval_transform(data_config)
        self.min_side = decode_size(data_config, None)
        self.input_size = tuple(data_config["input_size"])

    def __len__(self) -> int:
        return len(self.paths)

    def pixels(self, index: int):
        """The model input of one file, as evaluate.py makes it (PetTorchDataset); may raise."""
        return self.transform(open_rgb(self.paths[index], self.min_side))

    def __getitem__(self, index: int) -> dict:
        import torch  # already loaded by then: a dictionary lookup

        try:
            # the header check first: it never opens a FIFO or decodes a cut-off file
            if check_image_file(self.paths[index]) is None:
                return {"pixel_values": self.pixels(index), "index": index, "readable": 1}
        except Exception:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
            pass
        return {"pixel_values": torch.zeros(self.input_size), "index": index, "readable": 0}

    def why_unreadable(self, index: int) -> str:
        """The reason the file at `index` could not be used, in a few words."""
        reason = check_image_file(self.paths[index])
        if reason is not None:
            return reason
        from pet_pipeline.prefetch import first_sentence

        try:
            self.pixels(index)
        except Exception as e:
            return f"can't be decoded ({first_sentence(e)})"
        return "could not be read during prediction"  # changed since, or a passing I/O error


# ----------------------------------------------------------------------------- prediction


def predict_files(model, loader, accelerator, *, count: int, tta: str = "none"):
    """(probabilities float64 (count, K), readable bool (count,)) in input order, the same on
    every rank: every image once, whatever the number of processes."""
    import numpy as np
    import torch

    from pet_pipeline.evaluation import class_probabilities

    model.eval()
    gathered = []
    with torch.no_grad():
        for batch in loader:
            probabilities = class_probabilities(model, batch["pixel_values"], accelerator, tta=tta)
            parts = accelerator.gather_for_metrics((probabilities, batch["index"], batch["readable"]))
            gathered.append([part.cpu() for part in parts])
    probabilities, indices, readable = (torch.cat(column).numpy() for column in zip(*gathered))
    # gather_for_metrics drops the samples the sampler repeated to even out the last batch;
    # keeping the first of each index also puts the rows back in input order
    indices, first = np.unique(indices, return_index=True)
    if not np.array_equal(indices, np.arange(count)):
        raise RuntimeError(f"gathered {len(indices)} distinct images of {count}")
    return probabilities[first].astype(np.float64), readable[first].astype(bool)


def output_columns(top_k: int) -> list[str]:
    """path, label, probability, label_2, probability_2, ... label_K, probability_K, error."""
    ranked = [name for rank in range(1, top_k + 1)
              for name in (f"label{_suffix(rank)}", f"probability{_suffix(rank)}")]
    return ["path", *ranked, "error"]


def _suffix(rank: int) -> str:
    return "" if rank == 1 else f"_{rank}"


def prediction_rows(paths: list[str], probabilities, *, class_names: list[str], top_k: int,
                    reasons: dict[int, str]) -> list[dict]:
    """One row a path, in order: its `top_k` classes, most probable first (ties: the lower class
    index, as argmax), probabilities rounded to 6 decimals; for a position in `reasons` (the
    unreadable files), None there and the reason in `error`."""
    import numpy as np

    columns = output_columns(top_k)
    rows = []
    for position, path in enumerate(paths):
        row = dict.fromkeys(columns)
        row["path"] = path
        if position not in reasons:
            ranked = np.argsort(-probabilities[position], kind="stable")[:top_k]
            for rank, label in enumerate(ranked, start=1):
                row[f"label{_suffix(rank)}"] = class_names[label]
                row[f"probability{_suffix(rank)}"] = round(float(probabilities[position, label]), 6)
        else:
            row["error"] = reasons[position]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- writing


def _write_table(rows: list[dict], handle, suffix: str) -> None:
    if suffix == ".json":
        json.dump(rows, handle, indent=1)
        handle.write("\n")
    elif suffix == ".jsonl":
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    else:  # csv: empty cells for None, probabilities with their 6 decimals (never 1e-06)
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if value is None else f"{value:.6f}" if isinstance(value, float)
                             else value for key, value in row.items()})


def write_rows(rows: list[dict], output: str | Path) -> None:
    """The rows as CSV, a JSON list of objects or JSON lines, by `output`'s extension; written
    aside and renamed into place, so a failed write never leaves half a file."""
    from pet_pipeline.checkpoint import umask

    output, aside = Path(output), None
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=output.parent, prefix=f".{output.name}.",
                                         suffix=".tmp", newline="", delete=False) as handle:
            aside = Path(handle.name)
            _write_table(rows, handle, output.suffix.lower())
        os.chmod(aside, 0o666 & ~umask())  # NamedTemporaryFile makes it 0600
        aside.replace(output)
    except OSError as e:
        if aside is not None:
            aside.unlink(missing_ok=True)
        raise UserError(f"output: {output} could not be written ({e.strerror or e}); free some space "
                        "or choose another place, and run again.") from None


def save_gradcams(model, images: ImageFiles, targets: dict[int, int], out_dir: str | Path, *,
                  batch_size: int) -> int:
    """One Grad-CAM overlay per entry of `targets` (position -> class, the top one), named
    ROW_STEM.png after the image's row (1-based, zero-padded) and file; returns how many.

    Over the model's input (the eval transform's crop), on the main process with the plain
    model: Grad-CAM calls backward, which in a DDP-wrapped model would wait for the other ranks.
    The images go to the model's device.
    """
    import torch
    from PIL import Image
    from pytorch_grad_cam.utils.image import show_cam_on_image

    from pet_pipeline.gradcam import compute_gradcams, denormalize

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mean, std = images.data_config["mean"], images.data_config["std"]
    width = len(str(len(images)))
    positions, device = sorted(targets), next(model.parameters()).device
    for start in range(0, len(positions), batch_size):
        chunk = positions[start:start + batch_size]
        pixels = torch.stack([images.pixels(i) for i in chunk])
        cams = compute_gradcams(model, pixels.to(device), [targets[i] for i in chunk])
        for position, picture, cam in zip(chunk, denormalize(pixels, mean, std), cams):
            overlay = show_cam_on_image(picture, cam, use_rgb=True)
            name = f"{position + 1:0{width}d}_{Path(images.paths[position]).stem}.png"
            Image.fromarray(overlay).save(out_dir / name)
    return len(positions)
