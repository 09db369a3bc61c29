"""Warehouse settings: where the tables live and how to reach them, from the environment (pydantic-settings)."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class WarehouseSettings(BaseSettings):
    """``ENRICH_WAREHOUSE_ROOT`` (a local path or an fsspec/object-store URI such as ``s3://bucket/warehouse``) and
    ``ENRICH_STORAGE_OPTIONS`` (JSON object: endpoint, region...). S3 credentials come from the usual ``AWS_*``
    variables and are never written to a table, a log or an MLflow run."""

    model_config = SettingsConfigDict(env_prefix="ENRICH_", extra="ignore")

    warehouse_root: str = "data/warehouse"
    storage_options: dict[str, str] = Field(default_factory=dict)

    def public_dict(self) -> dict[str, Any]:
        """What is safe to log: the root and the option *names* only (values may be secrets)."""
        return {"warehouse_root": self.warehouse_root, "storage_option_keys": sorted(self.storage_options)}


def fsspec_options(storage_options: dict[str, str]) -> dict[str, Any]:
    """Translate delta-rs style ``AWS_*`` storage options into s3fs/fsspec keyword arguments."""
    opts: dict[str, Any] = {}
    client: dict[str, Any] = {}
    for key, value in storage_options.items():
        k = key.upper()
        if k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT"):
            client["endpoint_url"] = value
        elif k in ("AWS_REGION", "AWS_DEFAULT_REGION"):
            client["region_name"] = value
        elif k == "AWS_ACCESS_KEY_ID":
            opts["key"] = value
        elif k == "AWS_SECRET_ACCESS_KEY":
            opts["secret"] = value
        elif k == "AWS_SESSION_TOKEN":
            opts["token"] = value
    if client:
        opts["client_kwargs"] = client
    return opts
