"""Experiment tracking behind a small interface (MLflow on rank 0, nothing elsewhere).

The training loop talks to a :class:`Tracker`; :func:`create_tracker` returns

* a :class:`NullTracker` on non-main ranks and when tracking is off, and
* an :class:`MLflowTracker` on the main process otherwise.

``mlflow`` is imported lazily (inside functions), so importing this package is cheap and
non-zero ranks never pay for it.

Tracking URI resolution: explicit ``tracking_uri`` > env ``MLFLOW_TRACKING_URI`` > the embedded
default ``sqlite:///<output_dir>/mlflow.db`` with artifacts in ``<output_dir>/mlartifacts``.

Reliability contract:

* At start, an unreachable server is a :class:`TrackingUnavailableError` naming the URI, raised
  within seconds (a plain ``GET <uri>/health`` with a short timeout, not mlflow's minutes of
  retries); with ``tracking_fallback_local: true`` a warning is issued and the local sqlite store
  is used. Jobs starting at once on one sqlite store take turns creating it (a lock file beside it).
* During the run, tracking never raises into training. A call that fails is kept in memory (in
  order) and retried on later calls (with a back-off, so an outage costs the loop almost nothing)
  and once more at :meth:`Tracker.close`. What still fails at close is appended to
  ``<output_dir>/tracking_backlog.jsonl`` and a warning says how to replay it
  (``earlycrop tracking replay <backlog> --tracking-uri URI``, or :func:`replay_backlog`).

Modules: :mod:`.interface` (protocol, null tracker, errors), :mod:`.uris` (where the store is, its
lock, the health check), :mod:`.values` (keys and values within MLflow's limits),
:mod:`.operations` (the one operation applier), :mod:`.mlflow_client` (tracker and retry queue),
:mod:`.backlog` (JSONL backlog and replay), :mod:`.factory` (:func:`create_tracker`), :mod:`.names`
(metric sections such as ``train/loss``, run names that say what a run is), :mod:`.models` (the final model
as an MLflow Logged Model: transformers flavor, or a python model through ``earlycrop.from_pretrained``).
"""

from __future__ import annotations

from .backlog import BACKLOG_FILE_NAME, read_backlog, replay_backlog, write_backlog
from .factory import create_tracker, run_info
from .interface import NullTracker, Tracker, TrackingUnavailableError, TrackingWarning
from .mlflow_client import DEFAULT_HTTP_RETRIES, DEFAULT_HTTP_TIMEOUT, PENDING_DIR_NAME, MLflowTracker
from .names import ONE_OFF_STEP, default_run_name, metric_name
from .operations import apply_operation
from .stale import end_stale_run
from .uris import check_server_reachable, default_tracking_uri, resolve_tracking_uri
from .values import (
    MAX_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VALUE_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VALUE_LENGTH,
    flatten_config,
)

__all__ = [
    "Tracker",
    "NullTracker",
    "MLflowTracker",
    "TrackingUnavailableError",
    "TrackingWarning",
    "create_tracker",
    "run_info",
    "end_stale_run",
    "metric_name",
    "ONE_OFF_STEP",
    "default_run_name",
    "resolve_tracking_uri",
    "default_tracking_uri",
    "flatten_config",
    "check_server_reachable",
    "apply_operation",
    "read_backlog",
    "write_backlog",
    "replay_backlog",
    "BACKLOG_FILE_NAME",
    "PENDING_DIR_NAME",
    "DEFAULT_HTTP_TIMEOUT",
    "DEFAULT_HTTP_RETRIES",
    "MAX_PARAM_VALUE_LENGTH",
    "MAX_TAG_VALUE_LENGTH",
    "MAX_KEY_LENGTH",
    "MAX_PARAMS_TAGS_PER_BATCH",
    "MAX_METRICS_PER_BATCH",
]
