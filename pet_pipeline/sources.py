"""Your own images: a folder of class sub-folders, a CSV file, or a Hugging Face dataset.

    loaded = load_imagefolder("photos/")          # photos/CLASS/**.jpg, or photos/train|val|test/CLASS/...
    loaded = load_csv("labels.csv", image_column=None, label_column=None, split_column="split")
    loaded = load_hf("you/cats", revision="main")  # a Hub id, or a `save_to_disk` folder
    loaded.splits       # {"train": Dataset, "val"?: ..., "test"?: ...}: image, label, image_id
    loaded.class_names  # folder names / the ClassLabel's names / the label strings, sorted
    loaded.skipped      # "train/Sphynx/x.jpg: truncated JPEG (no end marker)", ... (left out)

Every source ends as the same `datasets` schema the Pets path makes (data.load_data then
carves the missing splits and applies the common filters), and every image passes the same
checks as a Pets image (pet_pipeline/images.check_image_file): a bad file is named and left
out; a file reached twice is kept once; a file in two splits stays in the later of train < val
< test only (a leak); a symlink that leaves a folder source is refused. `detect_format` picks
the source for `data_format: auto`.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from datasets import ClassLabel, Features, Value

from pet_pipeline.errors import UserError
from pet_pipeline.images import IMAGE_SUFFIXES, check_image_bytes, check_image_file

PETS_HUB_ID = "timm/oxford-iiit-pet"
# split folder / CSV split value / Hub split name -> ours
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val",
               "validation": "val", "dev": "val", "test": "test", "testing": "test"}
SPLIT_ORDER = ("train", "val", "test")  # a file in two splits stays in the later one
# what a column is usually called, for image_column / label_column left unset
IMAGE_COLUMNS = ("image", "img", "path", "file", "filename", "filepath", "image_path", "file_path")
LABEL_COLUMNS = ("label", "labels", "class", "category", "breed", "target")


@dataclass(frozen=True)
class Verdicts:
    """Which images the loaders leave out. A fresh start checks every file (images.py) and
    leaves out the bad ones; a resumed run takes its first start's verdicts instead (the image
    ids it left out, from the checkpoint), so it gets the same rows whatever happened to the
    files since: one that has become unreadable gets a stand-in when met (unreadable.py)."""

    left_out: frozenset | None = None  # None: a fresh start, check every file

    @property
    def fresh(self) -> bool:
        return self.left_out is None

    def reason(self, image_id: str, check) -> str | None:
        """Why `image_id` is left out: `check()` at a fresh start, else the first start's verdict."""
        if self.left_out is None:
            return check()
        return "bad at the run's first start" if image_id in self.left_out else None


FRESH = Verdicts()


@dataclass
class Loaded:
    splits: dict[str, datasets.Dataset]  # some of train, val, test
    class_names: list[str]
    description: str  # for the start line: which source, and from where
    skipped: list[str] = field(default_factory=list)
    counts: dict = field(default_factory=lambda: {"duplicates": 0, "leaks": 0, "bad_ids": []})


def image_features(class_names: list[str]) -> Features:
    return Features({"image": datasets.Image(), "label": ClassLabel(names=list(class_names)),
                     "image_id": Value("string")})


# ----------------------------------------------------------------------------- which source


def detect_format(data_dir: str | None, dataset: str) -> str:
    """What `data_format: auto` means for these keys: pets, imagefolder, csv or hf."""
    if data_dir is None:
        if dataset in ("synthetic", PETS_HUB_ID):
            return "pets"
        return "hf"  # a Hub id, or a saved dataset's folder
    path = Path(data_dir)
    if path.is_file():
        if path.suffix.lower() in (".csv", ".tsv"):
            return "csv"
        raise UserError(f"data_dir: {path} is a file but not a .csv or .tsv; give a CSV of image "
                        "paths and labels, or a folder.")
    if not path.is_dir():
        raise UserError(f"data_dir: {data_dir} does not exist; give the folder of the dataset.")
    for root in (path, path / "oxford-iiit-pet"):
        if (root / "images").is_dir() and (root / "annotations").is_dir():
            return "pets"
    if is_saved_dataset(path):
        return "hf"
    if any(child.is_dir() for child in path.iterdir()):
        return "imagefolder"
    raise UserError(f"data_dir: {path} has no sub-folders; put each class's images in a folder "
                    "named after the class (data_dir/CLASS/*.jpg), or give a CSV file.")


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `datasets`' save_to_disk (a DatasetDict or one Dataset)."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


# ----------------------------------------------------------------------------- a class-folder tree


def load_imagefolder(data_dir: str | Path, *, verdicts: Verdicts = FRESH) -> Loaded:
    """DIR/CLASS/**/*.jpg, or DIR/train/CLASS/... with optional DIR/val/ and DIR/test/.

    Class names are the class folders' names (any characters), sorted; a file whose suffix is
    not an image's (a README, .DS_Store) is counted and ignored.
    """
    root = Path(os.path.abspath(data_dir))
    split_dirs = {SPLIT_NAMES[d.name.lower()]: d for d in sorted(root.iterdir())
                  if d.is_dir() and d.name.lower() in SPLIT_NAMES}
    if split_dirs and "train" not in split_dirs:
        raise UserError(f"data_dir: {root} has {' and '.join(d.name + '/' for d in split_dirs.values())}"
                        " but no train/; add train/CLASS/ folders, or put the class folders in "
                        f"{root} itself.")
    trees = split_dirs or {"train": root}
    class_names = _class_folders(trees["train"])
    for tree in trees.values():
        unknown = [name for name in _class_folders(tree) if name not in class_names]
        if unknown:
            raise UserError(f"data_dir: {tree} has class folder(s) {', '.join(unknown[:3])} that "
                            f"{trees['train']} lacks; every class needs training images.")
    walk = _TreeWalk(root)
    candidates = {split: [(path, name) for name in class_names if (tree / name).is_dir()
                          for path in walk.images(tree / name)]
                  for split, tree in trees.items()}
    loose = [p for p in trees["train"].iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    walk.skipped += [f"{_relative(p, root)}: not in a class folder; left out" for p in loose]
    loaded = _checked_splits(candidates, class_names, root, walk.skipped, verdicts=verdicts)
    splits = "/, ".join(split_dirs.get(s, Path(s)).name for s in SPLIT_ORDER if s in split_dirs)
    loaded.description = (f"image folder {root}" + (f" ({splits}/)" if split_dirs else "")
                          + (f", {walk.non_images} non-image file(s) ignored" if walk.non_images else ""))
    return loaded


def _class_folders(tree: Path) -> list[str]:
    return sorted(d.name for d in tree.iterdir() if d.is_dir() and not d.name.startswith("."))


class _TreeWalk:
    """Image files under a folder of `root`, recursively and sorted; folder symlinks inside
    the tree are followed once, those that leave it are named in `skipped`."""

    def __init__(self, root: Path):
        self.root, self.real_root = root, Path(os.path.realpath(root))
        self.skipped: list[str] = []
        self.non_images = 0

    def images(self, folder: Path) -> list[Path]:
        found, visited = [], set()
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            real = os.path.realpath(dirpath)
            if not Path(real).is_relative_to(self.real_root):
                self.skipped.append(f"{_relative(Path(dirpath), self.root)}/: symlink out of "
                                    f"{self.root}; left out")
                dirnames[:] = []
                continue
            if real in visited:  # a symlink loop, or a second link to one folder
                dirnames[:] = []
                continue
            visited.add(real)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                    self.non_images += 1
                    continue
                found.append(Path(dirpath) / name)
        return found


def _relative(path: Path, root: Path) -> str:
    name = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
    return name if name.isprintable() else ascii(name)


def _checked_splits(candidates: dict[str, list[tuple[Path, str]]], class_names: list[str],
                    root: Path, skipped: list[str], *, inside_root: bool = True,
                    verdicts: Verdicts = FRESH) -> Loaded:
    """{split: [(path, class name)]} as Datasets of the files that pass the image checks.

    Each file once: a second path to a file already in the split is a duplicate, kept once;
    one already in an earlier split of SPLIT_ORDER is a leak, left out of the earlier one.
    With `inside_root`, a path whose real location is outside `root` is refused. `verdicts`:
    whether to check the files or take a resumed run's first verdicts.
    """
    real_root = Path(os.path.realpath(root))
    counts = {"duplicates": 0, "leaks": 0, "bad_ids": []}
    owner = {}  # real path -> (split, image id) that holds it
    kept = {split: {} for split in candidates}  # split -> {real path: (image id, label)}
    index = {name: i for i, name in enumerate(class_names)}
    for split in sorted(candidates, key=SPLIT_ORDER.index):
        for path, class_name in candidates[split]:
            image_id = _relative(path, root)
            real = Path(os.path.realpath(path))
            reason = (f"symlink out of {root}" if inside_root and not real.is_relative_to(real_root)
                      else verdicts.reason(image_id, lambda real=real: check_image_file(real)))
            if reason:
                counts["bad_ids"].append(image_id)
                skipped.append(f"{image_id}: {reason}; left out")
                continue
            if real in owner:
                earlier_split, earlier_id = owner[real]
                if earlier_split == split:
                    counts["duplicates"] += 1
                    skipped.append(f"{image_id}: the same file as {earlier_id}; kept once")
                    continue
                counts["leaks"] += 1
                del kept[earlier_split][real]
                skipped.append(f"{earlier_id}: the same file as {split} image {image_id} (a "
                               f"{earlier_split}/{split} leak); left out of {earlier_split}")
            owner[real] = (split, image_id)
            kept[split][real] = (image_id, index[class_name])
    features = image_features(class_names)
    splits = {split: datasets.Dataset.from_dict(
        {"image": [str(p) for p in rows], "label": [label for _, label in rows.values()],
         "image_id": [image_id for image_id, _ in rows.values()]}, features=features)
        for split, rows in kept.items()}
    return Loaded(splits=splits, class_names=class_names, description="", skipped=skipped,
                  counts=counts)


# ----------------------------------------------------------------------------- a CSV file


def load_csv(csv_path: str | Path, *, image_column: str | None = None, label_column: str | None = None,
             split_column: str = "split", verdicts: Verdicts = FRESH) -> Loaded:
    """A CSV (or TSV) of image paths, relative to the file's folder, and labels; a split column
    (train / val / test), when there is one, gives the splits. Class names: the labels, sorted."""
    path = Path(os.path.abspath(csv_path))
    rows, header = _read_table(path)
    image_column = _column(image_column, IMAGE_COLUMNS, header, "image_column", path)
    label_column = _column(label_column, LABEL_COLUMNS, header, "label_column", path)
    has_splits = split_column in header
    skipped, candidates = [], {}
    for line, row in rows:
        image, label = (row.get(image_column) or "").strip(), (row.get(label_column) or "").strip()
        if not image or not label:
            skipped.append(f"{path.name}:{line}: no {'image path' if not image else 'label'}; left out")
            continue
        split = (row.get(split_column) or "train").strip().lower() if has_splits else "train"
        if split not in SPLIT_NAMES:
            raise UserError(f"{split_column}: {path.name}:{line} has split {split!r}; use train, "
                            "val or test (or leave the cell empty for train).")
        file = Path(image) if os.path.isabs(image) else path.parent / image
        candidates.setdefault(SPLIT_NAMES[split], []).append((Path(os.path.normpath(file)), label))
    missing = [str(p) for entries in candidates.values() for p, _ in entries
               if verdicts.fresh and not os.path.lexists(p)]  # resumed: met as unreadable
    if missing:
        raise UserError(f"data_dir: {len(missing)} of the images {path.name} names do not exist (first: "
                        f"{', '.join(missing[:3])}); paths are relative to {path.parent}; fix the "
                        "column or the files.")
    if "train" not in candidates:
        raise UserError(f"data_dir: {path.name} has no training rows; mark some rows train in "
                        f"its {split_column} column.")
    class_names = sorted({label for entries in candidates.values() for _, label in entries})
    loaded = _checked_splits(candidates, class_names, path.parent, skipped, inside_root=False,
                             verdicts=verdicts)
    loaded.description = f"CSV {path} (columns {image_column}, {label_column}" + (
        f", {split_column})" if has_splits else ")")
    return loaded


def _read_table(path: Path) -> tuple[list[tuple[int, dict]], list[str]]:
    """[(line number, row)] and the header of a CSV/TSV; the delimiter is sniffed."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"data_dir: {path} can't be read as UTF-8 text ({e}); give a CSV file.") from None
    if path.suffix.lower() == ".tsv":
        delimiter = "\t"
    else:
        try:
            delimiter = csv.Sniffer().sniff(text[:4096], delimiters=",;\t").delimiter
        except csv.Error:
            delimiter = ","
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    header = [name.strip() for name in reader.fieldnames or []]
    reader.fieldnames = header
    rows = [(reader.line_num, row) for row in reader]
    if not header or not rows:
        raise UserError(f"data_dir: {path} has no rows under a header; the first line names the "
                        "columns (e.g. image,label), one image per line after it.")
    return rows, header


def _column(given: str | None, usual: tuple[str, ...], columns: list[str], key: str, where) -> str:
    """The column `given`, or the first usual name present when it is unset."""
    if given is not None and given in columns:
        return given
    if given is None:
        for name in usual:
            if name in columns:
                return name
    raise UserError(f"{key}: {where} has no column {given or ' or '.join(usual[:3])}; its columns are "
                    f"{', '.join(map(str, columns[:10]))}; set {key} to one of them.")


# ----------------------------------------------------------------------------- a Hugging Face dataset


def load_hf(source: str, *, image_column: str | None = None, label_column: str | None = None,
            revision: str | None = None, verdicts: Verdicts = FRESH) -> Loaded:
    """Any Hub dataset id (at `revision`) or a `save_to_disk` folder with an image and a label
    column; its own train / validation / test splits are used. A ClassLabel gives the class
    names in its order; plain labels become names, sorted."""
    loaded = _load_hf_dataset(source, revision)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    splits = {SPLIT_NAMES[name.lower()]: ds for name, ds in loaded.items() if name.lower() in SPLIT_NAMES}
    if "train" not in splits:
        raise UserError(f"dataset: {source} has splits {', '.join(loaded)} but none called train; "
                        "save it with a train split.")
    features = splits["train"].features
    image_column = _column(image_column, [n for n, f in features.items() if isinstance(f, datasets.Image)]
                           or IMAGE_COLUMNS, list(features), "image_column", source)
    label_column = _column(label_column, [n for n, f in features.items() if isinstance(f, ClassLabel)]
                           or LABEL_COLUMNS, list(features), "label_column", source)
    label_feature = features[label_column]
    if isinstance(label_feature, ClassLabel):
        class_names = list(label_feature.names)
    else:
        class_names = sorted({str(v) for ds in splits.values() for v in ds[label_column][:]})
    skipped = []
    columns = (image_column, label_column)
    result = {split: _hf_split(ds, split, columns, class_names, skipped, verdicts=verdicts)
              for split, ds in splits.items()}
    ignored = [name for name in loaded if name.lower() not in SPLIT_NAMES]
    where = "saved dataset" if Path(source).is_dir() else "Hub dataset"
    description = (f"{where} {source}" + (f" at {revision}" if revision else "")
                   + f" (columns {image_column}, {label_column})"
                   + (f", split(s) {', '.join(ignored)} not used" if ignored else ""))
    return Loaded(splits=result, class_names=class_names, description=description, skipped=skipped)


def _load_hf_dataset(source: str, revision: str | None):
    if Path(source).is_dir():
        try:
            return datasets.load_from_disk(source)
        except Exception as e:  # noqa: BLE001 - any unreadable folder ends in the same advice
            raise UserError(f"data_dir: {source} is not a dataset saved with save_to_disk "
                            f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__}); give "
                            "such a folder, a class-folder tree or a CSV.") from None
    try:
        return datasets.load_dataset(source, revision=revision)
    except Exception as e:  # offline, unknown id, auth: all end in the same advice
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(f"dataset: could not load {source!r} from the Hugging Face Hub ({reason}); "
                        "check the id and your network, or give data_dir a local copy (a class-folder "
                        "tree, a CSV or a save_to_disk folder).") from None


def _hf_split(ds: datasets.Dataset, split: str, columns: tuple[str, str], class_names: list[str],
              skipped: list[str], *, verdicts: Verdicts = FRESH) -> datasets.Dataset:
    """One split in our schema, its images checked like files (bytes or paths); the rows of
    `verdicts` (ids SPLIT/ROW): whether to check them or take a resumed run's first verdicts."""
    image_column, label_column = columns
    if isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    index = {name: i for i, name in enumerate(class_names)}
    is_class_label = isinstance(ds.features[label_column], ClassLabel)
    problems = problems_or_verdicts(ds, [f"{split}/{row}" for row in range(len(ds))], verdicts,
                                    image_column)
    skipped += [f"{split}[{row}]{f' ({name})' if name else ''}: {reason}; left out"
                for row, (reason, name) in problems.items()]
    keep = [row for row in range(len(ds)) if row not in problems]

    def to_schema(batch, indices):
        records = batch[image_column]
        return {"image": [r if isinstance(r, dict) else {"path": r, "bytes": None} for r in records],
                "label": [v if is_class_label else index[str(v)] for v in batch[label_column]],
                "image_id": [f"{split}/{keep[i]}" for i in indices]}  # the row in the source split

    features = Features({"image": datasets.Image(decode=False),
                         "label": ClassLabel(names=class_names), "image_id": Value("string")})
    selected = ds.select(keep)
    return selected.map(to_schema, batched=True, with_indices=True, remove_columns=selected.column_names,
                        features=features).cast_column("image", datasets.Image())


def problems_or_verdicts(ds: datasets.Dataset, ids: list[str], verdicts: Verdicts,
                         image_column: str = "image") -> dict[int, tuple[str, str | None]]:
    """`image_problems` at a fresh start; a resumed run's first verdicts for the rows' `ids`."""
    if verdicts.fresh:
        return image_problems(ds, image_column)
    return {row: (verdicts.reason(image_id, None), None) for row, image_id in enumerate(ids)
            if image_id in verdicts.left_out}


def image_problems(ds: datasets.Dataset, image_column: str = "image") -> dict[int, tuple[str, str | None]]:
    """{row: (why its image can't be used, its path if it has one)} of a Dataset's image
    column, checked as files are (header and end marker, no decoding), 256 rows at a time."""
    if isinstance(ds.features[image_column], datasets.Image) and ds.features[image_column].decode:
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    rows, problems = ds.select_columns([image_column]), {}
    for start in range(0, len(rows), 256):
        for offset, record in enumerate(rows[start:start + 256][image_column]):
            reason = _record_problem(record)
            if reason:
                path = record.get("path") if isinstance(record, dict) else record
                problems[start + offset] = (reason, path)
    return problems


def _record_problem(record) -> str | None:
    """Why a dataset's image cell can't be used: {'bytes', 'path'} or a path string."""
    if isinstance(record, dict):
        if record.get("bytes"):
            return check_image_bytes(record["bytes"])
        record = record.get("path")
    if not record:
        return "no image"
    return check_image_file(record)

