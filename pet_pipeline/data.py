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
from pet_pipeline.sources import (
    FRESH,
    PETS_HUB_ID,
    Loaded,
    Verdicts,
    detect_format,
    load_csv,
    load_hf,
    load_imagefolder,
    problems_or_verdicts,
)

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
    source: str = ""  # which source was read, from where: the start line says it
    bad_ids: list[str] = field(default_factory=list)  # images left out (a resumed run's Verdicts)


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


def load_local(data_dir: str | Path, class_names: list[str], *, verdicts: Verdicts = FRESH
               ) -> tuple[dict, list[str], dict]:
    """{'trainval': Dataset, 'test': Dataset} of the kept breeds, what was left out, and the
    counts {'duplicates': n, 'leaks': n} (those are also named among what was left out).
    `verdicts`: check the files, or take a resumed run's first verdicts (load_data)."""
    root = find_pet_root(data_dir)
    index = {name: i for i, name in enumerate(class_names)}
    problems = []
    counts = {"duplicates": 0, "leaks": 0, "bad_ids": []}
    kept = {}  # split -> [(annotation, resolved path)]
    listed = {}  # split -> every normalised id the file lists, of any breed
    for split, filename in ANNOTATION_FILES.items():
        kept[split], listed[split] = _read_annotation_file(root, filename, index, problems, counts,
                                                           verdicts=verdicts)
    kept["trainval"] = _without_test_images(kept, listed["test"], problems, counts)
    features = pet_features(class_names)
    splits = {split: _local_dataset(entries, index, features) for split, entries in kept.items()}
    return splits, problems, counts


def _read_annotation_file(root: Path, filename: str, index: dict[str, int], problems: list[str],
                          counts: dict, *, verdicts: Verdicts = FRESH) -> tuple[list, set[str]]:
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
            reason = verdicts.reason(row.image_id, lambda path=path: check_image_file(path))
        if reason:
            counts["bad_ids"].append(row.image_id)
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


def load_hub(dataset_id: str, class_names: list[str], *, verdicts: Verdicts = FRESH) -> dict:
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

    splits, skipped, bad_ids = {}, [], []
    for ours, theirs in (("trainval", "train"), ("test", "test")):
        ds = hub[theirs].filter(
            lambda labels: [x in to_kept for x in labels], input_columns="label", batched=True
        )
        ds = ds.map(relabel, input_columns="label", batched=True,
                    remove_columns=[c for c in ds.column_names if c not in features])
        ds = ds.cast(features)
        ids = ds["image_id"][:]
        bad = problems_or_verdicts(ds, ids, verdicts)  # the Hub's images: checked like files
        bad_ids += [ids[row] for row in bad]
        skipped += [f"{ids[row]}: {reason}; left out" for row, (reason, _) in bad.items()]
        splits[ours] = ds.select([row for row in range(len(ds)) if row not in bad]) if bad else ds
    return splits, skipped, bad_ids


# ----------------------------------------------------------------------------- one entry point


