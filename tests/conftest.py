"""Shared test fixtures: offline env, the ../shared/data location, one session-scoped Prefect harness."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Before anything imports prefect/transformers: offline, quiet, a private Prefect home.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="enrich-prefect-"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "90"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ENRICH_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"public dataset not available: {path} is absent (set ENRICH_SHARED_DATA to its folder)")
    return path


@pytest.fixture(scope="session")
def prefect_harness():
    """One ephemeral Prefect API for the whole session (cold start ~20 s, so never per test)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield
