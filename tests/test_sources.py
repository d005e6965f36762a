"""Your own images: a class-folder tree, a CSV file and a saved `datasets` folder train like the
Pets do, with the same checks (pet_pipeline/sources.py, data.load_data).

The real photos of the shared Oxford sample are rearranged at test time (hard links, no
copies) into each layout, so every source can be compared with the Pets path on the same
images. The bad-input cases use small generated images.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import datasets
import pytest
from conftest import PET_SAMPLE, TINY, evaluate_in_process, ok, refused, run_in_process, small_image

import predict
from pet_pipeline.breeds import CAT_BREEDS
from pet_pipeline.data import load_data
from pet_pipeline.errors import UserError

needs_sample = pytest.mark.skipif(
    not PET_SAMPLE.is_dir(),
    reason=f"real Oxford sample not found at {PET_SAMPLE} (shared/ is not next to the project)")

SPLIT = {"val_fraction": 0.1, "seed": 42}


def sample_cats() -> dict[str, list[tuple[str, str]]]:
    """{'trainval': [(image id, breed)], 'test': [...]} of the sample's cat photos."""
    from pet_pipeline.breeds import BREEDS

    rows = {}
    for split in ("trainval", "test"):
        lines = (PET_SAMPLE / "annotations" / f"{split}.txt").read_text().splitlines()
        rows[split] = [(parts[0], BREEDS[int(parts[1]) - 1]) for parts in map(str.split, lines)
                       if parts and not parts[0].startswith("#") and BREEDS[int(parts[1]) - 1] in CAT_BREEDS]
    return rows


def link(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.link(source, target)
    return target


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    """The sample's cat photos as a tree with train/ and test/, a flat class-folder tree, a CSV
    (columns file, breed, split) and a save_to_disk DatasetDict (image bytes, a ClassLabel)."""
    root = tmp_path_factory.mktemp("layouts")
    cats, rows = sample_cats(), []
    for split, ours in (("trainval", "train"), ("test", "test")):
        for image_id, breed in cats[split]:
            photo = PET_SAMPLE / "images" / f"{image_id}.jpg"
            tree_file = link(photo, root / "tree" / ours / breed / f"{image_id}.jpg")
            link(photo, root / "flat" / breed / f"{image_id}.jpg")
            rows.append({"file": tree_file.relative_to(root).as_posix(), "breed": breed, "split": ours})
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "breed", "split"])
        writer.writeheader()
        writer.writerows(rows)
    names = sorted({row["breed"] for row in rows})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    def split_of(split):
        kept = [r for r in rows if r["split"] == split]
        return datasets.Dataset.from_dict(
            {"image": [{"bytes": (root / r["file"]).read_bytes(), "path": None} for r in kept],
             "label": [names.index(r["breed"]) for r in kept]}, features=features)

    saved = datasets.DatasetDict({split: split_of(split) for split in ("train", "test")})
    saved.save_to_disk(str(root / "saved"))
    return {"tree": root / "tree", "flat": root / "flat", "csv": root / "labels.csv", "saved": root / "saved"}


@needs_sample
def test_every_layout_gives_the_class_list_and_splits_of_the_pets_path(layouts):
    pets = load_data(data_dir=str(PET_SAMPLE), species="cat", **SPLIT)
    sizes = [len(pets.train), len(pets.val), len(pets.test)]
    for name, kind in (("tree", "imagefolder (auto): image folder"), ("csv", "csv (auto): CSV"),
                       ("saved", "hf (auto): saved dataset")):
        data = load_data(data_dir=str(layouts[name]), **SPLIT)
        assert data.source.startswith(kind), data.source
        assert data.class_names == pets.class_names, name
        assert [len(data.train), len(data.val), len(data.test)] == sizes, name
        assert data.skipped == [] == pets.skipped, name
    # the same photos in the test split, file by file (the saved dataset keeps bytes, not names)
    tree = load_data(data_dir=str(layouts["tree"]), **SPLIT)
    assert ({Path(i).name for i in tree.test["image_id"][:]}
            == {f"{i}.jpg" for i in pets.test["image_id"][:]})


