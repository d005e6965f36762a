"""The data pipeline: annotation format, folder layouts, species filter, split, bad input, sources."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import warnings
import zlib
from collections import Counter
from contextlib import contextmanager

import datasets
import numpy as np
import PIL.Image
import PIL.ImageFile
import pytest
import torch
from conftest import PET_SAMPLE, REPO, annotation_ids, annotation_line, write_pet_folder
from datasets import ClassLabel, Features, Value
from PIL import Image

from pet_pipeline.breeds import BREEDS, CAT_BREEDS, DOG_BREEDS, kept_breeds
from pet_pipeline.data import (
    find_pet_root,
    load_hub,
    load_pets,
    parse_annotations,
    pet_features,
    split_fingerprint,
)
from pet_pipeline.errors import UserError
from pet_pipeline.images import check_image_file, open_rgb
from pet_pipeline.loader import PetTorchDataset
from pet_pipeline.synthetic import synthetic_pets_dir, write_synthetic_pets
from pet_pipeline.transforms import build_eval_transform, decode_size, model_data_config

# Written out, not derived from breeds.py: this is the fact the old script got wrong.
CAT_BREEDS_OFFICIAL = [
    "Abyssinian", "Bengal", "Birman", "Bombay", "British_Shorthair", "Egyptian_Mau",
    "Maine_Coon", "Persian", "Ragdoll", "Russian_Blue", "Siamese", "Sphynx",
]


def breed_of(image_id: str) -> str:
    return image_id.rsplit("_", 1)[0]


def ids(ds: datasets.Dataset) -> list[str]:
    return list(ds["image_id"])


@contextmanager
def count_decodes():
    """Count every pixel decode PIL does (ImageFile.load and Image.load) inside the block."""
    calls = Counter()
    with pytest.MonkeyPatch.context() as patch:
        for cls in (PIL.ImageFile.ImageFile, PIL.Image.Image):
            original = cls.load

            def counting(self, _original=original, _name=cls.__name__):
                calls[_name] += 1
                return _original(self)

            patch.setattr(cls, "load", counting)
        yield calls


# ----------------------------------------------------------------------------- annotation format


def test_annotation_format_with_comments_blank_lines_and_crlf(make_pet_folder, tmp_path):
    root = make_pet_folder(tmp_path, {"Abyssinian": (3, 2), "beagle": (2, 2)},
                           crlf=True, comments=True, blank_lines=True)
    raw = (root / "annotations" / "trainval.txt").read_bytes()
    assert b"\r\n" in raw and raw.startswith(b"#") and b"\r\n\r\n" in raw  # the test's own premise

    rows, problems = parse_annotations(root / "annotations" / "trainval.txt")
    assert problems == []
    assert [(r.image_id, r.breed) for r in rows] == [
        ("Abyssinian_1", "Abyssinian"), ("Abyssinian_2", "Abyssinian"), ("Abyssinian_3", "Abyssinian"),
        ("beagle_1", "beagle"), ("beagle_2", "beagle"),
    ]
    rows, problems = parse_annotations(root / "annotations" / "list.txt")  # 6 '#' lines first
    assert problems == [] and len(rows) == 9

    pets = load_pets(data_dir=str(root), species="all", val_fraction=0)
    assert pets.skipped == []
    assert ids(pets.train) == ["Abyssinian_1", "Abyssinian_2", "Abyssinian_3", "beagle_1", "beagle_2"]
    assert ids(pets.test) == ["Abyssinian_4", "Abyssinian_5", "beagle_3", "beagle_4"]


@pytest.mark.parametrize("torchvision_layout", [False, True], ids=["official", "torchvision-parent"])
def test_both_folder_layouts(make_pet_folder, tmp_path, torchvision_layout):
    pet_root = make_pet_folder(tmp_path, {"Bengal": 4, "Sphynx": 4},
                               torchvision_layout=torchvision_layout)
    assert find_pet_root(tmp_path) == pet_root
    pets = load_pets(data_dir=str(tmp_path), species="cat", val_fraction=0)
    assert len(pets.train) == 4 and len(pets.test) == 4
    assert set(pets.train["image_id"]) == {"Bengal_1", "Bengal_2", "Sphynx_1", "Sphynx_2"}
    assert pets.train[0]["image"].size == (24, 24)  # pixels really come from that folder


def test_not_an_oxford_layout_says_what_was_expected(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"x")
    with pytest.raises(UserError) as error:
        load_pets(data_dir=str(tmp_path))
    message = str(error.value)
    assert message.startswith("data_dir:") and "\n" not in message
    assert "images/" in message and "annotations/trainval.txt" in message and "oxford-iiit-pet" in message

    with pytest.raises(UserError, match=r"data_dir: .* does not exist"):
        load_pets(data_dir=str(tmp_path / "nowhere"))


def test_missing_annotation_file_is_named(make_pet_folder, tmp_path):
    root = make_pet_folder(tmp_path, {"Bengal": 4})
    (root / "annotations" / "test.txt").unlink()
    with pytest.raises(UserError, match=r"lacks test\.txt"):
        load_pets(data_dir=str(root))


# ----------------------------------------------------------------------------- species and breeds


def test_species_cat_gives_exactly_the_12_cat_breeds_in_official_order(synthetic_dir):
    pets = load_pets(data_dir=str(synthetic_dir), species="cat", val_fraction=0)
    assert pets.class_names == CAT_BREEDS_OFFICIAL
    assert pets.train.features["label"].names == CAT_BREEDS_OFFICIAL
    for split in (pets.train, pets.test):
        for label, image_id, species in zip(split["label"], split["image_id"], split["species"]):
            assert CAT_BREEDS_OFFICIAL[label] == breed_of(image_id)
            assert species == 0  # cat
    assert len(pets.train) == 12 * 4 and len(pets.test) == 12 * 4
    # the old script's "first 12 class ids" were 6 cats and 6 dogs
    assert sorted(BREEDS[:12]) != sorted(CAT_BREEDS_OFFICIAL)


@pytest.mark.parametrize("species, expected", [("dog", DOG_BREEDS), ("all", BREEDS)])
def test_species_dog_and_all(synthetic_dir, species, expected):
    pets = load_pets(data_dir=str(synthetic_dir), species=species, val_fraction=0)
    assert pets.class_names == list(expected)
    assert len(pets.class_names) == {"dog": 25, "all": 37}[species]
    assert sorted(set(pets.train["label"])) == list(range(len(expected)))
    assert all(expected[label] == breed_of(i) for label, i in zip(pets.test["label"], pets.test["image_id"]))
    if species == "dog":
        assert set(pets.train["species"]) == {1}


def test_explicit_breeds_narrow_case_insensitively(synthetic_dir):
    pets = load_pets(data_dir=str(synthetic_dir), species="cat",
                     breeds=["siamese", "BENGAL", "maine coon"], val_fraction=0)
    assert pets.class_names == ["Bengal", "Maine_Coon", "Siamese"]  # official order, not the user's
    label = pets.train.features["label"]
    assert isinstance(label, ClassLabel) and label.names == pets.class_names
    assert sorted(set(pets.train["label"])) == [0, 1, 2]
    assert {breed_of(i) for i in pets.test["image_id"]} == {"Bengal", "Maine_Coon", "Siamese"}


def test_bad_breed_name_suggests_the_closest():
    expected = r"breeds: 'Siamse' is not an Oxford-IIIT Pet breed; did you mean 'Siamese'\?"
    with pytest.raises(UserError, match=expected):
        kept_breeds("cat", ["Siamse"])
    with pytest.raises(UserError, match=r"breeds: beagle is a dog, but species is 'cat'"):
        kept_breeds("cat", ["beagle"])


def test_labels_are_contiguous_classlabels(synthetic_dir):
    pets = load_pets(data_dir=str(synthetic_dir), species="all", breeds=["Sphynx", "beagle", "pug"],
                     val_fraction=0.5)
    for split in (pets.train, pets.val, pets.test):
        assert split.features == pet_features(["beagle", "pug", "Sphynx"])
        assert sorted(set(split["label"])) == [0, 1, 2]


def test_filtering_and_splitting_decode_no_image(synthetic_dir):
    with count_decodes() as decodes:
        pets = load_pets(data_dir=str(synthetic_dir), species="cat", val_fraction=0.25, seed=1)
        assert len(pets.train) + len(pets.val) == 48
    assert sum(decodes.values()) == 0, f"filtering decoded images: {dict(decodes)}"

    with count_decodes() as decodes:  # the counter does see a decode when one happens
        assert pets.train[0]["image"].size == (48, 48)
        np.asarray(pets.train[0]["image"])
    assert sum(decodes.values()) > 0


# ----------------------------------------------------------------------------- the split

SPLIT_COUNTS = {"Abyssinian": (20, 3), "Bengal": (10, 2), "Birman": (30, 4), "Sphynx": (15, 2),
                "beagle": (12, 3), "pug": (8, 2)}


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory):
    return write_pet_folder(tmp_path_factory.mktemp("split"), SPLIT_COUNTS, image_size=16)


def test_split_is_stratified_reproducible_disjoint_and_leaves_test_alone(split_folder):
    kwargs = dict(data_dir=str(split_folder), species="cat", val_fraction=0.2,
                  breeds=["Abyssinian", "Bengal", "Birman", "Sphynx"])  # the cats this folder has
    pets = load_pets(seed=7, **kwargs)
    trainval_ids = [i for i in annotation_ids(split_folder / "annotations" / "trainval.txt")
                    if breed_of(i) in CAT_BREEDS]
    test_ids = [i for i in annotation_ids(split_folder / "annotations" / "test.txt")
                if breed_of(i) in CAT_BREEDS]

    train, val = set(ids(pets.train)), set(ids(pets.val))
    assert not train & val
    assert train | val == set(trainval_ids)
    assert len(pets.train) + len(pets.val) == len(trainval_ids)  # no duplicates either
    assert len(pets.val) == round(0.2 * len(trainval_ids))
    for breed in ("Abyssinian", "Bengal", "Birman", "Sphynx"):  # every class in proportion
        n_val = sum(breed_of(i) == breed for i in val)
        assert abs(n_val - 0.2 * SPLIT_COUNTS[breed][0]) <= 1, (breed, n_val)
    assert ids(pets.test) == test_ids  # the official test split, untouched and in file order

    again = load_pets(seed=7, **kwargs)
    assert ids(again.train) == ids(pets.train) and ids(again.val) == ids(pets.val)
    other = load_pets(seed=8, **kwargs)
    assert set(ids(other.val)) != val
    assert ids(other.test) == test_ids


def test_split_fingerprint_follows_the_split_only(split_folder):
    kwargs = dict(data_dir=str(split_folder), species="cat", val_fraction=0.2,
                  breeds=["Abyssinian", "Bengal", "Birman", "Sphynx"])  # the cats this folder has
    fingerprint = split_fingerprint(load_pets(seed=7, **kwargs))
    assert split_fingerprint(load_pets(seed=7, **kwargs)) == fingerprint
    assert split_fingerprint(load_pets(seed=8, **kwargs)) != fingerprint
    assert split_fingerprint(load_pets(seed=7, **{**kwargs, "val_fraction": 0.3})) != fingerprint
    assert split_fingerprint(load_pets(seed=7, **{**kwargs, "val_fraction": 0})) != fingerprint


def test_val_fraction_zero_keeps_all_of_trainval(split_folder):
    pets = load_pets(data_dir=str(split_folder), species="dog", val_fraction=0)
    assert pets.val is None and len(pets.train) == 12 + 8


def test_a_val_fraction_too_small_for_every_class_is_raised_to_the_smallest_that_is_not(
        make_pet_folder, tmp_path):
    cats = ["Bengal", "Birman", "Sphynx"]
    root = make_pet_folder(tmp_path, {breed: (2, 1) for breed in cats})
    pets = load_pets(data_dir=str(root), species="cat", breeds=cats, val_fraction=0.1, seed=3)
    assert sorted(pets.val["label"]) == [0, 1, 2] and sorted(pets.train["label"]) == [0, 1, 2]
    assert pets.notes == [
        "val_fraction: 0.1 (1 of 6 images) can't give each of the 3 classes a validation image; "
        "using the smallest stratified fraction that does, 0.5 (3 images)."]
    again = load_pets(data_dir=str(root), species="cat", breeds=cats, val_fraction=0.1, seed=3)
    assert ids(again.val) == ids(pets.val)

    # proportional allocation can starve a small class even with as many images as classes
    root = make_pet_folder(tmp_path / "uneven", {"Bengal": (20, 1), "Sphynx": (2, 1)})
    pets = load_pets(data_dir=str(root), species="cat", breeds=["Bengal", "Sphynx"],
                     val_fraction=0.1)
    assert sorted(set(pets.val["label"])) == [0, 1] and sorted(set(pets.train["label"])) == [0, 1]
    assert len(pets.notes) == 1 and pets.notes[0].startswith("val_fraction: 0.1 (2 of 22 images)")

    pets = load_pets(data_dir=str(root), species="cat", breeds=["Bengal", "Sphynx"],
                     val_fraction=0.5)  # enough: the split of before, and nothing to say
    assert len(pets.val) == 11 and pets.notes == []


def test_a_class_with_one_trainval_image_means_no_validation_split(make_pet_folder, tmp_path):
    root = make_pet_folder(tmp_path, {"Bengal": (1, 1), "Sphynx": (6, 1)})
    pets = load_pets(data_dir=str(root), species="cat", breeds=["Bengal", "Sphynx"], val_fraction=0.3)
    assert pets.val is None and len(pets.train) == 7 and len(pets.test) == 2
    assert pets.notes == [
        "val_fraction: breed Bengal has 1 trainval image(s), too few for a validation split; "
        "training on all 7 trainval images without one, so the last weights are the model."]


# ----------------------------------------------------------------------------- synthetic data


def test_synthetic_folder_is_official_layout_and_cached(synthetic_dir, pet_cache):
    assert len(list((synthetic_dir / "images").glob("*.jpg"))) == 37 * 8
    list_lines = (synthetic_dir / "annotations" / "list.txt").read_text().splitlines()
    assert list_lines[0].startswith("#") and not list_lines[6].startswith("#")
    trainval = annotation_ids(synthetic_dir / "annotations" / "trainval.txt")
    test = annotation_ids(synthetic_dir / "annotations" / "test.txt")
    assert len(trainval) == len(test) == 37 * 4 and not set(trainval) & set(test)
    assert {breed_of(i) for i in trainval} == set(BREEDS)
    line = (synthetic_dir / "annotations" / "trainval.txt").read_text().splitlines()[0]
    assert line == annotation_line("Abyssinian_1", "Abyssinian")

    stamp = (synthetic_dir / "annotations" / "test.txt").stat().st_mtime_ns
    assert synthetic_pets_dir(images_per_class=8, image_size=48) == synthetic_dir  # cached
    assert (synthetic_dir / "annotations" / "test.txt").stat().st_mtime_ns == stamp
    assert [p.name for p in pet_cache.iterdir() if p.name.startswith(".")] == []  # no tmp left


def test_synthetic_classes_look_different(synthetic_dir):
    def mean_colour(image_id):
        return np.asarray(Image.open(synthetic_dir / "images" / f"{image_id}.jpg"), dtype=float).mean((0, 1))

    # two images of one breed are closer than images of two different breeds
    same = np.abs(mean_colour("Bengal_1") - mean_colour("Bengal_2")).sum()
    different = np.abs(mean_colour("Bengal_1") - mean_colour("Birman_1")).sum()
    assert different > 2 * same


def test_dataset_synthetic_loads_through_the_cache(synthetic_dir):
    pets = load_pets(dataset="synthetic", synthetic_images_per_class=8, synthetic_image_size=48,
                     species="cat", val_fraction=0)
    assert pets.class_names == CAT_BREEDS_OFFICIAL and pets.skipped == []
    assert pets.train[0]["image"].size == (48, 48)


def test_synthetic_generator_command_line(tmp_path):
    out = tmp_path / "gen"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "pet_pipeline.synthetic", str(out), "--images-per-class", "3",
         "--image-size", "32"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"wrote {37 * 3} images" in result.stdout
    assert len(list((out / "images").glob("*.jpg"))) == 37 * 3
    assert Image.open(out / "images" / "pug_3.jpg").size == (32, 32)
    assert len(annotation_ids(out / "annotations" / "trainval.txt")) == 37 * 2
    assert len(annotation_ids(out / "annotations" / "test.txt")) == 37
    pets = load_pets(data_dir=str(out), species="all", val_fraction=0)
    assert pets.skipped == [] and len(pets.train) == 74


def test_synthetic_generator_is_seeded(tmp_path):
    a = write_synthetic_pets(tmp_path / "a", images_per_class=2, image_size=16, seed=3)
    b = write_synthetic_pets(tmp_path / "b", images_per_class=2, image_size=16, seed=3)
    assert (a / "images" / "pug_2.jpg").read_bytes() == (b / "images" / "pug_2.jpg").read_bytes()


# ----------------------------------------------------------------------------- bad input


def _make_16_bit() -> Image.Image:
    values = (np.arange(24 * 24, dtype=np.uint16).reshape(24, 24) * 100).astype(np.uint16)
    return Image.fromarray(values)


BASE = Image.new("RGB", (24, 24), (200, 100, 50))
# image id -> (PIL image, format, the mode PIL reports when it opens the file)
CONVERTIBLE = {
    "Abyssinian_101": (BASE, "PNG", "RGB"),
    "Abyssinian_102": (BASE.convert("P", palette=Image.Palette.ADAPTIVE), "GIF", "P"),
    "Abyssinian_103": (Image.new("RGBA", (24, 24), (200, 100, 50, 100)), "PNG", "RGBA"),
    "Abyssinian_104": (BASE.convert("L"), "JPEG", "L"),
    "Abyssinian_105": (BASE.convert("CMYK"), "JPEG", "CMYK"),
    "Abyssinian_106": (_make_16_bit(), "PNG", "I;16"),
}
BROKEN = {  # image id -> the reason the pipeline must report
    "Bengal_101": "empty file",
    "Bengal_102": "missing file",
    "Bengal_103": "not an image PIL can read",
    "Bengal_104": "truncated JPEG",
}
MALFORMED_LINES = [  # (line, words the report must contain)
    ("Bengal_201 6 1", "expected 4 fields"),
    ("Bengal_202 six 1 2", "must be integers"),
    ("Bengal_203 38 1 1", "CLASS-ID 38 is outside 1..37"),
    ("Bengal_204 6 2 2", "SPECIES 2 does not match breed Bengal"),
]


@pytest.fixture
def bad_folder(make_pet_folder, tmp_path):
    extra = [annotation_line(i, breed_of(i)) for i in [*CONVERTIBLE, *BROKEN]]
    extra += [line for line, _ in MALFORMED_LINES]
    root = make_pet_folder(tmp_path, {"Abyssinian": (4, 2), "Bengal": (4, 2)}, extra_trainval=extra)
    images = root / "images"
    for image_id, (img, image_format, _) in CONVERTIBLE.items():
        img.save(images / f"{image_id}.jpg", format=image_format)  # named .jpg, whatever it is
    for image_id in ("Bengal_201", "Bengal_202", "Bengal_203", "Bengal_204"):  # files exist, lines bad
        BASE.save(images / f"{image_id}.jpg")
    (images / "Bengal_101.jpg").write_bytes(b"")
    (images / "Bengal_103.jpg").write_bytes(b"this is not an image\n" * 20)
    Image.effect_noise((64, 64), 60).convert("RGB").save(images / "Bengal_104.jpg", quality=90)
    data = (images / "Bengal_104.jpg").read_bytes()
    (images / "Bengal_104.jpg").write_bytes(data[: len(data) // 2])
    assert not (images / "Bengal_102.jpg").exists()
    return root


def test_disguised_formats_are_converted_to_rgb(bad_folder):
    for image_id, (_, image_format, mode) in CONVERTIBLE.items():
        path = bad_folder / "images" / f"{image_id}.jpg"
        with Image.open(path) as raw:
            assert (raw.format, raw.mode) == (image_format, mode)  # the test's own premise
        assert check_image_file(path) is None
        img = open_rgb(path)
        assert img.mode == "RGB" and img.size == (24, 24)
        assert open_rgb(str(path), min_side=16).mode == "RGB"
        assert open_rgb({"path": str(path), "bytes": path.read_bytes()}).mode == "RGB"
    # a transparent pixel becomes a colour over white, not a random one
    assert open_rgb(bad_folder / "images" / "Abyssinian_103.jpg").getpixel((0, 0))[0] > 200


def test_bad_files_and_lines_are_reported_by_name_and_left_out(bad_folder):
    pets = load_pets(data_dir=str(bad_folder), species="cat", val_fraction=0)
    kept = set(ids(pets.train))
    assert set(CONVERTIBLE) <= kept  # used, not skipped
    assert not kept & set(BROKEN)
    assert not kept & {"Bengal_201", "Bengal_202", "Bengal_203", "Bengal_204"}
    assert len(pets.train) == 8 + len(CONVERTIBLE)

    skipped = pets.skipped
    assert len(skipped) == len(BROKEN) + len(MALFORMED_LINES), skipped
    for image_id, reason in BROKEN.items():
        assert any(s.startswith(f"images/{image_id}.jpg: {reason}") for s in skipped), (image_id, skipped)
    first_extra_line = 8 + len(CONVERTIBLE) + len(BROKEN) + 1  # 1-based line numbers
    for offset, (_, reason) in enumerate(MALFORMED_LINES):
        where = f"annotations/trainval.txt:{first_extra_line + offset}: "
        assert any(s.startswith(where) and reason in s for s in skipped), (where, reason, skipped)


def test_converted_images_reach_the_model_as_3_channel_tensors(bad_folder):
    pets = load_pets(data_dir=str(bad_folder), species="cat", val_fraction=0)
    data_config = model_data_config("resnet18", image_size=32)
    transform = build_eval_transform(data_config)
    for min_side in (None, decode_size(data_config, None)):
        dataset = PetTorchDataset(pets.train, transform, min_side=min_side)
        for index, image_id in enumerate(pets.train["image_id"]):
            if image_id in CONVERTIBLE:
                item = dataset[index]
                assert item["pixel_values"].shape == (3, 32, 32), image_id
                assert item["pixel_values"].dtype == torch.float32
                assert torch.isfinite(item["pixel_values"]).all()


def test_truncated_gif_is_reported(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
    img = Image.fromarray(pixels).convert("P", palette=Image.Palette.ADAPTIVE)
    path = tmp_path / "Abyssinian_1.jpg"
    img.save(path, format="GIF")
    data = path.read_bytes()
    semicolon = data.index(b";", len(data) // 2)  # a 0x3b byte in the LZW data, not the trailer
    assert semicolon < len(data) - 40
    path.write_bytes(data[: semicolon + 20])  # cut short, with that byte in the last 64
    with pytest.raises(OSError):
        open_rgb(path)  # the premise: this file can't be decoded
    assert check_image_file(path) is not None


def test_strict_data_makes_bad_input_an_error(bad_folder):
    with pytest.raises(UserError) as error:
        load_pets(data_dir=str(bad_folder), species="cat", val_fraction=0, strict_data=True)
    message = str(error.value)
    assert message.startswith("strict_data: 8 bad input(s), first ")
    assert "strict_data: false" in message


def test_bad_files_of_filtered_out_breeds_are_not_even_opened(make_pet_folder, tmp_path):
    root = make_pet_folder(tmp_path, {"Bengal": 4, "beagle": 4})
    (root / "images" / "beagle_1.jpg").write_bytes(b"")
    assert load_pets(data_dir=str(root), species="cat", val_fraction=0).skipped == []
    assert load_pets(data_dir=str(root), species="dog", val_fraction=0).skipped == [
        "images/beagle_1.jpg: empty file"]


# ----------------------------------------------------------------------------- untrusted annotations


def _load_skipped(root, **kwargs):
    pets = load_pets(data_dir=str(root), species="cat", val_fraction=0, **kwargs)
    return pets, pets.skipped


def test_paths_that_leave_images_are_named_by_their_given_id_and_left_out(make_pet_folder, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    BASE.save(outside / "secret.jpg")  # a readable image: only the path check keeps it out
    leaving = {  # image id as given -> the report
        "../../outside/secret": "images/../../outside/secret.jpg: path leaves images/",
        "../../../../../../etc/passwd": "images/../../../../../../etc/passwd.jpg: path leaves images/",
        "Bengal_1/../../../etc/shadow": "images/Bengal_1/../../../etc/shadow.jpg: path leaves images/",
        str(outside / "secret"): f"{outside / 'secret'}.jpg: absolute path, leaves images/",
        "/etc/passwd": "/etc/passwd.jpg: absolute path, leaves images/",
        "Bengal_9": "images/Bengal_9.jpg: symlink out of images/",
    }
    extra = [annotation_line(i, "Bengal") for i in [*leaving, "Bengal_10"]]
    root = make_pet_folder(tmp_path / "pets", {"Bengal": (4, 2)}, extra_trainval=extra)
    (root / "images" / "Bengal_9.jpg").symlink_to(outside / "secret.jpg")
    (root / "images" / "Bengal_10.jpg").symlink_to("Bengal_1.jpg")  # within images/: fine

    pets, skipped = _load_skipped(root)
    assert ids(pets.train) == ["Bengal_1", "Bengal_2", "Bengal_3", "Bengal_4", "Bengal_10"]
    assert sorted(skipped) == sorted(leaving.values())

    with pytest.raises(UserError) as error:
        _load_skipped(root, strict_data=True)
    message = str(error.value)
    assert message.startswith(f"strict_data: {len(leaving)} bad input(s), first images/../../outside")
    assert "path leaves images/" in message and "\n" not in message


def test_a_fifo_or_folder_named_like_an_image_is_left_out_without_blocking(make_pet_folder, tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    extra = [annotation_line(i, "Bengal") for i in ("Bengal_16", "Bengal_17")]
    root = make_pet_folder(tmp_path, {"Bengal": (4, 2)}, extra_trainval=extra)
    os.mkfifo(root / "images" / "Bengal_16.jpg")  # opening it for reading waits for a writer
    (root / "images" / "Bengal_17.jpg").mkdir()
    code = ("import json, sys\nfrom pet_pipeline.data import load_pets\n"
            "pets = load_pets(data_dir=sys.argv[1], species='cat', val_fraction=0)\n"
            "print(json.dumps([list(pets.train['image_id']), pets.skipped]))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    try:  # in a child process, so that a scan that blocks fails this test instead of hanging CI
        result = subprocess.run([sys.executable, "-c", code, str(root)], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("loading a folder with a FIFO named Bengal_16.jpg blocked for 90 s")
    assert result.returncode == 0, result.stderr[-2000:]
    train, skipped = json.loads(result.stdout.splitlines()[-1])
    assert train == ["Bengal_1", "Bengal_2", "Bengal_3", "Bengal_4"]
    assert skipped == ["images/Bengal_16.jpg: not a regular file", "images/Bengal_17.jpg: not a regular file"]


def write_blank_png(path, width: int, height: int) -> None:
    """A valid 1-bit PNG of width x height, tiny on disk (~110 KB at 30000x30000)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    data = b"".join([compressor.compress(row) for _ in range(height)] + [compressor.flush()])
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data)
                     + chunk(b"IEND", b""))


