"""The backlog: operations that could not be sent during a run, kept as JSONL for a later replay.

Each section of ``tracking_backlog.jsonl`` is a run header (``{"kind": "run", "run_id", "tracking_uri",
"experiment", "run_name", "written_at"}``) followed by one line per operation (``{"kind": ..., **payload}``).
Replay it with ``earlycrop tracking replay FILE --tracking-uri URI`` or :func:`replay_backlog`.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .interface import TrackingWarning
from .operations import OPERATION_KINDS, Operation, apply_operation
from .uris import check_server_reachable, create_in_store, sqlite_artifact_location
from .values import short_error

BACKLOG_FILE_NAME = "tracking_backlog.jsonl"


def write_backlog(path: Path, run: Mapping[str, Any], ops: Sequence[Operation]) -> None:
    """Append a section (``run``'s header, then ``ops``) to the backlog; warns instead of raising."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            header = {"kind": "run", **run, "written_at": int(time.time() * 1000)}
            f.write(json.dumps(header) + "\n")
            for kind, payload in ops:
                f.write(json.dumps({"kind": kind, **payload}) + "\n")
    except Exception as e:  # noqa: BLE001 — never raise into training
        warnings.warn(
            f"tracking: could not write the backlog {path} ({short_error(e)}); {len(ops)} operation(s) lost",
            TrackingWarning,
        )


def read_backlog(path: str | os.PathLike) -> list[tuple[dict[str, Any], list[Operation]]]:
    """The sections of a backlog, as ``(run header, operations)``; a malformed file raises ValueError."""
    sections: list[tuple[dict[str, Any], list[Operation]]] = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        kind = record.pop("kind", None)
        if kind == "run":
            sections.append((record, []))
        elif kind not in OPERATION_KINDS:
            raise ValueError(f"{path}:{number}: unknown record kind {kind!r}")
        elif not sections:
            raise ValueError(f"{path}:{number}: record before any run header")
        else:
            sections[-1][1].append((kind, record))
    return sections


def replay_backlog(
    path: str | os.PathLike, tracking_uri: str | None = None, *, run_id: str | None = None
) -> list[str]:
    """Send a ``tracking_backlog.jsonl`` to a tracking store; returns the run ids written to.

    Each section of the file belongs to the run named in its header. It is replayed into that run
    if it exists at ``tracking_uri`` (default: the URI in the header), into ``run_id`` if given,
    else into a new run of the same experiment and name, tagged ``earlycrop.replayed_from``.
    Failures raise (this is a manual operation). Staged artifacts that no longer exist are skipped.
    Rename or delete the file afterwards so that it is not replayed twice.
    """
    from mlflow.tracking import MlflowClient

    clients: dict[str, Any] = {}
    targets: dict[tuple[str, str], str] = {}
    for header, ops in read_backlog(path):
        uri = tracking_uri or header["tracking_uri"]
        if uri not in clients:
            check_server_reachable(uri)  # seconds, not mlflow's minutes of retries
            clients[uri] = MlflowClient(tracking_uri=uri)
        client = clients[uri]
        key = (uri, header["run_id"])
        if key not in targets:
            targets[key] = run_id or create_in_store(uri, lambda: _replay_target(client, header, uri))
        for kind, payload in ops:
            apply_operation(client, targets[key], kind, payload)
    return list(dict.fromkeys(targets.values()))


def _replay_target(client: Any, header: Mapping[str, Any], uri: str) -> str:
    """The run a section goes to: the original if it still exists there, else a new one."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(header["run_id"])
        if run.info.lifecycle_stage != "deleted":
            return run.info.run_id
    except MlflowException:
        pass
    exp = client.get_experiment_by_name(header["experiment"])
    if exp is not None:
        exp_id = exp.experiment_id
    else:
        exp_id = client.create_experiment(header["experiment"], artifact_location=sqlite_artifact_location(uri))
    run = client.create_run(
        exp_id, run_name=header.get("run_name"), tags={"earlycrop.replayed_from": header["run_id"]}
    )
    return run.info.run_id