@needs_sample
def test_a_flat_tree_holds_out_a_stratified_seeded_test_split(layouts):
    pets = load_data(data_dir=str(PET_SAMPLE), species="cat", val_fraction=0)
    total = len(pets.train) + len(pets.test)
    data = load_data(data_dir=str(layouts["flat"]), val_fraction=0, test_fraction=0.25, seed=3)
    assert data.class_names == pets.class_names
    assert len(data.train) + len(data.test) == total
    assert len(data.test) == round(total * 0.25)
    assert set(data.test["label"][:]) == set(range(len(data.class_names)))  # every class tested
    assert any(note.startswith("test_fraction: the data has no test split") for note in data.notes)
    again = load_data(data_dir=str(layouts["flat"]), val_fraction=0, test_fraction=0.25, seed=3)
    other = load_data(data_dir=str(layouts["flat"]), val_fraction=0, test_fraction=0.25, seed=4)
    assert again.test["image_id"][:] == data.test["image_id"][:] != other.test["image_id"][:]
    assert not set(data.train["image_id"][:]) & set(data.test["image_id"][:])


@needs_sample
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tree", "flat", "csv", "saved"])
def test_each_layout_trains_through_train_py_and_evaluates(layouts, layout, tmp_path, train_run):
    out = tmp_path / "run"
    result = ok(train_run({**TINY, "data_dir": layouts[layout], "max_steps": 2, "output_dir": out}))
    data = load_data(data_dir=str(layouts[layout]), val_fraction=0)
    kind = {"tree": "imagefolder", "flat": "imagefolder", "csv": "csv", "saved": "hf"}[layout]
    assert f"data: {kind} (auto): " in result.stdout
    exported = json.loads((out / "model" / "config.json").read_text())
    assert exported["label_names"] == data.class_names == sorted(CAT_BREEDS)
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["n"] == len(data.test)
    # the model card tells of this data, not of the Pets
    card = (out / "model" / "README.md").read_text()
    what = {"imagefolder": "a folder of class folders", "csv": "a CSV of images and labels",
            "hf": "a saved `datasets` folder"}[kind]
    assert f"Source: {what} (`{layouts[layout]}`)" in card
    assert "| class | precision |" in card and "Oxford" not in card and "breeds below" not in card
    # evaluate.py takes the run's data keys (data_dir, its format) and the model's classes
    again = ok(evaluate_in_process({"model_dir": out / "model", "output_dir": tmp_path / "again"}))
    assert f"test accuracy {metrics['accuracy']:.4f} on {metrics['n']} images" in again.stdout
    if layout != "saved":  # predict.py on the same test photos names the same class, file by file
        with open(out / "eval" / "predictions.csv") as f:
            evaluated = {row["image_id"]: row["predicted"] for row in csv.DictReader(f)}
        folder = layouts[layout].parent if layout == "csv" else layouts[layout]
        files = [folder / image_id for image_id in sorted(evaluated)]
        ok(run_in_process(predict.main, ["--model_dir", out / "model", "--output", tmp_path / "p.csv",
                                         *files]))
        with open(tmp_path / "p.csv") as f:
            predicted = [row["label"] for row in csv.DictReader(f)]
        assert predicted == [evaluated[image_id] for image_id in sorted(evaluated)]


# ----------------------------------------------------------------------------- generated trees


def write_tree(root: Path, counts: dict[str, int], size: int = 24) -> Path:
    """root/CLASS/CLASS_n.jpg, `counts[CLASS]` small images each."""
    for k, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            small_image(CAT_BREEDS[k % 12], i, size).save(root / name / f"{name}_{i}.jpg")
    return root


def test_class_folders_with_any_names_nested_folders_and_other_files(tmp_path):
    root = write_tree(tmp_path / "photos", {"Maine Coon": 4, "Ünïcode cat": 4, "b": 4})
    (root / "b" / "2024" / "summer").mkdir(parents=True)
    small_image("Bengal", 9).save(root / "b" / "2024" / "summer" / "deep.png")
    (root / "README.txt").write_text("my cats")
    (root / "b" / ".DS_Store").write_bytes(b"\0")
    (root / "b" / "notes.md").write_text("-")
    small_image("Bengal", 8).save(root / "loose.jpg")
    data = load_data(data_dir=str(root), val_fraction=0, test_fraction=0.25)
    assert data.class_names == ["Maine Coon", "b", "Ünïcode cat"]  # sorted as Python sorts
    assert len(data.train) + len(data.test) == 13
    assert "b/2024/summer/deep.png" in data.train["image_id"][:] + data.test["image_id"][:]
    assert "2 non-image file(s) ignored" in data.source  # .DS_Store is hidden, but counted
    assert data.skipped == ["loose.jpg: not in a class folder; left out"]