def test_images_over_the_pixel_limit_are_named_from_the_header(make_pet_folder, tmp_path, monkeypatch):
    extra = [annotation_line(i, "Bengal") for i in ("Bengal_17", "Bengal_18")]
    root = make_pet_folder(tmp_path, {"Bengal": (4, 2)}, extra_trainval=extra)
    bomb, big = root / "images" / "Bengal_17.jpg", root / "images" / "Bengal_18.jpg"
    write_blank_png(bomb, 30000, 30000)  # 900 M pixels: over twice PIL's limit, it raises
    write_blank_png(big, 10000, 10000)  # 100 M pixels: over the limit, PIL only warns
    assert bomb.stat().st_size < 200_000 and Image.MAX_IMAGE_PIXELS < 10000 * 10000
    with pytest.raises(Image.DecompressionBombError):  # the premise
        Image.open(bomb)

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with count_decodes() as decodes:
            pets, skipped = _load_skipped(root)
    assert sum(decodes.values()) == 0
    assert ids(pets.train) == ["Bengal_1", "Bengal_2", "Bengal_3", "Bengal_4"]
    assert skipped == [
        "images/Bengal_17.jpg: over the pixel limit (900,000,000 pixels > 89,478,485)",
        "images/Bengal_18.jpg: over the pixel limit (10000x10000 = 100,000,000 pixels > 89,478,485)",
    ]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000_000)  # PIL's limit raised: ours too
    assert check_image_file(big) is None and "over the pixel limit" in check_image_file(bomb)


