"""Fine-tune a timm CoAtNet on Oxford-IIIT Pet (by default the 12 cat breeds) with Accelerate.

The same script at every scale:

    # laptop CPU, no downloads (generated data), a few minutes:
    python train.py --config configs/quickstart.yaml
    # one GPU:
    python train.py --config configs/gpu.yaml
    # 8 GPUs of one node (bf16, one process per GPU; --num_processes N for another count):
    accelerate launch --config_file accelerate_config.yaml train.py --config configs/gpu.yaml
    # two CPU processes over gloo (what the tests do):
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 train.py --config configs/quickstart.yaml
    # SLURM, one node with all its GPUs:
    sbatch slurm/train.sbatch --config configs/gpu.yaml

Any key can be overridden on the command line (`--lr 3e-4 --batch_size 64`); `--help` lists
them. Started again, the same command continues a stopped run from its newest valid
checkpoint, or re-evaluates a finished one (resume: auto); what a start in a used output_dir
does is decided by pet_pipeline/rundir.py.
"""

from __future__ import annotations

import os
import sys

from pet_pipeline.config import Config, load_config
from pet_pipeline.errors import (
    INTERRUPTED_EXIT_CODE,
    QuitWithoutSaving,
    StoppedBeforeTraining,
    StoppedWhileClosing,
    UserError,
    exit_with,
    stop_exit_code,
)


def train(config: Config, argv: list[str]) -> int:
    """The whole job (pet_pipeline/trainer.py); returns the exit status."""
    checked = check_before_heavy_work(config)
    # torch, timm and the rest are imported here rather than at the top, so that `--help`
    # and a mistyped key or value answer in a fraction of a second instead of after ~8 s.
    from pet_pipeline.preemption import StopFlag
    from pet_pipeline.rundir import RunDirectory
    from pet_pipeline.trainer import Trainer

    main_process = int(os.environ.get("RANK", "0")) == 0
    # one lock per job, held by the global main process until the job ends; stop signals
    # (SIGTERM, SIGUSR1, Ctrl-C) handled by the run until then
    with RunDirectory(config.output_dir).held(lock=main_process) as run_dir, \
            StopFlag.installed(announce=main_process) as stop:
        trainer = Trainer(config, argv, run_dir=run_dir, stop=stop, checked=checked)
        exit_code = trainer.fit()
        stop.closing_now()  # saved: a signal now ends W&B's upload or the Hub push at once
        trainer.close(exit_code)
    return exit_code


def check_before_heavy_work(config: Config) -> dict:
    """Mistakes found from the config alone, before the accelerator or any data; returns the
    model's data config."""
    import torch

    from pet_pipeline.checkpoint import list_checkpoints
    from pet_pipeline.data import check_data_keys
    from pet_pipeline.model import check_weights_available
    from pet_pipeline.tracking import check_wandb_online, choose_wandb_mode, trackers_for
    from pet_pipeline.transforms import decode_size, model_data_config

    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("mixed_precision: fp16 needs a GPU; use bf16 or no on a CPU.")
    data_config = model_data_config(config.model, config.image_size)  # also checks the name
    check_data_keys(config)  # the source is there and its keys fit it
    resuming = config.resume not in ("none", "overwrite") and (
        config.resume != "auto" or list_checkpoints(config.output_dir))
    if not resuming:  # a resumed run's weights come from its checkpoint
        check_weights_available(config.model, pretrained=config.pretrained,
                                pretrained_path=config.pretrained_path)
    eval_side = decode_size(data_config, None)  # the short side the eval transform resizes to
    if config.pre_resize is not None and config.pre_resize < eval_side:
        raise UserError(f"pre_resize: {config.pre_resize} px is below the {eval_side} px that "
                        f"evaluation resizes to; use at least {eval_side}, or null.")
    if "wandb" in trackers_for(config.report_to):
        choose_wandb_mode()  # offline without credentials
        if config.wandb_required and int(os.environ.get("RANK", "0")) == 0:
            check_wandb_online(config.wandb_init_timeout_s)
    if config.push_to_hub:  # a token and the Hub now, not at the upload after the whole run
        from pet_pipeline.hub import check_hub_access

        check_hub_access(config.hub_model_id, ask_the_hub=int(os.environ.get("RANK", "0")) == 0)
    return data_config


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = None
    try:
        config = load_config(argv)
        return train(config, argv)
    except UserError as error:
        exit_with(error)
    except StoppedBeforeTraining as stop:
        exit_code = stop_exit_code(str(stop))
        print(f"stopped on {stop} before the first step: nothing to save; rerun the same "
              f"command to start (exit status {exit_code})", file=sys.stderr, flush=True)
        return exit_code
    except KeyboardInterrupt:  # Ctrl-C before the run set its own handler (imports, checks)
        print(f"stopped on SIGINT before the run started: nothing to save (exit status "
              f"{INTERRUPTED_EXIT_CODE})", file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT_CODE
    except StoppedWhileClosing as stop:
        exit_code = stop_exit_code(str(stop))
        print(f"stopped on {stop} while closing the run (W&B's upload, the Hub push): the run is "
              f"saved in {config.output_dir}; `wandb sync` uploads W&B's files later, and "
              f"`python evaluate.py --push_to_hub` the model (exit status {exit_code})",
              file=sys.stderr, flush=True)
        return exit_code
    except QuitWithoutSaving:
        print(f"quit on a second Ctrl-C without saving; {_what_is_kept(config)}", file=sys.stderr,
              flush=True)
        return INTERRUPTED_EXIT_CODE


def _what_is_kept(config: Config) -> str:
    """What a rerun resumes from, said after a quit: the newest complete checkpoint."""
    from pet_pipeline.checkpoint import list_checkpoints

    again = "the same command" if config.resume == "auto" else "the command with resume: auto"
    kept = list_checkpoints(config.output_dir)
    if not kept:
        return f"no checkpoint was complete yet: {again} starts the run again"
    return f"{kept[-1].name} is complete: {again} resumes from it"


if __name__ == "__main__":
    raise SystemExit(main())
