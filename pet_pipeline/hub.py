"""The Hugging Face Hub: the start-up check, the model card, and the upload.

    check_hub_access("user/pets-coatnet")              # before any heavy work; UserError if not
    write_model_card(run / "model", architecture=..., metrics=..., run_config=..., ...)
    url = push_folder(run / "model", repo_id="user/pets-coatnet", private=True, commit_message=...)

Every run writes the card (README.md, with confusion_matrix.png) into its model/ folder;
`push_to_hub: true` uploads that folder at the end, and `evaluate.py --push_to_hub` exports
an existing model with a card of its evaluation and uploads it the same way. The card is a
huggingface_hub ModelCard: YAML metadata (library timm, license, datasets, metrics, the
results as model-index) above the test results, the data and the training config.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from pet_pipeline.errors import UserError

CARD_FILE = "README.md"
CONFUSION_MATRIX_FILE = "confusion_matrix.png"
DATASET_NAME = "Oxford-IIIT Pet"
# Keys of the training config left out of a card that may be public: local paths (and
# resume, which may be one).
PRIVATE_KEYS = ("data_dir", "pretrained_path", "output_dir", "resume")
UPLOAD_LATER = ("set push_to_hub: false and upload later with `python evaluate.py --model_dir "
                "RUN/model --push_to_hub --hub_model_id ID` from a machine that can reach the Hub")


# ----------------------------------------------------------------------------- start-up check


def check_hub_access(repo_id: str, *, ask_the_hub: bool = True) -> None:
    """Before training: the repo id is valid, the Hub is not switched off, a token is there
    and (`ask_the_hub`: one process per job, the Hub limits these calls) the Hub accepts it
    for writing. A missing credential or network ends the start in one sentence, not the
    finished run at its upload."""
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.utils import HfHubHTTPError, HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(f"hub_model_id: {repo_id!r} is not a Hub repo id; write it as user/name or "
                        "org/name (letters, digits, '-', '_', '.').") from None
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"push_to_hub: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, or "
                        f"{UPLOAD_LATER}.")
    token = get_token()
    if token is None:
        raise UserError("push_to_hub: no Hugging Face token was found; log in with `hf auth login` or "
                        f"set HF_TOKEN to a token with write access, or {UPLOAD_LATER}.")
    if not ask_the_hub:
        return
    try:
        identity = HfApi().whoami(token=token)
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        if status == 401:
            raise UserError("push_to_hub: the Hub refused the Hugging Face token (401); log in again "
                            "with `hf auth login --force` or set HF_TOKEN to a valid token with write "
                            "access.") from None
        return  # the Hub answered (rate limit, a server error): it can be reached
    except Exception as error:  # whatever the HTTP backend raises when the Hub can't be reached
        raise UserError(f"push_to_hub: the Hub can't be reached ({type(error).__name__}); check the "
                        f"network, or {UPLOAD_LATER}.") from None
    role = identity.get("auth", {}).get("accessToken", {}).get("role")
    if role == "read":
        raise UserError("push_to_hub: the Hugging Face token is read-only; log in with a token that has "
                        "write access (`hf auth login --force`), or set push_to_hub: false.")


# ----------------------------------------------------------------------------- the model card


def _metric_rows(metrics: dict) -> list[tuple[str, float]]:
    names = [("accuracy", "accuracy"), ("top5_accuracy", "top-5 accuracy"),
             ("macro_precision", "macro precision"), ("macro_recall", "macro recall"),
             ("macro_f1", "macro F1"), ("weighted_precision", "weighted precision"),
             ("weighted_recall", "weighted recall"), ("weighted_f1", "weighted F1"),
             ("expected_calibration_error", "expected calibration error")]
    return [(label, metrics[key]) for key, label in names if key in metrics]


@dataclass(frozen=True)
class _Source:
    """Where a run's images came from, in the card's words."""

    kind: str  # pets, imagefolder, csv or hf (pet_pipeline/sources.py)
    synthetic: bool  # generated images (`dataset: synthetic` without a data_dir)
    local: bool  # a data_dir
    hub_dataset: str | None  # the Hub dataset's id; None for local or generated images
    species: str
    classes: str  # how many of what: "12 cat breeds", "5 classes"
    location: str  # the data_dir or dataset key

    @classmethod
    def of(cls, run_config: dict, n_classes: int) -> _Source:
        data_dir, dataset = run_config.get("data_dir"), run_config.get("dataset", "")
        kind = _source_kind(run_config.get("data_format", "auto"), data_dir, dataset)
        synthetic = kind == "pets" and dataset == "synthetic" and not data_dir
        local = bool(data_dir) or Path(dataset).is_dir()
        species = run_config.get("species", "cat")
        kept = {"cat": "cat breeds", "dog": "dog breeds", "all": "breeds"}.get(species, "breeds")
        return cls(kind=kind, synthetic=synthetic, local=local,
                   hub_dataset=None if synthetic or local else dataset, species=species,
                   classes=f"{n_classes} {kept if kind == 'pets' else 'classes'}",
                   location=str(data_dir or dataset))

    @property
    def pets(self) -> bool:
        return self.kind == "pets"

    @property
    def eval_dataset(self) -> tuple[str, str]:
        """(name, type) of the evaluated dataset in the card's model-index."""
        if self.synthetic:
            return f"generated pet images ({self.classes})", "synthetic"
        if not self.pets:
            name = Path(self.location).name or self.location
            return f"{name} ({self.classes})", self.hub_dataset or self.kind
        return f"{DATASET_NAME} ({self.classes})", self.hub_dataset or "oxford-iiit-pet"

    @property
    def photos(self) -> str:
        """What the model learnt from."""
        if self.synthetic:
            return "generated images"
        return f"photos of {DATASET_NAME}, mostly one well-lit pet each" if self.pets else "images"

    @property
    def description(self) -> str:
        """The data section's "Source:"."""
        if self.synthetic:
            return ("generated images (`dataset: synthetic`), a check of the pipeline: the numbers "
                    "below say nothing about real pets")
        if not self.pets:
            what = {"imagefolder": "a folder of class folders", "csv": "a CSV of images and labels",
                    "hf": "a saved `datasets` folder" if self.local else "a Hub dataset"}[self.kind]
            return f"{what} (`{self.location}`)"
        if self.local:
            return f"a local copy of {DATASET_NAME}"
        return f"{DATASET_NAME} from the Hub (`{self.hub_dataset}`)"


