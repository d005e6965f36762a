"""Images that stop being readable after the start-up scan: deleted, truncated or replaced
while a long job runs (network filesystems, synced folders).

A DataLoader item that can't be decoded never raises (pet_pipeline/loader.py): a training
sample is replaced by a deterministic stand-in of the same class and flagged with its index;
an evaluation sample is flagged and left out of the predictions. The trainer gathers the
flags of every rank at its sync points (the log steps, an epoch's end) and `UnreadableSamples`
names each image once (the console and metrics.jsonl), keeps the list in the train state (so
a resumed run knows them) and says when the run must stop instead: `strict_data: true`, or
more than `max_unreadable_fraction` of the training images gone (the data is gone, not one
file). The stand-in depends only on (seed, epoch, index) and the files: a resumed run
replaces the same samples the same way.
"""

from __future__ import annotations

from PIL import Image

# what decoding a damaged or vanished file raises: OSError (missing, truncated, unreadable,
# UnidentifiedImageError), ValueError / SyntaxError (broken headers), a bomb's header
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class DataGone(Exception):
    """Unreadable training images the config says must stop the run (one sentence)."""


def why_unreadable(record) -> str:
    """Why a `datasets.Image(decode=False)` record or a path can't be decoded now, in a few words."""
    from pet_pipeline.images import check_image_bytes, check_image_file, open_rgb

    if isinstance(record, dict) and record.get("bytes"):
        reason = check_image_bytes(record["bytes"])
    else:
        reason = check_image_file(record["path"] if isinstance(record, dict) else record)
    if reason is not None:
        return reason
    try:
        open_rgb(record)
    except READ_ERRORS as e:
        return f"can't be decoded ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})"
    return "could not be read for a moment (readable again now)"


class UnreadableSamples:
    """The training samples that could not be read, gathered from every rank.

        seen = UnreadableSamples(train_dataset, known=state.unreadable)
        seen.add(batch["unreadable"])                # every step: device tensor, -1 = read fine
        for line in seen.collect(accelerator):       # every rank at the same step (a collective)
            print(line)                               # "unreadable during training: ..."
        seen.check(strict=..., max_fraction=...)     # raises DataGone when the run must stop
    """

    def __init__(self, dataset, known: list[str]):
        self.dataset = dataset  # the training datasets.Dataset: image ids and image records
        self.known = known  # image ids named so far (the train state's list, updated in place)
        self.pending = []  # this rank's flags since the last collect, on the device
        self._ids = None  # the image ids, read at the first failure

    def add(self, flags) -> None:
        self.pending.append(flags)

    def collect(self, accelerator) -> list[dict]:
        """The images first seen unreadable since the last call, on every rank, each as
        {"unreadable_image": id, "reason": ...}; they join `known`."""
        import torch

        local = (torch.cat(self.pending) if self.pending
                 else torch.empty(0, dtype=torch.long, device=accelerator.device))
        self.pending = []
        if accelerator.num_processes > 1:  # the ranks hold different samples' flags
            failed = accelerator.reduce((local >= 0).sum().reshape(1), "sum")  # one small collective
            if not failed.item():
                return []
            local = accelerator.gather(accelerator.pad_across_processes(local, pad_index=-1))
        rows = sorted({int(i) for i in local.cpu().tolist() if i >= 0})
        new = []
        if rows and self._ids is None:
            self._ids = self.dataset["image_id"][:]  # the column alone: no image is decoded
        for row in rows:
            image_id = self._ids[row]
            if image_id not in self.known:
                self.known.append(image_id)
                record = self.dataset.cast_column("image", _undecoded())[row]["image"]
                new.append({"unreadable_image": image_id, "reason": why_unreadable(record)})
        return new

    def check(self, new: list[dict], *, strict: bool, max_fraction: float) -> None:
        """Raise DataGone when `new` failures mean the run must stop."""
        if not new:
            return
        first = f"{new[0]['unreadable_image']} ({new[0]['reason']})"
        if strict:
            raise DataGone(f"strict_data: {first} became unreadable during training; the run "
                           "stopped with a checkpoint: restore or remove the file and rerun the same "
                           "command to resume, or set strict_data: false to train on with a stand-in.")
        share = len(self.known) / max(1, len(self.dataset))
        if share > max_fraction:
            raise DataGone(f"max_unreadable_fraction: {len(self.known)} of {len(self.dataset)} training "
                           f"images ({share:.1%}) became unreadable during training, over "
                           f"{max_fraction:.1%} (the latest {first}): the data is gone, not one file; "
                           "the run stopped with a checkpoint: restore the data and rerun the same command.")


def _undecoded():
    import datasets

    return datasets.Image(decode=False)
