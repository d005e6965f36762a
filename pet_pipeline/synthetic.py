"""A small generated pets folder in the official layout, for offline runs and tests.

Every one of the 37 real breeds gets its own background colour, shape and shape colour,
with random position, size, rotation and noise, so a small model can learn the classes
in a few minutes on a CPU. The folder is written once per (images per class, size) into
the cache and then loaded like any downloaded copy.

    python -m pet_pipeline.synthetic OUT_DIR --images-per-class 24 --image-size 96
"""

from __future__ import annotations

import argparse
import colorsys
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pet_pipeline.breeds import BREEDS, CAT_BREEDS

VERSION = 2  # bump when the generated content changes, so caches are rebuilt
SHAPES = ("ellipse", "rectangle", "triangle", "cross")
# The comment lines that open the official annotations/list.txt, verbatim (typos included).
LIST_HEADER = (
    "#Image CLASS-ID SPECIES BREED ID",
    "#ID: 1:37 Class ids",
    "#SPECIES: 1:Cat 2:Dog",
    "#BREED ID: 1-25:Cat 1:12:Dog",
    "#All images with 1st letter as captial are cat images",
    "#images with small first letter are dog images",
)


def cache_root() -> Path:
    return Path(os.environ.get("PET_PIPELINE_CACHE", Path.home() / ".cache" / "pet-pipeline"))


def _colour(hue: float, value: float = 0.9) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, 0.75, value)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_pet(class_id: int, image_size: int, rng: np.random.Generator) -> Image.Image:
    """One image of class `class_id` (0..36): class-specific colours and shape, random pose."""
    background = _colour(class_id / len(BREEDS), value=0.55 + 0.1 * (class_id % 3))
    foreground = _colour((class_id * 11 % len(BREEDS)) / len(BREEDS) + 0.5)
    img = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(img)
    size = image_size * rng.uniform(0.35, 0.6)
    cx, cy = rng.uniform(size / 2, image_size - size / 2, size=2)
    box = [cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2]
    shape = SHAPES[class_id % len(SHAPES)]
    if shape == "ellipse":
        draw.ellipse(box, fill=foreground)
    elif shape == "rectangle":
        draw.rectangle(box, fill=foreground)
    elif shape == "triangle":
        draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=foreground)
    else:
        w = size / 6
        draw.rectangle([cx - w, box[1], cx + w, box[3]], fill=foreground)
        draw.rectangle([box[0], cy - w, box[2], cy + w], fill=foreground)
    img = img.rotate(rng.uniform(-30, 30), fillcolor=background)
    noise = rng.normal(0, 12, size=(image_size, image_size, 3))
    pixels = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _write_one(job) -> None:
    out_dir, breed, class_id, n, image_size, seed = job
    rng = np.random.default_rng([seed, class_id, n])  # per image: same files for any worker count
    draw_pet(class_id, image_size, rng).save(out_dir / "images" / f"{breed}_{n}.jpg", quality=90)


def write_synthetic_pets(out_dir: str | Path, images_per_class: int = 24, image_size: int = 96,
                         seed: int = 0, workers: int = 1) -> Path:
    """Write images/ and annotations/{list,trainval,test}.txt; half of each class is test."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    lines = {"trainval": [], "test": []}
    jobs, breed_ids = [], {}
    for class_id, breed in enumerate(BREEDS):
        species = 1 if breed in CAT_BREEDS else 2
        breed_ids[species] = breed_ids.get(species, 0) + 1
        for n in range(1, images_per_class + 1):
            jobs.append((out_dir, breed, class_id, n, image_size, seed))
            split = "trainval" if n <= (images_per_class + 1) // 2 else "test"
            lines[split].append(f"{breed}_{n} {class_id + 1} {species} {breed_ids[species]}")
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.map(_write_one, jobs, chunksize=64)
    else:
        for job in jobs:
            _write_one(job)
    for split, rows in lines.items():
        (out_dir / "annotations" / f"{split}.txt").write_text("\n".join(rows) + "\n")
    everything = sorted(lines["trainval"] + lines["test"], key=lambda r: int(r.split()[1]))
    (out_dir / "annotations" / "list.txt").write_text("\n".join([*LIST_HEADER, *everything]) + "\n")
    return out_dir


def synthetic_pets_dir(images_per_class: int = 24, image_size: int = 96) -> Path:
    """The cached synthetic folder, generated on first use.

    Written to a temporary sibling and renamed into place, so processes that start
    together never see a half-written folder.
    """
    target = cache_root() / f"synthetic-v{VERSION}-{images_per_class}x{image_size}"
    if (target / "annotations" / "test.txt").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    # one process a core for the big sets (7,000+ images at full size take a minute alone)
    workers = min(8, os.cpu_count() or 1) if images_per_class * len(BREEDS) >= 2000 else 1
    write_synthetic_pets(tmp, images_per_class, image_size, workers=workers)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first; its folder is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder to write images/ and annotations/ into")
    parser.add_argument("--images-per-class", type=int, default=24, help="images per breed (>= 2)")
    parser.add_argument("--image-size", type=int, default=96, help="side in pixels (>= 16)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the drawings")
    parser.add_argument("--workers", type=int, default=1, help="processes drawing in parallel")
    args = parser.parse_args(argv)
    if args.images_per_class < 2 or args.image_size < 16:
        parser.exit(2, "error: --images-per-class must be >= 2 and --image-size >= 16.\n")
    out = write_synthetic_pets(args.out_dir, args.images_per_class, args.image_size, args.seed,
                               workers=max(1, args.workers))
    print(f"wrote {len(BREEDS) * args.images_per_class} images to {out}")


if __name__ == "__main__":
    main()
