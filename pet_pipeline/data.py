"""Oxford-IIIT Pet as Hugging Face `datasets`, the same schema from every source.

    pets = load_pets(dataset=..., data_dir=..., species="cat", val_fraction=0.1, seed=42)
    pets.train, pets.val, pets.test        # datasets.Dataset: image, label, species, image_id
    pets.class_names                       # the kept breeds, official order, label 0..K-1
    pets.skipped                           # "images/x.jpg: empty file", ... (left out)
    pets.duplicates, pets.leaks            # counts, each also named in pets.skipped
    pets.notes                             # e.g. a val_fraction raised so every class has val

Sources: a local folder in the official layout (or its torchvision parent), the Hub
(`timm/oxford-iiit-pet`), or `synthetic`, which generates a local folder once and loads it
like any other. Filtering reads label columns only; no image is decoded until a batch
needs it.

The annotation files of a local folder are untrusted input: an image id whose path leaves
images/ (`../x`, `/etc/passwd`, a symlink out), a file that is not a regular file, an image
over the pixel limit are named and left out; a line repeated in one file is kept once, and
an image listed in both trainval.txt and test.txt is dropped from training (a leak).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from datasets import ClassLabel, Features, Value
from sklearn.model_selection import train_test_split

from pet_pipeline.breeds import BREEDS, SPECIES_NAMES, kept_breeds, official_name
from pet_pipeline.errors import UserError
from pet_pipeline.images import check_image_file, open_rgb

ANNOTATION_FILES = {"trainval": "trainval.txt", "test": "test.txt"}
QUICKSTART_HINT = "or try the offline quickstart: python train.py --config configs/quickstart.yaml"


@dataclass
class PetData:
    train: datasets.Dataset
    val: datasets.Dataset | None
    test: datasets.Dataset
    class_names: list[str]
    skipped: list[str] = field(default_factory=list)  # every problem, one line each
    duplicates: int = 0  # annotation lines repeating an image of the same file, kept once
    leaks: int = 0  # trainval images also in test.txt, dropped from training
    notes: list[str] = field(default_factory=list)  # how the request was adapted, to print


def pet_features(class_names: list[str]) -> Features:
    return Features(
        {
            "image": datasets.Image(),
            "label": ClassLabel(names=list(class_names)),
            "species": ClassLabel(names=list(SPECIES_NAMES)),
            "image_id": Value("string"),
        }
    )


# ----------------------------------------------------------------------------- local folder


def find_pet_root(data_dir: str | Path) -> Path:
    """The folder holding images/ and annotations/: `data_dir` itself or its oxford-iiit-pet/."""
    data_dir = Path(data_dir)
    for root in (data_dir, data_dir / "oxford-iiit-pet"):
        if (root / "images").is_dir() and (root / "annotations").is_dir():
            missing = [n for n in ANNOTATION_FILES.values() if not (root / "annotations" / n).is_file()]
            if missing:
                raise UserError(
                    f"data_dir: {root / 'annotations'} lacks {' and '.join(missing)}; "
                    "the official download has trainval.txt and test.txt there."
                )
            return root
    if not data_dir.exists():
        raise UserError(f"data_dir: {data_dir} does not exist; give the folder of the dataset.")
    raise UserError(
        f"data_dir: {data_dir} is not an Oxford-IIIT Pet folder; expected images/*.jpg and "
        "annotations/trainval.txt + test.txt in it, or in its oxford-iiit-pet/ subfolder."
    )


@dataclass
class Annotation:
    image_id: str
    breed: str  # official name
    line: int = 0  # 1-based line number in its file


def parse_annotations(path: Path) -> tuple[list[Annotation], list[str]]:
    """Lines `Image CLASS-ID SPECIES BREED-ID`; '#' comments, blank lines and CRLF allowed.

    Returns the good lines and one problem string per malformed line.
    """
    rows, problems = [], []
    text = path.read_bytes().decode("utf-8", errors="replace")
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path.parent.name}/{path.name}:{number}"
        parts = line.split()
        if len(parts) != 4:
            problems.append(f"{where}: expected 4 fields 'Image CLASS-ID SPECIES BREED-ID', got {line!r}")
            continue
        image_id, *numbers = parts
        try:
            class_id, species_id, _breed_id = (int(n) for n in numbers)
        except ValueError:
            problems.append(f"{where}: CLASS-ID, SPECIES and BREED-ID must be integers, got {line!r}")
            continue
        if not 1 <= class_id <= len(BREEDS):
            problems.append(f"{where}: CLASS-ID {class_id} is outside 1..{len(BREEDS)}")
            continue
        breed = BREEDS[class_id - 1]
        if species_id not in (1, 2) or SPECIES_NAMES[species_id - 1] != _species(breed):
            problems.append(f"{where}: SPECIES {species_id} does not match breed {breed}")
            continue
        rows.append(Annotation(image_id, breed, number))
    return rows, problems


def _species(breed: str) -> str:
    return "cat" if breed[0].isupper() else "dog"


def image_name(image_id: str) -> str:
    """How a report names the file of an annotation id: the id as given, never a cleaned one."""
    name = f"{image_id}.jpg" if os.path.isabs(image_id) else f"images/{image_id}.jpg"
    return name if name.isprintable() else ascii(name)


def image_path(images: Path, image_id: str, images_real: Path | None = None
               ) -> tuple[Path | None, str | None]:
    """The file of `image_id` inside the folder `images` (an absolute, normalised path;
    `images_real` is its resolved form), symlinks resolved, or why there is none.

    Opens no file: a lexical check for ids that leave the folder (absolute, `..`), then the
    resolved path, so a symlink out of images/ is refused too (one within it is fine).
    """
    if not image_id.isprintable():
        return None, "image id has control characters"
    if os.path.isabs(image_id) or os.path.splitdrive(image_id)[0]:
        return None, "absolute path, leaves images/"
    lexical = Path(os.path.normpath(os.path.join(images, f"{image_id}.jpg")))
    if not lexical.is_relative_to(images):
        return None, "path leaves images/"
    resolved = Path(os.path.realpath(lexical))
    if not resolved.is_relative_to(images_real or Path(os.path.realpath(images))):
        return None, "symlink out of images/"
    return resolved, None


def load_local(data_dir: str | Path, class_names: list[str]) -> tuple[dict, list[str], dict]:
    """{'trainval': Dataset, 'test': Dataset} of the kept breeds, what was left out, and the
    counts {'duplicates': n, 'leaks': n} (those are also named among what was left out)."""
    root = find_pet_root(data_dir)
    index = {name: i for i, name in enumerate(class_names)}
    problems = []
    counts = {"duplicates": 0, "leaks": 0}
    kept = {}  # split -> [(annotation, resolved path)]
    listed = {}  # split -> every normalised id the file lists, of any breed
    for split, filename in ANNOTATION_FILES.items():
        kept[split], listed[split] = _read_annotation_file(root, filename, index, problems, counts)
    kept["trainval"] = _without_test_images(kept, listed["test"], problems, counts)
    features = pet_features(class_names)
    splits = {split: _local_dataset(entries, index, features) for split, entries in kept.items()}
    return splits, problems, counts


def _read_annotation_file(root: Path, filename: str, index: dict[str, int], problems: list[str],
                          counts: dict) -> tuple[list, set[str]]:
    """The kept breeds' [(annotation, resolved path)] of one annotation file, each image once
    and its file checked, and the normalised ids of every image it lists, of any breed.
    What it leaves out is appended to `problems`; a repeated image adds to counts["duplicates"]."""
    images = Path(os.path.normpath(os.path.abspath(root / "images")))
    images_real = Path(os.path.realpath(images))
    rows, bad_lines = parse_annotations(root / "annotations" / filename)
    problems += bad_lines
    first = {}  # normalised id -> its first annotation in this file
    kept = []
    for row in rows:
        key = os.path.normpath(row.image_id)
        earlier = first.get(key)
        if earlier is not None:  # the same image twice in one file: kept once
            if earlier.breed in index or row.breed in index:
                counts["duplicates"] += 1
                other = "" if row.breed == earlier.breed else (
                    f" as {row.breed} (the first line's {earlier.breed} kept)")
                problems.append(f"annotations/{filename}:{row.line}: {image_name(row.image_id)} "
                                f"listed again{other}, first on line {earlier.line}; kept once")
            continue
        first[key] = row
        if row.breed not in index:  # filter on the annotation, before touching the file
            continue
        path, reason = image_path(images, row.image_id, images_real)
        if reason is None:
            reason = check_image_file(path)
        if reason:
            problems.append(f"{image_name(row.image_id)}: {reason}")
            continue
        kept.append((row, path))
    return kept, set(first)


def _without_test_images(kept: dict, listed_in_test: set[str], problems: list[str], counts: dict) -> list:
    """kept["trainval"] without the images of kept["test"]: an image in both files would be
    tested on after training on it, so training loses it. Each one adds to counts["leaks"]
    and to `problems`."""
    test_files = {path: row.image_id for row, path in kept["test"]}
    trainval = []
    for row, path in kept["trainval"]:
        if os.path.normpath(row.image_id) in listed_in_test:
            where = "listed in both trainval.txt and test.txt"
        elif path in test_files:  # another name (a symlink) for a test image's file
            where = f"the same file as test image {test_files[path]}"
        else:
            trainval.append((row, path))
            continue
        counts["leaks"] += 1
        problems.append(f"{image_name(row.image_id)}: {where} (a train/test leak); "
                        "left out of training, kept in test")
    return trainval


def _local_dataset(entries: list, index: dict[str, int], features: Features) -> datasets.Dataset:
    """One split's [(annotation, resolved path)] as a Dataset in our schema."""
    columns = {
        "image": [str(path) for _, path in entries],
        "label": [index[row.breed] for row, _ in entries],
        "species": [SPECIES_NAMES.index(_species(row.breed)) for row, _ in entries],
        "image_id": [row.image_id for row, _ in entries],
    }
    return datasets.Dataset.from_dict(columns, features=features)


