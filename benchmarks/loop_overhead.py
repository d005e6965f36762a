"""Per-step cost of train.py's Accelerate loop against a plain PyTorch loop.

    python benchmarks/loop_overhead.py                       # CPU, tiny model, ~3 minutes
    python benchmarks/loop_overhead.py --repeats 5 --json runs/loop_overhead.json
    python benchmarks/loop_overhead.py --image-size 224 --batch-size 64 --model coatnet_0_rw_224 \
        --mixed-precision bf16 --steps 60                    # on a GPU

Both loops train the same model on the same data (generated pets through the same
PetTorchDataset and DataLoader settings), with the same optimizer, batch and loss, and are
timed over the same steps after a warm-up interval:

ours:  `train.py` itself, in a subprocess (`--max_steps`), its images/s read back from
       metrics.jsonl; gradient clipping and label smoothing off so both do the same maths.
plain: model(x) -> cross-entropy -> backward -> AdamW step -> zero_grad, nothing else.

overhead_pct = (plain images/s / ours images/s - 1) * 100, from the medians over repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cache_dir(work: Path) -> str:
    """The caller's PET_PIPELINE_CACHE (generated data made once per session), else a fresh one."""
    return os.environ.get("PET_PIPELINE_CACHE") or str(work / "cache")


def run_ours(args, work: Path) -> float:
    """images/s of train.py over the logged intervals after the first (warm-up) one."""
    out = work / f"ours-{time.time_ns()}"
    command = [
        sys.executable, str(ROOT / "train.py"), "--dataset", "synthetic", "--species", "all",
        "--synthetic_images_per_class", str(args.images_per_class),
        "--synthetic_image_size", str(args.image_size), "--val_fraction", "0",
        "--model", args.model, "--pretrained", "false", "--image_size", str(args.image_size),
        "--batch_size", str(args.batch_size), "--max_steps", str(args.steps),
        "--log_every", str(args.log_every), "--num_workers", str(args.num_workers),
        "--clip_grad_norm", "null", "--label_smoothing", "0", "--drop_path_rate", "0",
        "--augment", "none", "--report_to", "none", "--resume", "none",
        "--mixed_precision", args.mixed_precision, "--output_dir", str(out),
    ]
    env = {**os.environ, "PET_PIPELINE_CACHE": cache_dir(work)}
    subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["images_per_s"] for r in records if "images_per_s" in r][1:]
    return statistics.fmean(speeds)


def run_plain(args, work: Path) -> float:
    """The same training in the plainest PyTorch: no Accelerate, no extras."""
    import torch

    from pet_pipeline.data import load_pets
    from pet_pipeline.loader import PetTorchDataset
    from pet_pipeline.model import build_model
    from pet_pipeline.transforms import build_eval_transform, decode_size, model_data_config

    os.environ["PET_PIPELINE_CACHE"] = cache_dir(work)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pets = load_pets(dataset="synthetic", species="all", val_fraction=0,
                     synthetic_images_per_class=args.images_per_class,
                     synthetic_image_size=args.image_size)
    data_config = model_data_config(args.model, args.image_size)
    dataset = PetTorchDataset(pets.train, build_eval_transform(data_config),
                              min_side=decode_size(data_config, "none"))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=args.num_workers > 0)
    model = build_model(args.model, num_classes=len(pets.class_names), pretrained=False,
                        image_size=args.image_size).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    model.train()
    step, interval_start, images, speeds = 0, time.perf_counter(), 0, []
    while step < args.steps:
        for batch in loader:
            x = batch["pixel_values"].to(device, non_blocking=True)
            y = batch["label"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            images += x.shape[0]
            if step % args.log_every == 0:
                loss.item()  # the same one sync per interval as train.py's logging
                now = time.perf_counter()
                speeds.append(images / (now - interval_start))
                interval_start, images = now, 0
            if step >= args.steps:
                break
    return statistics.fmean(speeds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="coatnet_nano_rw_224", help="timm model name")
    parser.add_argument("--image-size", type=int, default=64, help="input side, px")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--log-every", type=int, default=10, help="steps per timed interval")
    parser.add_argument("--images-per-class", type=int, default=40, help="generated images per breed")
    parser.add_argument("--num-workers", type=int, default=1, help="DataLoader workers, both loops")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each loop")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    if args.steps < 2 * args.log_every:
        parser.error("--steps must cover at least two --log-every intervals (one is warm-up)")

    ours, plain = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for i in range(args.repeats):
            ours.append(run_ours(args, work))
            plain.append(run_plain(args, work))
            print(f"repeat {i + 1}: ours {ours[-1]:.1f} images/s, plain {plain[-1]:.1f} images/s",
                  flush=True)
    ours_median, plain_median = statistics.median(ours), statistics.median(plain)
    overhead = (plain_median / ours_median - 1) * 100
    print(f"\n| loop | images/s (median of {args.repeats}) | runs |\n|---|---|---|")
    print(f"| train.py (Accelerate) | {ours_median:.1f} | {', '.join(f'{v:.1f}' for v in ours)} |")
    print(f"| plain PyTorch | {plain_median:.1f} | {', '.join(f'{v:.1f}' for v in plain)} |")
    print(f"\noverhead: {overhead:+.1f}% ({args.model}, {args.image_size} px, batch {args.batch_size},"
          f" {args.mixed_precision})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "overhead_pct": overhead, "ours_images_per_s": ours, "plain_images_per_s": plain,
            "args": vars(args), "machine": platform.node(), "cpu_count": os.cpu_count(),
            "date": date.today().isoformat(),
        }, indent=2))


if __name__ == "__main__":
    main()