def test_duplicate_lines_are_kept_once_and_counted(make_pet_folder, tmp_path):
    extra_trainval = [
        annotation_line("Bengal_1", "Bengal"),  # line 10: a repeat of line 1
        annotation_line("./Bengal_2", "Bengal"),  # the same image, spelt differently
        annotation_line("Sphynx_1", "Bengal"),  # a repeat with another breed: the first wins
        annotation_line("beagle_1", "beagle"),  # a dog: not this run's business
    ]
    root = make_pet_folder(tmp_path, {"Bengal": (4, 2), "Sphynx": (3, 2), "beagle": (2, 0)},
                           extra_trainval=extra_trainval,
                           extra_test=[annotation_line("Bengal_6", "Bengal")])
    pets, skipped = _load_skipped(root)
    assert ids(pets.train) == ["Bengal_1", "Bengal_2", "Bengal_3", "Bengal_4",
                               "Sphynx_1", "Sphynx_2", "Sphynx_3"]
    assert ids(pets.test) == ["Bengal_5", "Bengal_6", "Sphynx_4", "Sphynx_5"]
    assert pets.class_names[pets.train["label"][4]] == "Sphynx"
    assert skipped == [
        "annotations/trainval.txt:10: images/Bengal_1.jpg listed again, first on line 1; kept once",
        "annotations/trainval.txt:11: images/./Bengal_2.jpg listed again, first on line 2; kept once",
        "annotations/trainval.txt:12: images/Sphynx_1.jpg listed again as Bengal (the first line's "
        "Sphynx kept), first on line 5; kept once",
        "annotations/test.txt:5: images/Bengal_6.jpg listed again, first on line 2; kept once",
    ]
    assert pets.duplicates == 4 and pets.leaks == 0


