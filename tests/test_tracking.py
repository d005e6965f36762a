"""W&B with credentials but no server to reach: the run waits a bounded time, logs offline into
the same run id and folder, says so in one line, and trains to the end; `wandb_required: true`
refuses instead, before any heavy work.

Two local servers stand in for the unreachable one: a port that refuses connections, and a
socket that accepts and never answers. No network is used.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import torch  # noqa: F401 (imported here, not inside the timed refusals below)
from conftest import TINY, ok, refused, train_in_subprocess

sys.path.insert(0, str(Path(__file__).parent))
from wandb_offline import read_offline_run  # noqa: E402

INIT_TIMEOUT_S = 4


@pytest.fixture
def refusing_server():
    """A W&B base URL whose port refuses every connection at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there now


@pytest.fixture
def silent_server():
    """A W&B base URL that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])  # kept open, never read nor answered
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    server.close()


def online_with_a_key(base_url: str) -> dict:
    return {"WANDB_MODE": "online", "WANDB_API_KEY": "k" * 40, "WANDB_BASE_URL": base_url}


RUN = {**TINY, "max_steps": 3, "report_to": "wandb", "wandb_init_timeout_s": INIT_TIMEOUT_S}


@pytest.mark.parametrize("server", ["refusing_server", "silent_server"])
def test_an_unreachable_server_costs_a_bounded_wait_then_the_run_logs_offline(tmp_path, env, server,
                                                                             request):
    """A process of its own: W&B keeps its settings (the server's URL) in a service for the
    life of the process that first started it."""
    base_url = request.getfixturevalue(server)
    out = tmp_path / "run"
    started = time.time()
    result = train_in_subprocess({**RUN, "output_dir": out}, {**env, **online_with_a_key(base_url)})
    elapsed = time.time() - started
    ok(result)
    lines = [line for line in result.stdout.splitlines() if line.startswith("W&B server")]
    assert len(lines) == 1, result.stdout[-3000:]
    assert lines[0].startswith(f"W&B server {base_url} unreachable after {INIT_TIMEOUT_S} s (")
    assert "logging offline to" in lines[0] and "upload later with `wandb sync " in lines[0]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    # the wait is W&B's init timeout, not its default 90 s and a crash (what it was before)
    assert elapsed < INIT_TIMEOUT_S + 60, f"{elapsed:.0f} s"
    (run_file,) = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
    logged = read_offline_run(run_file)
    assert [h["_step"] for h in logged["history"] if "train_loss" in h] == [1, 2, 3]
    assert "test_accuracy" in set().union(*[h.keys() for h in logged["history"]])
    assert "W&B ran offline; upload with: wandb sync" in result.stdout


@pytest.mark.parametrize("server", ["refusing_server", "silent_server"])
def test_wandb_required_refuses_an_unreachable_server_before_any_heavy_work(tmp_path, train_run, server,
                                                                           request):
    base_url = request.getfixturevalue(server)
    out = tmp_path / "run"
    started = time.time()
    line = refused(train_run({**RUN, "wandb_required": True, "output_dir": out},
                             env=online_with_a_key(base_url)),
                   f"wandb_required: the W&B server {base_url} did not answer within {INIT_TIMEOUT_S} s",
                   "wandb_required: false")
    assert "wandb sync" in line
    assert time.time() - started < INIT_TIMEOUT_S + 10
    assert not out.exists(), "refused after the run had started"


def test_wandb_required_refuses_to_log_offline(tmp_path, train_run):
    """No key, or WANDB_MODE=offline: the run could only log offline, which was ruled out."""
    out = tmp_path / "run"
    required = {**RUN, "wandb_required": True, "output_dir": out}
    refused(train_run(required, env={"WANDB_MODE": "offline", "WANDB_API_KEY": "k" * 40}),
            "W&B would log offline here (WANDB_MODE=offline)")
    refused(train_run(required, env={"WANDB_MODE": ""}), "W&B would log offline here (no W&B login")
    refused(train_run({**RUN, "wandb_required": True, "report_to": "tensorboard", "output_dir": out}),
            "wandb_required: true means nothing with report_to: tensorboard")
    assert not out.exists()


def test_the_w_and_b_keys_may_change_when_a_run_resumes():
    """How long to wait for W&B, and whether it must be online, does not change what is trained."""
    from pet_pipeline.rundir import config_changes

    before = {"wandb_init_timeout_s": 30.0, "wandb_finish_timeout_s": 300.0, "wandb_required": False}
    after = {"wandb_init_timeout_s": 5.0, "wandb_finish_timeout_s": 0.0, "wandb_required": True}
    refused_keys, accepted = config_changes(before, after)
    assert not refused_keys and set(accepted) == set(after)


def test_wandb_required_bounds_a_name_lookup_that_never_answers(monkeypatch):
    """urlopen's timeout does not cover the DNS lookup: a resolver that hangs must cost the
    check its timeout, not the resolver's minutes."""
    import socket

    from pet_pipeline.errors import UserError
    from pet_pipeline.tracking import check_wandb_online

    def hanging_lookup(*args, **kwargs):
        time.sleep(30)
        raise socket.gaierror("never answered")

    monkeypatch.setattr(socket, "getaddrinfo", hanging_lookup)
    for key, value in online_with_a_key("http://wandb.invalid").items():
        monkeypatch.setenv(key, value)
    started = time.time()
    with pytest.raises(UserError, match=r"did not answer within 1 s \(no answer, not even to the name "
                                        r"lookup\)"):
        check_wandb_online(1)
    assert time.time() - started < 5