# ----------------------------------------------------------------------------- the Hub


def load_hub(dataset_id: str, class_names: list[str]) -> dict:
    """The Hub dataset (columns image, label = 37 lowercase names, image_id) in our schema."""
    try:
        hub = datasets.load_dataset(dataset_id)
    except Exception as e:  # offline, unknown id, auth: all end in the same advice
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(
            f"dataset: could not load {dataset_id!r} from the Hugging Face Hub ({reason}); "
            f"set data_dir to a local copy in the official layout, {QUICKSTART_HINT}."
        ) from None
    if "train" not in hub or "test" not in hub or "label" not in hub["train"].features:
        raise UserError(f"dataset: {dataset_id!r} has no train/test splits with a label column.")
    hub_names = hub["train"].features["label"].names
    official = [official_name(n) for n in hub_names]
    if None in official:
        unknown = hub_names[official.index(None)]
        raise UserError(f"dataset: {dataset_id!r} has label {unknown!r}, not an Oxford-IIIT Pet breed.")
    index = {name: i for i, name in enumerate(class_names)}
    to_kept = {i: index[name] for i, name in enumerate(official) if name in index}
    features = pet_features(class_names)

    def relabel(labels):
        return {
            "label": [to_kept[x] for x in labels],
            "species": [SPECIES_NAMES.index(_species(official[x])) for x in labels],
        }

    splits = {}
    for ours, theirs in (("trainval", "train"), ("test", "test")):
        ds = hub[theirs].filter(
            lambda labels: [x in to_kept for x in labels], input_columns="label", batched=True
        )
        ds = ds.map(relabel, input_columns="label", batched=True,
                    remove_columns=[c for c in ds.column_names if c not in features])
        splits[ours] = ds.cast(features)
    return splits, []


