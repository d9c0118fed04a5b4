"""Runs a killed job left RUNNING: the next job in the same output_dir ends them as KILLED."""

from __future__ import annotations

import warnings

from .interface import TrackingWarning


def end_stale_run(tracking_uri: str | None, run_id: str) -> bool:
    """Mark `run_id` KILLED if it is still RUNNING (its process died without closing it); True if it was.
    Tracking trouble here only warns: it must never stop the new run."""
    if not tracking_uri:
        return False
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        if client.get_run(run_id).info.status != "RUNNING":
            return False
        client.set_terminated(run_id, status="KILLED")
        return True
    except Exception as exc:  # any MLflow or network error: the old run simply stays as it is
        warnings.warn(f"could not mark the previous run {run_id} KILLED: {str(exc).splitlines()[0][:200]}", TrackingWarning,
                      stacklevel=2)
        return False
