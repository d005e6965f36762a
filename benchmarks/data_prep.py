"""Load + filter + split of a full-size Oxford-IIIT Pet folder, against the old script's approach.

    python benchmarks/data_prep.py                          # generates the folder once (~1-2 min)
    python benchmarks/data_prep.py --repeats 5 --json runs/data_prep.json

The folder is generated, not downloaded: the 37 real breed names with the official split sizes
(3,680 trainval + 3,669 test = 7,349 images), 500x375 JPEGs with shapes, gradients and noise,
written once under --work-dir and reused by later runs.

ours: `pet_pipeline.data.load_pets(data_dir=..., species="cat", val_fraction=0.1)`, which reads
      the annotation files, checks the header and end marker of each kept file, and splits
      (stratified) without decoding a pixel. Timed --repeats times; the median is reported.
old:  what the script this project replaces did to find the cats: for each of --old-passes
      passes, decode every image of both splits to RGB (PIL open + convert + load) to read
      its label.

Imports are in neither figure (pet_pipeline.data brings scikit-learn, ~1 s once per process,
which train.py and evaluate.py load for their evaluation anyway). Both run on a warm page
cache (the files were just written or read), so the comparison is CPU work, not disk speed.
A step-by-step re-run of `ours` shows where its time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

import datasets  # noqa: E402

from pet_pipeline.breeds import BREEDS, CAT_BREEDS, DOG_BREEDS, kept_breeds  # noqa: E402
from pet_pipeline.data import (  # noqa: E402
    find_pet_root,
    load_pets,
    parse_annotations,
    pet_features,
    stratified_split,
)
from pet_pipeline.images import check_image_file  # noqa: E402

N_TRAINVAL, N_TEST = 3680, 3669  # the official split sizes
WIDTH, HEIGHT = 500, 375  # the most common Oxford-IIIT Pet image size
FOLDER_VERSION = 1  # bump when the generated content changes


# ----------------------------------------------------------------------------- the folder


def per_class(total: int, classes: int) -> list[int]:
    """`total` spread as evenly as possible over `classes` (the real split is ~100 a breed)."""
    base, extra = divmod(total, classes)
    return [base + (k < extra) for k in range(classes)]


def annotation_line(image_id: str, breed: str) -> str:
    if breed in CAT_BREEDS:
        species, breed_id = 1, CAT_BREEDS.index(breed) + 1
    else:
        species, breed_id = 2, DOG_BREEDS.index(breed) + 1
    return f"{image_id} {BREEDS.index(breed) + 1} {species} {breed_id}"


def draw_photo(class_id: int, rng: np.random.Generator, textures: list[np.ndarray]) -> Image.Image:
    """A 500x375 picture with photo-like JPEG size (~100 KB): gradient, soft shapes, grain."""
    hue = np.array([(class_id * 53) % 256, (class_id * 97 + 60) % 256, (class_id * 29 + 120) % 256])
    ramp = np.linspace(0.55, 1.0, WIDTH, dtype=np.float32)[None, :, None]
    img = Image.fromarray((ramp * hue[None, None, :] * np.ones((HEIGHT, 1, 1))).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = rng.integers(0, WIDTH - 60), rng.integers(0, HEIGHT - 60)
        w, h = rng.integers(40, 220, size=2)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.ellipse([x, y, x + w, y + h], fill=colour, outline=(0, 0, 0), width=3)
    img = img.filter(ImageFilter.SMOOTH)
    texture = textures[rng.integers(len(textures))]
    shift = rng.integers(0, HEIGHT), rng.integers(0, WIDTH)
    pixels = np.asarray(img, dtype=np.float32) + np.roll(texture, shift, axis=(0, 1))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def generate_folder(root: Path, seed: int = 0) -> Path:
    """Write images/ and annotations/{trainval,test,list}.txt; atomically, via a temp folder."""
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    (tmp / "annotations").mkdir()
    rng = np.random.default_rng(seed)
    textures = [rng.normal(0, 10, size=(HEIGHT, WIDTH, 3)).astype(np.float32) for _ in range(6)]
    lines = {"trainval": [], "test": []}
    counts = {"trainval": per_class(N_TRAINVAL, len(BREEDS)), "test": per_class(N_TEST, len(BREEDS))}
    start, done = time.perf_counter(), 0
    for class_id, breed in enumerate(BREEDS):
        n = 0
        for split in ("trainval", "test"):
            for _ in range(counts[split][class_id]):
                n += 1
                image_id = f"{breed}_{n}"
                draw_photo(class_id, rng, textures).save(tmp / "images" / f"{image_id}.jpg", quality=90)
                lines[split].append(annotation_line(image_id, breed))
                done += 1
        print(f"\r  generating: {done}/{N_TRAINVAL + N_TEST} images"
              f" ({time.perf_counter() - start:.0f} s)", end="", flush=True)
    print()
    for split, rows in lines.items():
        (tmp / "annotations" / f"{split}.txt").write_text("\n".join(rows) + "\n")
    header = ["#Image CLASS-ID SPECIES BREED ID", "#ID: 1:37 Class ids", "#SPECIES: 1:Cat 2:Dog",
              "#BREED ID: 1-25:Cat 1:12:Dog",
              "#All images with 1st letter as captial are cat images",
              "#images with small first letter are dog images"]
    everything = header + lines["trainval"] + lines["test"]
    (tmp / "annotations" / "list.txt").write_text("\n".join(everything) + "\n")
    (tmp / "DONE").write_text(f"{FOLDER_VERSION}\n")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def full_size_folder(work_dir: Path) -> Path:
    root = work_dir / f"oxford-pet-full-v{FOLDER_VERSION}"
    if (root / "DONE").is_file():
        print(f"folder: {root} (cached)")
        return root
    print(f"folder: generating {N_TRAINVAL + N_TEST} images of {WIDTH}x{HEIGHT} in {root}")
    return generate_folder(root)


# ----------------------------------------------------------------------------- the two approaches


def ours(root: Path) -> tuple[float, object]:
    start = time.perf_counter()
    pets = load_pets(data_dir=str(root), species="cat", val_fraction=0.1, seed=42)
    return time.perf_counter() - start, pets


def old_pass(root: Path) -> float:
    """One pass of the old script: every image of both splits decoded to read its label."""
    start = time.perf_counter()
    for split in ("trainval", "test"):
        for line in (root / "annotations" / f"{split}.txt").read_text().splitlines():
            image_id, class_id = line.split()[:2]
            with Image.open(root / "images" / f"{image_id}.jpg") as img:
                img.convert("RGB").load()
            int(class_id) - 1  # the label it wanted
    return time.perf_counter() - start


def breakdown(root: Path, repeats: int) -> dict[str, float]:
    """Median seconds of each step `ours` takes, re-run one by one with the pipeline's own
    functions (cProfile would inflate the 2,000+ small per-file calls several times over)."""
    names = kept_breeds("cat")
    index = {name: i for i, name in enumerate(names)}
    steps: dict[str, list[float]] = {}

    @contextmanager
    def timer(step: str):
        start = time.perf_counter()
        yield
        steps.setdefault(step, []).append(time.perf_counter() - start)

    for _ in range(repeats):
        with timer("find_pet_root"):
            pet_root = find_pet_root(root)
        with timer("parse_annotations (2 files)"):
            rows = {split: parse_annotations(pet_root / "annotations" / f"{split}.txt")[0]
                    for split in ("trainval", "test")}
        kept = {split: [r for r in split_rows if r.breed in index] for split, split_rows in rows.items()}
        paths = {split: [pet_root / "images" / f"{r.image_id}.jpg" for r in split_rows]
                 for split, split_rows in kept.items()}
        with timer(f"check_image_file ({sum(len(p) for p in paths.values())} kept files)"):
            for split_paths in paths.values():
                for path in split_paths:
                    check_image_file(path)
        with timer("datasets.Dataset.from_dict (2 splits)"):
            splits = {}
            for split, split_rows in kept.items():
                columns = {"image": [str(p) for p in paths[split]],
                           "label": [index[r.breed] for r in split_rows],
                           "species": [0] * len(split_rows),
                           "image_id": [r.image_id for r in split_rows]}
                splits[split] = datasets.Dataset.from_dict(columns, features=pet_features(names))
        with timer("stratified_split (val_fraction 0.1)"):
            stratified_split(splits["trainval"], 0.1, 42)
    return {step: statistics.median(times) for step, times in steps.items()}


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--work-dir", default="runs/benchmark-data",
                        help="where the generated 7,349-image folder is kept between runs (~0.5 GB)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of ours (median reported)")
    parser.add_argument("--old-passes", type=int, default=3,
                        help="decode passes over both splits, as the old script did (default 3)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.old_passes < 1:
        parser.error("--repeats and --old-passes must be >= 1")

    root = full_size_folder(Path(args.work_dir))
    n_images = sum(len((root / "annotations" / f"{split}.txt").read_text().splitlines())
                   for split in ("trainval", "test"))
    size_mb = sum(p.stat().st_size for p in (root / "images").iterdir()) / 1e6
    print(f"{n_images} images, {size_mb:.0f} MB; python {platform.python_version()},"
          f" {os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f}")

    ours_runs, pets = [], None
    for i in range(args.repeats):
        seconds, pets = ours(root)
        ours_runs.append(seconds)
        print(f"  ours run {i + 1}: {seconds:.3f} s")
    ours_s = statistics.median(ours_runs)
    print(f"  -> train {len(pets.train)} / val {len(pets.val)} / test {len(pets.test)} images,"
          f" {len(pets.class_names)} classes, {len(pets.skipped)} skipped")

    old_runs = []
    for i in range(args.old_passes):
        old_runs.append(old_pass(root))
        print(f"  old pass {i + 1}: {old_runs[-1]:.2f} s ({n_images} decodes)")
    old_s = sum(old_runs)

    steps = breakdown(root, args.repeats)

    print()
    print(f"{'approach':<58} {'seconds':>9}")
    print("-" * 68)
    print(f"{'ours: load_pets(species=cat, val_fraction=0.1), median':<58} {ours_s:>9.3f}")
    print(f"{'ours: first run / fastest run':<58} {ours_runs[0]:>5.3f} / {min(ours_runs):.3f}")
    print(f"{f'old: decode all {n_images} images x {args.old_passes} passes':<58} {old_s:>9.2f}")
    print(f"{'old / ours':<58} {old_s / ours_s:>8.0f}x")
    print()
    print(f"where ours spends its time (each step re-run alone, median of {args.repeats}):")
    for step, seconds in steps.items():
        print(f"  {step:<50} {seconds:>7.3f} s  {100 * seconds / sum(steps.values()):>4.0f}%")

    if args.json:
        result = {
            "ours_s": ours_s, "old_s": old_s, "ratio": old_s / ours_s,
            "ours_runs_s": ours_runs, "old_passes_s": old_runs, "n_images": n_images,
            "kept": {"train": len(pets.train), "val": len(pets.val), "test": len(pets.test)},
            "ours_steps_s": steps,
            "cpus": os.cpu_count(), "python": platform.python_version(),
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
