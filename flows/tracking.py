"""MLflow plumbing shared by every flow: the local store, experiments, safe params, and the @champion rule.

Embedded default: ``sqlite:///mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts`` (MLflow 3 refuses the
old ``./mlruns`` file store). ``MLFLOW_TRACKING_URI`` points elsewhere (e.g. the compose stack's server).

The champion rule: a registered model's ``@champion`` alias moves to a new version only when that version's
selection metric beats the current champion's **on the same evaluation set** (the version tags ``eval_set`` and
``eval_metric`` / ``eval_value`` record what it was scored on). With no champion, the first version becomes it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

CHAMPION = "champion"
_SECRET = re.compile(r"(secret|password|passwd|token|credential|api[_-]?key|access[_-]?key)", re.IGNORECASE)


def tracking_uri(root: str | os.PathLike | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` or the embedded sqlite store under ``root`` (default ``./mlruns``)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = Path(root or "mlruns").absolute()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def artifact_root(root: str | os.PathLike | None = None) -> str | None:
    """Where new experiments keep artifacts: ``mlruns/artifacts`` for the embedded store, the server's default else."""
    if os.environ.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://")):
        return None
    base = Path(root or "mlruns").absolute()
    if os.environ.get("MLFLOW_TRACKING_URI", "").startswith("sqlite:///"):
        # sqlite:///rel/path.db is relative to the working directory (SQLAlchemy), sqlite:////abs/path.db absolute
        base = Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")).parent.absolute()
    return (base / "artifacts").as_uri()


def setup(experiment: str, root: str | os.PathLike | None = None) -> str:
    """Point MLflow at the store and make ``experiment`` current (created with the artifact root if new)."""
    mlflow.set_tracking_uri(tracking_uri(root))
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        exp_id = client.create_experiment(experiment, artifact_location=artifact_root(root))
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def flat_params(obj: Any, prefix: str = "") -> dict[str, str]:
    """A config (dataclass / mapping, nested) as flat MLflow params; keys that look like secrets are dropped."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    out: dict[str, str] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            key = f"{prefix}{k}"
            if _SECRET.search(str(k)):
                continue
            if isinstance(v, Mapping) or (dataclasses.is_dataclass(v) and not isinstance(v, type)):
                out.update(flat_params(v, f"{key}."))
            else:
                out[key] = str(v)[:6000]
    else:
        out[prefix.rstrip(".") or "value"] = str(obj)
    return out


@dataclass(frozen=True)
class Promotion:
    promoted: bool
    reason: str
    previous_version: str | None


def promote_if_better(
    model_name: str,
    version: str | int,
    *,
    metric: str,
    value: float,
    eval_set: str,
    higher_is_better: bool = True,
    client: MlflowClient | None = None,
) -> Promotion:
    """Tag ``version`` with its score, then move ``@champion`` to it only if it beats the champion on ``eval_set``."""
    client = client or MlflowClient()
    version = str(version)
    for key, v in {"eval_set": eval_set, "eval_metric": metric, "eval_value": repr(float(value))}.items():
        client.set_model_version_tag(model_name, version, key, v)
    try:
        current = client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        current = None
    if current is None:
        client.set_registered_model_alias(model_name, CHAMPION, version)
        return Promotion(True, f"no champion yet: version {version} becomes @{CHAMPION}", None)
    tags = current.tags or {}
    if str(current.version) == version:
        return Promotion(False, f"version {version} already is @{CHAMPION}", current.version)
    if tags.get("eval_set") != eval_set or tags.get("eval_metric") != metric:
        return Promotion(
            False,
            f"@{CHAMPION} (version {current.version}) was scored on {tags.get('eval_set')!r} by "
            f"{tags.get('eval_metric')!r}, not {eval_set!r} by {metric!r}: not comparable, alias left in place "
            f"(evaluate both on the same set, or move it by hand with `enrich promote`)",
            str(current.version),
        )
    best = float(tags.get("eval_value", "nan"))
    better = (value > best if higher_is_better else value < best) or math.isnan(best)
    if not better:
        return Promotion(
            False,
            f"{metric}={value:.4f} does not beat @{CHAMPION} version {current.version} ({best:.4f}) on {eval_set}",
            str(current.version),
        )
    client.set_registered_model_alias(model_name, CHAMPION, version)
    return Promotion(
        True, f"{metric}={value:.4f} beats version {current.version} ({best:.4f}) on {eval_set}", str(current.version)
    )


def champion(model_name: str, client: MlflowClient | None = None, train_cmd: str | None = None):
    """The ``@champion`` model version, or a clear error naming what to run (``train_cmd``, e.g. `enrich train
    matcher`; by default the jave / encoder one)."""
    client = client or MlflowClient()
    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        train_cmd = train_cmd or f"enrich train {'jave' if model_name == 'jave' else 'encoder'} ..."
        raise LookupError(
            f"registered model {model_name!r} has no @{CHAMPION} version in {mlflow.get_tracking_uri()}; "
            f"train one first (e.g. `{train_cmd}`)"
        ) from None


def load_registered(model_name: str, version: str | None, train_cmd: str) -> tuple[Any, str, str]:
    """(the pyfunc's Python model, model version, MLflow run id) of ``model_name@champion`` (``version`` None or
    ``"champion"``) or of a given version; a clear error naming ``train_cmd`` when there is none."""
    import mlflow.pyfunc

    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    if version is None or str(version) == CHAMPION:
        mv = champion(model_name, client, train_cmd)
    else:
        try:
            mv = client.get_model_version(model_name, str(version))
        except MlflowException:
            raise LookupError(
                f"registered model {model_name!r} has no version {version!r} in {mlflow.get_tracking_uri()}; "
                f"pick one from the registry or train one with `{train_cmd}`"
            ) from None
    pyfunc = mlflow.pyfunc.load_model(f"models:/{model_name}/{mv.version}")
    return pyfunc.unwrap_python_model(), str(mv.version), str(mv.run_id)
