"""`augment_on: device`: the host copies uint8 source regions, the device augments whole batches.

    train_set = CachedImages(pets.train, cache, data_config=data_config, augment="standard",
                             train=True, seed=42, stand_in=True)   # a worker: draw, slice, copy
    loader = build_dataloader(train_set, ..., collate_fn=collate_regions)
    augment = DeviceAugment(data_config, device)
    images = augment(batch)   # (N, 3, S, S) float, normalised: crop + resize, flip

The CPU path (transforms.py) decodes, crops, resizes and flips every image in PIL in a loader
worker: ~2.5 ms of host time an image even from `pre_resize`'s raw pixels. Here a worker only
draws the sample's parameters and copies the pixels the crop needs out of the memory-mapped
cache (pixel_cache.py); one `torchvision.ops.roi_align` call per batch then resamples every
crop box to the input size on the device (bilinear, averaging ceil(box / output) samples a pixel
when it shrinks, like an antialiased resize), and the flip and normalisation follow on the
batch. Mixup and cutmix run after, as on the CPU path (Learner.inputs).

The parameters are drawn exactly as the CPU path draws them, by the same code: timm's
`RandomResizedCropAndInterpolation.get_params` (Python's generator) and the flip from torch's,
under the sample's seed of (seed, epoch, index) (loader.seeded_rng). So augmentation is a
function of (seed, epoch, index) for any number of workers and after a resume. Boxes are in the
cached image's pixels (`pre_resize`'s short side), so scale and aspect ratio follow timm's
distribution. `augment: strong` adds RandAugment, a PIL op per image with no batched form here,
so it stays on the CPU path (config.py refuses strong with augment_on: device, and auto picks
cpu for it); its colour jitter and random erasing already run on the device there.

Evaluation is the same resampling of a fixed box: the centre crop that timm's eval transform
keeps (resize the short side to floor(size / crop_pct), centre-crop size), resized in one step.
"""

from __future__ import annotations

import math

import datasets
import numpy as np
import torch
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch.utils.data import Dataset

from pet_pipeline.loader import sample_seed, seeded_rng
from pet_pipeline.pixel_cache import PixelCache
from pet_pipeline.transforms import AUGMENT_PRESETS, DeviceNormalize

RATIO = (3 / 4, 4 / 3)  # timm's RandomResizedCrop aspect-ratio range (transforms_imagenet_train)


def random_crop_box(height: int, width: int, scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """timm's RandomResizedCrop draw on an image of this size, from Python's generator:
    (top, left, crop height, crop width) in pixels."""
    shape_only = torch.empty(()).expand(3, height, width)  # get_params reads the size alone
    return RandomResizedCropAndInterpolation.get_params(shape_only, scale, RATIO)


def center_crop_box(height: int, width: int, *, size: int, crop_pct: float) -> tuple[float, ...]:
    """The region timm's eval transform keeps, in the image's own pixels: (x1, y1, x2, y2).

    torchvision's Resize(floor(size / crop_pct)) makes the short side that and the long side
    int(that x long / short); CenterCrop(size) then starts at round((side - size) / 2). The box
    is that square mapped back. When the cache's short side is the resize's (pre_resize 256 for
    224 at crop_pct 0.875) the box falls on whole pixels and the resampling is an exact copy."""
    scale_size = math.floor(size / crop_pct)
    short, long = sorted((height, width))
    resized_long = int(scale_size * long / short)
    resized_height, resized_width = ((scale_size, resized_long) if height <= width
                                     else (resized_long, scale_size))
    top, left = round((resized_height - size) / 2), round((resized_width - size) / 2)
    fy, fx = height / resized_height, width / resized_width
    return left * fx, top * fy, (left + size) * fx, (top + size) * fy


class CachedImages(Dataset):
    """A split's images from the pixel cache, as {"region", "box", "flip", "label", "index",
    "unreadable"}: the uint8 pixels the sample's crop needs (HWC), the crop box within them
    (x1, y1, x2, y2), and whether to mirror it.

    Keys are row indices or the sampler's (epoch, index) pairs, as for loader.PetTorchDataset,
    and unreadable rows are handled the same way: in training (`stand_in`) the next readable
    image of the same class stands in, else a grey image with "unreadable" set to the row.
    """

    def __init__(self, source: datasets.Dataset, cache: PixelCache, *, data_config: dict, augment: str,
                 train: bool, seed: int = 0, stand_in: bool = False):
        if len(cache) != len(source):
            raise ValueError(f"the pixel cache has {len(cache)} rows for a split of {len(source)}")
        self.source, self.cache, self.seed, self.stand_in = source, cache, seed, stand_in
        self.labels = source["label"][:]
        self.size, self.crop_pct = data_config["input_size"][-1], data_config.get("crop_pct", 1.0)
        preset = AUGMENT_PRESETS[augment] if train and augment != "none" else None
        self.scale = preset["scale"] if preset else None  # None: the eval crop
        self.hflip = preset["hflip"] if preset else 0.0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key) -> dict:
        epoch, index = key if isinstance(key, tuple) else (None, key)
        row = self._readable_row(index)
        if epoch is None:
            item = self._draw(row)
        else:
            with seeded_rng(sample_seed(self.seed, epoch, index), numpy=False):  # timm's crop: Python's
                item = self._draw(row)
        return {**item, "label": self.labels[index], "index": index,
                "unreadable": -1 if row == index else index}

    def _draw(self, row: int | None) -> dict:
        """The sample's parameters (crop, then flip: the CPU path's order) and its pixels."""
        if row is None:  # nothing readable: a grey stand-in, left out of evaluation
            pixels = np.full((8, 8, 3), 128, np.uint8)
        else:
            pixels = self.cache.image(row)
        height, width = pixels.shape[:2]
        if self.scale is None:
            box = center_crop_box(height, width, size=self.size, crop_pct=self.crop_pct)
        else:
            top, left, crop_height, crop_width = random_crop_box(height, width, self.scale)
            box = (left, top, left + crop_width, top + crop_height)
        flip = bool(self.hflip and torch.rand(1) < self.hflip)
        region, box = _region_around(pixels, box)
        return {"region": torch.from_numpy(region), "box": torch.tensor(box, dtype=torch.float32),
                "flip": flip}

    def _readable_row(self, index: int) -> int | None:
        """`index` if its pixels are cached, else its stand-in (training) or None."""
        if self.cache.readable(index):
            return index
        if self.stand_in:
            n = len(self.labels)
            for other in (row % n for row in range(index + 1, index + n)):
                if self.labels[other] == self.labels[index] and self.cache.readable(other):
                    return other
        return None


