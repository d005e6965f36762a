"""Evaluate a trained model on any split, with 1..N processes, and write the full report.

    python evaluate.py --model_dir runs/quickstart/model
    python evaluate.py --model_dir runs/quickstart/model --split val --output_dir /tmp/val-report
    accelerate launch --config_file accelerate_config.yaml evaluate.py --model_dir runs/x/model
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 evaluate.py --model_dir runs/x/model
    # upload it in timm's format with a model card of this evaluation (hf auth login first):
    python evaluate.py --model_dir runs/x/model --push_to_hub --hub_model_id you/pets-coatnet

`--model_dir` is a run's model/ folder or one of its checkpoints/step_N folders (its EMA
weights when it has some; saved by any number of processes, compiled or not). The class
list comes from the model; the data keys (dataset, data_dir, val_fraction, seed, ...)
default to the training run's config.yaml, so `--split val` is the run's own validation
split. Every process count gives the same predictions, each image counted once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pet_pipeline.config import RUN_DATA_KEYS, Config, EvalConfig, check_model_dir, load_config, read_yaml
from pet_pipeline.errors import UserError, exit_with

# torch, timm and the rest are imported in the functions that use them, so that `--help`
# and a mistyped key or value answer in a fraction of a second instead of after ~8 s.


def resolve_data_keys(config: EvalConfig, run_config: Path | None) -> dict:
    """Explicit values win, then the training run's, then train.py's defaults."""
    defaults = Config.__dataclass_fields__
    run_values = read_yaml(str(run_config)) if run_config else {}
    resolved = {}
    for key in RUN_DATA_KEYS:
        value = getattr(config, key)
        if value is None:
            value = run_values.get(key, defaults[key].default)
        resolved[key] = value
    if config.dataset is not None and config.data_dir is None:
        resolved["data_dir"] = None  # an explicit dataset replaces the run's local folder
    return resolved


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(sys.argv[1:] if argv is None else argv, cls=EvalConfig)
        check_model_dir(Path(config.model_dir))  # before torch: a wrong path answers at once
        if config.push_to_hub:  # a token and the Hub now, not after the evaluation
            from pet_pipeline.hub import check_hub_access

            check_hub_access(config.hub_model_id, ask_the_hub=int(os.environ.get("RANK", "0")) == 0)
        return evaluate(config)
    except UserError as error:
        exit_with(error)


def evaluate(config: EvalConfig) -> int:
    from accelerate import Accelerator

    from pet_pipeline.evaluation import evaluate_and_report
    from pet_pipeline.model import load_trained_model

    # ------------------------------------------------------------------ model (before any data)
    model, description = load_trained_model(config.model_dir)
    class_names = list(description["label_names"])
    data_config = description["data_config"]
    check_classes(config, class_names)
    run_data = resolve_data_keys(config, run_config_file(description))
    data = data_keys_for_split(config, run_data)
    out = report_folder(config, description)

    # ------------------------------------------------------------------ accelerator and data
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    pets, dataset = load_split(config, accelerator, class_names, data)
    model, loader = prepare_model_and_loader(config, accelerator, model, dataset, data_config)

    # ------------------------------------------------------------------ evaluation
    accelerator.print(f"evaluating {description['architecture']} ({len(class_names)} classes) on "
                      f"{len(dataset)} {config.split} images with {accelerator.num_processes} process(es)")
    metrics = evaluate_and_report(model, loader, accelerator, dataset=dataset,
                                  class_names=class_names, data_config=data_config, out_dir=out,
                                  gradcam_images=config.gradcam_images, tta=config.tta)
    if accelerator.is_main_process:
        print(f"{config.split} accuracy {metrics['accuracy']:.4f} on {metrics['n']} images; "
              f"report in {out}")
        if metrics["unreadable"]:  # deleted or damaged since the data was scanned
            print(f"{len(metrics['unreadable'])} image(s) could not be read and are left out of the "
                  f"report (listed in its metrics.json): {', '.join(metrics['unreadable'][:5])}"
                  f"{', ...' if len(metrics['unreadable']) > 5 else ''}")
        if config.push_to_hub:
            training = pets if data == run_data else load_model_classes(class_names, run_data)
            push_evaluated_model(config, accelerator.unwrap_model(model, keep_torch_compile=False),
                                 description, metrics=metrics, report_dir=out, run_data=run_data,
                                 split_sizes={name: len(getattr(training, name) or [])
                                              for name in ("train", "val", "test")})
    accelerator.end_training()
    return 0


def run_config_file(description: dict) -> Path | None:
    """The training run's config.yaml, when the run folder still has it."""
    path = description["run_dir"] / "config.yaml"
    return path if path.is_file() else None


def check_classes(config: EvalConfig, class_names: list[str]) -> None:
    """`species` and `breeds` may only name the model's own classes."""
    if config.species is None and config.breeds is None:
        return
    from pet_pipeline.breeds import kept_breeds

    wanted = kept_breeds(config.species or "all", config.breeds)
    if wanted != class_names:
        raise UserError(
            f"species/breeds: the data would have {len(wanted)} classes ({', '.join(wanted[:3])}"
            f"...) but the model knows {len(class_names)} ({', '.join(class_names[:3])}...); "
            "leave species and breeds out to use the model's classes."
        )


