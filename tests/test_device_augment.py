"""`augment_on: device`: the pixel cache and the batched crop, resize and flip on the device.

What must hold: the cache is what the decoder gives and is never used torn or stale; the
device path draws its crops from the CPU path's distribution; its batches are a function of
(seed, epoch, index) whatever the worker count and across a resume; and its evaluation crop
agrees with timm's eval transform on real photos through real ImageNet weights.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from conftest import PET_SAMPLE, REPO, TINY, cli, ok, refused, run_in_process
from PIL import Image
from safetensors.torch import load_file

from pet_pipeline.checkpoint import list_checkpoints
from pet_pipeline.device_augment import CachedImages, DeviceAugment, _region_around, collate_regions
from pet_pipeline.loader import build_dataloader
from pet_pipeline.pixel_cache import open_or_build

needs_sample = pytest.mark.skipif(
    not PET_SAMPLE.is_dir(),
    reason=f"real Oxford sample not found at {PET_SAMPLE} (shared/ is not next to the project)")

DATA_CONFIG = {"input_size": (3, 224, 224), "crop_pct": 0.875, "mean": (0.485, 0.456, 0.406),
               "std": (0.229, 0.224, 0.225), "interpolation": "bicubic"}


def image_dataset(paths, labels) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"image": [str(p) for p in paths], "label": labels, "image_id": [p.stem for p in paths]}
    ).cast_column("image", datasets.Image())


@pytest.fixture(scope="module")
def sample_photos() -> datasets.Dataset:
    """The shared sample's 372 real photos (a PNG and a GIF named .jpg among them), labelled
    by breed."""
    paths = sorted((PET_SAMPLE / "images").glob("*.jpg"))
    breeds = sorted({p.stem.rsplit("_", 1)[0] for p in paths})
    return image_dataset(paths, [breeds.index(p.stem.rsplit("_", 1)[0]) for p in paths])


@pytest.fixture(scope="module")
def sample_cache(sample_photos, tmp_path_factory):
    cache, built = open_or_build(sample_photos, short_side=256, root=tmp_path_factory.mktemp("cache"),
                                 num_proc=2, progress=False)
    assert built
    return cache


@pytest.fixture
def small_photos(tmp_path) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    paths = []
    for n, size in enumerate([(40, 30), (30, 50), (64, 64), (90, 20), (33, 47)] * 2):
        path = tmp_path / "photos" / f"p_{n}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return image_dataset(paths, [n % 2 for n in range(len(paths))])


# --------------------------------------------------------------------------- the pixel cache


def test_the_cache_holds_the_decoders_pixels_and_a_second_open_reuses_it(small_photos, tmp_path):
    from pet_pipeline.data import open_resized

    root = tmp_path / "cache"
    cache, built = open_or_build(small_photos, short_side=24, root=root, num_proc=2, progress=False)
    assert built and len(cache) == len(small_photos)
    records = small_photos.cast_column("image", datasets.Image(decode=False))["image"][:]
    for row, record in enumerate(records):
        np.testing.assert_array_equal(cache.image(row), np.asarray(open_resized(record, 24, enlarge=True)))
        assert min(cache.size(row)) == 24  # (90, 20) enlarged, like the eval transform enlarges it
    again, built = open_or_build(small_photos, short_side=24, root=root, progress=False)
    assert not built and again.folder == cache.folder
    assert "10 images at 24 px short side" in again.describe()


def test_a_torn_cache_is_rebuilt_and_changed_data_gets_a_cache_of_its_own(small_photos, tmp_path):
    root = tmp_path / "cache"
    cache, _ = open_or_build(small_photos, short_side=24, root=root, progress=False)
    expected = cache.image(3).copy()
    chunk = cache.folder / "chunk-00000.u8"
    with open(chunk, "r+b") as f:  # a copy cut short, a crash while writing
        f.truncate(os.path.getsize(chunk) // 2)
    rebuilt, built = open_or_build(small_photos, short_side=24, root=root, progress=False)
    assert built, "a truncated chunk was used"
    np.testing.assert_array_equal(rebuilt.image(3), expected)
    (rebuilt.folder / "meta.json").unlink()  # a build killed before its last write
    assert open_or_build(small_photos, short_side=24, root=root, progress=False)[1]

    changed = small_photos.cast_column("image", datasets.Image(decode=False))["image"][3]["path"]
    Image.new("RGB", (40, 30), (255, 0, 0)).save(changed)  # the data changed since: not served stale
    fresh, built = open_or_build(small_photos, short_side=24, root=root, progress=False)
    assert built and fresh.folder != rebuilt.folder
    assert (fresh.image(3) == (255, 0, 0)).all()


def test_an_image_unreadable_when_cached_gets_a_stand_in_of_its_class_in_training(small_photos, tmp_path):
    broken = small_photos.cast_column("image", datasets.Image(decode=False))["image"][2]["path"]
    with open(broken, "wb") as f:
        f.write(b"not an image")
    cache, _ = open_or_build(small_photos, short_side=24, root=tmp_path / "cache", progress=False)
    assert not cache.readable(2) and cache.readable(4)
    config = {**DATA_CONFIG, "input_size": (3, 16, 16)}
    train = CachedImages(small_photos, cache, data_config=config, augment="standard", train=True,
                         stand_in=True)
    item = train[(0, 2)]
    assert item["unreadable"] == 2 and item["label"] == 0  # row 4, the next of class 0, stands in
    assert item["region"].shape[0] <= cache.size(4)[0] + 1  # of row 4, the edge repeated once
    evaluation = CachedImages(small_photos, cache, data_config=config, augment="standard", train=False)
    assert evaluation[2]["unreadable"] == 2 and evaluation[3]["unreadable"] == -1


# --------------------------------------------------------------------------- the crops


@needs_sample
def test_crop_boxes_follow_the_cpu_paths_scale_and_ratio_distribution(sample_photos, sample_cache):
    """The CPU path crops the full-size photo with timm's RandomResizedCropAndInterpolation; the
    device path draws its boxes on the cached (smaller) image. Scale (crop area / image area)
    and log aspect ratio must have the same distribution: histograms within 2 points a bin
    over 6,000 draws each (the sampling noise of a bin is ~0.6 points)."""
    from timm.data.transforms import RandomResizedCropAndInterpolation

    train = CachedImages(sample_photos, sample_cache, data_config=DATA_CONFIG, augment="standard", train=True)
    rows = [row * 7 % len(sample_photos) for row in range(6000)]
    device_scale, device_ratio = [], []
    for epoch, row in enumerate(rows):
        item = train[(epoch, row)]
        x1, y1, x2, y2 = item["box"].tolist()
        height, width = sample_cache.size(row)
        device_scale.append((x2 - x1) * (y2 - y1) / (height * width))
        device_ratio.append(math.log((x2 - x1) / (y2 - y1)))
    crop = RandomResizedCropAndInterpolation(224, scale=(0.08, 1.0))
    sizes = {row: Image.open(record["path"]).size for row, record in enumerate(
        sample_photos.cast_column("image", datasets.Image(decode=False))["image"][:])}
    random.seed(0)
    cpu_scale, cpu_ratio = [], []
    for row in rows:
        width, height = sizes[row]
        image = Image.new("L", (width, height))
        _, _, crop_height, crop_width = crop.get_params(image, crop.scale, crop.ratio)
        cpu_scale.append(crop_width * crop_height / (width * height))
        cpu_ratio.append(math.log(crop_width / crop_height))

    def shares(values, edges):
        return np.histogram(values, bins=edges)[0] / len(values)

    for device, cpu, edges in ((device_scale, cpu_scale, np.linspace(0.0, 1.0, 11)),
                               (device_ratio, cpu_ratio, np.linspace(math.log(3 / 4), math.log(4 / 3), 9))):
        difference = np.abs(shares(device, edges) - shares(cpu, edges))
        assert difference.max() < 0.02, (shares(device, edges), shares(cpu, edges))
    flips = [train[(epoch, 5)]["flip"] for epoch in range(400)]
    assert 0.42 < np.mean(flips) < 0.58


def _whole_image_resized(pixels: np.ndarray, size: int) -> np.ndarray:
    """The device path's resize of a box over all of `pixels`, in a batch beside a larger
    region, so that zero padding lies right of and below it."""
    height, width = pixels.shape[:2]
    region, box = _region_around(pixels, (0.0, 0.0, float(width), float(height)))
    item = {"region": torch.from_numpy(region), "box": torch.tensor(box), "flip": False, "label": 0,
            "index": 0, "unreadable": -1}
    larger = {**item, "region": torch.zeros(height + 30, width + 30, 3, dtype=torch.uint8)}
    config = {**DATA_CONFIG, "input_size": (3, size, size), "mean": (0, 0, 0), "std": (1 / 255,) * 3}
    return DeviceAugment(config, "cpu")(collate_regions([item, larger]))[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("height, width, size", [(96, 128, 48), (36, 48, 96)], ids=["shrink", "enlarge"])
def test_the_device_resize_of_a_whole_image_box_matches_pils_bilinear_resize(height, width, size):
    """roi_align over a box covering the image is a resize: against PIL's bilinear resize of a
    smooth image, within 2 grey levels inside; at the border PIL renormalises its filter over
    the pixels inside and roi_align reads the repeated edge (enlarging without that edge, the
    border fell 61 levels towards the zero padding)."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = (127 + 100 * np.sin(x * 14 / width)[..., None] * np.cos(y * 7 / height)[..., None]
              * np.array([1.0, 0.5, -0.7])).astype(np.uint8)
    expected = np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR)).astype(np.float32)
    difference = np.abs(_whole_image_resized(pixels, size) - expected)
    assert difference[2:-2, 2:-2].max() <= 2.0 and difference.mean() < 0.5
    assert difference.max() <= 4.0


