"""A pre-decoded image cache: every image decoded once, as uint8 pixels in memory-mapped files,
its short side resized to `short_side` (bicubic, antialiased, as the eval transform resizes).

    cache = open_or_build(ds, short_side=256, root=cache_root(), num_proc=8)
    cache.image(i)        # (H, W, 3) uint8, a view into the file: no decoding, no copy
    cache.describe()      # "372 images at 256 px, 0.07 GB in ~/.cache/pet-pipeline/decoded/..."

`augment_on: device` reads training crops and evaluation images from here (device_augment.py):
a worker then only copies a crop's source region out of the page cache, and the device does
the resampling. The folder's name is the data's content key (pet_pipeline/data.content_key:
paths, sizes and modification times of local files, the fingerprint of a Hub dataset) and the
short side, so changed data gets a new cache and is never served from an old one.

Layout of one cache folder:
    chunk-00000.u8 ...    the pixels of CHUNK consecutive rows, each image HWC, back to back
    index.npy             (N, 4) int64: chunk, byte offset, height, width (height 0: unreadable)
    meta.json             key, short side, rows, each chunk's byte size; written last
A folder is built aside (.tmp-KEY-PID) and renamed into place complete, so a reader never sees
half of one; a folder whose meta.json is missing or disagrees with its files (a torn copy, a
truncated chunk) is set aside and built again. Processes on one node open the same files, so
the page cache holds the pixels once. Memory-mapped: data larger than RAM works, at disk speed.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import datasets
import numpy as np

from pet_pipeline.unreadable import READ_ERRORS

FORMAT = "pixel-cache-v2"  # v2: small images enlarged to the short side
CHUNK = 256  # rows a chunk file: the unit of parallel building and of the progress bar


class PixelCache:
    """An opened cache folder: images by row, as uint8 arrays mapped from disk."""

    def __init__(self, folder: Path, meta: dict):
        self.folder, self.meta = folder, meta
        self.short_side = meta["short_side"]
        self.index = np.load(folder / "index.npy")
        self._chunks: dict[int, np.memmap] = {}  # opened on first use, in each worker

    def __len__(self) -> int:
        return len(self.index)

    @property
    def nbytes(self) -> int:
        return sum(self.meta["chunk_bytes"])

    def size(self, row: int) -> tuple[int, int]:
        """(height, width) of a row's cached image; (0, 0) when it could not be read."""
        return int(self.index[row, 2]), int(self.index[row, 3])

    def readable(self, row: int) -> bool:
        return self.index[row, 2] > 0

    def image(self, row: int) -> np.ndarray:
        """(H, W, 3) uint8 view of a readable row's pixels (read-only; slicing it reads only
        the rows of the file it needs)."""
        chunk, offset, height, width = (int(v) for v in self.index[row])
        pixels = self._chunk(chunk)
        return pixels[offset:offset + height * width * 3].reshape(height, width, 3)

    def _chunk(self, chunk: int) -> np.memmap:
        if chunk not in self._chunks:
            path = self.folder / f"chunk-{chunk:05d}.u8"
            self._chunks[chunk] = (np.memmap(path, dtype=np.uint8, mode="r")
                                   if os.path.getsize(path) else np.zeros(0, np.uint8))
        return self._chunks[chunk]

    def __getstate__(self):  # DataLoader workers map the files themselves
        return {"folder": self.folder, "meta": self.meta}

    def __setstate__(self, state):
        self.__init__(state["folder"], state["meta"])

    def describe(self) -> str:
        unreadable = int((self.index[:, 2] == 0).sum())
        return (f"{len(self)} images at {self.short_side} px short side, {self.nbytes / 1e9:.2f} GB"
                f" in {self.folder}" + (f"; {unreadable} unreadable" if unreadable else ""))


def cache_folder(root: Path, key: str) -> Path:
    return Path(root) / "decoded" / key


