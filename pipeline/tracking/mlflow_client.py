"""The MLflow tracker: one run through ``MlflowClient``, with a retry queue so outages never stop training."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .backlog import BACKLOG_FILE_NAME, write_backlog
from .interface import TrackingUnavailableError, TrackingWarning, is_permanent
from .names import metric_name
from .operations import Operation, apply_operation
from .uris import check_server_reachable, create_in_store, sqlite_artifact_location
from .values import MAX_METRICS_PER_BATCH, flatten_config, sanitize_key, short_error, tag_values, to_plain

PENDING_DIR_NAME = "tracking_pending"  # staged artifacts whose upload is still pending
# what the experiment is, as the UI records it when a user picks one (model training, not GenAI); the view the UI
# opens in is its own switch (the run's printed address sets it: launch/cli.py)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"

# HTTP behaviour of mlflow's REST client while *we* make calls (unless the user set these env
# variables): mlflow's default is 7 retries with exponential back-off and a 120 s timeout, i.e.
# minutes per call when the server is gone. We keep unsent data and retry later ourselves, so one
# attempt is one immediate retry (e.g. a stale keep-alive connection) with a 10 s socket timeout.
DEFAULT_HTTP_TIMEOUT = 10
DEFAULT_HTTP_RETRIES = 1

@contextmanager
def short_http_env(timeout: int = DEFAULT_HTTP_TIMEOUT, retries: int = DEFAULT_HTTP_RETRIES) -> Iterator[None]:
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


class MLflowTracker:
    """Logs one MLflow run through ``MlflowClient`` (no global fluent state).

    Construction checks the backend (a quick ``/health`` GET for HTTP servers), gets or creates
    the experiment and creates the run (or resumes ``run_id``); any failure there raises
    :class:`TrackingUnavailableError` naming the URI. After that, no method raises on backend
    failures: a failed call is queued (in order) and retried on later calls with a back-off, and
    once more at :meth:`close`; what still fails then goes to the backlog file. Metric names go to MLflow in
    sections (:func:`~.names.metric_name`: `train_loss` is logged as `train/loss`).
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
        self._pending: list[Operation] = []
        self._lock = threading.RLock()
        self._backoff = retry_interval
        self._next_attempt = 0.0
        self._outage_warned = False
        self._closed = False
        self._spilled = 0

        check_server_reachable(self._uri, timeout=health_timeout)
        if artifact_location is None:
            artifact_location = sqlite_artifact_location(self._uri)
        try:
            start_tags = tag_values(tags or {})
            with short_http_env(**self._http):
                run = create_in_store(self._uri, lambda: self._start_run(start_tags, run_id, artifact_location))
        except TrackingUnavailableError:
            raise
        except Exception as e:
            raise TrackingUnavailableError(
                f"Could not start an MLflow run at {self._uri} (experiment {experiment!r}): {short_error(e)}"
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
            entries.append({"key": sanitize_key(metric_name(key)), "value": fvalue, "timestamp": now, "step": int(step or 0)})
        if entries:
            self._submit(("metrics", {"metrics": entries}))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        values = tag_values(tags)
        if values:
            self._submit(("tags", {"tags": values}))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        p = Path(path)
        if not p.exists():
            warnings.warn(f"tracking: artifact {p} does not exist; skipped", TrackingWarning, stacklevel=2)
            return
        payload = {"local_path": str(p.resolve()), "artifact_path": artifact_path, "is_dir": p.is_dir()}
        self._submit(("artifact", {**payload, "staged": False}))

    def log_model_dir(self, path: str | os.PathLike, artifact_path: str = "model", *,
                      registered_model_name: str | None = None, step: int = 0) -> None:
        """The saved model folder as an MLflow Logged Model named `artifact_path`, linked to the metrics of `step`
        and registered under `registered_model_name` if given (pipeline.tracking.models says which flavor)."""
        p = Path(path)
        if not p.is_dir():
            warnings.warn(f"tracking: model dir {p} is not a directory; skipped", TrackingWarning, stacklevel=2)
            return
        payload = {"local_path": str(p.resolve()), "artifact_path": artifact_path,
                   "registered_model_name": registered_model_name, "step": int(step)}
        self._submit(("model", payload))

    def log_dict(self, obj: Any, file_name: str) -> None:
        """Write ``obj`` as JSON (or YAML for ``.yaml``/``.yml``) to artifact ``file_name``."""
        try:
            staged = self._stage_path(file_name)
            obj = to_plain(obj)
            if file_name.endswith((".yaml", ".yml")):
                import yaml

                staged.write_text(yaml.safe_dump(json.loads(json.dumps(obj, default=str)), sort_keys=False))
            else:
                staged.write_text(json.dumps(obj, indent=2, default=str))
        except Exception as e:  # noqa: BLE001 — never raise into training
            warnings.warn(f"tracking: could not serialise {file_name}: {short_error(e)}", TrackingWarning, stacklevel=2)
            return
        self._submit_staged(staged, file_name)

    def log_figure(self, fig: Any, file_name: str) -> None:
        """Save a matplotlib figure (format from the extension) as artifact ``file_name``."""
        try:
            staged = self._stage_path(file_name)
            fig.savefig(staged, bbox_inches="tight", dpi=120)
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"tracking: could not render {file_name}: {short_error(e)}", TrackingWarning, stacklevel=2)
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
            if not (self._pending or self._spilled):
                return
            if self._pending:
                self._write_backlog(self._pending)
            n, self._pending = len(self._pending) + self._spilled, []
            warnings.warn(
                f"tracking: {n} logging operation(s) for MLflow run {self._run_id} could not be sent "
                f"to {self._uri}; they are saved in {self.backlog_path}. Replay them when the server "
                f"is back with:  earlycrop tracking replay {self.backlog_path} --tracking-uri {self._uri}",
                TrackingWarning,
                stacklevel=2,
            )

    def __enter__(self) -> MLflowTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FAILED" if exc_type is not None else "FINISHED")

    # -- internals ----------------------------------------------------------------------------

    def _start_run(self, tags: dict[str, str], run_id: str | None, artifact_location: str | None) -> Any:
        """Client, experiment and run (new, or ``run_id`` resumed); called under the store lock."""
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self._uri)
        self._experiment_id = self._get_or_create_experiment(artifact_location)
        if run_id is None:
            # who started it and from where (user, entry point, git commit), as mlflow's own runs show them
            from mlflow.tracking.context.registry import resolve_tags

            return self._client.create_run(self._experiment_id, tags=resolve_tags(tags), run_name=self._run_name)
        run = self._client.get_run(run_id)
        self._client.update_run(run_id, status="RUNNING")
        if tags:
            apply_operation(self._client, run_id, "tags", {"tags": tags})
        return run

    def _get_or_create_experiment(self, artifact_location: str | None) -> str:
        name = self._experiment_name
        exp = self._client.get_experiment_by_name(name)
        if exp is None:
            try:
                return self._client.create_experiment(name, artifact_location=artifact_location,
                                                      tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            except Exception:  # created concurrently by another process?
                exp = self._client.get_experiment_by_name(name)
                if exp is None:
                    raise
        elif exp.lifecycle_stage == "deleted":
            raise TrackingUnavailableError(
                f"MLflow experiment {name!r} at {self._uri} is deleted; restore it or choose another experiment name."
            )
        elif EXPERIMENT_KIND_TAG not in exp.tags:  # made before this tag, or by hand: a kind the user chose stays
            with contextlib.suppress(Exception):  # a store that refuses experiment tags still takes the run
                self._client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id

    def _stage_path(self, file_name: str) -> Path:
        rel = Path(file_name)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"artifact file name must be relative: {file_name!r}")
        staged = self._output_dir / PENDING_DIR_NAME / uuid.uuid4().hex[:12] / rel.name
        staged.parent.mkdir(parents=True, exist_ok=True)
        return staged

    def _submit_staged(self, staged: Path, file_name: str) -> None:
        parent = Path(file_name).parent.as_posix()
        artifact_path = None if parent in ("", ".") else parent
        payload = {"local_path": str(staged.resolve()), "artifact_path": artifact_path, "is_dir": False, "staged": True}
        self._submit(("artifact", payload))

    def _submit(self, op: Operation) -> None:
        with self._lock:
            if self._closed:
                warnings.warn(f"tracking: {op[0]} logged after close() is ignored", TrackingWarning, stacklevel=3)
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
        """Send the queue in order; stop at the first transient failure, drop what MLflow rejects."""
        if not self._pending:
            return
        if not force and time.monotonic() < self._next_attempt:
            return  # in an outage: wait for the back-off window, queueing is free
        with short_http_env(**self._http):
            solo = False  # after a rejected metrics batch, send its first op alone
            while self._pending:
                kind, payload = self._pending[0]
                try:
                    n_ops = self._send_head(max_ops=1 if solo else None)
                except Exception as e:  # noqa: BLE001 — never raise into training
                    if not is_permanent(e):
                        self._enter_outage(e)
                        return
                    if kind == "metrics" and not solo:
                        solo = True  # find which op of the batch is rejected
                        continue
                    n_ops = 1
                    warnings.warn(
                        f"tracking: MLflow rejected {kind} for run {self._run_id} ({short_error(e)}); dropped",
                        TrackingWarning,
                        stacklevel=4,
                    )
                solo = False
                del self._pending[:n_ops]
                if kind == "artifact" and payload.get("staged"):
                    shutil.rmtree(Path(payload["local_path"]).parent, ignore_errors=True)
        if self._outage_warned:
            warnings.warn(
                f"tracking: MLflow at {self._uri} reachable again; pending data sent.", TrackingWarning, stacklevel=4
            )
        self._outage_warned = False
        self._backoff = self._retry_interval
        self._next_attempt = 0.0

    def _enter_outage(self, exc: BaseException) -> None:
        """Back off before the next attempt; warn once per outage."""
        self._next_attempt = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self._max_retry_interval)
        if not self._outage_warned:
            self._outage_warned = True
            warnings.warn(
                f"tracking: MLflow at {self._uri} failed ({short_error(exc)}); keeping logged "
                f"data in memory and retrying. Training continues.",
                TrackingWarning,
                stacklevel=5,
            )

    def _send_head(self, max_ops: int | None = None) -> int:
        """Send the operation at the head of the queue; returns how many queued operations it covered.

        Consecutive metrics operations go out together (one ``metrics`` operation, in batches).
        """
        kind, payload = self._pending[0]
        n = 1
        if kind == "metrics":
            entries = list(payload["metrics"])
            limit = len(self._pending) if max_ops is None else min(max_ops, len(self._pending))
            while n < limit and self._pending[n][0] == "metrics" and len(entries) < 10 * MAX_METRICS_PER_BATCH:
                entries.extend(self._pending[n][1]["metrics"])
                n += 1
            payload = {"metrics": entries}
        apply_operation(self._client, self._run_id, kind, payload)
        return n

    def _write_backlog(self, ops: list[Operation]) -> None:
        run = {"run_id": self._run_id, "tracking_uri": self._uri}
        write_backlog(self.backlog_path, {**run, "experiment": self._experiment_name, "run_name": self._run_name}, ops)
