"""Experiment tracking behind a small interface (MLflow on rank 0, nothing elsewhere).

The training loop talks to a :class:`Tracker`; :func:`create_tracker` returns

* a :class:`NullTracker` on non-main ranks and when tracking is off, and
* an :class:`MLflowTracker` on the main process otherwise.

``mlflow`` is imported lazily (inside the tracker), so importing this module is cheap and
non-zero ranks never pay for it.

Tracking URI resolution: explicit ``tracking_uri`` > env ``MLFLOW_TRACKING_URI`` > the embedded
default ``sqlite:///<output_dir>/mlflow.db`` with artifacts in ``<output_dir>/mlartifacts``.

Reliability contract:

* At start, an unreachable server is a :class:`TrackingUnavailableError` naming the URI, raised
  within seconds (a plain ``GET <uri>/health`` with a short timeout, not mlflow's minutes of
  retries); with ``fallback_to_local=True`` a warning is issued and the local sqlite store is used.
* During the run, tracking never raises into training. A call that fails is kept in memory (in
  order) and retried on later calls (with a back-off, so an outage costs the loop almost nothing)
  and once more at :meth:`Tracker.close`. What still fails at close is appended to
  ``<output_dir>/tracking_backlog.jsonl`` and a warning says how to replay it
  (:func:`replay_backlog`, or ``python -m pipeline.tracking replay <backlog> --tracking-uri URI``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Tracker",
    "NullTracker",
    "MLflowTracker",
    "TrackingUnavailableError",
    "TrackingWarning",
    "create_tracker",
    "resolve_tracking_uri",
    "default_tracking_uri",
    "flatten_config",
    "check_server_reachable",
    "replay_backlog",
    "BACKLOG_FILE_NAME",
]

# MLflow limits (mlflow.utils.validation in 3.x); duplicated here so that importing this module
# does not import mlflow.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

BACKLOG_FILE_NAME = "tracking_backlog.jsonl"
PENDING_DIR_NAME = "tracking_pending"  # staged artifacts whose upload is still pending
_TRUNCATION_MARK = "...[truncated]"
_INVALID_KEY_CHARS = re.compile(r"[^/\w.\- :]")

# HTTP behaviour of mlflow's REST client while *we* make calls (unless the user set these env
# variables): mlflow's default is 7 retries with exponential back-off and a 120 s timeout, i.e.
# minutes per call when the server is gone. We keep unsent data and retry later ourselves, so one
# attempt is one immediate retry (e.g. a stale keep-alive connection) with a 10 s socket timeout.
DEFAULT_HTTP_TIMEOUT = 10
DEFAULT_HTTP_RETRIES = 1

# MLflow error codes that a retry cannot fix (bad key, changed param value, ...).
_PERMANENT_ERROR_CODES = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "BAD_REQUEST",
        "MALFORMED_REQUEST",
        "RESOURCE_ALREADY_EXISTS",
        "INVALID_STATE",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "CUSTOMER_UNAUTHORIZED",
    }
)


class TrackingUnavailableError(RuntimeError):
    """The tracking backend cannot be reached or used when the run starts."""


class TrackingWarning(RuntimeWarning):
    """Tracking degraded (fallback, buffering, backlog written); training goes on."""


# --------------------------------------------------------------------------------------------
# Interface
# --------------------------------------------------------------------------------------------


@runtime_checkable
class Tracker(Protocol):
    """What the pipeline needs from experiment tracking."""

    @property
    def run_id(self) -> str | None: ...

    @property
    def tracking_uri(self) -> str | None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...

    def log_dict(self, obj: Any, file_name: str) -> None: ...

    def log_figure(self, fig: Any, file_name: str) -> None: ...

    def log_model_dir(self, path: str | os.PathLike, artifact_path: str = "model") -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Does nothing and writes nothing (non-zero ranks, ``tracking: off``)."""

    @property
    def run_id(self) -> str | None:
        return None

    @property
    def tracking_uri(self) -> str | None:
        return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, obj: Any, file_name: str) -> None:
        pass

    def log_figure(self, fig: Any, file_name: str) -> None:
        pass

    def log_model_dir(self, path: str | os.PathLike, artifact_path: str = "model") -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        pass


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def default_tracking_uri(output_dir: str | os.PathLike) -> str:
    """The embedded store: ``sqlite:///<output_dir>/mlflow.db`` (absolute path)."""
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(tracking_uri: str | None, output_dir: str | os.PathLike) -> str:
    """Explicit ``tracking_uri`` > env ``MLFLOW_TRACKING_URI`` > ``sqlite:///<output_dir>/mlflow.db``."""
    if tracking_uri:
        return str(tracking_uri)
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return default_tracking_uri(output_dir)


def _is_http(uri: str) -> bool:
    return urllib.parse.urlparse(uri).scheme in ("http", "https")


def _sqlite_db_path(uri: str) -> Path | None:
    """``sqlite:///dir/x.db`` -> ``dir/x.db`` (None for other URIs and in-memory databases)."""
    if not uri.startswith("sqlite:///"):
        return None
    db_path = uri[len("sqlite:///") :].split("?", 1)[0]
    if not db_path or db_path == ":memory:":
        return None
    return Path(db_path).resolve()


def _sqlite_artifact_location(uri: str) -> str | None:
    """For ``sqlite:///dir/x.db`` -> ``file:///dir/mlartifacts`` (new experiments only)."""
    db_path = _sqlite_db_path(uri)
    return None if db_path is None else (db_path.parent / "mlartifacts").as_uri()


def _truncate(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    return value[: limit - len(_TRUNCATION_MARK)] + _TRUNCATION_MARK


def _sanitize_key(key: Any) -> str:
    """Make a valid mlflow param/metric/tag key (allowed chars, no '..' path tricks, <=250)."""
    key = _INVALID_KEY_CHARS.sub("_", str(key))
    parts = [p if p not in ("", ".", "..") else "_" for p in key.split("/")]
    key = "/".join(parts) or "_"
    return key[:MAX_KEY_LENGTH]


def _to_plain(obj: Any) -> Any:
    """Pydantic models / dataclasses / Paths -> plain python containers."""
    if hasattr(obj, "model_dump") and callable(obj.model_dump):
        return obj.model_dump()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return obj


def _value_to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        try:
            seq = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
            return json.dumps(seq, default=str, separators=(",", ":"))
        except (TypeError, ValueError):
            return repr(value)
    return str(value)


def flatten_config(config: Mapping[str, Any] | Any, *, sep: str = ".", prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings into ``{"a.b.c": "value"}`` with string values fit for mlflow.

    Lists and tuples become compact JSON, ``None`` becomes ``"None"``, an empty mapping is kept as
    ``"{}"``. Keys are made valid for mlflow (disallowed characters -> ``_``, at most 250
    characters) and values longer than mlflow's 6000-character limit are cut, ending in
    ``...[truncated]``. Pydantic models and dataclasses are accepted.
    """
    out: dict[str, str] = {}

    def walk(node: Any, path: str) -> None:
        node = _to_plain(node)
        if isinstance(node, Mapping):
            if not node and path:
                out[_sanitize_key(path)] = "{}"
            for k, v in node.items():
                walk(v, f"{path}{sep}{k}" if path else str(k))
            return
        if not path:
            raise TypeError(f"flatten_config expects a mapping, got {type(node).__name__}")
        out[_sanitize_key(path)] = _truncate(_value_to_str(node), MAX_PARAM_VALUE_LENGTH)

    walk(config, prefix)
    return out


def check_server_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise :class:`TrackingUnavailableError` unless ``GET <uri>/health`` answers within ``timeout``.

    Any HTTP answer below 500 counts as reachable (a proxy may want auth for /health).
    Non-HTTP URIs are not checked.
    """
    if not _is_http(uri):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (http/https only)
            resp.read(64)
    except urllib.error.HTTPError as e:
        if e.code >= 500:
            raise TrackingUnavailableError(
                f"MLflow tracking server at {uri} is not healthy: GET {url} -> HTTP {e.code}."
            ) from e
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingUnavailableError(
            f"MLflow tracking server at {uri} is unreachable (GET {url} failed within {timeout:g}s: "
            f"{reason}). Start the server, fix `tracking_uri` / MLFLOW_TRACKING_URI, set "
            f"`tracking: off`, or allow `fallback_to_local` to log to a local sqlite store."
        ) from e


@contextmanager
def _short_http_env(timeout: int = DEFAULT_HTTP_TIMEOUT, retries: int = DEFAULT_HTTP_RETRIES) -> Iterator[None]:
    """Temporarily give mlflow's REST client short retries/timeouts (the user's env settings win).

    mlflow reads these variables at every request, so this scopes them to our own calls.
    """
    values = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(int(retries)),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, int(timeout))),
    }
    added = [k for k in values if k not in os.environ]
    for k in added:
        os.environ[k] = values[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _is_permanent(exc: BaseException) -> bool:
    code = getattr(exc, "error_code", None)
    return isinstance(code, str) and code in _PERMANENT_ERROR_CODES


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------------------------
# MLflow
# --------------------------------------------------------------------------------------------

# A pending operation: (kind, payload). Payloads are JSON-serialisable (they go to the backlog).
#   ("params",   {"params": {k: v}})
#   ("metrics",  {"metrics": [{"key", "value", "timestamp", "step"}]})
#   ("tags",     {"tags": {k: v}})
#   ("artifact", {"local_path": str, "artifact_path": str | None, "is_dir": bool, "staged": bool})
#   ("terminate", {"status": str, "end_time": int})
_Op = tuple[str, dict[str, Any]]


class MLflowTracker:
    """Logs one MLflow run through ``MlflowClient`` (no global fluent state).

    Construction checks the backend (a quick ``/health`` GET for HTTP servers), gets or creates
    the experiment and creates the run (or resumes ``run_id``); any failure there raises
    :class:`TrackingUnavailableError` naming the URI. After that, no method raises on backend
    failures: see the module docstring.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str | None = None,
        *,
        output_dir: str | os.PathLike,
        tags: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        artifact_location: str | None = None,
        health_timeout: float = 5.0,
        http_timeout: int = DEFAULT_HTTP_TIMEOUT,
        http_retries: int = DEFAULT_HTTP_RETRIES,
        retry_interval: float = 5.0,
        max_retry_interval: float = 60.0,
        max_pending: int = 100_000,
    ) -> None:
        self._uri = str(tracking_uri)
        self._experiment_name = experiment
        self._run_name = run_name
        self._output_dir = Path(output_dir)
        self._retry_interval = retry_interval
        self._http = {"timeout": http_timeout, "retries": http_retries}
        self._max_retry_interval = max_retry_interval
        self._max_pending = max_pending
        self._pending: list[_Op] = []
        self._lock = threading.RLock()
        self._backoff = retry_interval
        self._next_attempt = 0.0
        self._outage_warned = False
        self._closed = False
        self._spilled = 0

        check_server_reachable(self._uri, timeout=health_timeout)
        if artifact_location is None:
            artifact_location = _sqlite_artifact_location(self._uri)
        db_path = _sqlite_db_path(self._uri)
        if db_path is not None:  # sqlite cannot create the database in a missing folder
            db_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            from mlflow.tracking import MlflowClient

            with _short_http_env(**self._http):
                self._client = MlflowClient(tracking_uri=self._uri)
                exp = self._client.get_experiment_by_name(experiment)
                if exp is None:
                    try:
                        self._experiment_id = self._client.create_experiment(
                            experiment, artifact_location=artifact_location
                        )
                    except Exception:  # created concurrently by another process?
                        exp = self._client.get_experiment_by_name(experiment)
                        if exp is None:
                            raise
                        self._experiment_id = exp.experiment_id
                else:
                    if exp.lifecycle_stage == "deleted":
                        raise TrackingUnavailableError(
                            f"MLflow experiment {experiment!r} at {self._uri} is deleted; restore it "
                            f"or choose another experiment name."
                        )
                    self._experiment_id = exp.experiment_id
                tag_values = {
                    _sanitize_key(k): _truncate(_value_to_str(v), MAX_TAG_VALUE_LENGTH)
                    for k, v in (tags or {}).items()
                }
                if run_id is not None:
                    run = self._client.get_run(run_id)
                    self._run_id = run.info.run_id
                    self._client.update_run(run_id, status="RUNNING")
                    if tag_values:
                        self._log_batch(tags=tag_values)
                else:
                    run = self._client.create_run(
                        self._experiment_id, tags=tag_values or None, run_name=run_name
                    )
        except TrackingUnavailableError:
            raise
        except Exception as e:
            raise TrackingUnavailableError(
                f"Could not start an MLflow run at {self._uri} (experiment {experiment!r}): {_short(e)}"
            ) from e
        self._run_id: str = run.info.run_id
        self._artifact_uri: str = run.info.artifact_uri

    # -- properties ---------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def tracking_uri(self) -> str:
        return self._uri

    @property
    def artifact_uri(self) -> str:
        return self._artifact_uri

    @property
    def experiment_id(self) -> str:
        return self._experiment_id

    @property
    def pending(self) -> int:
        """Number of operations waiting for the backend."""
        return len(self._pending)

    @property
    def backlog_path(self) -> Path:
        return self._output_dir / BACKLOG_FILE_NAME

    # -- logging ------------------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = flatten_config(params)
        if flat:
            self._submit(("params", {"params": flat}))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        entries = []
        for key, value in metrics.items():
            try:
                fvalue = float(value)
            except (TypeError, ValueError):
                warnings.warn(
                    f"tracking: metric {key!r} has non-numeric value {value!r}; skipped",
                    TrackingWarning,
                    stacklevel=2,
                )
                continue
            entries.append(
                {"key": _sanitize_key(key), "value": fvalue, "timestamp": now, "step": int(step or 0)}
            )
        if entries:
            self._submit(("metrics", {"metrics": entries}))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        values = {
            _sanitize_key(k): _truncate(_value_to_str(v), MAX_TAG_VALUE_LENGTH) for k, v in tags.items()
        }
        if values:
            self._submit(("tags", {"tags": values}))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        p = Path(path)
        if not p.exists():
            warnings.warn(f"tracking: artifact {p} does not exist; skipped", TrackingWarning, stacklevel=2)
            return
        payload = {
            "local_path": str(p.resolve()),
            "artifact_path": artifact_path,
            "is_dir": p.is_dir(),
            "staged": False,
        }
        self._submit(("artifact", payload))

    def log_model_dir(self, path: str | os.PathLike, artifact_path: str = "model") -> None:
        p = Path(path)
        if not p.is_dir():
            warnings.warn(f"tracking: model dir {p} is not a directory; skipped", TrackingWarning, stacklevel=2)
            return
        self._submit(
            ("artifact", {"local_path": str(p.resolve()), "artifact_path": artifact_path, "is_dir": True, "staged": False})
        )

    def log_dict(self, obj: Any, file_name: str) -> None:
        """Write ``obj`` as JSON (or YAML for ``.yaml``/``.yml``) to artifact ``file_name``."""
        try:
            staged = self._stage_path(file_name)
            obj = _to_plain(obj)
            if file_name.endswith((".yaml", ".yml")):
                import yaml

                staged.write_text(yaml.safe_dump(json.loads(json.dumps(obj, default=str)), sort_keys=False))
            else:
                staged.write_text(json.dumps(obj, indent=2, default=str))
        except Exception as e:  # noqa: BLE001 — never raise into training
            warnings.warn(f"tracking: could not serialise {file_name}: {_short(e)}", TrackingWarning, stacklevel=2)
            return
        self._submit_staged(staged, file_name)

    def log_figure(self, fig: Any, file_name: str) -> None:
        """Save a matplotlib figure (format from the extension) as artifact ``file_name``."""
        try:
            staged = self._stage_path(file_name)
            fig.savefig(staged, bbox_inches="tight", dpi=120)
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"tracking: could not render {file_name}: {_short(e)}", TrackingWarning, stacklevel=2)
            return
        self._submit_staged(staged, file_name)

    def close(self, status: str = "FINISHED") -> None:
        """Flush what is pending, end the run, write what still failed to the backlog file."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._pending.append(("terminate", {"status": status, "end_time": int(time.time() * 1000)}))
            self._flush(force=True)
            try:  # remove the staging folder if every staged artifact went out
                (self._output_dir / PENDING_DIR_NAME).rmdir()
            except OSError:
                pass
            if self._pending or self._spilled:
                if self._pending:
                    self._write_backlog(self._pending)
                n, self._pending = len(self._pending) + self._spilled, []
                warnings.warn(
                    f"tracking: {n} logging operation(s) for MLflow run {self._run_id} could not be sent "
                    f"to {self._uri}; they are saved in {self.backlog_path}. Replay them when the server "
                    f"is back with:  python -m pipeline.tracking replay {self.backlog_path} "
                    f"--tracking-uri {self._uri}   (or pipeline.tracking.replay_backlog(path, uri)).",
                    TrackingWarning,
                    stacklevel=2,
                )

    def __enter__(self) -> MLflowTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FAILED" if exc_type is not None else "FINISHED")

    # -- internals ----------------------------------------------------------------------------

    def _stage_path(self, file_name: str) -> Path:
        rel = Path(file_name)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"artifact file name must be relative: {file_name!r}")
        staged = self._output_dir / PENDING_DIR_NAME / uuid.uuid4().hex[:12] / rel.name
        staged.parent.mkdir(parents=True, exist_ok=True)
        return staged

    def _submit_staged(self, staged: Path, file_name: str) -> None:
        parent = Path(file_name).parent.as_posix()
        self._submit(
            (
                "artifact",
                {
                    "local_path": str(staged.resolve()),
                    "artifact_path": None if parent in ("", ".") else parent,
                    "is_dir": False,
                    "staged": True,
                },
            )
        )

    def _submit(self, op: _Op) -> None:
        with self._lock:
            if self._closed:
                warnings.warn(
                    f"tracking: {op[0]} logged after close() is ignored", TrackingWarning, stacklevel=3
                )
                return
            self._pending.append(op)
            if len(self._pending) > self._max_pending:
                self._spill()
            self._flush(force=False)

    def _spill(self) -> None:
        """Too much pending: move the oldest half to the backlog file now (bounded memory)."""
        half = len(self._pending) // 2
        spilled, self._pending = self._pending[:half], self._pending[half:]
        self._write_backlog(spilled)
        self._spilled += len(spilled)

    def _flush(self, force: bool) -> None:
        if not self._pending:
            return
        if not force and time.monotonic() < self._next_attempt:
            return  # in an outage: wait for the back-off window, queueing is free
        with _short_http_env(**self._http):
            solo = False  # after a rejected metrics batch, send its first op alone
            while self._pending:
                kind, payload = self._pending[0]
                n_ops = 1
                try:
                    if kind == "metrics":
                        n_ops = self._send_metrics(max_ops=1 if solo else None)
                    else:
                        self._send(kind, payload)
                except Exception as e:  # noqa: BLE001 — never raise into training
                    if _is_permanent(e):
                        if kind == "metrics" and not solo:
                            solo = True  # find which op of the batch is rejected
                            continue
                        solo = False
                        self._pending.pop(0)
                        warnings.warn(
                            f"tracking: MLflow rejected {kind} for run {self._run_id} ({_short(e)}); dropped",
                            TrackingWarning,
                            stacklevel=4,
                        )
                        continue
                    self._next_attempt = time.monotonic() + self._backoff
                    self._backoff = min(self._backoff * 2, self._max_retry_interval)
                    if not self._outage_warned:
                        self._outage_warned = True
                        warnings.warn(
                            f"tracking: MLflow at {self._uri} failed ({_short(e)}); keeping logged "
                            f"data in memory and retrying. Training continues.",
                            TrackingWarning,
                            stacklevel=4,
                        )
                    return
                solo = False
                del self._pending[:n_ops]
                if kind == "artifact" and payload.get("staged"):
                    shutil.rmtree(Path(payload["local_path"]).parent, ignore_errors=True)
        # all sent
        if self._outage_warned:
            warnings.warn(
                f"tracking: MLflow at {self._uri} reachable again; pending data sent.",
                TrackingWarning,
                stacklevel=4,
            )
        self._outage_warned = False
        self._backoff = self._retry_interval
        self._next_attempt = 0.0

    def _send_metrics(self, max_ops: int | None = None) -> int:
        """Send the run of consecutive metrics ops at the head of the queue in one or more batches."""
        from mlflow.entities import Metric

        n = 0
        entries: list[dict[str, Any]] = []
        limit = len(self._pending) if max_ops is None else min(max_ops, len(self._pending))
        while n < limit and self._pending[n][0] == "metrics":
            entries.extend(self._pending[n][1]["metrics"])
            n += 1
            if len(entries) >= 10 * MAX_METRICS_PER_BATCH:
                break
        # sending in chunks: on failure half-way, the ops stay queued and a retry may repeat some
        # points (a metric history accepts duplicates); nothing is lost.
        for i in range(0, len(entries), MAX_METRICS_PER_BATCH):
            chunk = entries[i : i + MAX_METRICS_PER_BATCH]
            self._client.log_batch(
                self._run_id,
                metrics=[Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in chunk],
            )
        return n

    def _log_batch(self, params: Mapping[str, str] | None = None, tags: Mapping[str, str] | None = None) -> None:
        from mlflow.entities import Param, RunTag

        for items, make, field in (
            (list((params or {}).items()), Param, "params"),
            (list((tags or {}).items()), RunTag, "tags"),
        ):
            for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
                chunk = [make(k, v) for k, v in items[i : i + MAX_PARAMS_TAGS_PER_BATCH]]
                self._client.log_batch(self._run_id, **{field: chunk})

    def _send(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "params":
            self._log_batch(params=payload["params"])
        elif kind == "tags":
            self._log_batch(tags=payload["tags"])
        elif kind == "artifact":
            local = payload["local_path"]
            if not Path(local).exists():
                warnings.warn(f"tracking: artifact {local} vanished before upload; skipped", TrackingWarning)
                return
            if payload["is_dir"]:
                self._client.log_artifacts(self._run_id, local, payload["artifact_path"])
            else:
                self._client.log_artifact(self._run_id, local, payload["artifact_path"])
        elif kind == "terminate":
            self._client.set_terminated(self._run_id, status=payload["status"], end_time=payload["end_time"])
        else:  # pragma: no cover
            raise ValueError(f"unknown tracking op {kind}")

    def _write_backlog(self, ops: list[_Op]) -> None:
        path = self.backlog_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                header = {
                    "kind": "run",
                    "run_id": self._run_id,
                    "tracking_uri": self._uri,
                    "experiment": self._experiment_name,
                    "run_name": self._run_name,
                    "written_at": int(time.time() * 1000),
                }
                f.write(json.dumps(header) + "\n")
                for kind, payload in ops:
                    f.write(json.dumps({"kind": kind, **payload}) + "\n")
        except Exception as e:  # noqa: BLE001
            warnings.warn(
                f"tracking: could not write the backlog {path} ({_short(e)}); {len(ops)} operation(s) lost",
                TrackingWarning,
            )


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------


def create_tracker(
    *,
    is_main_process: bool,
    output_dir: Path,
    tracking_uri: str | None,
    experiment: str,
    run_name: str | None,
    enabled: bool = True,
    fallback_to_local: bool = False,
    tags: Mapping[str, Any] | None = None,
    run_id: str | None = None,
) -> Tracker:
    """The tracker for this process.

    Non-main processes and ``enabled=False`` get a :class:`NullTracker`. Otherwise the URI is
    resolved (explicit > ``MLFLOW_TRACKING_URI`` > local sqlite in ``output_dir``) and an
    :class:`MLflowTracker` is started; if that fails, :class:`TrackingUnavailableError` is raised,
    or with ``fallback_to_local`` a :class:`TrackingWarning` is issued and the local sqlite store
    in ``output_dir`` is used instead (the run gets tag ``earlycrop.tracking_fallback_from``).
    ``run_id`` resumes an existing run (e.g. when resuming from a checkpoint).
    """
    if not enabled or not is_main_process:
        return NullTracker()
    output_dir = Path(output_dir)
    uri = resolve_tracking_uri(tracking_uri, output_dir)
    try:
        return MLflowTracker(uri, experiment, run_name, output_dir=output_dir, tags=tags, run_id=run_id)
    except TrackingUnavailableError as e:
        local = default_tracking_uri(output_dir)
        if not fallback_to_local or uri == local:
            raise
        warnings.warn(
            f"tracking: {e} Falling back to the local store {local}.", TrackingWarning, stacklevel=2
        )
        fallback_tags = dict(tags or {})
        fallback_tags["earlycrop.tracking_fallback_from"] = uri
        return MLflowTracker(local, experiment, run_name, output_dir=output_dir, tags=fallback_tags)


# --------------------------------------------------------------------------------------------
# Backlog replay
# --------------------------------------------------------------------------------------------


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
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    lines = [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]
    clients: dict[str, Any] = {}
    targets: dict[tuple[str, str], str] = {}
    used: list[str] = []
    client = target = None
    for rec in lines:
        kind = rec.pop("kind")
        if kind == "run":
            uri = tracking_uri or rec["tracking_uri"]
            client = clients.setdefault(uri, MlflowClient(tracking_uri=uri))
            key = (uri, rec["run_id"])
            if key not in targets:
                targets[key] = run_id or _replay_target(client, rec, uri)
            target = targets[key]
            if target not in used:
                used.append(target)
            continue
        if client is None or target is None:
            raise ValueError(f"{path}: record before any run header")
        if kind == "params":
            items = list(rec["params"].items())
            for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
                client.log_batch(target, params=[Param(k, v) for k, v in items[i : i + MAX_PARAMS_TAGS_PER_BATCH]])
        elif kind == "tags":
            items = list(rec["tags"].items())
            for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
                client.log_batch(target, tags=[RunTag(k, v) for k, v in items[i : i + MAX_PARAMS_TAGS_PER_BATCH]])
        elif kind == "metrics":
            ms = rec["metrics"]
            for i in range(0, len(ms), MAX_METRICS_PER_BATCH):
                client.log_batch(
                    target,
                    metrics=[Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in ms[i : i + MAX_METRICS_PER_BATCH]],
                )
        elif kind == "artifact":
            local = rec["local_path"]
            if not Path(local).exists():
                warnings.warn(f"replay: artifact {local} no longer exists; skipped", TrackingWarning)
                continue
            if rec["is_dir"]:
                client.log_artifacts(target, local, rec["artifact_path"])
            else:
                client.log_artifact(target, local, rec["artifact_path"])
        elif kind == "terminate":
            client.set_terminated(target, status=rec["status"], end_time=rec["end_time"])
        else:
            raise ValueError(f"{path}: unknown record kind {kind!r}")
    return used


def _replay_target(client: Any, header: Mapping[str, Any], uri: str) -> str:
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
        exp_id = client.create_experiment(header["experiment"], artifact_location=_sqlite_artifact_location(uri))
    run = client.create_run(
        exp_id, run_name=header.get("run_name"), tags={"earlycrop.replayed_from": header["run_id"]}
    )
    return run.info.run_id


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking")
    sub = parser.add_subparsers(dest="cmd", required=True)
    rp = sub.add_parser("replay", help="send a tracking_backlog.jsonl to an MLflow store")
    rp.add_argument("backlog")
    rp.add_argument("--tracking-uri", default=None, help="default: the URI recorded in the backlog")
    rp.add_argument("--run-id", default=None, help="replay into this run instead")
    args = parser.parse_args(argv)
    runs = replay_backlog(args.backlog, args.tracking_uri, run_id=args.run_id)
    print(f"replayed {args.backlog} into run(s): {', '.join(runs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