def _source_kind(data_format: str, data_dir: str | None, dataset: str) -> str:
    """The run's data_format, `auto` resolved while its data is still there (else: the Pets)."""
    if data_format != "auto":
        return data_format
    from pet_pipeline.sources import detect_format

    try:
        return detect_format(data_dir, dataset)
    except UserError:  # the data has moved since: the card still says what it can
        return "pets"


def build_model_card(*, data_config: dict, metrics: dict, run_config: dict, split_sizes: dict,
                     architecture: str | None = None, class_names: list[str] | None = None,
                     evaluated_split: str = "test", repo_id: str | None = None, base_model: str | None = None,
                     license: str | None = None, has_confusion_matrix: bool = True):
    """The model card of a trained model, as a `huggingface_hub.ModelCard`.

    `metrics` is an eval/metrics.json (accuracy, top-5, macro and weighted P/R/F1, per class,
    n); `run_config` the training run's config; `split_sizes` images per split ("train",
    "val", "test"); `base_model` the Hub id of the weights training started from.
    `architecture` defaults to the run's `model`, `class_names` to the classes of `metrics`
    (its per-class rows, in the model's order).
    """
    from huggingface_hub import ModelCard

    run_config = dict(run_config)
    architecture = run_config["model"] if architecture is None else architecture
    class_names = list(metrics["per_class"]) if class_names is None else class_names
    source = _Source.of(run_config, len(class_names))
    model_name = repo_id.split("/")[-1] if repo_id else f"{architecture}-pets"
    metadata = _card_metadata(source, metrics, evaluated_split, model_name=model_name,
                              base_model=base_model, license=license)
    lines = [
        f"# {model_name}",
        "",
        f"A timm `{architecture}` {_how_trained(run_config)} with pet-pipeline to tell {source.classes} "
        f"{f'of {DATASET_NAME} ' if source.pets else ''}apart from "
        f"{'a photo' if source.pets else 'an image'}, at {data_config['input_size'][-1]} px.",
        "",
        *_how_to_use(repo_id),
        *_intended_use(len(class_names), source, split_sizes),
        *_data_section(source, run_config, split_sizes),
        *_results_section(metrics, evaluated_split, has_confusion_matrix,
                          a_class="breed" if source.pets else "class"),
        *_config_section(run_config),
    ]
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(lines))