def test_an_image_in_both_trainval_and_test_is_dropped_from_training(make_pet_folder, tmp_path):
    root = make_pet_folder(tmp_path, {"Bengal": (4, 2), "Sphynx": (4, 2)},
                           extra_trainval=[annotation_line("Sphynx_9", "Sphynx")],
                           extra_test=[annotation_line("Bengal_1", "Bengal")])
    (root / "images" / "Sphynx_9.jpg").symlink_to("Sphynx_5.jpg")  # a test image by another name
    pets = load_pets(data_dir=str(root), species="cat", breeds=["Bengal", "Sphynx"],
                     val_fraction=0.25, seed=0)
    train = ids(pets.train) + ids(pets.val)
    assert sorted(train) == ["Bengal_2", "Bengal_3", "Bengal_4", "Sphynx_1", "Sphynx_2",
                             "Sphynx_3", "Sphynx_4"]
    assert ids(pets.test) == ["Bengal_5", "Bengal_6", "Sphynx_5", "Sphynx_6", "Bengal_1"]  # untouched
    assert pets.skipped == [
        "images/Bengal_1.jpg: listed in both trainval.txt and test.txt (a train/test leak); "
        "left out of training, kept in test",
        "images/Sphynx_9.jpg: the same file as test image Sphynx_5 (a train/test leak); "
        "left out of training, kept in test",
    ]
    assert pets.leaks == 2 and pets.duplicates == 0
    with pytest.raises(UserError, match=r"^strict_data: 2 bad input\(s\), first images/Bengal_1\.jpg"):
        load_pets(data_dir=str(root), species="cat", val_fraction=0, strict_data=True)


# ----------------------------------------------------------------------------- the real sample


@pytest.mark.skipif(
    not PET_SAMPLE.is_dir(),
    reason=f"real Oxford sample not found at {PET_SAMPLE} (shared/ is not next to the project)",
)
def test_real_oxford_sample_loads_with_nothing_skipped():
    pets = load_pets(data_dir=str(PET_SAMPLE), species="all", val_fraction=0)
    assert pets.skipped == []
    assert len(pets.train) + len(pets.test) == 372
    assert pets.class_names == list(BREEDS)
    for image_id, image_format in (("Abyssinian_5", "PNG"), ("Abyssinian_34", "GIF")):
        path = PET_SAMPLE / "images" / f"{image_id}.jpg"
        with Image.open(path) as raw:
            assert raw.format == image_format
        assert open_rgb(path).mode == "RGB"
        split = pets.train if image_id in pets.train["image_id"] else pets.test
        record = split.cast_column("image", datasets.Image(decode=False))[
            list(split["image_id"]).index(image_id)]["image"]
        assert open_rgb(record, min_side=64).mode == "RGB"
    cats = load_pets(data_dir=str(PET_SAMPLE), species="cat", val_fraction=0)
    assert cats.class_names == CAT_BREEDS_OFFICIAL
    assert {breed_of(i) for i in cats.train["image_id"]} == set(CAT_BREEDS_OFFICIAL)