def test_bad_symlinked_and_repeated_files_are_named_and_left_out(tmp_path):
    root = write_tree(tmp_path / "photos", {"a": 3, "b": 3})
    outside = write_tree(tmp_path / "elsewhere", {"x": 1})
    (root / "a" / "cut.jpg").write_bytes((root / "a" / "a_0.jpg").read_bytes()[:-10])
    (root / "b" / "empty.jpg").write_bytes(b"")
    (root / "b" / "escape.jpg").symlink_to(outside / "x" / "x_0.jpg")
    (root / "b" / "again.jpg").symlink_to(root / "b" / "b_0.jpg")
    data = load_data(data_dir=str(root), val_fraction=0, test_fraction=0.4)
    assert sorted(data.skipped) == sorted([
        "a/cut.jpg: truncated JPEG (no end marker); left out",
        "b/empty.jpg: empty file; left out",
        f"b/escape.jpg: symlink out of {root}; left out",
        "b/b_0.jpg: the same file as b/again.jpg; kept once",
    ])
    assert data.duplicates == 1 and len(data.train) + len(data.test) == 6
    with pytest.raises(UserError, match=r"strict_data: 4 bad input\(s\)"):
        load_data(data_dir=str(root), val_fraction=0, strict_data=True)


def test_a_file_in_train_and_test_stays_in_test_only(tmp_path):
    root = tmp_path / "photos"
    write_tree(root / "train", {"a": 3, "b": 3})
    write_tree(root / "test", {"a": 1, "b": 1})
    (root / "test" / "b" / "twin.jpg").symlink_to(root / "train" / "b" / "b_2.jpg")
    data = load_data(data_dir=str(root), val_fraction=0)
    assert data.leaks == 1
    assert "train/b/b_2.jpg" not in data.train["image_id"][:]
    assert "test/b/twin.jpg" in data.test["image_id"][:]
    assert data.skipped == ["train/b/b_2.jpg: the same file as test image test/b/twin.jpg (a "
                            "train/test leak); left out of train"]


def test_split_folders_are_used_as_given(tmp_path):
    root = tmp_path / "photos"
    write_tree(root / "train", {"a": 5, "b": 5})
    write_tree(root / "validation", {"a": 2, "b": 1})
    write_tree(root / "test", {"a": 1, "b": 2})
    data = load_data(data_dir=str(root), val_fraction=0.5)
    assert [len(data.train), len(data.val), len(data.test)] == [10, 3, 3]
    assert "(train/, validation/, test/)" in data.source
    assert any("own validation split" in note for note in data.notes)


@pytest.mark.parametrize("make, message", [
    (lambda r: write_tree(r, {"only": 4}), "has one class (only); a classifier needs at least 2"),
    (lambda r: write_tree(r / "val", {"a": 2, "b": 2}), "has val/ but no train/"),
    (lambda r: (write_tree(r / "train", {"a": 2, "b": 2}), write_tree(r / "test", {"c": 1})),
     "class folder(s) c that"),
    (lambda r: (write_tree(r, {"a": 3, "b": 0}), (r / "b" / "bad.jpg").write_bytes(b"x")),
     "class b has no usable training images (see the files left out)"),
    (lambda r: write_tree(r, {"a": 4, "b": 1}), "test_fraction: class b has 1 image(s), too few"),
])
def test_a_tree_that_cannot_train_is_refused_in_one_sentence(tmp_path, make, message):
    root = tmp_path / "photos"
    root.mkdir()
    make(root)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_data(data_dir=str(root), val_fraction=0)


def test_classes_keeps_a_subset_of_any_source(tmp_path):
    root = write_tree(tmp_path / "photos", {"a": 4, "b": 4, "c": 4})
    data = load_data(data_dir=str(root), classes=["c", "a"], val_fraction=0, test_fraction=0.25)
    assert data.class_names == ["a", "c"]
    assert set(data.train["label"][:]) == {0, 1} and len(data.train) + len(data.test) == 8
    assert {i.split("/")[0] for i in data.train["image_id"][:]} == {"a", "c"}
    with pytest.raises(UserError, match="classes: 'd' is not a class of this data; its classes are a, b, c"):
        load_data(data_dir=str(root), classes=["d"])


