"""MLflow plumbing: the embedded sqlite store, safe params, and the @champion rule."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    from flows import tracking

    tracking.setup("test-exp", root=tmp_path)
    return tmp_path


def _version(name: str) -> str:
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    with contextlib.suppress(mlflow.exceptions.MlflowException):
        client.create_registered_model(name)
    with mlflow.start_run() as run:
        mlflow.log_param("x", 1)
    return client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id).version


def test_champion_moves_only_when_better_on_same_eval_set(store):
    from mlflow import MlflowClient

    from flows.tracking import champion, promote_if_better

    with pytest.raises(LookupError, match="enrich train jave"):
        champion("jave")
    v1, v2, v3, v4 = (_version("jave") for _ in range(4))
    assert promote_if_better("jave", v1, metric="f1", value=0.80, eval_set="ae-110k/test").promoted
    assert str(champion("jave").version) == str(v1)
    worse = promote_if_better("jave", v2, metric="f1", value=0.79, eval_set="ae-110k/test")
    assert not worse.promoted and "does not beat" in worse.reason
    other = promote_if_better("jave", v3, metric="f1", value=0.99, eval_set="oa-mine/test")
    assert not other.promoted and "not comparable" in other.reason
    assert str(champion("jave").version) == str(v1)
    better = promote_if_better("jave", v4, metric="f1", value=0.85, eval_set="ae-110k/test")
    assert better.promoted and better.previous_version == str(v1)
    assert str(champion("jave").version) == str(v4)
    assert MlflowClient().get_model_version("jave", v2).tags["eval_value"] == "0.79"


def test_flat_params_drops_secrets_and_flattens():
    from flows.tracking import flat_params

    @dataclass(frozen=True)
    class Inner:
        lr: float = 0.1
        api_key: str = "sk-123"

    @dataclass(frozen=True)
    class Outer:
        name: str = "jave"
        inner: Inner = Inner()
        aws_secret_access_key: str = "shh"

    params = flat_params(Outer())
    assert params == {"name": "jave", "inner.lr": "0.1"}


def test_embedded_store_layout(store):
    import mlflow

    assert mlflow.get_tracking_uri().startswith("sqlite:///")
    with mlflow.start_run() as run:
        mlflow.log_text("hello", "a.txt")
    assert run.info.artifact_uri.startswith((store / "artifacts").as_uri())
    assert (store / "artifacts").is_dir()


def test_relative_sqlite_uri_keeps_artifacts_beside_the_database(tmp_path, monkeypatch):
    """``MLFLOW_TRACKING_URI=sqlite:///data/mlflow.db`` (relative to the working directory) is a valid store: runs
    log, and their artifacts land beside the database (it used to fail: "relative path can't be expressed as a
    file URI")."""
    import mlflow

    from flows import tracking

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///data/mlflow.db")
    tracking.setup("relative-exp")
    with mlflow.start_run() as run:
        mlflow.log_text("hello", "a.txt")
    assert (tmp_path / "data" / "mlflow.db").is_file()
    assert run.info.artifact_uri.startswith((tmp_path / "data" / "artifacts").as_uri())
    assert (tmp_path / "data" / "artifacts").is_dir()