# ----------------------------------------------------------------------------- the Hub


def test_hub_offline_names_data_dir(monkeypatch, tmp_path):
    import huggingface_hub.constants

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    # datasets and huggingface_hub read these once at import; this process imported them already
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))

    with pytest.raises(UserError) as error:
        load_pets(dataset="timm/oxford-iiit-pet")
    message = str(error.value)
    assert message.startswith("dataset: could not load 'timm/oxford-iiit-pet'")
    assert "data_dir" in message and "quickstart" in message and "\n" not in message


def _fake_hub_split(start: int, per_breed: int) -> datasets.Dataset:
    """A split shaped like timm/oxford-iiit-pet: 37 lowercase label names, label_cat_dog."""
    features = Features({
        "image": datasets.Image(),
        "label": ClassLabel(names=[b.lower() for b in BREEDS]),
        "image_id": Value("string"),
        "label_cat_dog": ClassLabel(names=["cat", "dog"]),
    })
    columns = {"image": [], "label": [], "image_id": [], "label_cat_dog": []}
    for k, breed in enumerate(BREEDS):
        for n in range(start, start + per_breed):
            columns["image"].append(Image.new("RGB", (8, 6), (k * 6, n, 0)))
            columns["label"].append(k)
            columns["image_id"].append(f"{breed}_{n}")
            columns["label_cat_dog"].append(0 if breed in CAT_BREEDS else 1)
    return datasets.Dataset.from_dict(columns, features=features)


