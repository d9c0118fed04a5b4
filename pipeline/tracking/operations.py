"""Logging operations and the one place that turns them into MLflow client calls.

The live tracker queues operations while the backend is down and sends them later; the backlog
stores the ones that never went out and replays them. Both hand each operation to
:func:`apply_operation`, so a run logged live and a run replayed from a backlog are the same.

An operation is ``(kind, payload)`` with a JSON-serialisable payload (it may go to the backlog):

* ``("params",    {"params": {key: value}})``
* ``("metrics",   {"metrics": [{"key", "value", "timestamp", "step"}]})``
* ``("tags",      {"tags": {key: value}})``
* ``("artifact",  {"local_path": str, "artifact_path": str | None, "is_dir": bool, "staged": bool})``
* ``("model",     {"local_path": str, "artifact_path": str, "registered_model_name": str | None, "step": int})``
* ``("terminate", {"status": str, "end_time": int})``
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .interface import TrackingWarning
from .models import log_logged_model
from .values import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

Operation = tuple[str, dict[str, Any]]

OPERATION_KINDS = frozenset({"params", "metrics", "tags", "artifact", "model", "terminate"})


def apply_operation(client: Any, run_id: str, kind: str, payload: Mapping[str, Any]) -> None:
    """Send one operation to run ``run_id`` through ``client`` (an ``MlflowClient``); failures raise.

    Lists longer than mlflow's per-request limits go out in several ``log_batch`` calls. An
    artifact or model whose local files no longer exist is skipped with a :class:`TrackingWarning`.
    """
    from mlflow.entities import Metric, Param, RunTag

    if kind == "params":
        _log_batches(client, run_id, "params", [Param(k, v) for k, v in payload["params"].items()])
    elif kind == "tags":
        _log_batches(client, run_id, "tags", [RunTag(k, v) for k, v in payload["tags"].items()])
    elif kind == "metrics":
        metrics = [Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in payload["metrics"]]
        _log_batches(client, run_id, "metrics", metrics)
    elif kind in ("artifact", "model") and not Path(payload["local_path"]).exists():
        warnings.warn(f"tracking: {kind} {payload['local_path']} no longer exists; skipped", TrackingWarning, stacklevel=2)
    elif kind == "model":
        log_logged_model(client, run_id, payload)
    elif kind == "artifact":
        local = payload["local_path"]
        if payload["is_dir"]:
            client.log_artifacts(run_id, local, payload["artifact_path"])
        else:
            client.log_artifact(run_id, local, payload["artifact_path"])
    elif kind == "terminate":
        client.set_terminated(run_id, status=payload["status"], end_time=payload["end_time"])
    else:
        raise ValueError(f"unknown tracking operation {kind!r}")


def _log_batches(client: Any, run_id: str, field: str, entities: list[Any]) -> None:
    """``log_batch`` in chunks: a failure half-way leaves the operation to be retried whole, which may
    repeat some metric points (a metric history accepts duplicates) but loses nothing."""
    size = MAX_METRICS_PER_BATCH if field == "metrics" else MAX_PARAMS_TAGS_PER_BATCH
    for i in range(0, len(entities), size):
        client.log_batch(run_id, **{field: entities[i : i + size]})
