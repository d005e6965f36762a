"""Top-k predictions of a trained model for new photos (files, folders, globs), to CSV or JSON.

    python predict.py --model_dir runs/quickstart/model photos/ --output predictions.csv
    python predict.py --model_dir runs/x/model cat.jpg 'more/**/*.png' --top_k 3 --output out.jsonl
    python predict.py --model_dir runs/x/checkpoints/step_00000120 photos/ --tta flip --gradcam cams/
    python predict.py --model_dir hf-hub:you/pets-coatnet photos/ --output predictions.json
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 predict.py --model_dir runs/x/model photos/
    accelerate launch --config_file accelerate_config.yaml predict.py --model_dir runs/x/model photos/

`--model_dir` is what evaluate.py takes (a run's model/ folder or one of its checkpoints/step_N
folders), or timm's `local-dir:PATH` and `hf-hub:org/name`. A folder is searched recursively,
its images sorted; a glob is expanded by Python (quote it for `**`). One row an image, in the
order given: `path`, `label`, `probability`, `label_2`, `probability_2`, ... up to `--top_k`,
and `error`, the reason a file could not be read (its other cells empty). Images are read and
transformed exactly as evaluate.py reads them, so the two agree on a file; every process count
gives the same rows, each image once.
"""

from __future__ import annotations

import sys

from pet_pipeline.config import PredictConfig, load_predict_config
from pet_pipeline.errors import UserError, exit_with
from pet_pipeline.predict import check_model_source, check_output_file, check_output_folder, find_images

# torch, timm and the rest are imported in predict(), so that `--help`, a mistyped key and a
# wrong path answer in a fraction of a second instead of after ~8 s.


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_predict_config(sys.argv[1:] if argv is None else argv)
        paths = check_before_heavy_work(config)
        return predict(config, paths)
    except UserError as error:
        exit_with(error)


def check_before_heavy_work(config: PredictConfig) -> list[str]:
    """The model folder, the images, the output file and the Grad-CAM folder, without torch;
    returns the image paths in order."""
    check_model_source(config.model_dir)
    paths = find_images(config.inputs)
    check_output_file(config.output)
    if config.gradcam:
        check_output_folder(config.gradcam)
    return paths


def predict(config: PredictConfig, paths: list[str]) -> int:
    """Every image through the model on every rank; the main process writes the rows (and the
    Grad-CAM overlays). Returns the exit status."""
    from accelerate import Accelerator

    from pet_pipeline.loader import build_dataloader, default_num_workers
    from pet_pipeline.predict import ImageFiles, load_model, predict_files, prediction_rows, write_rows

    # ------------------------------------------------------------------ model, accelerator, images
    model, class_names, data_config = load_model(config.model_dir)
    top_k = min(config.top_k, len(class_names))
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    images = ImageFiles(paths, data_config)
    num_workers = config.num_workers if config.num_workers is not None else default_num_workers()
    loader = build_dataloader(images, batch_size=config.batch_size, train=False, seed=0,
                              num_workers=num_workers, pin_memory=accelerator.device.type == "cuda")
    if accelerator.device.type == "cuda":  # as evaluate.py: the faster layout for convolutions
        import torch

        model = model.to(memory_format=torch.channels_last)
    model, loader = accelerator.prepare(model, loader)

    # ------------------------------------------------------------------ prediction
    accelerator.print(f"predicting {len(paths)} image(s) with {config.model_dir} ({len(class_names)} "
                      f"classes, tta {config.tta}) on {accelerator.num_processes} process(es)")
    probabilities, readable = predict_files(model, loader, accelerator, count=len(paths), tta=config.tta)

    # ------------------------------------------------------------------ rows (main process)
    if accelerator.is_main_process:
        reasons = {i: images.why_unreadable(i) for i in range(len(paths)) if not readable[i]}
        rows = prediction_rows(paths, probabilities, class_names=class_names, top_k=top_k,
                               reasons=reasons)
        write_rows(rows, config.output)
        print(f"wrote {len(rows)} row(s), top {top_k}, to {config.output}")
        for i, reason in list(reasons.items())[:10]:
            print(f"could not read {paths[i]}: {reason}")
        if len(reasons) > 10:
            print(f"... {len(reasons) - 10} more unreadable file(s); the error column names them all")
        if config.gradcam:  # of the top class, for every readable image
            targets = {i: int(probabilities[i].argmax()) for i in range(len(paths)) if i not in reasons}
            write_gradcams(config, accelerator, model, images, targets)
    accelerator.end_training()
    return 0


def write_gradcams(config: PredictConfig, accelerator, model, images, targets: dict[int, int]) -> None:
    """A Grad-CAM overlay into config.gradcam for each position -> class of `targets`."""
    from pet_pipeline.predict import save_gradcams

    count = save_gradcams(accelerator.unwrap_model(model, keep_torch_compile=False), images, targets,
                          config.gradcam, batch_size=config.batch_size)
    print(f"wrote {count} Grad-CAM overlay(s) to {config.gradcam}")


if __name__ == "__main__":
    raise SystemExit(main())