# ----------------------------------------------------------------------------- one entry point


def stratified_split(ds: datasets.Dataset, val_fraction: float, seed: int,
                     notes: list[str] | None = None):
    """(train, val) of `ds`, stratified by label and reproducible for a seed.

    Every class gets at least one validation image and keeps at least one training image.
    When `val_fraction` can't give that, the smallest validation size that does is used
    instead; when no size can (a class with fewer than 2 images), there is no validation
    split (val None). Either way one line saying so is appended to `notes`.
    """
    if val_fraction == 0:
        return ds, None
    notes = [] if notes is None else notes
    labels = ds["label"][:]  # a list; iterating a datasets Column formats row by row
    counts = Counter(labels)
    names = ds.features["label"].names
    too_few = [k for k in range(len(names)) if counts.get(k, 0) < 2]
    if too_few:
        notes.append(_no_validation_note(
            f"breed {names[too_few[0]]} has {counts.get(too_few[0], 0)} trainval image(s), too few "
            "for a validation split", len(ds)))
        return ds, None
    wanted = round(len(ds) * val_fraction)
    rows = np.arange(len(ds))
    most = len(ds) - len(names)  # every class keeps a training image
    for n_val in range(min(max(wanted, len(names)), most), most + 1):
        # scikit-learn on the label list (~15 ms for the 3,680 trainval images), then two
        # index views; datasets' own train_test_split took ~7x as long
        train_rows, val_rows = train_test_split(rows, test_size=n_val, stratify=labels,
                                                random_state=seed)
        # its allocation is proportional: a small class can get no validation image even
        # when there are as many validation images as classes
        if all(len({labels[i] for i in part}) == len(names) for part in (train_rows, val_rows)):
            if n_val > wanted:
                notes.append(
                    f"val_fraction: {val_fraction} ({wanted} of {len(ds)} images) can't give "
                    f"each of the {len(names)} classes a validation image; using the smallest "
                    f"stratified fraction that does, {n_val / len(ds):.3g} ({n_val} images)."
                )
            elif n_val < wanted:
                notes.append(
                    f"val_fraction: {val_fraction} leaves too few training images for each of "
                    f"the {len(names)} classes; using {n_val / len(ds):.3g} ({n_val} of "
                    f"{len(ds)} images) instead."
                )
            return ds.select(np.sort(train_rows)), ds.select(np.sort(val_rows))
    notes.append(_no_validation_note(f"no stratified split of {len(ds)} images gives each of "
                                     f"the {len(names)} classes both a training and a "
                                     "validation image", len(ds)))
    return ds, None