@needs_sample
def test_device_batches_are_the_same_for_any_number_of_workers(sample_photos, sample_cache):
    train = CachedImages(sample_photos.select(range(48)), _first_rows(sample_cache, 48),
                         data_config=DATA_CONFIG, augment="standard", train=True, seed=3)
    augment = DeviceAugment(DATA_CONFIG, "cpu")

    def images(workers: int) -> list[torch.Tensor]:
        loader = build_dataloader(train, batch_size=16, train=True, seed=3, num_workers=workers,
                                  collate_fn=collate_regions)
        loader.sampler.set_epoch(2)
        return [augment(batch) for batch in loader]

    reference = images(0)
    assert len(reference) == 3 and not torch.equal(reference[0][0], reference[0][1])
    for workers in (1, 2):
        for got, expected in zip(images(workers), reference):
            assert torch.equal(got, expected), f"{workers} workers changed the batches"


def _first_rows(cache, n: int):
    """The cache's first n rows, as the cache of the split's first n rows."""
    import copy

    view = copy.copy(cache)
    view.index = cache.index[:n]
    return view


def test_augment_on_device_with_strong_is_refused_in_one_sentence(tmp_path):
    import train

    said = refused(run_in_process(train.main, ["--augment", "strong", "--augment_on", "device",
                                               "--output_dir", str(tmp_path / "run")]),
                   "augment_on: device has no batched RandAugment")
    assert "augment_on: cpu" in said