def _region_around(pixels: np.ndarray, box) -> tuple[np.ndarray, tuple[float, ...]]:
    """A copy of the pixels under `box` and one more on each side where the image has them
    (bilinear sampling reads a neighbour), plus a last row and column repeating the edge, so
    that sampling at the image's border reads the border as it does at a tensor's; and the box
    in the copy's coordinates. Only these pages of the cache are read."""
    height, width = pixels.shape[:2]
    x1, y1, x2, y2 = box
    left, top = max(0, math.floor(x1) - 1), max(0, math.floor(y1) - 1)
    right, bottom = min(width, math.ceil(x2) + 1), min(height, math.ceil(y2) + 1)
    rows, columns = bottom - top, right - left
    region = np.empty((rows + 1, columns + 1, 3), np.uint8)  # a copy: the cache's pages are read-only
    region[:rows, :columns] = pixels[top:bottom, left:right]
    region[rows, :columns] = region[rows - 1, :columns]
    region[:, columns] = region[:, columns - 1]
    return region, (x1 - left, y1 - top, x2 - left, y2 - top)


def collate_regions(items: list[dict]) -> dict:
    """A batch: the regions' pixels back to back in one flat uint8 tensor ("pixels"), their
    (height, width) as a list ("sizes": plain ints, so reading them never waits for a device),
    the other keys stacked. Flat, not padded to the largest: a batch hands over each region's
    bytes once (~115 KB an image at 256 px against ~250 KB padded). In a loader worker the
    tensor is made in shared memory, as torch's default_collate does, so handing it over to
    the main process copies nothing."""
    regions = [item["region"].reshape(-1) for item in items]
    out = None
    if torch.utils.data.get_worker_info() is not None:
        numel = sum(len(region) for region in regions)
        out = regions[0].new(regions[0]._typed_storage()._new_shared(numel, device="cpu")).resize_(numel)
    batch = {"pixels": torch.cat(regions, out=out), "box": torch.stack([item["box"] for item in items]),
             "sizes": [tuple(item["region"].shape[:2]) for item in items]}
    for key in ("flip", "label", "index", "unreadable"):
        batch[key] = torch.tensor([item[key] for item in items])
    return batch


def regions_canvas(pixels: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
    """The flat regions of a batch as one zero-padded (N, 3, H, W) float tensor on their
    device (H, W: the largest region's), for roi_align: one copy a region, no host sync."""
    canvas = pixels.new_zeros((len(sizes), max(h for h, _ in sizes), max(w for _, w in sizes), 3))
    offset = 0
    for slot, (height, width) in zip(canvas, sizes):
        slot[:height, :width] = pixels[offset:offset + height * width * 3].view(height, width, 3)
        offset += height * width * 3
    return canvas.permute(0, 3, 1, 2).float()  # 0..255


class DeviceAugment:
    """The batch half: every region's box resampled to the input size, mirrored where the
    sample drew a flip, and normalised to the model's mean and std.

        images = DeviceAugment(data_config, device)(batch)

    One roi_align over the batch; everything stays on the device (no host sync). The same for
    training and evaluation: what differs is the boxes (and evaluation never flips).
    """

    def __init__(self, data_config: dict, device):
        self.size = data_config["input_size"][-1]
        self.normalize = DeviceNormalize(data_config["mean"], data_config["std"], device)

    def __call__(self, batch: dict) -> torch.Tensor:
        from torchvision.ops import roi_align

        regions = regions_canvas(batch["pixels"], batch["sizes"])
        numbers = torch.arange(len(regions), device=regions.device, dtype=regions.dtype)
        boxes = torch.cat([numbers[:, None], batch["box"].to(regions.dtype)], dim=1)
        # sampling_ratio -1: ceil(box / output) bilinear samples a pixel and axis, averaged
        images = roi_align(regions, boxes, output_size=self.size, spatial_scale=1.0,
                           sampling_ratio=-1, aligned=True)
        images = torch.where(batch["flip"].view(-1, 1, 1, 1), images.flip(-1), images)
        return self.normalize(images)


class DeviceBatches:
    """An evaluation loader whose batches gain "pixel_values", made on the device by
    `augment` (DeviceAugment); everything else is the loader's."""

    def __init__(self, loader, augment: DeviceAugment):
        self.loader, self.augment = loader, augment

    def __iter__(self):
        for batch in self.loader:
            yield {**batch, "pixel_values": self.augment(batch)}

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)
