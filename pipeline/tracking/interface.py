"""What the pipeline needs from experiment tracking, and the tracker for ranks that track nothing."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable


# MLflow error codes that a retry cannot fix (bad key, changed param value, ...).
PERMANENT_ERROR_CODES = frozenset(
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


def is_permanent(exc: BaseException) -> bool:
    """Whether MLflow rejected the request itself (retrying would fail the same way)."""
    code = getattr(exc, "error_code", None)
    return isinstance(code, str) and code in PERMANENT_ERROR_CODES


class TrackingUnavailableError(RuntimeError):
    """The tracking backend cannot be reached or used when the run starts."""


class TrackingWarning(RuntimeWarning):
    """Tracking degraded (fallback, buffering, backlog written); training goes on."""


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

    def log_model_dir(self, path: str | os.PathLike, artifact_path: str = "model", *,
                      registered_model_name: str | None = None, step: int = 0) -> None: ...

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

    def log_model_dir(self, path: str | os.PathLike, artifact_path: str = "model", *,
                      registered_model_name: str | None = None, step: int = 0) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        pass