def stratified_split(ds: datasets.Dataset, val_fraction: float, seed: int,
                     notes: list[str] | None = None, *, pets: bool = True):
    """(train, val) of `ds`, stratified by label and reproducible for a seed.

    Every class gets at least one validation image and keeps at least one training image.
    When `val_fraction` can't give that, the smallest validation size that does is used
    instead; when no size can (a class with fewer than 2 images), there is no validation
    split (val None). Either way one line saying so is appended to `notes`.
    """
    if val_fraction == 0:
        return ds, None
    notes = [] if notes is None else notes
    a_class, pool = ("breed", "trainval") if pets else ("class", "training")
    labels = ds["label"][:]  # a list; iterating a datasets Column formats row by row
    counts = Counter(labels)
    names = ds.features["label"].names
    too_few = [k for k in range(len(names)) if counts.get(k, 0) < 2]
    if too_few:
        notes.append(_no_validation_note(
            f"{a_class} {names[too_few[0]]} has {counts.get(too_few[0], 0)} {pool} image(s), too few "
            "for a validation split", len(ds), pool))
        return ds, None
    wanted = round(len(ds) * val_fraction)
    held = _stratified_rows(labels, wanted, seed, len(names))
    if held is None:
        notes.append(_no_validation_note(f"no stratified split of {len(ds)} images gives each of "
                                         f"the {len(names)} classes both a training and a "
                                         "validation image", len(ds), pool))
        return ds, None
    train_rows, val_rows = held
    if len(val_rows) > wanted:
        notes.append(
            f"val_fraction: {val_fraction} ({wanted} of {len(ds)} images) can't give "
            f"each of the {len(names)} classes a validation image; using the smallest "
            f"stratified fraction that does, {len(val_rows) / len(ds):.3g} ({len(val_rows)} images)."
        )
    elif len(val_rows) < wanted:
        notes.append(
            f"val_fraction: {val_fraction} leaves too few training images for each of "
            f"the {len(names)} classes; using {len(val_rows) / len(ds):.3g} ({len(val_rows)} of "
            f"{len(ds)} images) instead."
        )
    return ds.select(train_rows), ds.select(val_rows)


def _stratified_rows(labels: list[int], wanted: int, seed: int, n_classes: int):
    """(kept rows, held-out rows), sorted, of about `wanted` held-out images with every class
    on both sides, the size nearest `wanted` that allows it; None when no size does."""
    rows = np.arange(len(labels))
    most = len(labels) - n_classes  # every class keeps an image
    for n_held in range(min(max(wanted, n_classes), most), most + 1):
        # scikit-learn on the label list (~15 ms for the 3,680 trainval images), then two
        # index views; datasets' own train_test_split took ~7x as long
        kept, held = train_test_split(rows, test_size=n_held, stratify=labels, random_state=seed)
        # its allocation is proportional: a small class can get no held-out image even
        # when there are as many held-out images as classes
        if all(len({labels[i] for i in part}) == n_classes for part in (kept, held)):
            return np.sort(kept), np.sort(held)
    return None


def _no_validation_note(reason: str, n_images: int, pool: str = "trainval") -> str:
    return (f"val_fraction: {reason}; training on all {n_images} {pool} images without "
            "one, so the last weights are the model.")


def split_fingerprint(pets: PetData) -> str:
    """A short hash of which images are in train and which in val."""
    digest = hashlib.sha256()
    for name, ds in (("train", pets.train), ("val", pets.val)):
        ids = sorted(ds["image_id"][:]) if ds is not None else []
        digest.update(json.dumps([name, ids]).encode())
    return digest.hexdigest()[:16]


