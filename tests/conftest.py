"""Shared fixtures: a per-session cache for generated data, and tiny Oxford-layout folders.

    def test_x(make_pet_folder, tmp_path):
        root = make_pet_folder(tmp_path, {"Abyssinian": (4, 2), "beagle": 3})

    def test_y(synthetic_dir):      # the cached `dataset: synthetic` folder, 8 images a breed
        ...

Everything is generated, small and offline; nothing here needs the network.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from pet_pipeline.breeds import BREEDS, CAT_BREEDS, DOG_BREEDS
from pet_pipeline.synthetic import LIST_HEADER

REPO = Path(__file__).resolve().parents[1]
# The CI clone puts shared/ next to the project folder; tests that need it skip without it.
SHARED = REPO.parent / "shared"
PET_SAMPLE = SHARED / "data" / "oxford-pet-sample"

OXFORD_HEADER = LIST_HEADER


def annotation_line(image_id: str, breed: str) -> str:
    """`Image CLASS-ID SPECIES BREED-ID` with the official numbering of `breed`."""
    class_id = BREEDS.index(breed) + 1
    if breed in CAT_BREEDS:
        species, breed_id = 1, CAT_BREEDS.index(breed) + 1
    else:
        species, breed_id = 2, DOG_BREEDS.index(breed) + 1
    return f"{image_id} {class_id} {species} {breed_id}"


def small_image(breed: str, n: int, size: int = 24) -> Image.Image:
    """A small RGB picture whose colour depends on the breed and a little on `n`."""
    k = BREEDS.index(breed)
    colour = ((k * 67) % 256, (k * 31 + 80) % 256, (n * 13 + 40) % 256)
    img = Image.new("RGB", (size, size), colour)
    img.putpixel((0, 0), (255 - colour[0], 0, 0))
    return img


def write_pet_folder(
    root: str | Path,
    breeds_and_counts: dict,
    *,
    torchvision_layout: bool = False,
    crlf: bool = False,
    blank_lines: bool = False,
    comments: bool = False,
    image_size: int = 24,
    extra_trainval: list[str] = (),
    extra_test: list[str] = (),
) -> Path:
    """Write a tiny official-layout folder and return the folder holding images/.

    `breeds_and_counts` maps an official breed name to `(n_trainval, n_test)`, or to one
    number n split as ceil(n/2) trainval + floor(n/2) test. Image ids are `Breed_1..n`.
    `torchvision_layout` puts everything under `root/oxford-iiit-pet/` (then pass `root`
    as data_dir to test the parent layout). `crlf`, `blank_lines` and `comments` shape the
    annotation files the way some copies of the dataset have them; `extra_trainval` /
    `extra_test` are raw lines appended as they are (for malformed-line tests).
    annotations/list.txt always starts with the official '#' header.
    """
    root = Path(root)
    pet_root = root / "oxford-iiit-pet" if torchvision_layout else root
    (pet_root / "images").mkdir(parents=True, exist_ok=True)
    (pet_root / "annotations").mkdir(parents=True, exist_ok=True)
    lines = {"trainval": [], "test": []}
    for breed, counts in breeds_and_counts.items():
        if isinstance(counts, int):
            counts = ((counts + 1) // 2, counts // 2)
        n_trainval, n_test = counts
        for n in range(1, n_trainval + n_test + 1):
            image_id = f"{breed}_{n}"
            small_image(breed, n, image_size).save(pet_root / "images" / f"{image_id}.jpg", quality=90)
            split = "trainval" if n <= n_trainval else "test"
            lines[split].append(annotation_line(image_id, breed))
    lines["trainval"] += list(extra_trainval)
    lines["test"] += list(extra_test)
    newline = "\r\n" if crlf else "\n"
    for split, rows in lines.items():
        out = []
        if comments:
            out += list(OXFORD_HEADER)
        for i, row in enumerate(rows):
            out.append(row)
            if blank_lines and i % 3 == 0:
                out.append("")
        if blank_lines:
            out.append("   ")
        (pet_root / "annotations" / f"{split}.txt").write_bytes((newline.join(out) + newline).encode())
    everything = list(OXFORD_HEADER) + lines["trainval"] + lines["test"]
    (pet_root / "annotations" / "list.txt").write_bytes((newline.join(everything) + newline).encode())
    return pet_root


def annotation_ids(path: Path) -> list[str]:
    """The image ids of an annotation file (comments and blank lines skipped)."""
    ids = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            ids.append(line.split()[0])
    return ids


@pytest.fixture
def make_pet_folder():
    """`write_pet_folder` as a fixture, so test modules need not import conftest."""
    return write_pet_folder


@pytest.fixture(scope="session")
def pet_cache(tmp_path_factory):
    """PET_PIPELINE_CACHE pointed at a session tmp folder, so `dataset: synthetic` is
    generated there once per session and never in the user's home."""
    cache = tmp_path_factory.mktemp("pet-cache")
    previous = os.environ.get("PET_PIPELINE_CACHE")
    os.environ["PET_PIPELINE_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("PET_PIPELINE_CACHE", None)
    else:
        os.environ["PET_PIPELINE_CACHE"] = previous


@pytest.fixture(scope="session")
def synthetic_dir(pet_cache) -> Path:
    """The cached synthetic folder (37 breeds x 8 images of 48 px), generated once."""
    from pet_pipeline.synthetic import synthetic_pets_dir

    folder = synthetic_pets_dir(images_per_class=8, image_size=48)
    assert folder.is_relative_to(pet_cache)
    return folder