def _no_validation_note(reason: str, n_images: int) -> str:
    return (f"val_fraction: {reason}; training on all {n_images} trainval images without "
            "one, so the last weights are the model.")


def split_fingerprint(pets: PetData) -> str:
    """A short hash of which images are in train and which in val."""
    digest = hashlib.sha256()
    for name, ds in (("train", pets.train), ("val", pets.val)):
        ids = sorted(ds["image_id"][:]) if ds is not None else []
        digest.update(json.dumps([name, ids]).encode())
    return digest.hexdigest()[:16]


def load_pets(
    *,
    dataset: str = "timm/oxford-iiit-pet",
    data_dir: str | None = None,
    species: str = "cat",
    breeds: list[str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 42,
    strict_data: bool = False,
    synthetic_images_per_class: int = 24,
    synthetic_image_size: int = 96,
) -> PetData:
    class_names = kept_breeds(species, breeds)
    counts = {}
    if data_dir is not None:
        splits, skipped, counts = load_local(data_dir, class_names)
    elif dataset == "synthetic":
        from pet_pipeline.synthetic import synthetic_pets_dir

        folder = synthetic_pets_dir(images_per_class=synthetic_images_per_class,
                                    image_size=synthetic_image_size)
        splits, skipped, counts = load_local(folder, class_names)
    else:
        splits, skipped = load_hub(dataset, class_names)
    if skipped and strict_data:
        raise UserError(
            f"strict_data: {len(skipped)} bad input(s), first {skipped[0]}; fix or remove "
            "them, or set strict_data: false to leave them out."
        )
    for name, ds in splits.items():
        if len(ds) == 0:
            raise UserError(
                f"data: the {name} split has no images of {', '.join(class_names[:3])}"
                f"{'...' if len(class_names) > 3 else ''}; check data_dir, species and breeds."
            )
    notes = []
    train, val = stratified_split(splits["trainval"], val_fraction, seed, notes)
    return PetData(train=train, val=val, test=splits["test"], class_names=class_names,
                   skipped=skipped, notes=notes, **counts)


# ----------------------------------------------------------------------------- pre-resized cache


def _cache_key(ds: datasets.Dataset, short_side: int) -> str:
    """Same images and size -> same key, across runs and processes."""
    images = ds.cast_column("image", datasets.Image(decode=False))
    digest = hashlib.sha256(f"v1-{short_side}".encode())
    first_path = images[0]["image"]["path"] if len(images) else None  # one row, not the column
    if first_path and os.path.isfile(first_path):  # a local folder: ids, paths, sizes, times
        for record in images.select_columns("image")["image"][:]:
            stat = os.stat(record["path"])
            digest.update(f"{record['path']}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    else:  # a Hub dataset: its fingerprint follows its files
        digest.update(ds._fingerprint.encode())
    digest.update(json.dumps(ds["image_id"][:]).encode())
    return digest.hexdigest()[:20]


def pre_resize(ds: datasets.Dataset, *, short_side: int, num_proc: int = 1) -> datasets.Dataset:
    """Decode every image once, scale its short side down to `short_side` and store it raw.

    Later epochs and runs read uncompressed pixels (PPM: opening is a memory copy) instead
    of decoding a JPEG: decoding is the largest per-image cost of the input pipeline. The
    result is cached on disk under the pet-pipeline cache (PET_PIPELINE_CACHE) by content,
    so every run and every rank reuses it; ~0.26 MB an image at 256 px.
    """
    from pet_pipeline.synthetic import cache_root

    def resize(batch):
        stored = []
        for record in batch["image"]:
            image = open_rgb(record, min_side=short_side)  # JPEG draft decoding where it helps
            width, height = image.size
            scale = short_side / min(width, height)
            if scale < 1:
                image = image.resize((round(width * scale), round(height * scale)),
                                     resample=3)  # bicubic, antialiased
            buffer = io.BytesIO()
            image.save(buffer, format="PPM")
            stored.append({"bytes": buffer.getvalue(), "path": None})
        return {"image": stored}

    cache_file = cache_root() / "resized" / f"{_cache_key(ds, short_side)}.arrow"
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    features = ds.features.copy()
    features["image"] = datasets.Image(decode=False)
    resized = ds.cast_column("image", datasets.Image(decode=False)).map(
        resize, batched=True, batch_size=32, features=features, num_proc=num_proc if len(ds) > 256 else None,
        cache_file_name=str(cache_file), desc=f"pre-resizing to {short_side} px (once)")
    return resized.cast_column("image", datasets.Image())