def load_data(
    *,
    data_format: str = "auto",
    dataset: str = PETS_HUB_ID,
    data_dir: str | None = None,
    species: str = "cat",
    breeds: list[str] | None = None,
    classes: list[str] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 42,
    strict_data: bool = False,
    image_column: str | None = None,
    label_column: str | None = None,
    split_column: str = "split",
    dataset_revision: str | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    synthetic_images_per_class: int = 24,
    synthetic_image_size: int = 96,
    verdicts: Verdicts = FRESH,
) -> PetData:
    """Any source as checked train / val / test Datasets of one schema (the keys are the
    config's; pet_pipeline/config.py says what each means).

    The source's own splits are used; a missing test split is carved out of the training
    images (`test_fraction`), then a missing validation split (`val_fraction`), both
    stratified and seeded. `classes` keeps a subset of any source; `max_*_samples` shrink
    the splits, stratified, for debugging. `verdicts`: a resumed run leaves out what its first
    start left out, without checking the files again, so its rows (and with them the data
    order and the stand-ins) are the checkpoint's (sources.Verdicts, pet_pipeline/unreadable.py).
    """
    kind = source_format(data_format, data_dir, dataset)
    if kind == "pets":
        loaded = _pets_source(dataset, data_dir, kept_breeds(species, breeds),
                              (synthetic_images_per_class, synthetic_image_size), verdicts=verdicts)
    elif kind in ("imagefolder", "csv") and data_dir is None:
        raise UserError(f"data_format: {kind} reads data_dir; set data_dir to the "
                        f"{'folder of class folders' if kind == 'imagefolder' else 'CSV file'}.")
    elif kind == "imagefolder":
        loaded = load_imagefolder(data_dir, verdicts=verdicts)
    elif kind == "csv":
        loaded = load_csv(data_dir, image_column=image_column, label_column=label_column,
                          split_column=split_column, verdicts=verdicts)
    else:
        loaded = load_hf(data_dir or dataset, image_column=image_column, label_column=label_column,
                         revision=dataset_revision, verdicts=verdicts)
    loaded.description = f"{kind}{' (auto)' if data_format == 'auto' else ''}: {loaded.description}"
    if classes:
        loaded = keep_classes(loaded, classes)
    if loaded.skipped and strict_data:
        raise UserError(
            f"strict_data: {len(loaded.skipped)} bad input(s), first {loaded.skipped[0]}; fix or "
            "remove them, or set strict_data: false to leave them out."
        )
    _check_enough_images(loaded, pets=kind == "pets")
    return _split(loaded, pets=kind == "pets", val_fraction=val_fraction, test_fraction=test_fraction,
                  seed=seed, max_samples=(max_train_samples, max_eval_samples))


def source_format(data_format: str, data_dir: str | None, dataset: str) -> str:
    return detect_format(data_dir, dataset) if data_format == "auto" else data_format


def check_data_keys(config) -> str:
    """The source `config` names is there and its keys fit it, found without reading an image
    (train.py's check before heavy work); returns the source's format."""
    kind = source_format(config.data_format, config.data_dir, config.dataset)
    if kind == "pets":
        kept_breeds(config.species, config.breeds)  # unknown breed names
        if config.data_dir is not None:
            find_pet_root(config.data_dir)  # the official layout is there
        return kind
    if config.breeds:
        raise UserError(f"breeds: names Oxford-IIIT Pet breeds, but the data is {kind}; use classes "
                        "to keep some of its classes.")
    wanted = {"imagefolder": ("folder of class folders", Path.is_dir), "csv": ("CSV file", Path.is_file)}
    if kind in wanted:
        what, is_one = wanted[kind]
        if config.data_dir is None or not is_one(Path(config.data_dir)):
            raise UserError(f"data_dir: data_format: {kind} reads a {what}; "
                            f"{config.data_dir or 'data_dir is unset'} is not one.")
    return kind


def load_pets(*, species: str = "cat", breeds: list[str] | None = None, **keys) -> PetData:
    """Oxford-IIIT Pet (the Hub, a local copy or `dataset: synthetic`), by species or breeds."""
    return load_data(data_format="pets", species=species, breeds=breeds, **keys)


def _pets_source(dataset: str, data_dir: str | None, class_names: list[str], synthetic: tuple[int, int],
                 *, verdicts: Verdicts = FRESH) -> Loaded:
    """The Pets as a Loaded source: trainval.txt is its train split, test.txt its test split."""
    counts = {"duplicates": 0, "leaks": 0, "bad_ids": []}
    if data_dir is not None:
        splits, skipped, counts = load_local(data_dir, class_names, verdicts=verdicts)
        where = f"Oxford-IIIT Pet folder {find_pet_root(data_dir)}"
    elif dataset == "synthetic":
        from pet_pipeline.synthetic import synthetic_pets_dir

        images_per_class, image_size = synthetic
        folder = synthetic_pets_dir(images_per_class=images_per_class, image_size=image_size)
        splits, skipped, counts = load_local(folder, class_names, verdicts=verdicts)
        where = f"generated stand-in Pets in {folder}"
    else:
        splits, skipped, counts["bad_ids"] = load_hub(dataset, class_names, verdicts=verdicts)
        where = f"Hub dataset {dataset}"
    return Loaded(splits={"train": splits["trainval"], "test": splits["test"]}, class_names=class_names,
                  description=where, skipped=skipped, counts=counts)


