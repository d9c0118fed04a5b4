"""Where tracking goes: URI resolution, the sqlite store's files and creation lock, a fast health check."""

from __future__ import annotations

import fcntl
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from .interface import TrackingUnavailableError

T = TypeVar("T")

# What a lost race between two processes migrating one fresh database looks like (alembic / sqlite).
MIGRATION_RACE_SIGNATURES = ("Online migration expected to match one row", "_alembic_tmp_", "duplicate column name")


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


def is_http(uri: str) -> bool:
    """Only HTTP(S) servers can be health-checked (and only they go down independently of us)."""
    return urllib.parse.urlparse(uri).scheme in ("http", "https")


def sqlite_db_path(uri: str) -> Path | None:
    """``sqlite:///dir/x.db`` -> ``dir/x.db`` (None for other URIs and in-memory databases)."""
    if not uri.startswith("sqlite:///"):
        return None
    db_path = uri[len("sqlite:///") :].split("?", 1)[0]
    if not db_path or db_path == ":memory:":
        return None
    return Path(db_path).resolve()


def sqlite_artifact_location(uri: str) -> str | None:
    """For ``sqlite:///dir/x.db`` -> ``file:///dir/mlartifacts`` (new experiments only)."""
    db_path = sqlite_db_path(uri)
    return None if db_path is None else (db_path.parent / "mlartifacts").as_uri()


@contextmanager
def sqlite_store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<db>.lock`` beside a sqlite store (no-op for other URIs).

    The lock sits next to the database, so it also serialises jobs on other hosts of a shared file
    system (mlflow's own init lock lives in the local temp dir and does not cover the tracking store).
    """
    db_path = sqlite_db_path(uri)
    if db_path is None:
        yield
        return
    db_path.parent.mkdir(parents=True, exist_ok=True)  # sqlite cannot create the db in a missing folder
    with db_path.with_name(db_path.name + ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_migration_race(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a lost schema-migration race."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:  # a chain can loop back on itself
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return any(sig in str(e) for e in chain for sig in MIGRATION_RACE_SIGNATURES)


def create_in_store(uri: str, create: Callable[[], T], retry_delay: float = 5.0) -> T:
    """Run ``create`` (the first client / experiment / run creation) safely on a possibly fresh store.

    Two jobs starting at once on one new sqlite file both run mlflow's schema migrations, and one
    dies. Under :func:`sqlite_store_lock` our own jobs take turns; a lost race against a process that
    does not take the lock (``mlflow ui`` on the same file) is retried once.
    """
    with sqlite_store_lock(uri):
        try:
            return create()
        except Exception as e:  # noqa: BLE001 — only the migration race is retried
            if not is_migration_race(e):
                raise
        time.sleep(retry_delay)  # let the other process finish its migration
        return create()


def check_server_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise :class:`TrackingUnavailableError` unless ``GET <uri>/health`` answers within ``timeout``.

    Any HTTP answer below 500 counts as reachable (a proxy may want auth for /health).
    Non-HTTP URIs are not checked.
    """
    if not is_http(uri):
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
            f"`tracking: off`, or set `tracking_fallback_local: true` to log to the local store instead."
        ) from e
