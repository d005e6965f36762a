"""One table for a sweep: every run folder under SWEEP_DIR, its settings and test results.

    python slurm/summarize_sweep.py runs/sweep-1234            # prints the markdown table
    python slurm/summarize_sweep.py runs/sweep-1234 --tasks 4  # and says how many are missing

Reads each RUN/config.yaml, RUN/eval/metrics.json (written at the end of a run) and the best
validation accuracy in RUN/metrics.jsonl; writes SWEEP_DIR/summary.csv and summary.md, best
test accuracy first. The columns are the config keys whose values differ between the runs.
slurm/sweep.sbatch runs it after every task, so the last task to finish leaves the full table;
a run that has not finished (or failed) is listed without results.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

import yaml

RESULTS = ("accuracy", "macro_f1", "weighted_f1", "n")
NOT_SETTINGS = {"output_dir", "run_name", "resume"}  # differ between runs by construction


def read_run(run_dir: Path) -> dict:
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    row = {"run": run_dir.name, "config": config, "status": "not finished"}
    metrics_file = run_dir / "eval" / "metrics.json"
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        row.update({key: metrics.get(key) for key in RESULTS}, status="done")
    log = run_dir / "metrics.jsonl"
    if log.is_file():
        val = [json.loads(line).get("val_accuracy") for line in log.read_text().splitlines() if line.strip()]
        val = [v for v in val if v is not None]
        row["best_val_accuracy"] = max(val) if val else None
    return row


def summarize(sweep_dir: Path, expected_tasks: int | None = None) -> str:
    runs = sorted((p for p in sweep_dir.iterdir() if (p / "config.yaml").is_file()),
                  key=lambda p: (len(p.name), p.name))  # task-2 before task-10
    rows = [read_run(p) for p in runs]
    keys = sorted({k for r in rows for k in r["config"]} - NOT_SETTINGS)
    varied = [k for k in keys if len({json.dumps(r["config"].get(k)) for r in rows}) > 1]
    columns = ["run", *varied, "accuracy", "macro_f1", "weighted_f1", "best_val_accuracy", "n", "status"]
    rows.sort(key=lambda r: -(r.get("accuracy") if r.get("accuracy") is not None else -1))

    def cell(row, column):
        value = row["config"].get(column) if column in varied else row.get(column)
        if isinstance(value, float):
            return f"{value:.4f}" if column in (*RESULTS, "best_val_accuracy") else f"{value:g}"
        return "" if value is None else str(value)

    table = [[cell(r, c) for c in columns] for r in rows]
    _write_atomically(sweep_dir / "summary.csv",
                      lambda f: csv.writer(f).writerows([columns, *table]))
    done = sum(r["status"] == "done" for r in rows)
    total = expected_tasks if expected_tasks is not None else len(rows)
    markdown = "\n".join([
        f"# Sweep {sweep_dir.name}: {done} of {total} runs finished",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
        *("| " + " | ".join(line) + " |" for line in table),
    ]) + "\n"
    _write_atomically(sweep_dir / "summary.md", lambda f: f.write(markdown))
    return markdown


def _write_atomically(path: Path, write) -> None:
    """Tasks finishing together may both write: each renames its own complete file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        write(f)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="folder holding one output folder per run")
    parser.add_argument("--tasks", type=int, default=None, help="how many runs the sweep has")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a folder")
    print(summarize(args.sweep_dir, args.tasks), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
