"""The tracker each process gets: MLflow on the main process, nothing elsewhere."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .interface import NullTracker, Tracker, TrackingUnavailableError, TrackingWarning
from .mlflow_client import MLflowTracker
from .uris import default_tracking_uri, resolve_tracking_uri


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
    or with ``fallback_to_local`` (config ``tracking_fallback_local``) a :class:`TrackingWarning` is
    issued and the local sqlite store in ``output_dir`` is used instead (the run gets tag
    ``earlycrop.tracking_fallback_from``). ``run_id`` resumes an existing run (e.g. from a checkpoint).
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
        warnings.warn(f"tracking: {e} Falling back to the local store {local}.", TrackingWarning, stacklevel=2)
        fallback_tags = dict(tags or {})
        fallback_tags["earlycrop.tracking_fallback_from"] = uri
        return MLflowTracker(local, experiment, run_name, output_dir=output_dir, tags=fallback_tags)


def run_info(tracker: Tracker) -> dict[str, Any]:
    """What run_info.json keeps: the run and its store (to resume it), and its experiment (the CLI prints the run's
    page from it; only an MLflow tracker has one)."""
    return {"run_id": tracker.run_id, "tracking_uri": tracker.tracking_uri,
            "experiment_id": getattr(tracker, "experiment_id", None)}