def open_cache(folder: Path, *, rows: int) -> PixelCache | None:
    """The cache in `folder` if it is complete and has `rows` rows, else None."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        complete = (meta.get("format") == FORMAT and meta["rows"] == rows
                    and len(meta["chunk_bytes"]) == -(-rows // CHUNK)
                    and all(os.path.getsize(folder / f"chunk-{i:05d}.u8") == size
                            for i, size in enumerate(meta["chunk_bytes"])))
        cache = PixelCache(folder, meta) if complete else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if cache is None or cache.index.shape != (rows, 4):
        return None
    return cache


def open_or_build(ds: datasets.Dataset, *, short_side: int, root: Path, num_proc: int = 1,
                  progress: bool = True) -> tuple[PixelCache, bool]:
    """The cache of `ds` at `short_side`: opened when a complete one exists, else built
    (`num_proc` processes). Returns (cache, built)."""
    from pet_pipeline.data import content_key

    key = f"{content_key(ds, short_side)}-{short_side}px"
    folder = cache_folder(root, key)
    cache = open_cache(folder, rows=len(ds))
    if cache is not None:
        return cache, False
    if folder.exists():  # torn or stale: set aside, then removed (a reader may still map it)
        aside = folder.with_name(f".broken-{key}-{os.getpid()}")
        os.replace(folder, aside)
        shutil.rmtree(aside, ignore_errors=True)
    build(ds, folder, short_side=short_side, num_proc=num_proc, progress=progress)
    cache = open_cache(folder, rows=len(ds))
    if cache is None:
        raise OSError(f"{folder}: the decoded cache just built does not verify")
    return cache, True


def build(ds: datasets.Dataset, folder: Path, *, short_side: int, num_proc: int = 1,
          progress: bool = True) -> None:
    """Decode `ds`'s images into a new cache folder, chunk by chunk in `num_proc` processes."""
    from tqdm.auto import tqdm

    temporary = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    records = ds.cast_column("image", datasets.Image(decode=False)).select_columns("image")
    starts = range(0, len(ds), CHUNK)
    jobs = [(records, start, min(start + CHUNK, len(ds)), short_side, temporary) for start in starts]
    index, chunk_bytes = np.zeros((len(ds), 4), np.int64), [0] * len(jobs)
    bar = tqdm(total=len(ds), desc=f"decoding to {short_side} px (once)", unit="img", disable=not progress)
    workers = min(num_proc, len(jobs))
    # fork: the children inherit the memory-mapped Arrow table instead of pickling it
    pool = ProcessPoolExecutor(workers, mp_context=get_context("fork")) if workers > 1 else _InProcess()
    with pool:
        for number, (rows, size) in enumerate(pool.map(_build_chunk, jobs)):
            index[number * CHUNK:number * CHUNK + len(rows)] = rows
            chunk_bytes[number] = size
            bar.update(len(rows))
    bar.close()
    np.save(temporary / "index.npy", index)
    meta = {"format": FORMAT, "key": folder.name, "short_side": short_side, "rows": len(ds),
            "chunk_bytes": chunk_bytes}
    (temporary / "meta.json").write_text(json.dumps(meta))  # last: its presence means complete
    try:
        os.rename(temporary, folder)
    except OSError:  # another node built the same cache first: use that one
        shutil.rmtree(temporary, ignore_errors=True)


def _build_chunk(job) -> tuple[np.ndarray, int]:
    """Decode rows [start, stop) into chunk file number start // CHUNK; their index rows."""
    from pet_pipeline.data import open_resized

    records, start, stop, short_side, folder = job
    rows, offset = np.zeros((stop - start, 4), np.int64), 0
    with open(folder / f"chunk-{start // CHUNK:05d}.u8", "wb") as out:
        for position, record in enumerate(records[start:stop]["image"]):
            try:
                # small images enlarged as the eval transform enlarges them: its crop is then a copy
                pixels = np.asarray(open_resized(record, short_side, enlarge=True), dtype=np.uint8)
            except READ_ERRORS:  # damaged since the start-up scan: a stand-in serves it
                rows[position] = (start // CHUNK, offset, 0, 0)
                continue
            out.write(pixels.tobytes())
            rows[position] = (start // CHUNK, offset, pixels.shape[0], pixels.shape[1])
            offset += pixels.nbytes
    return rows, offset


class _InProcess:
    """ProcessPoolExecutor's `map` in this process, for one worker."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, function, jobs):
        return map(function, jobs)