def test_max_samples_shrink_the_splits_stratified_and_seeded(tmp_path):
    root = write_tree(tmp_path / "photos", {"a": 10, "b": 10})
    data = load_data(data_dir=str(root), val_fraction=0.25, test_fraction=0.25,
                     max_train_samples=6, max_eval_samples=2)
    assert [len(data.train), len(data.val), len(data.test)] == [6, 2, 2]
    assert sorted(data.train["label"][:]) == [0, 0, 0, 1, 1, 1]
    again = load_data(data_dir=str(root), val_fraction=0.25, test_fraction=0.25,
                      max_train_samples=6, max_eval_samples=2)
    assert again.train["image_id"][:] == data.train["image_id"][:]


# ----------------------------------------------------------------------------- CSV and datasets


def test_a_csv_names_bad_rows_and_refuses_missing_files(tmp_path):
    write_tree(tmp_path / "img", {"a": 3, "b": 3})
    table = tmp_path / "t.tsv"
    table.write_text("path\tclass\n" + "".join(f"img/{c}/{c}_{i}.jpg\t{c}\n" for c in "ab" for i in range(3))
                     + "img/a/a_0.jpg\t\n")
    data = load_data(data_dir=str(table), val_fraction=0, test_fraction=0.34)
    assert data.class_names == ["a", "b"] and len(data.train) + len(data.test) == 6
    assert data.skipped == ["t.tsv:8: no label; left out"]
    table.write_text("path\tclass\n" + "".join(f"img/x_{i}.jpg\ta\n" for i in range(5)))
    with pytest.raises(UserError, match=r"data_dir: 5 of the images t.tsv names do not exist \(first: "):
        load_data(data_dir=str(table))
    table.write_text("picture\tkind\nimg/a/a_0.jpg\ta\n")
    with pytest.raises(UserError, match="image_column: .* has no column image or img or path; its "
                                        "columns are picture, kind; set image_column"):
        load_data(data_dir=str(table))
    with pytest.raises(UserError, match="has one class"):  # past the columns, named this time
        load_data(data_dir=str(table), image_column="picture", label_column="kind")


def test_a_saved_dataset_checks_its_image_bytes_and_maps_string_labels(tmp_path):
    write_tree(tmp_path / "img", {"a": 3, "b": 3})
    files = sorted((tmp_path / "img").rglob("*.jpg"))
    images = [{"bytes": f.read_bytes(), "path": None} for f in files]
    images[1] = {"bytes": images[1]["bytes"][:-10], "path": None}  # cut short inside the Arrow file
    ds = datasets.Dataset.from_dict({"picture": images, "kind": [f.parent.name for f in files]},
                                    features=datasets.Features({"picture": datasets.Image(),
                                                                "kind": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(UserError, match="label_column: .* has no column label or labels or class; its "
                                        "columns are picture, kind; set label_column"):
        load_data(data_dir=str(tmp_path / "saved"))
    data = load_data(data_dir=str(tmp_path / "saved"), label_column="kind", val_fraction=0, test_fraction=0.4)
    assert data.class_names == ["a", "b"]
    assert data.skipped == ["train[1]: truncated JPEG (no end marker); left out"]
    assert len(data.train) + len(data.test) == 5
    assert "columns picture, kind" in data.source


def test_a_hub_id_offline_ends_in_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match="dataset: could not load 'someone/cats' from the Hugging Face Hub"):
        load_data(dataset="someone/cats", dataset_revision="v1")


# ----------------------------------------------------------------------------- train.py refuses early


def test_train_py_refuses_data_keys_that_do_not_fit_before_any_heavy_work(tmp_path, train_run):
    root = write_tree(tmp_path / "photos", {"a": 4, "b": 4})
    out = tmp_path / "run"
    base = {**TINY, "output_dir": out}
    refused(train_run({**base, "data_dir": root, "data_format": "csv"}),
            "data_dir: data_format: csv reads a CSV file;")
    refused(train_run({**base, "data_dir": root, "breeds": ["Bengal"]}),
            "breeds: names Oxford-IIIT Pet breeds, but the data is imagefolder; use classes")
    refused(train_run({**base, "data_dir": tmp_path / "nowhere"}), "does not exist")
    refused(train_run({**base, "data_format": "parquet"}), "data_format")
    refused(train_run({**base, "test_fraction": 1.5}), "test_fraction: 1.5 must be in (0, 1)")
    assert not out.exists()
