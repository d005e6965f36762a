"""Shared fixtures: a per-session cache for generated data, and tiny Oxford-layout folders.

    def test_x(make_pet_folder, tmp_path):
        root = make_pet_folder(tmp_path, {"Abyssinian": (4, 2), "beagle": 3})

    def test_y(synthetic_dir):      # the cached `dataset: synthetic` folder, 8 images a breed
        ...

Everything is generated, small and offline; nothing here needs the network.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from pet_pipeline.breeds import BREEDS, CAT_BREEDS, DOG_BREEDS
from pet_pipeline.synthetic import LIST_HEADER

REPO = Path(__file__).resolve().parents[1]
# The CI clone puts shared/ next to the project folder; tests that need it skip without it.
SHARED = REPO.parent / "shared"
PET_SAMPLE = SHARED / "data" / "oxford-pet-sample"

OXFORD_HEADER = LIST_HEADER


def annotation_line(image_id: str, breed: str) -> str:
    """`Image CLASS-ID SPECIES BREED-ID` with the official numbering of `breed`."""
    class_id = BREEDS.index(breed) + 1
    if breed in CAT_BREEDS:
        species, breed_id = 1, CAT_BREEDS.index(breed) + 1
    else:
        species, breed_id = 2, DOG_BREEDS.index(breed) + 1
    return f"{image_id} {class_id} {species} {breed_id}"


def small_image(breed: str, n: int, size: int = 24) -> Image.Image:
    """A small RGB picture whose colour depends on the breed and a little on `n`."""
    k = BREEDS.index(breed)
    colour = ((k * 67) % 256, (k * 31 + 80) % 256, (n * 13 + 40) % 256)
    img = Image.new("RGB", (size, size), colour)
    img.putpixel((0, 0), (255 - colour[0], 0, 0))
    return img


def write_pet_folder(
    root: str | Path,
    breeds_and_counts: dict,
    *,
    torchvision_layout: bool = False,
    crlf: bool = False,
    blank_lines: bool = False,
    comments: bool = False,
    image_size: int = 24,
    extra_trainval: list[str] = (),
    extra_test: list[str] = (),
) -> Path:
    """Write a tiny official-layout folder and return the folder holding images/.

    `breeds_and_counts` maps an official breed name to `(n_trainval, n_test)`, or to one
    number n split as ceil(n/2) trainval + floor(n/2) test. Image ids are `Breed_1..n`.
    `torchvision_layout` puts everything under `root/oxford-iiit-pet/` (then pass `root`
    as data_dir to test the parent layout). `crlf`, `blank_lines` and `comments` shape the
    annotation files the way some copies of the dataset have them; `extra_trainval` /
    `extra_test` are raw lines appended as they are (for malformed-line tests).
    annotations/list.txt always starts with the official '#' header.
    """
    root = Path(root)
    pet_root = root / "oxford-iiit-pet" if torchvision_layout else root
    (pet_root / "images").mkdir(parents=True, exist_ok=True)
    (pet_root / "annotations").mkdir(parents=True, exist_ok=True)
    lines = {"trainval": [], "test": []}
    for breed, counts in breeds_and_counts.items():
        if isinstance(counts, int):
            counts = ((counts + 1) // 2, counts // 2)
        n_trainval, n_test = counts
        for n in range(1, n_trainval + n_test + 1):
            image_id = f"{breed}_{n}"
            small_image(breed, n, image_size).save(pet_root / "images" / f"{image_id}.jpg", quality=90)
            split = "trainval" if n <= n_trainval else "test"
            lines[split].append(annotation_line(image_id, breed))
    lines["trainval"] += list(extra_trainval)
    lines["test"] += list(extra_test)
    newline = "\r\n" if crlf else "\n"
    for split, rows in lines.items():
        out = []
        if comments:
            out += list(OXFORD_HEADER)
        for i, row in enumerate(rows):
            out.append(row)
            if blank_lines and i % 3 == 0:
                out.append("")
        if blank_lines:
            out.append("   ")
        (pet_root / "annotations" / f"{split}.txt").write_bytes((newline.join(out) + newline).encode())
    everything = list(OXFORD_HEADER) + lines["trainval"] + lines["test"]
    (pet_root / "annotations" / "list.txt").write_bytes((newline.join(everything) + newline).encode())
    return pet_root


def annotation_ids(path: Path) -> list[str]:
    """The image ids of an annotation file (comments and blank lines skipped)."""
    ids = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            ids.append(line.split()[0])
    return ids


@pytest.fixture
def make_pet_folder():
    """`write_pet_folder` as a fixture, so test modules need not import conftest."""
    return write_pet_folder


@pytest.fixture(scope="session")
def pet_cache(tmp_path_factory):
    """PET_PIPELINE_CACHE pointed at a session tmp folder, so `dataset: synthetic` is
    generated there once per session and never in the user's home."""
    cache = tmp_path_factory.mktemp("pet-cache")
    previous = os.environ.get("PET_PIPELINE_CACHE")
    os.environ["PET_PIPELINE_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("PET_PIPELINE_CACHE", None)
    else:
        os.environ["PET_PIPELINE_CACHE"] = previous


@pytest.fixture(scope="session")
def synthetic_dir(pet_cache) -> Path:
    """The cached synthetic folder (37 breeds x 8 images of 48 px), generated once."""
    from pet_pipeline.synthetic import synthetic_pets_dir

    folder = synthetic_pets_dir(images_per_class=8, image_size=48)
    assert folder.is_relative_to(pet_cache)
    return folder


# --------------------------------------------------------------------------- train.py runs

# The tiny training run every end-to-end test starts from: 12 cat breeds x 8 trainval images
# (48 px, generated once a session), trained at 32 px without a validation split. timm's
# `test_efficientnet` (0.1 M parameters, batch norm, a classifier head like CoAtNet's) makes a
# step ~0.1 s and a checkpoint ~1 MB; tests of what only CoAtNet does name it themselves.
TINY = {
    "dataset": "synthetic", "synthetic_images_per_class": 16, "synthetic_image_size": 48,
    "model": "test_efficientnet", "pretrained": False, "image_size": 32, "batch_size": 8,
    "lr": 2e-3, "num_workers": 0, "log_every": 1, "drop_path_rate": 0.0, "report_to": "none",
    "val_fraction": 0.0, "gradcam_images": 0,
}

COATNET_MODEL = {"model": "coatnet_nano_rw_224"}  # for what depends on the job's own model family


def cli(values: dict) -> list[str]:
    """{"lr": 1e-3, "breeds": ["A", "B"]} -> ["--lr", "0.001", "--breeds", "A,B"]."""
    def text(value):
        if value is None:
            return "null"
        if isinstance(value, bool):
            return str(value).lower()
        return ",".join(value) if isinstance(value, list) else str(value)

    return [arg for key, value in values.items() for arg in (f"--{key}", text(value))]


@dataclass
class Finished:
    """What a run of train.py left: its exit status and what it printed."""

    returncode: int
    stdout: str
    stderr: str


def run_in_process(main, argv: list[str], *, env: dict | None = None) -> Finished:
    """`main(argv)` of train.py or evaluate.py in this process, as `python SCRIPT ...` would run
    it, without the ~8 s of imports a subprocess pays. The process-wide state a run sets is put
    back afterwards: the environment, signal handlers, Accelerate's singletons; stdout and
    stderr are captured. Tests of process behaviour (signals from outside, kills, launchers,
    several processes) run the script as a process of its own instead."""
    import contextlib
    import io
    import signal

    import torch
    from accelerate.state import AcceleratorState, GradientState, PartialState

    saved_env, saved_threads = dict(os.environ), torch.get_num_threads()
    signals = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGCHLD)
    saved_handlers = {sig: signal.getsignal(sig) for sig in signals}
    os.environ.update({**RUN_ENV, **(env or {})})
    if "WANDB_API_KEY" not in (env or {}):  # the developer's own login is not the test's
        os.environ.pop("WANDB_API_KEY", None)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # as a subprocess would have
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main([str(arg) for arg in argv])
            except SystemExit as end:
                code = end.code
    finally:
        _finish_wandb_run()  # a run that ended in an error leaves wandb.run for the next one
        for key in set(os.environ) - set(saved_env):
            del os.environ[key]
        os.environ.update(saved_env)
        torch.set_num_threads(saved_threads)
        for sig, handler in saved_handlers.items():
            signal.signal(sig, handler)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        PartialState._reset_state()
    return Finished(int(code or 0), stdout.getvalue(), stderr.getvalue())


def _finish_wandb_run() -> None:
    wandb = sys.modules.get("wandb")  # only if a run imported it
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def train_in_process(values: dict | list[str], *, env: dict | None = None) -> Finished:
    """train.py with `values` (a dict of keys, or argv) in this process: `run_in_process`."""
    import train

    return run_in_process(train.main, cli(values) if isinstance(values, dict) else values, env=env)


def evaluate_in_process(values: dict | list[str], *, env: dict | None = None) -> Finished:
    """evaluate.py in this process. It is loaded from its file under another name: `import
    evaluate` means Hugging Face's library (pet_pipeline/metrics)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pet_pipeline_evaluate_py", REPO / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return run_in_process(script.main, cli(values) if isinstance(values, dict) else values, env=env)


# what every run of train.py gets: offline, two threads, output unbuffered (for a subprocess)
RUN_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
           "WANDB_SILENT": "true", "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}


def run_env(pet_cache: Path, **extra: str) -> dict:
    """os.environ with RUN_ENV, the session's data cache and `extra`, for a subprocess."""
    environment = {**os.environ, **RUN_ENV, "PET_PIPELINE_CACHE": str(pet_cache), **extra}
    environment.pop("WANDB_API_KEY", None)
    return environment


@pytest.fixture(scope="session")
def env(pet_cache) -> dict:
    """The environment of a train.py subprocess, sharing the session's data cache."""
    return run_env(pet_cache)


def ok(result: Finished) -> Finished:
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def refused(result: Finished, *fragments: str) -> str:
    """Exit 2 with one `error:` sentence holding every fragment, and no traceback."""
    assert result.returncode == 2, f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    for fragment in fragments:
        assert fragment in lines[0], f"{lines[0]}\n{result.stdout[-2000:]}"
    return lines[0]



@pytest.fixture(scope="session")
def train_run(pet_cache):
    """`train_in_process`, with `dataset: synthetic` generated once a session in its cache."""
    return train_in_process


def train_in_subprocess(values: dict | list[str], env: dict, *, faults: str | None = None,
                        launcher=(sys.executable,), timeout: float = 600) -> Finished:
    """`python train.py ...` as its own process, for what only a process shows: a signal from
    outside, a kill at an exact point (tests/faults.py FAULTS), several ranks (`launcher`)."""
    import subprocess

    argv = cli(values) if isinstance(values, dict) else [str(arg) for arg in values]
    if faults:
        launcher = (*launcher, str(REPO / "tests" / "faults.py"), faults)
    done = subprocess.run([*launcher, str(REPO / "train.py"), *argv], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    return Finished(done.returncode, done.stdout, done.stderr)