# --------------------------------------------------------------------------- train.py


def test_a_run_on_the_device_path_resumed_mid_epoch_ends_with_the_uninterrupted_weights(tmp_path, train_run):
    values = {**TINY, "augment_on": "device", "epochs": 2, "val_fraction": 0.25, "checkpoint_steps": 4,
              "keep_checkpoints": 10, "pre_resize": 40, "output_dir": tmp_path / "straight"}
    straight = ok(train_run(values))
    assert "augment_on: device: crops resampled on the device from the pixel cache; train built" in (
        straight.stdout)
    checkpoints = list_checkpoints(tmp_path / "straight")
    mid_epoch = next(c for c in checkpoints
                     if json.loads((c / "train_state.json").read_text())["step_in_epoch"] > 0)
    resumed = ok(train_run({**values, "output_dir": tmp_path / "resumed", "resume": mid_epoch}))
    assert "train reused" in resumed.stdout  # the cache of the first run, not a second build
    final = load_file(str(checkpoints[-1] / "model.safetensors"))
    again = load_file(str(list_checkpoints(tmp_path / "resumed")[-1] / "model.safetensors"))
    for key in final:
        torch.testing.assert_close(again[key], final[key], rtol=1e-5, atol=1e-6)
    straight_metrics = json.loads((tmp_path / "straight" / "eval" / "metrics.json").read_text())
    resumed_metrics = json.loads((tmp_path / "resumed" / "eval" / "metrics.json").read_text())
    assert resumed_metrics["accuracy"] == straight_metrics["accuracy"]
    assert straight_metrics["n"] == 96  # the device eval path counts every test image once