def _card_metadata(source: _Source, metrics: dict, evaluated_split: str, *, model_name: str,
                   base_model: str | None = None, license: str | None = None):
    """The card's YAML metadata, with accuracy and macro F1 as its model-index results."""
    from huggingface_hub import EvalResult, ModelCardData

    dataset_name, dataset_type = source.eval_dataset
    results = [EvalResult(task_type="image-classification", dataset_type=dataset_type,
                          dataset_name=dataset_name, dataset_split=evaluated_split,
                          metric_type=metric_type, metric_name=label,
                          metric_value=round(float(metrics[key]), 4))
               for key, metric_type, label in (("accuracy", "accuracy", "accuracy"),
                                               ("macro_f1", "f1", "macro F1"))
               if key in metrics]
    return ModelCardData(
        library_name="timm", license=license or "apache-2.0", pipeline_tag="image-classification",
        tags=["image-classification", "timm", "pet-pipeline"],
        datasets=[source.hub_dataset] if source.hub_dataset else None,
        metrics=["accuracy", "f1", "precision", "recall"],
        base_model=base_model, model_name=model_name, eval_results=results,
    )


def _how_trained(run_config: dict) -> str:
    if "pretrained" not in run_config:  # no config.yaml to tell
        return "trained"
    if run_config["pretrained"] or run_config.get("pretrained_path"):
        return "fine-tuned from ImageNet weights"
    return "trained from scratch"


def _how_to_use(repo_id: str | None) -> list[str]:
    load_from = f"hf-hub:{repo_id}" if repo_id else "local-dir:PATH/TO/model"
    return [
        "## How to use",
        "",
        "```python",
        "import timm",
        "import torch",
        "from PIL import Image",
        "",
        f'model = timm.create_model("{load_from}", pretrained=True).eval()',
        "transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))",
        "with torch.no_grad():",
        '    probabilities = model(transform(Image.open("pet.jpg").convert("RGB"))[None]).softmax(dim=1)',
        'print(model.pretrained_cfg["label_names"][probabilities.argmax()])',
        "```",
        "",
    ]


def _intended_use(n_classes: int, source: _Source, split_sizes: dict) -> list[str]:
    if not source.pets:
        return [
            "## Intended use and limits",
            "",
            f"- Made to sort an image into one of the {n_classes} classes below.",
            "- It always answers one of those classes: it has no \"none of these\" class, so an "
            "image of something else still gets one, often with high confidence.",
            f"- It learnt from {split_sizes.get('train', 'a few')} images; expect lower accuracy on "
            "images unlike them. With few test images per class, the per-class numbers are rough.",
            "",
        ]
    return [
        "## Intended use and limits",
        "",
        f"- Made to name the breed of the one cat or dog in a photo, among the {n_classes} "
        "breeds below, for research, teaching and demonstrations.",
        "- It always answers one of those breeds: it has no \"none of these\" class, so a mixed "
        "breed, another breed or animal, or a photo without a pet still gets a breed, often "
        "with high confidence.",
        f"- It learnt from {split_sizes.get('train', 'a few')} {source.photos}; expect lower accuracy on "
        "other kinds of photos. With a few dozen test images per breed, the per-class numbers "
        "are rough.",
        "- Not for decisions about an animal's health, ownership, pedigree or value.",
        "",
    ]


def _data_section(source: _Source, run_config: dict, split_sizes: dict) -> list[str]:
    breeds, classes = run_config.get("breeds"), run_config.get("classes")
    if source.pets:
        data_filter = (f"`breeds`: {', '.join(breeds)}" if breeds
                       else f"`species: {source.species}` ({source.classes})")
    else:
        data_filter = f"`classes`: {', '.join(classes)}" if classes else f"none ({source.classes})"
    pool, per = ("trainval", "breed") if source.pets else ("the training images", "class")
    validation = (f"`val_fraction` {run_config.get('val_fraction')} of {pool}, stratified by {per} "
                  f"(seed {run_config.get('seed')}), for model selection" if split_sizes.get("val")
                  else "none (the last weights are the model)")
    test = ("the dataset's own test split" if source.pets else
            f"the data's own test split, or `test_fraction` {run_config.get('test_fraction', 0.2)} "
            "held out, stratified, when it has none")
    return [
        "## Data",
        "",
        f"Source: {source.description}. Filter: {data_filter}. Validation: {validation}. Test: "
        f"{test}.",
        "",
        "| split | images |",
        "|---|---|",
        *[f"| {name} | {count} |" for name, count in split_sizes.items()],
        "",
    ]