@pytest.fixture
def fake_hub(monkeypatch):
    hub = datasets.DatasetDict(train=_fake_hub_split(1, 3), test=_fake_hub_split(100, 2))
    requested = []

    def load_dataset(dataset_id, *args, **kwargs):
        requested.append(dataset_id)
        return hub

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return requested


def test_hub_dataset_is_mapped_to_our_schema(fake_hub):
    with count_decodes() as decodes:
        splits, skipped, bad_ids = load_hub("timm/oxford-iiit-pet", CAT_BREEDS_OFFICIAL)
    assert sum(decodes.values()) == 0
    assert fake_hub == ["timm/oxford-iiit-pet"] and skipped == [] == bad_ids
    assert set(splits) == {"trainval", "test"}
    for split, per_breed in (("trainval", 3), ("test", 2)):
        ds = splits[split]
        assert ds.features == pet_features(CAT_BREEDS_OFFICIAL)
        assert len(ds) == 12 * per_breed
        for label, species, image_id in zip(ds["label"], ds["species"], ds["image_id"]):
            assert CAT_BREEDS_OFFICIAL[label] == breed_of(image_id) and species == 0
    assert splits["trainval"][0]["image"].size == (8, 6)


def test_load_pets_from_the_hub_filters_and_splits(fake_hub):
    pets = load_pets(dataset="timm/oxford-iiit-pet", species="dog", breeds=["Pug", "beagle"],
                     val_fraction=0.34, seed=0)
    assert pets.class_names == ["beagle", "pug"]
    assert sorted(set(pets.train["label"]) | set(pets.val["label"])) == [0, 1]
    assert len(pets.train) + len(pets.val) == 6 and len(pets.test) == 4
    assert {breed_of(i) for i in pets.test["image_id"]} == {"beagle", "pug"}
    assert all(["beagle", "pug"][label] == breed_of(i)
               for label, i in zip(pets.test["label"], pets.test["image_id"]))


