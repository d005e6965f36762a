"""push_to_hub: without a token, a network or a repo id, train.py and evaluate.py stop at
start-up in one sentence, before any data or training. Offline: nothing is uploaded here
(the card's content is checked on a real run in test_evaluate.py)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "synthetic", "--model", "coatnet_nano_rw_224", "--pretrained", "false",
        "--image_size", "64", "--report_to", "none", "--num_workers", "0"]


def closed_port() -> int:
    """A local port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def hub_env(tmp_path):
    """No token anywhere (an empty HF_HOME, no HF_TOKEN), the Hub switched on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), PET_PIPELINE_CACHE=str(tmp_path / "cache"))
    return env


CASES = {
    "offline": ({"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_not_a_real_token"}, "HF_HUB_OFFLINE is set"),
    "no token": ({}, "no Hugging Face token"),
    "no network": ({"HF_TOKEN": "hf_not_a_real_token", "HF_ENDPOINT": "http://127.0.0.1:{port}"},
                   "the Hub can't be reached"),
}


def one_error_line(result) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


@pytest.mark.parametrize("case", list(CASES))
def test_train_py_without_hub_access_stops_before_training(hub_env, tmp_path, case):
    extra, message = CASES[case]
    env = {**hub_env, **{k: v.format(port=closed_port()) for k, v in extra.items()}}
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, "--output_dir", str(out),
                             "--push_to_hub", "true", "--hub_model_id", "someone/pets-coatnet"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    error = one_error_line(result)
    assert "push_to_hub" in error and message in error, error
    assert not out.exists(), "the run started before the check"  # not even the lock was taken
    assert not (tmp_path / "cache").exists(), "data was made before the check"


def test_push_to_hub_needs_a_repo_id(hub_env, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, "--push_to_hub",
                             "--output_dir", str(tmp_path / "run")],
                            cwd=tmp_path, env=hub_env, capture_output=True, text=True, timeout=300)
    assert "hub_model_id" in one_error_line(result)
    assert not (tmp_path / "run").exists()


def test_evaluate_py_without_hub_access_stops_before_evaluating(hub_env, tmp_path):
    """The model folder is not even read: the check comes first."""
    model_dir = tmp_path / "run" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps({}))
    result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--model_dir", str(model_dir),
                             "--push_to_hub", "--hub_model_id", "someone/pets-coatnet"],
                            cwd=tmp_path, env={**hub_env, "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_x"},
                            capture_output=True, text=True, timeout=300)
    error = one_error_line(result)
    assert "push_to_hub" in error and "HF_HUB_OFFLINE" in error, error
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model"]  # no eval_test/


def test_hub_keys_may_change_when_a_run_resumes():
    """Where a model goes does not change what is trained."""
    from pet_pipeline.rundir import config_changes

    before = {"push_to_hub": False, "hub_model_id": None, "hub_private": True, "lr": 1e-4}
    after = {"push_to_hub": True, "hub_model_id": "someone/pets", "hub_private": False, "lr": 1e-4}
    refused, accepted = config_changes(before, after)
    assert not refused and set(accepted) == {"push_to_hub", "hub_model_id", "hub_private"}


def test_evaluate_py_uploads_an_older_model_folder_in_timms_format_with_its_card(tmp_path, monkeypatch):
    """evaluate.py --push_to_hub exports what it evaluated: a model/ folder of an earlier
    version (config.json without model_args) goes up in timm's format, with the card of
    this evaluation; `hf-hub:` on what the Hub would then serve predicts as the model."""
    import importlib.util

    import numpy as np
    import timm
    import torch
    from huggingface_hub import ModelCard, constants
    from safetensors.torch import save_file

    import pet_pipeline.hub
    from pet_pipeline.breeds import CAT_BREEDS
    from pet_pipeline.config import EvalConfig
    from pet_pipeline.evaluation import Predictions, compute_metrics
    from pet_pipeline.model import build_model, load_trained_model
    from pet_pipeline.transforms import model_data_config

    torch.manual_seed(0)
    source = build_model("coatnet_nano_rw_224", num_classes=len(CAT_BREEDS), pretrained=False,
                         image_size=32).eval()
    model_dir = tmp_path / "run" / "model"
    model_dir.mkdir(parents=True)
    weights = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(weights, str(model_dir / "model.safetensors"))
    data_config = model_data_config("coatnet_nano_rw_224", 32)
    (model_dir / "config.json").write_text(json.dumps({  # the layout written before timm's
        "architecture": "coatnet_nano_rw_224", "num_classes": len(CAT_BREEDS),
        "label_names": list(CAT_BREEDS),
        "pretrained_cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}}))
    report = tmp_path / "run" / "eval_test"
    report.mkdir()
    (report / "confusion_matrix.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(len(CAT_BREEDS)), size=24)
    metrics = compute_metrics(Predictions(probabilities, rng.integers(0, 12, size=24), np.arange(24)),
                              list(CAT_BREEDS))

    uploaded = {}
    hub_cache = tmp_path / "hub-cache"
    repo = hub_cache / "models--someone--pets-coatnet"

    def push_folder(folder, **kwargs):  # instead of the upload: the Hub's files, as a download caches them
        uploaded.update(kwargs, files=sorted(p.name for p in Path(folder).iterdir()))
        shutil.copytree(folder, repo / "snapshots" / ("0" * 40))
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0" * 40)
        return "https://huggingface.co/someone/pets-coatnet/commit/0"

    monkeypatch.setattr(pet_pipeline.hub, "push_folder", push_folder)
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model, description = load_trained_model(model_dir)
    config = EvalConfig(model_dir=str(model_dir), push_to_hub=True, hub_model_id="someone/pets-coatnet")
    script.push_evaluated_model(config, model, description, metrics=metrics, report_dir=report,
                                run_data={"dataset": "synthetic", "val_fraction": 0.1, "seed": 0},
                                split_sizes={"train": 80, "val": 16, "test": 24})

    assert uploaded["files"] == ["README.md", "config.json", "confusion_matrix.png", "model.safetensors"]
    assert uploaded["repo_id"] == "someone/pets-coatnet" and uploaded["private"] is True
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # from the cache, never the network
    pushed = timm.create_model("hf-hub:someone/pets-coatnet", pretrained=True).eval()
    assert timm.data.resolve_model_data_config(pushed)["input_size"] == (3, 32, 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pushed(x), source(x), rtol=0, atol=0)
    assert pushed.pretrained_cfg["label_names"] == list(CAT_BREEDS)
    card = ModelCard.load(next(repo.glob("snapshots/*/README.md")))
    (accuracy,) = [r for r in card.data.eval_results if r.metric_type == "accuracy"]
    assert accuracy.metric_value == round(metrics["accuracy"], 4)
    assert 'timm.create_model("hf-hub:someone/pets-coatnet", pretrained=True)' in card.text
    assert "| test | 24 |" in card.text


class FakeHub:
    """A local HTTP server that answers /api/whoami-v2 as the Hub would for one token, knows
    no repo, and refuses (403) every POST, such as creating one; `posted` lists their paths."""

    def __init__(self, status: int, role: str | None):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        posted = self.posted = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the http.server name
                posted.append(self.path)
                body = json.dumps({"error": "You don't have the rights to create this repo"}).encode()
                self.send_response(403)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802
                if not self.path.startswith("/api/whoami-v2"):
                    answer, body = 404, json.dumps({"error": "Repository not found"}).encode()
                else:
                    answer, body = status, json.dumps(
                        {"name": "someone", "auth": {"accessToken": {"role": role}}} if status == 200
                        else {"error": "Invalid credentials"}).encode()
                self.send_response(answer)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.mark.parametrize("status, role, message", [
    (401, None, "refused the Hugging Face token"),
    (200, "read", "read-only"),
    (200, "write", None),
])
def test_the_start_up_check_asks_the_hub_about_the_token(monkeypatch, status, role, message):
    from huggingface_hub import constants

    from pet_pipeline.errors import UserError
    from pet_pipeline.hub import check_hub_access

    hub = FakeHub(status, role)
    try:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
        if message is None:
            check_hub_access("someone/pets-coatnet")
        else:
            with pytest.raises(UserError, match=message):
                check_hub_access("someone/pets-coatnet")
    finally:
        hub.server.shutdown()


def test_a_malformed_repo_id_is_refused_before_the_hub_is_asked():
    from pet_pipeline.errors import UserError
    from pet_pipeline.hub import check_hub_access

    with pytest.raises(UserError, match="hub_model_id: 'someone/pets/coatnet' is not a Hub repo id"):
        check_hub_access("someone/pets/coatnet")


@pytest.mark.slow
def test_a_failed_upload_at_the_end_keeps_the_run_and_says_how_to_upload_later(hub_env, tmp_path):
    """The start-up check passes (a write token), the upload at the end is refused: the run
    is complete on disk, card included, and one sentence gives the command that uploads it."""
    hub, hub_id = FakeHub(200, "write"), "someone/pets-coatnet"
    out = tmp_path / "run"
    tiny = ["--dataset", "synthetic", "--synthetic_images_per_class", "4", "--synthetic_image_size", "32",
            "--model", "test_resnet", "--pretrained", "false", "--image_size", "32", "--epochs", "1",
            "--batch_size", "8", "--val_fraction", "0.5", "--report_to", "none", "--num_workers", "0",
            "--gradcam_images", "0", "--output_dir", str(out)]
    try:
        result = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *tiny, "--push_to_hub", "--hub_model_id",
             "someone/pets-coatnet"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
            env={**hub_env, "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_not_a_real_token",
                 "OMP_NUM_THREADS": "2"})
    finally:
        hub.server.shutdown()
    error = one_error_line(result)
    assert "push_to_hub: the upload to someone/pets-coatnet failed" in error, error
    later = f"python evaluate.py --model_dir {out / 'model'} --push_to_hub --hub_model_id {hub_id}"
    assert later in error, error
    assert hub.posted and all(path.startswith("/api/repos/create") for path in hub.posted), hub.posted
    assert "test accuracy" in result.stdout  # the run finished before the upload
    assert {"model.safetensors", "config.json", "README.md", "confusion_matrix.png"} <= {
        p.name for p in (out / "model").iterdir()}