# --------------------------------------------------------------------------- real photos, real weights


@needs_sample
def test_the_device_eval_crop_equals_timms_eval_transform_on_every_real_photo(sample_photos, sample_cache):
    """EfficientNet-Lite0's eval transform (bicubic resize of the short side to 256, centre crop
    224) from each of the sample's 372 photos (small ones, a PNG and a GIF among them) against
    the device path from the 256 px cache: the same model inputs, so the same predictions.
    Before the crop box was rounded as CenterCrop rounds it and small images were enlarged in the
    cache, inputs differed by up to 0.23 and the top-1 ImageNet class of Lite0's real weights
    differed on 3 of the 186 test photos."""
    from pet_pipeline.loader import PetTorchDataset
    from pet_pipeline.transforms import build_eval_transform, decode_size, model_data_config

    data_config = model_data_config("tf_efficientnet_lite0")
    assert math.floor(224 / data_config["crop_pct"]) == 256  # the cache's short side
    cpu = PetTorchDataset(sample_photos, build_eval_transform(data_config),
                          min_side=decode_size(data_config, None))
    device = CachedImages(sample_photos, sample_cache, data_config=data_config, augment="standard",
                          train=False)
    resample = DeviceAugment(data_config, "cpu")
    for start in range(0, len(sample_photos), 64):
        rows = range(start, min(start + 64, len(sample_photos)))
        expected = torch.stack([cpu[row]["pixel_values"] for row in rows])
        got = resample(collate_regions([device[row] for row in rows]))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.cluster  # several processes: pytest -m cluster
def test_two_processes_on_the_device_path_share_one_cache_and_count_every_test_image_once(tmp_path, env):
    """torchrun, 2 CPU processes: the node's main process builds the pixel cache, the other maps
    the same files; the device-resampled test batches are gathered with every image exactly once
    (the split does not fill the last batch of both ranks, so accelerate pads it with repeats
    that gather_for_metrics must drop)."""
    out, cache = tmp_path / "ddp", tmp_path / "cache"
    env2 = {**env, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PET_PIPELINE_CACHE": str(cache)}
    values = {**TINY, "augment_on": "device", "epochs": 1, "synthetic_images_per_class": 15,
              "output_dir": out}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run([*launch, str(REPO / "train.py"), *cli(values)], env=env2, cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    ok(result)
    assert "2 process(es)" in result.stdout
    test_images = int(re.search(r"/ test (\d+) images", result.stdout).group(1))
    assert test_images % (2 * 16) != 0  # 2 ranks x eval batch 16: accelerate pads the last batch
    assert "test built" in result.stdout
    assert len(list((cache / "decoded").iterdir())) == 2  # train and test, built once each
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["n"] == test_images
    ids = [line.split(",")[0] for line in (out / "eval" / "predictions.csv").read_text().splitlines()[1:]]
    assert len(ids) == len(set(ids)) == test_images
