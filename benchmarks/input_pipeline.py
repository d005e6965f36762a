"""Input pipeline images/s, per core and in total: the old script's against ours, same files.

    python benchmarks/input_pipeline.py                                  # 2,000 images, W = 0 1 2
    python benchmarks/input_pipeline.py --images 200 --measure-images 128 --workers 0 1   # ~1 min
    python benchmarks/input_pipeline.py --workers 0 4 8 16 --images 4000 --json runs/input_pipeline.json
    python benchmarks/input_pipeline.py --generated                      # no ../shared: generated JPEGs

Files: the real sample (372 Oxford-IIIT Pet photos, one PNG and one GIF among them, from
<repo>/../shared/data/oxford-pet-sample) replicated to --images entries: a folder in the
official layout under --work-dir whose trainval.txt lists each photo several times under
new image ids (hard links, copies where links fail). --generated, or a missing sample folder,
uses benchmarks/data_prep.py's generated 500x375 JPEGs instead. Both pipelines read that
folder's trainval.txt, so they decode the very same files.

old:   a Dataset like torchvision's OxfordIIITPet: PIL.Image.open(path).convert("RGB"),
       Resize((224, 224)), ToTensor(); DataLoader(batch_size=32, shuffle=True, num_workers=W).
ours:  load_pets(data_dir, species="all", val_fraction=0) -> PetTorchDataset with the
       CPU half of the "strong" train transform of coatnet_0_rw_224 (RandomResizedCrop, flip,
       RandAugment, uint8 tensor, colour jitter factors drawn) -> build_dataloader(train=True,
       batch_size=32, num_workers=W, seed=0). Its device half (colour jitter, normalisation,
       random erasing on the whole batch) runs on the GPU in training; the profile reports
       its cost on this CPU apart.
ours + pre_resize 256: the same on pet_pipeline.data.pre_resize(train, short_side=256), when
       that function exists; its one-off cost (cold: a fresh PET_PIPELINE_CACHE) is reported
       apart, not in images/s.
ours + pre_resize 256, standard: the same without RandAugment (augment: standard, what
       configs/gpu.yaml trains with): the CPU path the device path replaces, like for like.
device (standard): augment_on: device. pet_pipeline.pixel_cache decodes the images once into
       memory-mapped uint8 files at short side 256 (one-off, reported apart), and the workers run
       device_augment.CachedImages + collate_regions: draw the crop, copy its source region,
       pad into a batch. That is the host's whole share; the device's (DeviceAugment: one
       roi_align over the batch, flip, normalise) is timed apart on this CPU, one thread, and
       runs on the GPU in training. Its per_core is host-side images/s per core.

For each W, each pipeline: a fresh iterator, --warmup-rounds rounds of W batches (worker
start-up, first batches), then whole rounds of W batches timed (~--measure-images images,
within one epoch). per core = total / max(1, W): W = 0 is the main process alone, one core;
the main process's own share (receiving batches) is not counted for W > 0. The main process
runs torch with one thread so that W = 0 really is one core.

Headline: ours_per_core and old_per_core at the same W, the W (below the core count) where
the old pipeline's per-core figure is best: the baseline at its best. ratio = ours / old.
Then an in-process profile of one worker's per-image costs, stage by stage.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from a checkout

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import PIL  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset, default_collate  # noqa: E402
from torchvision import transforms  # noqa: E402

import pet_pipeline.data as pet_data  # noqa: E402
from benchmarks.data_prep import annotation_line, full_size_folder  # noqa: E402
from pet_pipeline.device_augment import CachedImages, DeviceAugment, collate_regions  # noqa: E402
from pet_pipeline.images import open_rgb  # noqa: E402
from pet_pipeline.loader import PetTorchDataset, build_dataloader, seeded_rng  # noqa: E402
from pet_pipeline.transforms import (  # noqa: E402
    DeviceTransform,
    build_train_transform,
    decode_size,
    model_data_config,
)

SAMPLE_DIR = ROOT.parent / "shared" / "data" / "oxford-pet-sample"
MODEL, IMAGE_SIZE, AUGMENT, BATCH_SIZE = "coatnet_0_rw_224", 224, "strong", 32
PRE_RESIZE_SIDE = 256
DEVICE = "device (standard)"  # augment_on: device: the host's share only
PRE_RESIZE_STANDARD = f"ours + pre_resize {PRE_RESIZE_SIDE}, standard"
FOLDER_VERSION = 1  # bump when the replicated folder's layout changes


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ----------------------------------------------------------------------------- the files


def replicated_folder(source: Path, n_images: int, work_dir: Path) -> Path:
    """A folder in the official layout whose trainval.txt lists `n_images` entries, each a hard
    link to one of `source`'s images (trainval and test), cycled in a fixed shuffled order."""
    root = work_dir / f"{source.name}-x{n_images}-v{FOLDER_VERSION}"
    stamp = f"{FOLDER_VERSION} {source.resolve()} {n_images}\n"
    if (root / "DONE").is_file() and (root / "DONE").read_text() == stamp:
        print(f"folder: {root} (cached)")
        return root
    rows = []
    for split in ("trainval", "test"):
        split_rows, problems = pet_data.parse_annotations(source / "annotations" / f"{split}.txt")
        if problems:
            print(f"  note: {len(problems)} malformed line(s) in {split}.txt left out, first {problems[0]}")
        rows += split_rows
    random.Random(0).shuffle(rows)  # classes mixed whatever the source's order
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    (tmp / "annotations").mkdir()
    copied = 0

    def add(row, copy: int) -> str:
        nonlocal copied
        image_id = f"{row.image_id}_c{copy}"
        target = tmp / "images" / f"{image_id}.jpg"
        if not target.exists():
            original = source / "images" / f"{row.image_id}.jpg"
            try:
                os.link(original, target)
            except OSError:  # another file system, or links not allowed: copy
                shutil.copyfile(original, target)
                copied += 1
        return annotation_line(image_id, row.breed)

    trainval = [add(rows[i % len(rows)], i // len(rows)) for i in range(n_images)]
    test = [add(row, 0) for row in rows[:100]]  # load_pets wants a non-empty test split
    (tmp / "annotations" / "trainval.txt").write_text("\n".join(trainval) + "\n")
    (tmp / "annotations" / "test.txt").write_text("\n".join(test) + "\n")
    (tmp / "DONE").write_text(stamp)
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    print(f"folder: {root}: {n_images} entries over {min(n_images, len(rows))} distinct files of"
          f" {source} ({'copies' if copied else 'hard links'})")
    return root


def describe_files(root: Path) -> dict:
    """Distinct files behind trainval.txt: count, median bytes and pixel size (headers only)."""
    inodes, sizes, dims = set(), [], []
    for line in (root / "annotations" / "trainval.txt").read_text().split("\n"):
        if not line.strip():
            continue
        path = root / "images" / f"{line.split()[0]}.jpg"
        stat = path.stat()
        if (stat.st_dev, stat.st_ino) in inodes:
            continue
        inodes.add((stat.st_dev, stat.st_ino))
        sizes.append(stat.st_size)
        with Image.open(path) as img:
            dims.append(img.size)
    return {
        "distinct_files": len(sizes),
        "median_kb": statistics.median(sizes) / 1e3,
        "median_width": statistics.median(w for w, _ in dims),
        "median_height": statistics.median(h for _, h in dims),
    }


# ----------------------------------------------------------------------------- the pipelines


class OldPetDataset(Dataset):
    """What the old script used: torchvision's OxfordIIITPet (category targets), read from
    the same annotation file; PIL open + convert("RGB"), then its transform."""

    def __init__(self, root: Path, split: str, transform):
        self.images, self.labels = [], []
        for line in (root / "annotations" / f"{split}.txt").read_text().splitlines():
            image_id, label, *_ = line.strip().split()
            self.images.append(root / "images" / f"{image_id}.jpg")
            self.labels.append(int(label) - 1)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx):
        image = Image.open(self.images[idx]).convert("RGB")
        return self.transform(image), self.labels[idx]


def old_transform():
    return transforms.Compose([transforms.Resize((IMAGE_SIZE, IMAGE_SIZE)), transforms.ToTensor()])


def old_loader(dataset: OldPetDataset, workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=workers)


def ours_loader(dataset: Dataset, workers: int) -> DataLoader:
    collate = collate_regions if isinstance(dataset, CachedImages) else None
    return build_dataloader(dataset, batch_size=BATCH_SIZE, train=True, seed=0, num_workers=workers,
                            collate_fn=collate)


def batch_len(batch) -> int:
    return len(batch["label"]) if isinstance(batch, dict) else len(batch[1])


def time_pass(loader: DataLoader, epoch: int, warmup_batches: int, measure_batches: int):
    """(images, seconds) of `measure_batches` batches after `warmup_batches`, one iterator."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)  # a new order each pass, as in training
    iterator = iter(loader)
    for _ in range(warmup_batches):
        next(iterator)
    images, start = 0, time.perf_counter()
    for _ in range(measure_batches):
        images += batch_len(next(iterator))
    seconds = time.perf_counter() - start
    del iterator  # non-persistent workers end here; persistent ones wait for the next pass
    return images, seconds


# ----------------------------------------------------------------------------- per-stage profile

STAGE_NAMES = {"RandomResizedCropAndInterpolation": "RandomResizedCrop", "MaybeToTensor": "ToTensor",
               "Resize": "Resize((224, 224))"}


ITEM = "Dataset[i] end to end (check)"


def profile_stages(subjects: dict, n: int) -> dict[str, dict[str, float]]:
    """Mean microseconds per image of each stage, run in this process on `n` images: what one
    DataLoader worker does for every image, minus the collate and hand-over to the main process.

    `subjects`: name -> (fetch, decode, transform, seeded, item). The pipelines take turns image
    by image, so a busy neighbour on a shared machine slows all of them alike.
    """
    totals = {name: defaultdict(float) for name in subjects}
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    for i in range(n):
        for name, (fetch, decode, transform, seeded, item) in subjects.items():
            stages, clock = totals[name], time.perf_counter()
            lap = partial(_lap, stages)
            source = fetch(i)
            clock = lap("fetch (path / datasets row)", clock)
            if seeded:  # PetTorchDataset reseeds the three generators around every sample
                with seeded_rng(i):
                    pass
                clock = lap("seeded_rng (enter + exit)", clock)
            x = decode(source)
            clock = lap("decode to RGB", clock)
            for step in transform.transforms:
                x = step(x)
                clock = lap(STAGE_NAMES.get(type(step).__name__, type(step).__name__), clock)
            item(i)
            lap(ITEM, clock)
    return {name: {stage: seconds / n * 1e6 for stage, seconds in stages.items()}
            for name, stages in totals.items()}


def _lap(stages: dict, stage: str, clock_before: float) -> float:
    now = time.perf_counter()
    stages[stage] += now - clock_before
    return now


def merged_order(columns: dict[str, dict]) -> list[str]:
    """Stage names of all columns, each after the stage it follows in its own column."""
    order: list[str] = []
    for column in sorted(columns.values(), key=len, reverse=True):
        previous = None
        for stage in column:
            if stage not in order:
                order.insert(order.index(previous) + 1 if previous in order else len(order), stage)
            previous = stage
    return order


class ReadyTensors(Dataset):
    """Items as ours yields them, already made: a loader over these measures collate + IPC."""

    def __init__(self, size: int, dtype=torch.float32):
        self.size = size
        self.pixels = torch.randint(0, 256, (3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8).to(dtype)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index):
        return {"pixel_values": self.pixels, "label": 0, "index": index}


def collate_costs(batches: int = 24) -> dict[str, float]:
    """Microseconds per image: default_collate in process, and collate into shared memory +
    hand-over through a 1-worker DataLoader (the slower of worker and main process sets it),
    for float32 images (what both pipelines send) and uint8 ones (4x fewer bytes: what timm's
    prefetcher loader sends, normalising on the GPU)."""
    items = [ReadyTensors(BATCH_SIZE)[i] for i in range(BATCH_SIZE)]
    costs = {"collate (default_collate, in process)":
             min(mean_us(lambda _: default_collate(items), 5) for _ in range(3)) / BATCH_SIZE}
    for label, dtype in (("float32", torch.float32), ("uint8", torch.uint8)):
        dataset = ReadyTensors(BATCH_SIZE * (batches + 4), dtype)
        loader = DataLoader(dataset, batch_size=BATCH_SIZE, num_workers=1)
        images, seconds = time_pass(loader, 0, 4, batches)
        costs[f"collate + IPC, {label} (1-worker DataLoader, ready tensors)"] = seconds / images * 1e6
    return costs


def device_half_cost(data_config: dict, repeats: int = 5) -> float:
    """Microseconds per image of the strong preset's device half on a CPU batch (best of
    `repeats`): what the GPU does instead of the workers."""
    transform = build_train_transform(data_config, AUGMENT)
    items = [transform(Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (120, 80, 40)))
             for _ in range(BATCH_SIZE)]
    batch = default_collate(items) if isinstance(items[0], dict) else {"pixel_values": torch.stack(items)}
    device_transform = DeviceTransform(data_config, AUGMENT, "cpu")
    return min(mean_us(lambda _: device_transform(batch), 2) for _ in range(repeats)) / BATCH_SIZE


def device_path_costs(dataset: CachedImages, data_config: dict, n: int, repeats: int = 5) -> dict:
    """Microseconds per image of the device path: the host's share in process (draw, copy the
    region, collate a batch of BATCH_SIZE: what a worker does), and DeviceAugment on that batch
    on this CPU with one thread (what the GPU does in training); best of `repeats`."""
    batches = max(1, n // BATCH_SIZE)

    def host(_):
        for b in range(batches):
            collate_regions([dataset[(0, (b * BATCH_SIZE + i) % len(dataset))] for i in range(BATCH_SIZE)])

    batch = collate_regions([dataset[(0, i % len(dataset))] for i in range(BATCH_SIZE)])
    augment = DeviceAugment(data_config, "cpu")
    return {"host_us": min(mean_us(host, 1) for _ in range(repeats)) / (batches * BATCH_SIZE),
            "device_side_cpu_us": min(mean_us(lambda _: augment(batch), 2)
                                      for _ in range(repeats)) / BATCH_SIZE}


def mean_us(fn, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - start) / n * 1e6


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--images", type=int, default=2000,
                        help="entries in the benchmark's trainval.txt (the real sample is replicated)")
    parser.add_argument("--measure-images", type=int, default=1024,
                        help="images timed per pipeline and W, after warm-up (rounded to whole rounds of"
                             " W batches; capped by what one epoch of --images holds)")
    parser.add_argument("--workers", nargs="+", default=["0 1 2"],
                        help="DataLoader num_workers values to run, e.g. 0 4 8 16 (or '0,4,8,16') on a"
                             " big machine")
    parser.add_argument("--warmup-rounds", type=int, default=1,
                        help="rounds of W batches (1 batch for W=0) fetched before timing")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed passes per pipeline and W, alternating pipelines (median reported)")
    parser.add_argument("--generated", action="store_true",
                        help="use data_prep.py's generated 500x375 JPEGs instead of the real sample")
    parser.add_argument("--sample-dir", default=str(SAMPLE_DIR), help="the real sample folder")
    parser.add_argument("--work-dir", default="runs/benchmark-data",
                        help="where the benchmark folders are kept between runs (hard links: ~no space)")
    parser.add_argument("--pre-resize-procs", type=int, default=None,
                        help="num_proc for pre_resize (default: the usable core count)")
    parser.add_argument("--profile-images", type=int, default=256,
                        help="images for the in-process per-stage profile; 0 skips it")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.images < BATCH_SIZE or args.measure_images < 1 or args.repeats < 1 or args.warmup_rounds < 0:
        parser.error(f"--images must be >= {BATCH_SIZE}, --measure-images and --repeats >= 1,"
                     " --warmup-rounds >= 0")
    try:
        args.workers = list(dict.fromkeys(int(w) for token in args.workers
                                          for w in token.replace(",", " ").split()))
    except ValueError:
        parser.error(f"--workers takes integers, got {' '.join(args.workers)!r}")
    if not args.workers or min(args.workers) < 0:
        parser.error("--workers takes values >= 0")

    # W = 0 must be one core: torch would otherwise spread ToTensor/Normalize over threads.
    # (DataLoader workers run torch with one thread anyway.)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cores = usable_cores()
    print(f"machine: {platform.node()}, {cores} usable core(s) (os.cpu_count {os.cpu_count()}),"
          f" load average {os.getloadavg()[0]:.1f}; python {platform.python_version()}, torch"
          f" {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__},"
          f" Pillow {PIL.__version__}")
    for w in args.workers:
        if w >= cores:
            print(f"  warning: num_workers {w} >= {cores} cores: the workers share cores, so its"
                  " per-core figure means little (its total still counts)")

    # ------------------------------------------------------------------------- files
    work_dir = Path(args.work_dir)
    sample = Path(args.sample_dir)
    if not args.generated and not (sample / "annotations" / "trainval.txt").is_file():
        print(f"note: no real sample at {sample}; using the generated full-size folder instead")
        args.generated = True
    source = full_size_folder(work_dir) if args.generated else sample
    root = replicated_folder(source, args.images, work_dir)
    files = describe_files(root)
    print(f"files: {args.images} entries, {files['distinct_files']} distinct files, median"
          f" {files['median_kb']:.0f} KB, {files['median_width']:.0f}x{files['median_height']:.0f} px")

    # ------------------------------------------------------------------------- datasets
    old_dataset = OldPetDataset(root, "trainval", old_transform())
    pets = pet_data.load_pets(data_dir=str(root), species="all", val_fraction=0)
    if pets.skipped:
        print(f"  note: ours left out {len(pets.skipped)} file(s) the old pipeline reads,"
              f" first {pets.skipped[0]}")
    data_config = model_data_config(MODEL, IMAGE_SIZE)
    train_transform = build_train_transform(data_config, AUGMENT)
    min_side = decode_size(data_config, AUGMENT)  # None: random crops need the full resolution
    pipelines = {
        "old": old_dataset,
        "ours": PetTorchDataset(pets.train, train_transform, seed=0, min_side=min_side),
    }

    # ------------------------------------------------------------------------- ours + pre_resize
    # pet_pipeline.data.pre_resize(ds, short_side, num_proc) -> datasets.Dataset: the same schema,
    # images decoded once and stored at short side 256. One-off cost, reported apart.
    pre_resize = getattr(pet_data, "pre_resize", None)
    pre_resize_s, pre_resize_procs = None, args.pre_resize_procs or cores
    if pre_resize is None:
        print("pre_resize: pet_pipeline.data has no pre_resize yet; 'ours + pre_resize' skipped")
    else:
        # pre_resize caches on disk by content; a fresh cache folder makes its cost the cold one
        cache_dir = tempfile.TemporaryDirectory(prefix="pre-resize-cache-", dir=work_dir)
        os.environ["PET_PIPELINE_CACHE"] = cache_dir.name
        start = time.perf_counter()
        cached = pre_resize(pets.train, short_side=PRE_RESIZE_SIDE, num_proc=pre_resize_procs)
        pre_resize_s = time.perf_counter() - start
        print(f"pre_resize: {len(cached)} images to short side {PRE_RESIZE_SIDE} in {pre_resize_s:.1f} s"
              f" (num_proc {pre_resize_procs}; one-off, not in the images/s below)")
        pipelines[f"ours + pre_resize {PRE_RESIZE_SIDE}"] = PetTorchDataset(
            cached, train_transform, seed=0, min_side=min_side)
        pipelines[PRE_RESIZE_STANDARD] = PetTorchDataset(
            cached, build_train_transform(data_config, "standard"), seed=0, min_side=min_side)

    # ------------------------------------------------------------------------- the device path
    from pet_pipeline.pixel_cache import open_or_build

    start = time.perf_counter()
    pixel_cache_dir = tempfile.TemporaryDirectory(prefix="pixel-cache-", dir=work_dir)  # cold
    pixel_cache, _ = open_or_build(pets.train, short_side=PRE_RESIZE_SIDE, root=Path(pixel_cache_dir.name),
                                   num_proc=pre_resize_procs)
    pixel_cache_s = time.perf_counter() - start
    print(f"pixel cache: {pixel_cache.describe()}, built in {pixel_cache_s:.1f} s"
          f" (num_proc {pre_resize_procs}; one-off, not in the images/s below)")
    pipelines[DEVICE] = CachedImages(pets.train, pixel_cache, data_config=data_config, augment="standard",
                                     train=True, seed=0)

    # ------------------------------------------------------------------------- timing
    full_batches = len(pets.train) // BATCH_SIZE  # the last, partial batch is never timed
    rows = []
    for workers in args.workers:
        per_round = max(1, workers)
        warmup = args.warmup_rounds * per_round
        rounds = max(1, round(args.measure_images / BATCH_SIZE / per_round))
        rounds = min(rounds, (full_batches - warmup) // per_round)
        if rounds < 1:
            parser.error(f"--images {args.images} gives {full_batches} full batches, too few to warm up and"
                         f" time one round of {per_round} batches at num_workers {workers}; raise --images")
        loaders = {name: (old_loader if name == "old" else ours_loader)(dataset, workers)
                   for name, dataset in pipelines.items()}
        passes = defaultdict(list)
        for repeat in range(args.repeats):
            names = list(loaders)
            names = names[repeat % len(names):] + names[:repeat % len(names)]  # alternate who goes first
            for name in names:
                images, seconds = time_pass(loaders[name], repeat, warmup, rounds * per_round)
                passes[name].append(images / seconds)
                print(f"  W={workers} {name:<24} pass {repeat + 1}: {images} images in {seconds:.2f} s ="
                      f" {images / seconds:.1f} images/s", flush=True)
        for name in loaders:
            total = statistics.median(passes[name])
            rows.append({"pipeline": name, "num_workers": workers, "images_per_s": total,
                         "per_core": total / per_round, "measured_images": rounds * per_round * BATCH_SIZE,
                         "passes_images_per_s": passes[name], "oversubscribed": workers >= cores})
        del loaders
        gc.collect()  # ends the persistent workers before the next W

    # ------------------------------------------------------------------------- headline
    def row(name, workers):
        return next(r for r in rows if r["pipeline"] == name and r["num_workers"] == workers)

    fair = [w for w in args.workers if w < cores] or list(args.workers)
    headline_w = max(fair, key=lambda w: row("old", w)["per_core"])
    ours_pc, old_pc = row("ours", headline_w)["per_core"], row("old", headline_w)["per_core"]
    best = {name: max((row(name, w) for w in fair), key=lambda r: r["per_core"]) for name in pipelines}

    print("\n| pipeline | num_workers | images/s total | images/s per core | timed images |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        flag = " (W >= cores)" if r["oversubscribed"] else ""
        print(f"| {r['pipeline']} | {r['num_workers']}{flag} | {r['images_per_s']:.1f} | {r['per_core']:.1f}"
              f" | {r['measured_images']} |")
    print(f"\nheadline at num_workers {headline_w} (where the old pipeline's per-core figure is best):"
          f" ours_per_core {ours_pc:.1f}, old_per_core {old_pc:.1f}, ratio {ours_pc / old_pc:.2f}")
    for name, r in best.items():
        print(f"  best per core of {name}: {r['per_core']:.1f} images/s at num_workers {r['num_workers']}")
    cached_pc = None
    if pre_resize_s is not None:
        cached_pc = row(f"ours + pre_resize {PRE_RESIZE_SIDE}", headline_w)["per_core"]
        print(f"  ours + pre_resize {PRE_RESIZE_SIDE}: {cached_pc:.1f} images/s per core at num_workers"
              f" {headline_w} (ratio {cached_pc / old_pc:.2f}), after a one-off {pre_resize_s:.1f} s")

    # ------------------------------------------------------------------------- where time goes
    profile = None
    if args.profile_images:
        n = args.profile_images
        raw = pets.train.cast_column("image", datasets.Image(decode=False))
        subjects = {
            "old": (lambda i: old_dataset.images[i % len(old_dataset)],
                    lambda p: Image.open(p).convert("RGB"), old_transform(), False,
                    lambda i: old_dataset[i % len(old_dataset)]),
            "ours": (lambda i: raw[i % len(raw)]["image"], lambda r: open_rgb(r, min_side), train_transform,
                     True, lambda i: pipelines["ours"][(0, i % len(raw))]),
        }
        if pre_resize_s is not None:
            cached_raw = cached.cast_column("image", datasets.Image(decode=False))
            cached_dataset = pipelines[f"ours + pre_resize {PRE_RESIZE_SIDE}"]
            subjects[f"ours + pre_resize {PRE_RESIZE_SIDE}"] = (
                lambda i: cached_raw[i % len(cached_raw)]["image"], lambda r: open_rgb(r, min_side),
                train_transform, True, lambda i: cached_dataset[(0, i % len(cached_raw))])
        columns = profile_stages(subjects, n)
        whole = {name: column.pop(ITEM) for name, column in columns.items()}
        collate = collate_costs()
        print(f"\nwhere one worker's time goes, microseconds per image (in process, mean of {n} images,"
              " pipelines taking turns):")
        print(f"| stage | {' | '.join(columns)} |\n|---|{'---:|' * len(columns)}")
        for stage in merged_order(columns):
            cells = " | ".join(f"{c[stage]:.0f}" if stage in c else "-" for c in columns.values())
            print(f"| {stage} | {cells} |")
        print(f"| **sum of stages** | {' | '.join(f'{sum(c.values()):.0f}' for c in columns.values())} |")
        print(f"| {ITEM} | {' | '.join(f'{whole[k]:.0f}' for k in columns)} |")
        in_process = "collate (default_collate, in process)"
        print(f"| {in_process} | {' | '.join(f'{collate[in_process]:.0f}' for _ in columns)} |")
        float32 = collate["collate + IPC, float32 (1-worker DataLoader, ready tensors)"]
        uint8 = collate["collate + IPC, uint8 (1-worker DataLoader, ready tensors)"]
        ipc = {k: float32 if k == "old" else uint8 for k in columns}  # ours hands over uint8
        print(f"| collate + IPC, float32 (old) / uint8 (ours), 1-worker DataLoader, ready tensors |"
              f" {' | '.join(f'{ipc[k]:.0f}' for k in columns)} |")
        implied = {k: 1e6 / (whole[k] + ipc[k]) for k in columns}
        print(f"| implied images/s per core: 1e6 / (end to end + collate and IPC) |"
              f" {' | '.join(f'{v:.0f}' for v in implied.values())} |")
        device_us = device_half_cost(data_config)
        print(f"ours' device half (colour jitter, normalise, random erasing on a batch of {BATCH_SIZE}),"
              f" on this CPU with one thread: {device_us:.0f} us per image; in training it runs on the"
              " GPU, not in the loader workers")
        profile = {"images": n, "stages_us": columns, "item_us": whole, "collate_us": collate,
                   "implied_per_core": implied, "device_half_cpu_us": device_us}

    device_pc = row(DEVICE, headline_w)["per_core"]
    standard_pc = row(PRE_RESIZE_STANDARD, headline_w)["per_core"] if pre_resize_s is not None else None
    device_costs = device_path_costs(pipelines[DEVICE], data_config, max(args.profile_images, BATCH_SIZE))
    print(f"  {DEVICE}: {device_pc:.1f} host-side images/s per core at num_workers {headline_w} (ratio"
          f" {device_pc / old_pc:.2f} to the old pipeline" + (
              f", {device_pc / cached_pc:.2f}x ours + pre_resize {PRE_RESIZE_SIDE} (strong),"
              f" {device_pc / standard_pc:.2f}x {PRE_RESIZE_STANDARD}" if cached_pc else "") + ")")
    print(f"  {DEVICE} in process: host {device_costs['host_us']:.0f} us per image (draw + region copy +"
          f" collate); device side (roi_align, flip, normalise) {device_costs['device_side_cpu_us']:.0f} us"
          " per image on this CPU, one thread (on the GPU in training)")

    if args.json:
        result = {
            "ours_per_core": ours_pc, "old_per_core": old_pc, "ratio": ours_pc / old_pc,
            "headline_num_workers": headline_w,
            "best_per_core": {name: {"per_core": r["per_core"], "num_workers": r["num_workers"]}
                              for name, r in best.items()},
            "pre_resize": {"available": pre_resize is not None, "seconds": pre_resize_s,
                           "short_side": PRE_RESIZE_SIDE, "num_proc": pre_resize_procs,
                           "per_core": cached_pc, "ratio": None if cached_pc is None else cached_pc / old_pc,
                           "standard_per_core": standard_pc},
            "device": {"per_core": device_pc, "ratio": device_pc / old_pc,
                       "vs_pre_resize": None if cached_pc is None else device_pc / cached_pc,
                       "vs_pre_resize_standard": None if standard_pc is None else device_pc / standard_pc,
                       "cache_seconds": pixel_cache_s, "cache_bytes": pixel_cache.nbytes, **device_costs},
            "rows": rows, "profile": profile, "args": vars(args),
            "files": {"source": str(source), "folder": str(root), **files},
            "machine": {"node": platform.node(), "usable_cores": cores, "cpu_count": os.cpu_count(),
                        "processor": platform.processor() or platform.machine(),
                        "load_average": os.getloadavg()[0], "python": platform.python_version(),
                        "torch": torch.__version__, "torchvision": torchvision.__version__,
                        "timm": timm.__version__, "pillow": PIL.__version__,
                        "datasets": datasets.__version__},
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    if pre_resize is not None:
        cache_dir.cleanup()
    pixel_cache_dir.cleanup()


if __name__ == "__main__":
    main()
