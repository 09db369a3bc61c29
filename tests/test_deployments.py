"""prefect.yaml: every deployment's entrypoint is a flow of this package and takes the parameters it is given."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_deployments_point_at_flows_that_take_their_parameters():
    from prefect import Flow

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = {d["name"] for d in spec["deployments"]}
    assert {"nightly", "maintain"} <= names
    for d in spec["deployments"]:
        path, _, attr = d["entrypoint"].partition(":")
        fn = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), attr)
        assert isinstance(fn, Flow), f"{d['entrypoint']} is not a Prefect flow"
        unknown = set(d.get("parameters") or {}) - set(inspect.signature(fn.fn).parameters)
        assert not unknown, f"deployment {d['name']} passes parameters {sorted(unknown)} its flow does not take"
        assert all(s.get("cron") for s in d.get("schedules") or []), d["name"]
        assert d.get("concurrency_limit") == 1, f"{d['name']} could run twice at once"