def test_hub_images_pass_the_checks_a_local_file_does(monkeypatch):
    """A broken image inside the Hub's Arrow files is named and left out, not met mid-training."""
    import io

    split = _fake_hub_split(1, 2)
    good = io.BytesIO()
    Image.new("RGB", (64, 48), (1, 2, 3)).save(good, format="JPEG")
    records = split.cast_column("image", datasets.Image(decode=False))["image"][:]
    records[0] = {"bytes": good.getvalue()[:-10], "path": None}  # Abyssinian_1, cut short
    records[1] = {"bytes": b"not an image", "path": None}  # Abyssinian_2
    broken = split.cast_column("image", datasets.Image(decode=False)).remove_columns("image").add_column(
        "image", records, feature=datasets.Image(decode=False)).cast_column("image", datasets.Image())
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: datasets.DatasetDict(train=broken, test=_fake_hub_split(100, 2)))
    splits, skipped, bad_ids = load_hub("timm/oxford-iiit-pet", CAT_BREEDS_OFFICIAL)
    assert skipped == ["Abyssinian_1: truncated JPEG (no end marker); left out",
                       "Abyssinian_2: not an image PIL can read; left out"]
    assert len(splits["trainval"]) == 12 * 2 - 2 and bad_ids == ["Abyssinian_1", "Abyssinian_2"]
    assert "Abyssinian_1" not in splits["trainval"]["image_id"][:]
    pets = load_pets(dataset="timm/oxford-iiit-pet", species="cat", val_fraction=0)
    assert pets.skipped == skipped
    with pytest.raises(UserError, match=r"strict_data: 2 bad input\(s\), first Abyssinian_1"):
        load_pets(dataset="timm/oxford-iiit-pet", strict_data=True)


def test_hub_dataset_with_foreign_labels_is_a_user_error(monkeypatch):
    features = Features({"image": datasets.Image(), "label": ClassLabel(names=["cat", "car"])})
    split = datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))], "label": [1]},
                                       features=features)
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: datasets.DatasetDict(train=split, test=split))
    with pytest.raises(UserError, match=r"has label 'cat', not an Oxford-IIIT Pet breed"):
        load_hub("someone/cifar", CAT_BREEDS_OFFICIAL)


# --------------------------------------------------------------------------- pre-resized cache


def test_pre_resize_keeps_schema_shrinks_images_and_is_reused(tmp_path, monkeypatch):
    from pet_pipeline.data import pre_resize

    monkeypatch.setenv("PET_PIPELINE_CACHE", str(tmp_path / "cache"))
    root = write_pet_folder(tmp_path / "pets", {"Abyssinian": (3, 1), "Bengal": (3, 1)}, image_size=120)
    pets = load_pets(data_dir=str(root), species="cat", breeds=["Abyssinian", "Bengal"], val_fraction=0)
    resized = pre_resize(pets.train, short_side=48)
    assert resized.features == pets.train.features
    assert list(resized["image_id"]) == list(pets.train["image_id"])
    assert list(resized["label"]) == list(pets.train["label"])
    for original, small in zip(pets.train, resized):
        assert min(small["image"].size) == 48 and small["image"].mode == "RGB"
        ratio = original["image"].size[0] / original["image"].size[1]
        assert small["image"].size[0] / small["image"].size[1] == pytest.approx(ratio, rel=0.05)
        # the same picture, only smaller
        back = np.asarray(small["image"].resize(original["image"].size), dtype=np.float32)
        assert np.abs(back - np.asarray(original["image"].convert("RGB"), dtype=np.float32)).mean() < 20
    cached = list((tmp_path / "cache" / "resized").glob("*.arrow"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    again = pre_resize(pets.train, short_side=48)  # a second run reads the cache
    assert cached[0].stat().st_mtime_ns == mtime and len(again) == len(resized)
    dataset = PetTorchDataset(again, build_eval_transform(model_data_config("coatnet_nano_rw_224", 32)))
    assert dataset[0]["pixel_values"].shape == (3, 32, 32)


def test_a_process_with_loader_workers_still_alive_exits(tmp_path):
    """Loader workers ignore SIGTERM (the main process handles stops); a loader still alive
    when Python exits must not make the exit wait on them forever."""
    script = tmp_path / "alive_at_exit.py"
    script.write_text(
        "import torch\n"
        "from pet_pipeline.loader import build_dataloader\n"
        "loader = build_dataloader(torch.utils.data.TensorDataset(torch.arange(8)), batch_size=2,\n"
        "                          train=False, seed=0, num_workers=2)\n"
        "batches = iter(loader)\n"
        "next(batches)\n"
        "print('one batch read', flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for _ in range(3):  # the workers die in any order during the exit: a race, so a few runs
        try:
            result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                                    env=env, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the process hung at exit, waiting for loader workers that ignore SIGTERM")
        assert result.returncode == 0, result.stderr[-2000:]
        assert "one batch read" in result.stdout
        assert "Exception ignored in atexit" not in result.stderr, result.stderr[-2000:]
