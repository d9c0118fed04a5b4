"""Keys and values made fit for MLflow's limits, so that a long or odd config never fails a log call."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

# MLflow limits (mlflow.utils.validation in 3.x); duplicated here so that importing this module
# does not import mlflow.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

TRUNCATION_MARK = "...[truncated]"
INVALID_KEY_CHARS = re.compile(r"[^/\w.\- :]")


def truncate(value: str, limit: int) -> str:
    """Cut ``value`` to ``limit`` characters, ending in a visible mark (mlflow rejects longer values)."""
    if len(value) <= limit:
        return value
    return value[: limit - len(TRUNCATION_MARK)] + TRUNCATION_MARK


def sanitize_key(key: Any) -> str:
    """Make a valid mlflow param/metric/tag key (allowed chars, no '..' path tricks, <=250)."""
    key = INVALID_KEY_CHARS.sub("_", str(key))
    parts = [p if p not in ("", ".", "..") else "_" for p in key.split("/")]
    key = "/".join(parts) or "_"
    return key[:MAX_KEY_LENGTH]


def to_plain(obj: Any) -> Any:
    """Pydantic models / dataclasses -> plain python containers (what JSON and flattening expect)."""
    if hasattr(obj, "model_dump") and callable(obj.model_dump):
        return obj.model_dump()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return obj


def value_to_str(value: Any) -> str:
    """One string per value; sequences as compact JSON so that they read back as lists."""
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


def tag_values(tags: Mapping[str, Any]) -> dict[str, str]:
    """Tags with valid keys and string values within mlflow's tag length."""
    return {sanitize_key(k): truncate(value_to_str(v), MAX_TAG_VALUE_LENGTH) for k, v in tags.items()}


def flatten_config(config: Mapping[str, Any] | Any, *, sep: str = ".", prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings into ``{"a.b.c": "value"}`` with string values fit for mlflow.

    Lists and tuples become compact JSON, ``None`` becomes ``"None"``, an empty mapping is kept as
    ``"{}"``. Keys are made valid for mlflow (disallowed characters -> ``_``, at most 250
    characters) and values longer than mlflow's 6000-character limit are cut, ending in
    ``...[truncated]``. Pydantic models and dataclasses are accepted.
    """
    out: dict[str, str] = {}

    def walk(node: Any, path: str) -> None:
        node = to_plain(node)
        if isinstance(node, Mapping):
            if not node and path:
                out[sanitize_key(path)] = "{}"
            for k, v in node.items():
                walk(v, f"{path}{sep}{k}" if path else str(k))
            return
        if not path:
            raise TypeError(f"flatten_config expects a mapping, got {type(node).__name__}")
        out[sanitize_key(path)] = truncate(value_to_str(node), MAX_PARAM_VALUE_LENGTH)

    walk(config, prefix)
    return out


def short_error(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` cut to ``limit`` characters, for one-line warnings."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + "..."