def data_keys_for_split(config: EvalConfig, run_data: dict) -> dict:
    """The data keys that give `config.split`: the run's, without a validation split for test."""
    data = dict(run_data)
    if config.split == "val" and not data["val_fraction"]:
        raise UserError("split: val needs val_fraction > 0; the training run had no validation split.")
    if config.split == "test":
        # the test split is the annotation file's, whatever the validation split: don't make
        # one (train is trainval minus val, so --split train keeps the run's val_fraction)
        data["val_fraction"] = 0
    return data


def report_folder(config: EvalConfig, description: dict) -> Path:
    """`output_dir`, or beside model/ as eval_SPLIT; for a checkpoint, in the run folder as
    eval_SPLIT_step_N (not inside checkpoints/, which holds checkpoints only)."""
    if config.output_dir:
        return Path(config.output_dir)
    model_dir = Path(config.model_dir)
    suffix = "" if model_dir.parent == description["run_dir"] else f"_{model_dir.name}"
    return description["run_dir"] / f"eval_{config.split}{suffix}"


def load_split(config: EvalConfig, accelerator, class_names: list[str], data: dict):
    """(all the splits, the one to evaluate) of the model's classes; a UserError when it is empty."""
    with accelerator.local_main_process_first():
        pets = load_model_classes(class_names, data)
    for note in pets.notes:
        accelerator.print(note)
    dataset = {"test": pets.test, "val": pets.val, "train": pets.train}[config.split]
    if dataset is None or len(dataset) == 0:
        raise UserError(f"split: the {config.split} split is empty after filtering; check the data keys.")
    return pets, dataset


def load_model_classes(class_names: list[str], data: dict):
    """The data of `data`'s keys with exactly the model's classes, in the model's order."""
    from pet_pipeline.data import load_data, source_format

    if source_format(data["data_format"], data["data_dir"], data["dataset"]) == "pets":
        pets = load_data(species="all", breeds=class_names, **data)
    else:
        pets = load_data(classes=class_names, **data)
    if pets.class_names != class_names:
        raise UserError(f"data: the data's classes ({', '.join(pets.class_names[:3])}...) are not the "
                        f"model's ({', '.join(class_names[:3])}...) in its order; give the data the "
                        "model was trained on.")
    return pets


def prepare_model_and_loader(config: EvalConfig, accelerator, model, dataset, data_config: dict):
    """The model and an eval DataLoader of `dataset`, prepared by the accelerator."""
    import torch

    from pet_pipeline.loader import PetTorchDataset, build_dataloader, default_num_workers
    from pet_pipeline.transforms import build_eval_transform, decode_size

    eval_set = PetTorchDataset(dataset, build_eval_transform(data_config),
                               min_side=decode_size(data_config, None))
    num_workers = config.num_workers if config.num_workers is not None else default_num_workers()
    loader = build_dataloader(eval_set, batch_size=config.batch_size, train=False, seed=0,
                              num_workers=num_workers, pin_memory=accelerator.device.type == "cuda")
    if accelerator.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return accelerator.prepare(model, loader)


def push_evaluated_model(config: EvalConfig, model, description: dict, *, metrics: dict, split_sizes: dict,
                         report_dir: Path | None = None, run_data: dict | None = None) -> None:
    """The model in timm's format, with a card of this evaluation, to the Hub in one commit
    (exported aside: a checkpoint or an older model/ folder is uploaded in today's format).
    `report_dir` and `run_data` default to evaluate()'s: its report_folder, and the data keys
    of the training run as resolve_data_keys gives them."""
    import tempfile

    from pet_pipeline.hub import push_folder, write_model_card
    from pet_pipeline.model import export_model

    report_dir = report_folder(config, description) if report_dir is None else report_dir
    config_file = run_config_file(description)
    run_data = resolve_data_keys(config, config_file) if run_data is None else run_data
    run_config = {"model": description["architecture"],
                  **(read_yaml(str(config_file)) if config_file else {}), **run_data}
    with tempfile.TemporaryDirectory() as staging:
        export_model(model, staging, class_names=description["label_names"],
                     data_config=description["data_config"])
        write_model_card(staging, architecture=description["architecture"], run_config=run_config,
                         class_names=description["label_names"], data_config=description["data_config"],
                         metrics=metrics, split_sizes=split_sizes, evaluated_split=config.split,
                         repo_id=config.hub_model_id, confusion_matrix=report_dir / "confusion_matrix.png")
        url = push_folder(staging, repo_id=config.hub_model_id, private=config.hub_private,
                          commit_message=f"pet-pipeline: {description['architecture']}, "
                                         f"{config.split} accuracy {metrics['accuracy']:.4f}",
                          retry=f"the report is in {report_dir}; run the same command again")
    print(f"pushed the model to the Hub: {url}")


if __name__ == "__main__":
    raise SystemExit(main())
