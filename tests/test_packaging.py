"""The package as users install it: a wheel built from the source, in an environment where
the checkout is not importable and the `evaluate` library lies beside pet_pipeline."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Run inside the new environment, from a folder that holds a copy of the project's
# evaluate.py script (as the checkout does) but no pet_pipeline.
CHECK_WHEEL = """
import json, sys
from pathlib import Path

import numpy as np

import pet_pipeline
from pet_pipeline.evaluation import Predictions, write_report
from pet_pipeline.metrics import compute_with_evaluate, evaluate

site_packages = Path(sys.argv[1]).resolve()
assert Path(pet_pipeline.__file__).resolve().is_relative_to(site_packages), pet_pipeline.__file__
assert Path(evaluate.__file__).resolve().parent.name == "evaluate", evaluate.__file__
rng = np.random.default_rng(0)
probabilities = rng.dirichlet(np.ones(7), size=40)
labels = rng.integers(0, 7, size=40)
metrics = compute_with_evaluate(labels, probabilities.argmax(axis=1), probabilities)
report = write_report(Path(sys.argv[2]), Predictions(probabilities, labels, np.arange(40)),
                      [f"breed_{k}" for k in range(7)], [f"image_{i}" for i in range(40)])
print(json.dumps({"metrics": metrics, "report_accuracy": report["accuracy"],
                  "expected_accuracy": float(np.mean(probabilities.argmax(axis=1) == labels))}))
"""


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """(python, its site-packages, a work folder): a fresh environment with the wheel built
    from a copy of the source installed into its site-packages, and the dependencies of this
    environment linked in beside it (no download), without this checkout or its editable hook."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"  # a copy: building must not leave build/ in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "pet_pipeline", source / "pet_pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(work / "dist"), str(source)], check=True, timeout=300)
    (wheel,) = (work / "dist").glob("pet_pipeline-*.whl")

    environment = work / "env"
    venv.create(environment, with_pip=False)
    python = environment / "bin" / "python"
    site_packages = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(("pet_pipeline", "__editable__", "_pet_pipeline")):
            (site_packages / entry.name).symlink_to(entry)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                    "--target", str(site_packages), str(wheel)], check=True, timeout=300)
    return python, site_packages, work


def clean_env(work: Path) -> dict:
    return {"PATH": "/usr/bin:/bin", "HOME": str(work), "HF_HOME": str(work / "hf"),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PET_PIPELINE_CACHE": str(work / "cache"),
            "OMP_NUM_THREADS": "2"}


@pytest.mark.slow
def test_the_built_wheel_imports_and_computes_metrics_outside_the_checkout(wheel_env, tmp_path):
    """`pip install .` puts pet_pipeline in site-packages next to `evaluate`: importing the
    metrics must not depend on where the package lies (it once dropped site-packages from
    sys.path to dodge the project's evaluate.py, and failed with "No module named 'evaluate'")."""
    python, site_packages, work = wheel_env
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    shutil.copy(ROOT / "evaluate.py", scripts / "evaluate.py")  # the name clash, as in the checkout
    (scripts / "check_wheel.py").write_text(CHECK_WHEEL)
    result = subprocess.run([str(python), str(scripts / "check_wheel.py"), str(site_packages),
                             str(tmp_path / "report")], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env=clean_env(work))
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["metrics"]["accuracy"] == pytest.approx(out["expected_accuracy"])
    assert out["report_accuracy"] == pytest.approx(out["expected_accuracy"])
    for key in ("top5_accuracy", "macro_f1", "weighted_precision"):
        assert 0 <= out["metrics"][key] <= 1, key
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["n"] == 40


@pytest.mark.slow
def test_train_and_evaluate_scripts_run_against_the_installed_wheel(wheel_env, tmp_path):
    """The scripts outside the checkout, beside no pet_pipeline: a tiny run through its
    validation (where the installed package used to crash), its report, and evaluate.py."""
    python, site_packages, work = wheel_env
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for name in ("train.py", "evaluate.py"):
        shutil.copy(ROOT / name, scripts / name)
    out = tmp_path / "run"
    tiny = ["--dataset", "synthetic", "--synthetic_images_per_class", "4", "--synthetic_image_size", "32",
            "--model", "test_resnet", "--pretrained", "false", "--image_size", "32", "--epochs", "1",
            "--batch_size", "8", "--val_fraction", "0.5", "--report_to", "none", "--num_workers", "0",
            "--gradcam_images", "0", "--output_dir", str(out)]
    trained = subprocess.run([str(python), str(scripts / "train.py"), *tiny], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600, env=clean_env(work))
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "val accuracy" in trained.stdout
    reported = json.loads((out / "eval" / "metrics.json").read_text())
    evaluated = subprocess.run([str(python), str(scripts / "evaluate.py"), "--model_dir", str(out / "model"),
                                "--gradcam_images", "0", "--num_workers", "0",
                                "--output_dir", str(tmp_path / "again")],
                               cwd=tmp_path, capture_output=True, text=True, timeout=600, env=clean_env(work))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["n"] == reported["n"] and again["accuracy"] == reported["accuracy"]
