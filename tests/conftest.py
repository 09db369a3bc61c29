"""Shared test fixtures: offline env, the ../shared/data location, one session-scoped Prefect harness."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest


def _session_dir(var: str, prefix: str) -> None:
    """``var`` -> a fresh temporary folder for this test session, removed when it ends (unless the caller set it)."""
    if not os.environ.get(var):
        os.environ[var] = tempfile.mkdtemp(prefix=prefix)
        atexit.register(shutil.rmtree, os.environ[var], ignore_errors=True)


# Before anything imports prefect/transformers: offline, quiet, a private Prefect home.
_session_dir("PREFECT_HOME", "enrich-prefect-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "90"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
_session_dir("ENRICH_ONNX_CACHE", "enrich-onnx-")  # exported towers, per session

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ENRICH_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"public dataset not available: {path} is absent (set ENRICH_SHARED_DATA to its folder)")
    return path


@pytest.fixture(scope="session", autouse=True)
def single_torch_thread():
    """Tiny models on a 2-core box: intra-op threading costs far more than it saves (flows that train set their
    own thread count for the duration of training)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def prefect_harness():
    """One ephemeral Prefect API for the whole session (cold start ~20 s, so never per test)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def moto_s3(monkeypatch, tmp_path):
    """A local S3 (moto) on 127.0.0.1 with dummy credentials -> (boto3 client, endpoint URL).

    moto runs in its own process: delta-rs calls hold the GIL while they wait on the network, so an in-process
    (threaded) moto server would never get to answer them.
    """
    import socket
    import subprocess
    import sys
    import time

    import boto3

    for var, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(var, value)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "moto.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"moto server did not start; see {tmp_path / 'moto.log'}") from None
                time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        yield boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1"), endpoint
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@contextlib.contextmanager
def mlflow_server(uri: str):
    """``mlflow server`` on a free loopback port over the store ``uri`` (lean: one worker, no job execution) -> its
    base URL, once /health answers."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port",
         str(port), "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError("mlflow server did not come up on 127.0.0.1 within 90 s") from None
                time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        proc.wait(20)


def http_json(url: str, payload: dict | None = None) -> dict:
    """GET (or POST ``payload``) ``url`` -> the JSON answer."""
    import json
    import urllib.request

    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())