def _results_section(metrics: dict, evaluated_split: str, has_confusion_matrix: bool,
                     a_class: str = "breed") -> list[str]:
    lines = [
        f"## Results on the {evaluated_split} split ({metrics.get('n')} images)",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {label} | {value:.4f} |" for label, value in _metric_rows(metrics)],
        "",
        f"| {a_class} | precision | recall | F1 | images |",
        "|---|---|---|---|---|",
        *[f"| {name} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | {row['support']} |"
          for name, row in metrics.get("per_class", {}).items()],
        "",
    ]
    if has_confusion_matrix:
        lines += [f"![Confusion matrix on the {evaluated_split} split]({CONFUSION_MATRIX_FILE})", ""]
    return lines


def _config_section(run_config: dict) -> list[str]:
    public_config = {k: v for k, v in run_config.items() if k not in PRIVATE_KEYS}
    return [
        "## Training config",
        "",
        "The run's `config.yaml` (for `python train.py --config`), without the keys that may "
        f"hold local paths ({', '.join(k for k in PRIVATE_KEYS if k in run_config)}):",
        "",
        "```yaml",
        yaml.safe_dump(public_config, sort_keys=False).rstrip(),
        "```",
        "",
    ]


def base_weights(run_config: dict) -> tuple[str | None, str | None]:
    """(Hub id, license) of the ImageNet weights a run started from, as timm names them;
    no Hub id for a local weights file or a model trained from scratch."""
    import timm

    cfg = timm.models.get_pretrained_cfg(run_config.get("model", ""))
    if cfg is None:
        return None, None
    from_the_hub = run_config.get("pretrained") and not run_config.get("pretrained_path")
    return (cfg.hf_hub_id or None) if from_the_hub else None, cfg.license


def write_model_card(folder: str | Path, *, run_config: dict, data_config: dict, metrics: dict,
                     split_sizes: dict, architecture: str | None = None, class_names: list[str] | None = None,
                     evaluated_split: str = "test", repo_id: str | None = None,
                     confusion_matrix: str | Path | None = None) -> Path:
    """README.md (the card), and the confusion matrix it shows, beside the model files in
    `folder`; returns the card's path. `architecture` and `class_names` default as in
    `build_model_card`: the run's model, the classes of `metrics`."""
    folder = Path(folder)
    base_model, license = base_weights(run_config)
    has_matrix = confusion_matrix is not None and Path(confusion_matrix).is_file()
    card = build_model_card(architecture=architecture, class_names=class_names, data_config=data_config,
                            metrics=metrics, run_config=run_config, split_sizes=split_sizes,
                            evaluated_split=evaluated_split, repo_id=repo_id, base_model=base_model,
                            license=license, has_confusion_matrix=has_matrix)
    if has_matrix:
        shutil.copyfile(confusion_matrix, folder / CONFUSION_MATRIX_FILE)
    from pet_pipeline.files import replaced

    with replaced(folder / CARD_FILE, "w", newline="", encoding="utf-8") as handle:
        handle.write(str(card))  # what ModelCard.save writes, aside first
    return folder / CARD_FILE


# ----------------------------------------------------------------------------- the upload


def push_folder(folder: str | Path, *, repo_id: str, private: bool, commit_message: str,
                retry: str) -> str:
    """Create the repo if need be (private or not; an existing one keeps its visibility) and
    upload the folder's files in one commit; returns the commit's URL. A failure is a
    UserError that ends with `retry`, what to do to upload later."""
    from huggingface_hub import HfApi

    api = HfApi(library_name="pet-pipeline")
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo.repo_id, folder_path=str(folder),
                                   commit_message=commit_message, ignore_patterns=[".*"])
    except Exception as error:  # the network, the Hub, permissions: whatever the library raises
        why = str(error).splitlines()[0][:120] if str(error) else ""
        raise UserError(f"push_to_hub: the upload to {repo_id} failed ({type(error).__name__}: "
                        f"{why}); {retry}.") from None
    return commit.commit_url


def push_model_dir(out: str | Path, *, config, step: int) -> str:
    """A finished run's model/ (weights, timm's config.json, the model card), in one commit."""
    out = Path(out)
    later = (f"python evaluate.py --model_dir {out / 'model'} --push_to_hub "
             f"--hub_model_id {config.hub_model_id}")
    return push_folder(out / "model", repo_id=config.hub_model_id, private=config.hub_private,
                       commit_message=f"pet-pipeline: {config.model}, step {step}",
                       retry=f"the run is complete in {out}; upload it with `{later}`")