def keep_classes(loaded: Loaded, classes: list[str]) -> Loaded:
    """Only the images of `classes` (names as the source spells them), relabelled 0..K-1 in
    the source's order."""
    unknown = [name for name in classes if name not in loaded.class_names]
    if unknown:
        more = ", ..." if len(loaded.class_names) > 8 else ""
        raise UserError(f"classes: {unknown[0]!r} is not a class of this data; its classes are "
                        f"{', '.join(loaded.class_names[:8])}{more}.")
    kept = [name for name in loaded.class_names if name in set(classes)]
    to_kept = {loaded.class_names.index(name): i for i, name in enumerate(kept)}
    splits = {}
    for split, ds in loaded.splits.items():
        features = ds.features.copy()
        features["label"] = ClassLabel(names=kept)
        ds = ds.filter(lambda labels: [x in to_kept for x in labels], input_columns="label", batched=True)
        splits[split] = ds.map(lambda labels: {"label": [to_kept[x] for x in labels]},
                               input_columns="label", batched=True, features=features)
    loaded.splits, loaded.class_names = splits, kept
    return loaded


def _check_enough_images(loaded: Loaded, *, pets: bool) -> None:
    """Every split has images; outside the Pets, at least 2 classes, each with training images."""
    names = loaded.class_names
    for name, ds in loaded.splits.items():
        if len(ds) == 0:
            raise UserError(
                f"data: the {name} split has no images of {', '.join(names[:3])}"
                f"{'...' if len(names) > 3 else ''}; check data_dir"
                f"{', species and breeds' if pets else ' and classes'}.")
    if pets:
        return
    if len(names) < 2:
        raise UserError(f"data: {loaded.description} has one class ({names[0] if names else 'none'}); a "
                        "classifier needs at least 2, e.g. one folder per class.")
    in_train = Counter(loaded.splits["train"]["label"][:])
    empty = [name for i, name in enumerate(names) if not in_train.get(i)]
    if empty:
        raise UserError(f"data: class {empty[0]} has no usable training images"
                        f"{' (see the files left out)' if loaded.skipped else ''}; add images or "
                        "remove the class.")


def _split(loaded: Loaded, *, pets: bool, val_fraction: float, test_fraction: float, seed: int,
           max_samples: tuple[int | None, int | None] = (None, None)) -> PetData:
    """Train / val / test from the source's splits, the missing ones carved out, then shrunk."""
    notes = []
    train, val, test = (loaded.splits.get(name) for name in ("train", "val", "test"))
    if test is None:
        train, test = carve_test(train, test_fraction, seed, notes)
    if val is None:
        if callable(val_fraction):  # auto_scale: recipe.ValidationRule, from the pool's size
            val_fraction = val_fraction(len(train), len(loaded.class_names))
        train, val = stratified_split(train, val_fraction, seed, notes, pets=pets)
    elif not pets:
        notes.append(f"val_fraction: the data has its own validation split ({len(val)} images); "
                     "val_fraction is not used.")
    max_train, max_eval = max_samples
    train = _at_most(train, max_train, seed, "max_train_samples", notes)
    val = _at_most(val, max_eval, seed, "max_eval_samples", notes)
    test = _at_most(test, max_eval, seed, "max_eval_samples", notes)
    return PetData(train=train, val=val, test=test, class_names=loaded.class_names,
                   skipped=loaded.skipped, notes=notes, source=loaded.description, **loaded.counts)


