"""PyTorch DataLoaders over the pets datasets, with reproducible augmentation.

The train sampler yields `(epoch, index)` pairs and every sample is augmented under a seed
made of (seed, epoch, index). Data order and augmentation are therefore a function of the
seed and the epoch only: the same for any number of workers, with persistent workers, and
after resuming in the middle of an epoch.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import random
import signal
from contextlib import contextmanager

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pet_pipeline.transforms import batch_transform
from pet_pipeline.unreadable import READ_ERRORS


class EpochSeededSampler(Sampler):
    """A permutation of `range(size)` drawn from (seed, epoch); yields (epoch, index)."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = range(self.size)
        return iter([(self.epoch, i) for i in order])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed one sample is augmented under: the same on the CPU and the device path."""
    return seed * 1_000_003 + epoch * 100_000_007 + index


def _seed_all(seed: int, numpy: bool = True) -> None:
    random.seed(seed)
    if numpy:
        np.random.seed(seed % (2**32))
    torch.random.default_generator.manual_seed(seed % (2**63))


@contextmanager
def seeded_rng(seed: int, *, numpy: bool = True):
    """Seed Python's, NumPy's and torch's CPU generators (torchvision draws from torch,
    timm's RandAugment from NumPy and Python) for one sample; `numpy=False` leaves NumPy's
    alone, for draws that never use it (device_augment: the crop and the flip).

    In the main process (num_workers 0) the caller's states are put back afterwards
    (~150 us, mostly NumPy's state copy); a DataLoader worker's generators serve nothing
    else, so there it only seeds (~15 us).
    """
    if torch.utils.data.get_worker_info() is not None:
        _seed_all(seed, numpy)
        yield
        return
    python_state, numpy_state = random.getstate(), np.random.get_state() if numpy else None
    torch_state = torch.random.get_rng_state()
    _seed_all(seed, numpy)
    try:
        yield
    finally:
        random.setstate(python_state)
        if numpy:
            np.random.set_state(numpy_state)
        torch.random.set_rng_state(torch_state)


class PetTorchDataset(Dataset):
    """A `with_transform` view of a pets `datasets.Dataset` for a DataLoader.

    Items are {"pixel_values", "label", "index", "unreadable"}, plus "color_jitter" with
    `augment: strong` (the factors the device applies); "index" lets evaluation map
    predictions back to image ids. Keys may be plain indices or the sampler's (epoch, index)
    pairs.

    An image that can't be decoded any more (deleted or damaged after the start-up scan)
    never raises: "unreadable" holds its index (else -1), and the item is a stand-in, with
    `stand_in` (training) the next readable image of the same class, else a grey image of
    its label (evaluation leaves it out). pet_pipeline/unreadable.py names and counts them.
    """

    def __init__(self, ds: datasets.Dataset, transform, *, seed: int = 0,
                 min_side: int | None = None, stand_in: bool = False):
        self.source = ds  # the dataset as given: its rows are the items' "index"
        ds = ds.cast_column("image", datasets.Image(decode=False))  # we decode, in the worker
        self.transform = batch_transform(transform, min_side)
        self.ds = ds.with_transform(self.transform)
        self.seed = seed
        self.stand_in = stand_in
        self._labels = None  # the label column, read the first time a stand-in is needed

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (None, key)
        if epoch is None:
            item = self._read(index)
        else:
            with seeded_rng(sample_seed(self.seed, epoch, index)):
                item = self._read(index)
        return {**item, "index": index}

    def _read(self, index: int) -> dict:
        try:
            return {**self.ds[index], "unreadable": -1}
        except READ_ERRORS:
            pass
        for other in self._same_class_after(index) if self.stand_in else ():
            try:
                return {**self.ds[other], "unreadable": index}
            except READ_ERRORS:
                continue
        from PIL import Image

        grey = self.transform({"image": [Image.new("RGB", (256, 256), (128, 128, 128))],
                               "label": [self.labels[index]]})
        return {**{key: values[0] for key, values in grey.items()}, "unreadable": index}

    @property
    def labels(self) -> list[int]:
        """The label column (alone: a row of the dataset would decode its image)."""
        if self._labels is None:
            self._labels = self.source["label"][:]
        return self._labels

    def _same_class_after(self, index: int, tries: int = 8) -> list[int]:
        """The next rows of `index`'s class, in order and wrapping around: the stand-ins."""
        labels, n = self.labels, len(self.labels)
        rows = (row % n for row in range(index + 1, index + n))
        return [row for row in rows if labels[row] == labels[index]][:tries]


def default_num_workers(processes_per_node: int = 1) -> int:
    """All cores but one per process, at most 16: on one H200 with 16 cores, 8 workers fed
    ~1,000 images/s to a model that trains at ~2,000 (docs/PERFORMANCE.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(16, (cores or 1) // max(1, processes_per_node) - 1))


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave stop signals to the main process, which checkpoints and then
    ends them. SLURM's scancel, `pkill -f train.py` and Ctrl-C signal every process: a worker
    that died of it made the next batch raise 'DataLoader worker ... killed by signal' (a
    traceback, exit 1, no checkpoint, no requeue) instead of the stop at the next step."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole foreground group


def _kill_loader_workers() -> None:
    """At exit, end the workers with SIGKILL, the one signal they can't ignore.

    A loader that lives until the interpreter exits is not shut down by torch (it does
    nothing once Python is exiting); multiprocessing's own exit hook then sends SIGTERM to
    each daemonic child and waits for it, which would wait forever on a worker that ignores
    SIGTERM. atexit runs hooks last-registered first, so this runs before that one. The
    workers hold nothing to save: they only read images. torch's SIGCHLD handler, which
    raises 'DataLoader worker ... is killed' as each one dies, is set back to the default
    first: raised in here, it left the other workers alive."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    for worker in workers:
        worker.kill()
    for worker in workers:
        worker.join(timeout=5)


_kill_at_exit_registered = False


def _register_worker_cleanup() -> None:
    global _kill_at_exit_registered
    if not _kill_at_exit_registered:
        atexit.register(_kill_loader_workers)
        _kill_at_exit_registered = True


def build_dataloader(dataset: Dataset, *, batch_size: int, train: bool, seed: int,
                     num_workers: int, pin_memory: bool = False, drop_last: bool = False,
                     collate_fn=None):
    """`collate_fn`: None for torch's default; device_augment.collate_regions for
    `augment_on: device`."""
    sampler = EpochSeededSampler(len(dataset), seed, shuffle=True) if train else None
    if num_workers > 0:
        _register_worker_cleanup()
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        collate_fn=collate_fn,
        # Its own generator: creating an iterator then draws no number from the global RNG,
        # which dropout and drop-path use, so a resumed run sees the same random stream.
        generator=torch.Generator().manual_seed(seed),
        # Workers stay alive across epochs: re-forking them costs seconds per epoch on GPU.
        persistent_workers=num_workers > 0,
        worker_init_fn=_ignore_stop_signals,
    )
