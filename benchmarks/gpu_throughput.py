"""Training throughput on one GPU: the real loop against the model-only bound and the old script.

    python benchmarks/gpu_throughput.py --json runs/gpu_throughput.json          # ~6 min on an H100
    python benchmarks/gpu_throughput.py --tiny                                   # CPU proof, ~3 min

In one run, on the same GPU:
  bound        forward + backward + fused AdamW on random tensors already on the GPU (bf16
               autocast, channels_last) at batch 128/256/384, eager and with each compile
               mode asked for: no data, no framework; the best is the upper bound, also as
               MFU (26.4 GFLOP an image against the GPU's dense bf16 peak, PEAK_BF16_TFLOPS).
  model_only   the same at --batch-size, eager and compiled.
  train.py     the real loop (`train.py --max_steps`), generated full-size JPEGs; images/s
               read back from metrics.jsonl after the first logged interval. eager: augment
               standard on the CPU path (`--augment_on cpu`: decoded, cropped, flipped by
               DataLoader workers); device: the same with `--augment_on device` (the workers
               copy regions of the pixel cache, the GPU resamples the batch: what `auto` gives
               on a GPU); strong (CPU path only); --compile true on the CPU path.
  old script   train.py with the old settings: fp32, batch 8, no workers, no augmentation,
               no channels_last.
  fine-tune    wall time of `python train.py` on the 12 cat breeds (10 epochs, validation each
               epoch, checkpoints, final evaluation and report) from launch to exit, with
               configs/gpu.yaml's augment_on (auto: the device path on a GPU).

The data are generated (no network on GPU nodes): 200 images per breed, 384 px JPEGs, which
is the size of the real cats subset (2,371 images); decoding cost is close to the real photos'.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# Dense bf16 tensor-core peaks (NVIDIA data sheets, without sparsity), for the MFU figure.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}
# Forward + backward of coatnet_0_rw_224 at 224 px: 3 x its 4.4 GMACs x 2 FLOP a MAC.
TRAIN_GFLOP_PER_IMAGE = {"coatnet_0_rw_224": 26.4}


def peak_tflops(device_name: str) -> tuple[str, float] | None:
    for name, tflops in PEAK_BF16_TFLOPS.items():
        if name in device_name:
            return name, tflops
    return None


def model_only(args, compile_model: bool, batch_size: int | None = None, mode: str | None = None) -> float:
    """Images/s of forward + backward + fused AdamW on tensors already on the device."""
    import torch

    from pet_pipeline.model import build_model

    batch_size = batch_size or args.batch_size
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(args.model, num_classes=12, pretrained=False, image_size=args.image_size)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_model = torch.compile(model, mode=mode) if compile_model else model
    images = torch.randn(batch_size, 3, args.image_size, args.image_size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 12, (batch_size,), device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(step_model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup_steps):  # includes compilation
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.steps * batch_size / (time.perf_counter() - start)


def bound_sweep(args, report) -> None:
    """The model-only bound over batch sizes, eager and compiled (each compile mode asked
    for): the best is the bound train.py is measured against. An out-of-memory batch is
    recorded as such and the sweep goes on."""
    import torch

    modes = ["eager", *(args.compile_modes if "compile" not in args.skip else [])]
    for batch_size in args.bound_batches:
        for mode in modes:
            name = f"bound_{mode}_b{batch_size}"
            try:
                report(name, model_only(args, mode != "eager", batch_size,
                                        None if mode in ("eager", "default") else mode))
            except torch.cuda.OutOfMemoryError:
                print(f"{name}: out of memory", flush=True)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()


def train_py(args, extra: list[str], steps: int, out: Path) -> tuple[float, float]:
    """(images/s after the first logged interval, wall seconds) of a train.py run."""
    command = [sys.executable, str(ROOT / "train.py"), *data_args(args), "--model", args.model,
               "--pretrained", "false", "--image_size", str(args.image_size), "--val_fraction", "0",
               "--max_steps", str(steps), "--log_every", str(args.log_every), "--report_to", "none",
               "--resume", "none", "--output_dir", str(out), *extra]
    start = time.perf_counter()
    result = subprocess.run(command, env=env(args), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"train.py failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["images_per_s"] for r in records if "images_per_s" in r][1:]
    return statistics.fmean(speeds), wall


def data_args(args) -> list[str]:
    return ["--dataset", "synthetic", "--species", "cat",
            "--synthetic_images_per_class", str(args.images_per_class),
            "--synthetic_image_size", str(args.source_size)]


def env(args) -> dict:
    return {**os.environ, "PET_PIPELINE_CACHE": str(Path(args.work_dir) / "cache"),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="coatnet_0_rw_224")
    parser.add_argument("--image-size", type=int, default=224, help="model input, px")
    parser.add_argument("--source-size", type=int, default=384, help="generated JPEG side, px")
    parser.add_argument("--images-per-class", type=int, default=200)
    parser.add_argument("--pre-resize", type=int, default=256, help="train.py's pre_resize, px")
    parser.add_argument("--batch-size", type=int, default=128, help="per GPU, ours and model-only")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="DataLoader workers (default: train.py's choice)")
    parser.add_argument("--steps", type=int, default=60, help="timed steps, model-only")
    parser.add_argument("--train-steps", type=int, default=80, help="steps of each train.py run")
    parser.add_argument("--old-steps", type=int, default=150, help="steps of the old-settings run")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["bound", "eager", "device", "strong", "compile", "old", "finetune"],
                        help="parts to leave out")
    parser.add_argument("--work-dir", default="runs/gpu-benchmark")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--bound-batches", type=int, nargs="*", default=[128, 256, 384],
                        help="batch sizes of the model-only bound sweep (part 'bound')")
    parser.add_argument("--compile-modes", nargs="*", default=["default", "max-autotune"],
                        help="torch.compile modes of the bound sweep")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU proof: coatnet_nano at 64 px, few steps, small data")
    args = parser.parse_args()
    if args.tiny:
        args.model, args.image_size, args.source_size, args.images_per_class = (
            "coatnet_nano_rw_224", 64, 96, 24)
        args.pre_resize = 80
        args.batch_size, args.steps, args.train_steps, args.old_steps = 16, 5, 20, 20
        args.warmup_steps, args.log_every, args.finetune_epochs = 2, 5, 2
        args.bound_batches, args.compile_modes = [8, 16], ["default"]
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    workers = [] if args.num_workers is None else ["--num_workers", str(args.num_workers)]
    # ours: the recommended recipe's input settings (configs/gpu.yaml)
    ours = ["--batch_size", str(args.batch_size), "--mixed_precision", "bf16", "--augment", "standard",
            "--augment_on", "cpu", "--channels_last", "true", "--pre_resize", str(args.pre_resize), *workers]
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    if not torch.cuda.is_available():
        ours[ours.index("bf16")] = "no"  # bf16 autocast on CPU is slower, not a measurement of ours
    figures = {"device": device, "date": date.today().isoformat(), "args": vars(args)}

    def report(name, value, unit="images/s"):
        figures[name] = value
        print(f"{name:<28} {value:>10.1f} {unit}", flush=True)
        if args.json:  # after every figure: a run cut short by a time limit keeps what it measured
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(figures, indent=2))

    print(f"device: {device}; model {args.model} at {args.image_size} px, batch {args.batch_size}")
    # generate the data once (timed separately, not part of any figure)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from pet_pipeline.synthetic import synthetic_pets_dir as s; "
                    f"s({args.images_per_class}, {args.source_size})"], env=env(args), cwd=ROOT, check=True)
    print(f"data ready in {time.perf_counter() - start:.0f} s")

    if "bound" not in args.skip:
        bound_sweep(args, report)
    if "eager" not in args.skip:
        report("model_only_eager", model_only(args, False))
        report("train_py_eager", train_py(args, ours, args.train_steps, work / "eager")[0])
    if "device" not in args.skip:  # augment_on: device, otherwise the same run
        on_device = [*ours]
        on_device[on_device.index("cpu")] = "device"
        report("train_py_device", train_py(args, on_device, args.train_steps, work / "device")[0])
    if "strong" not in args.skip:  # the heavier augmentation preset, through the real loader
        strong = [*ours]
        strong[strong.index("standard")] = "strong"
        report("train_py_strong", train_py(args, strong, args.train_steps, work / "strong")[0])
    if "old" not in args.skip:
        old = ["--batch_size", "8", "--mixed_precision", "no", "--num_workers", "0", "--augment", "none",
               "--channels_last", "false", "--log_every", "25" if not args.tiny else "5"]
        report("old_settings", train_py(args, old, args.old_steps, work / "old")[0])
    if "finetune" not in args.skip:
        out = work / "finetune"
        command = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/gpu.yaml"),
                   *data_args(args), "--pretrained", "false", "--model", args.model,
                   "--image_size", str(args.image_size), "--epochs", str(args.finetune_epochs),
                   "--early_stopping_patience", "null", "--report_to", "none", "--resume", "none",
                   "--output_dir", str(out), *workers]
        if not torch.cuda.is_available():
            command += ["--mixed_precision", "no", "--batch_size", str(args.batch_size)]
        start = time.perf_counter()
        result = subprocess.run(command, env=env(args), capture_output=True, text=True)
        wall = time.perf_counter() - start
        (out / "stdout.txt").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise RuntimeError(f"fine-tune failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
        metrics = json.loads((out / "eval/metrics.json").read_text())
        report("finetune_wall_s", wall, "s")
        report("finetune_test_accuracy", metrics["accuracy"], "")
        # train.py's own account of the wall time (from its start, imports not included)
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        for key, seconds in next((r for r in records if "time/total_s" in r), {}).items():
            if key.startswith("time/"):
                report(f"finetune_{key[5:]}", seconds, "s")
    # compilation last: the slowest part, and the one a time limit should cut first
    if "compile" not in args.skip:
        report("model_only_compiled", model_only(args, True))
        report("train_py_compiled", train_py(args, [*ours, "--compile", "true"], args.train_steps,
                                             work / "compiled")[0])
    bound = max([v for k, v in figures.items() if k.startswith(("model_only_", "bound_"))] or [0])
    gflop = TRAIN_GFLOP_PER_IMAGE.get(args.model)
    peak = peak_tflops(device)
    if bound and gflop and peak:  # model FLOPs utilisation of the best bound
        figures["mfu_peak"] = f"{peak[0]} dense bf16, {peak[1]:.0f} TFLOP/s"
        report("bound_mfu_pct", 100 * bound * gflop / (peak[1] * 1e3), "%")
    best = max(figures.get(key, 0) for key in ("train_py_eager", "train_py_device", "train_py_compiled"))
    if bound and best:
        report("end_to_end_pct_of_bound", 100 * best / bound, "%")
    for path in ("eager", "device"):  # each input path's share of the bound
        if bound and f"train_py_{path}" in figures:
            report(f"{path}_pct_of_bound", 100 * figures[f"train_py_{path}"] / bound, "%")
    if best and "old_settings" in figures:
        report("speedup_vs_old", best / figures["old_settings"], "x")


if __name__ == "__main__":
    main()