def carve_test(ds: datasets.Dataset, test_fraction: float, seed: int, notes: list[str]):
    """(train, test) of a source without a test split: about `test_fraction` of each class
    held out, stratified and seeded, every class on both sides."""
    names = ds.features["label"].names
    labels = ds["label"][:]
    counts = Counter(labels)
    too_few = [i for i in range(len(names)) if counts.get(i, 0) < 2]
    held = None if too_few else _stratified_rows(labels, round(len(ds) * test_fraction), seed, len(names))
    if held is None:
        which = (f"class {names[too_few[0]]} has {counts.get(too_few[0], 0)} image(s), too few"
                 if too_few else f"{len(ds)} images can't give each of the {len(names)} classes")
        raise UserError(f"test_fraction: {which} to hold out a test image and keep a training one; "
                        "add images, or give the data its own test split (a test/ folder, test rows).")
    train_rows, test_rows = held
    notes.append(f"test_fraction: the data has no test split; {len(test_rows)} of {len(ds)} images "
                 f"({len(test_rows) / len(ds):.3g}, stratified, seed {seed}) held out as the test split.")
    return ds.select(train_rows), ds.select(test_rows)


def _at_most(ds: datasets.Dataset | None, n: int | None, seed: int, key: str, notes: list[str]):
    """`ds` cut to `n` images, stratified where every class can keep one, else at random."""
    if ds is None or n is None or n >= len(ds):
        return ds
    labels = ds["label"][:]
    try:
        rows, _ = train_test_split(np.arange(len(ds)), train_size=n, stratify=labels, random_state=seed)
    except ValueError:  # fewer images than classes, or a class of one image
        rows = np.random.default_rng(seed).permutation(len(ds))[:n]
    notes.append(f"{key}: using {n} of {len(ds)} images.")
    return ds.select(np.sort(rows))


# ----------------------------------------------------------------------------- pre-resized cache


def content_key(ds: datasets.Dataset, short_side: int) -> str:
    """Same images and size -> same key, across runs and processes."""
    images = ds.cast_column("image", datasets.Image(decode=False))
    digest = hashlib.sha256(f"v2-{short_side}".encode())  # v2: the long side as torchvision rounds it
    first_path = images[0]["image"]["path"] if len(images) else None  # one row, not the column
    if first_path and os.path.isfile(first_path):  # a local folder: ids, paths, sizes, times
        for record in images.select_columns("image")["image"][:]:
            stat = os.stat(record["path"])
            digest.update(f"{record['path']}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    else:  # a Hub dataset: its fingerprint follows its files
        digest.update(ds._fingerprint.encode())
    digest.update(json.dumps(ds["image_id"][:]).encode())
    return digest.hexdigest()[:20]


def open_resized(record, short_side: int, *, enlarge: bool = False):
    """Decode an image record to RGB with its short side scaled down to `short_side` (`enlarge`:
    or up), bicubic and antialiased; JPEGs decode in draft mode where that is enough."""
    image = open_rgb(record, min_side=short_side)
    width, height = image.size
    if min(width, height) > short_side or (enlarge and min(width, height) < short_side):
        # the long side as torchvision's Resize(short_side) makes it
        long = int(short_side * max(width, height) / min(width, height))
        image = image.resize((short_side, long) if width <= height else (long, short_side), resample=3)
    return image


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
            image = open_resized(record, short_side)
            buffer = io.BytesIO()
            image.save(buffer, format="PPM")
            stored.append({"bytes": buffer.getvalue(), "path": None})
        return {"image": stored}

    cache_file = cache_root() / "resized" / f"{content_key(ds, short_side)}.arrow"
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    features = ds.features.copy()
    features["image"] = datasets.Image(decode=False)
    resized = ds.cast_column("image", datasets.Image(decode=False)).map(
        resize, batched=True, batch_size=32, features=features, num_proc=num_proc if len(ds) > 256 else None,
        cache_file_name=str(cache_file), desc=f"pre-resizing to {short_side} px (once)")
    return resized.cast_column("image", datasets.Image())
