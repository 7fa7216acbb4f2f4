"""How tools look on the wire: compact schemas for ``tools/list`` and one shape for results.

Schemas: pydantic's automatic titles (the property name again, in Title Case) go, and an
optional argument is written as its type alone (``null`` stays accepted, its absence from
``required`` says it is optional), which keeps ``tools/list`` small in an agent's context.

Results: compact JSON text, times as ISO-8601 UTC, durations in seconds (rounded to ms),
and remote paths under the server root written relative to it.
"""

from __future__ import annotations

import datetime
import json
import posixpath
from typing import Any

import pydantic_core

# Results' keys whose string value is a remote path (local paths have their own keys:
# local_path, local_dir, images).
REMOTE_PATH_KEYS = frozenset({"path", "resolved_path", "remote_path", "remote_dir", "log_path",
                              "cwd", "record_path"})
# Content that is the user's own (a cell's display data and its metadata): left as it is.
OPAQUE_KEYS = frozenset({"data", "metadata"})
_SCHEMA_MAPS = frozenset({"properties", "$defs", "definitions", "patternProperties"})


# --- schemas ----------------------------------------------------------------------------------


def compact_schema(node: Any) -> Any:
    """An input schema without pydantic's automatic titles, trivial bounds, and with an
    optional ``X | None = None`` argument written as ``X`` (no ``anyOf``, no
    ``default: null``)."""
    if isinstance(node, list):
        return [compact_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "title" and isinstance(value, str):
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: compact_schema(sub) for name, sub in value.items()}
        else:
            out[key] = compact_schema(value)
    # Bounds any value meets (a non-empty string, a positive timeout) say nothing to an
    # agent; the server still checks them.
    for key, trivial in (("minLength", 1), ("exclusiveMinimum", 0)):
        if out.get(key) == trivial:
            del out[key]
    return _drop_null_option(out)


def _drop_null_option(node: dict[str, Any]) -> dict[str, Any]:
    options = node.get("anyOf")
    if not (isinstance(options, list) and len(options) == 2 and {"type": "null"} in options
            and "default" in node and node["default"] is None):
        return node
    (kept,) = [option for option in options if option != {"type": "null"}]
    rest = {k: v for k, v in node.items() if k not in ("anyOf", "default")}
    return {**kept, **rest}


# --- results ----------------------------------------------------------------------------------


def iso_utc(seconds: float | None) -> str | None:
    """A Unix time as ISO-8601 UTC with milliseconds (``2025-01-31T12:00:00.250Z``)."""
    if seconds is None:
        return None
    moment = datetime.datetime.fromtimestamp(float(seconds), datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _is_time_key(key: str) -> bool:
    return key.endswith(("_at", "_since")) or key == "mtime"


def _is_duration_key(key: str) -> bool:
    return key == "seconds" or key.endswith("_s")


def relative_to_root(path: str, root: str | None) -> str:
    """``path`` relative to the remote ``root`` when it lies under it (the root itself is
    ``.``); anything else as it was."""
    if not root or not path.startswith("/"):
        return path
    root = root.rstrip("/") or "/"
    if path == root:
        return "."
    prefix = root if root == "/" else root + "/"
    if not path.startswith(prefix):
        return path
    return posixpath.normpath(path[len(prefix):])


def shape(value: Any, root: str | None, key: str = "") -> Any:
    """A tool result in the shape every tool shares (see the module docstring)."""
    if key in OPAQUE_KEYS:
        return value
    if isinstance(value, dict):
        return {k: shape(v, root, k) if isinstance(k, str) else shape(v, root)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [shape(item, root) for item in value]
    if isinstance(value, bool) or not key:
        return value
    if isinstance(value, int | float) and _is_time_key(key):
        return iso_utc(value)
    if isinstance(value, float) and _is_duration_key(key):
        return round(value, 3)
    if isinstance(value, str) and key in REMOTE_PATH_KEYS:
        return relative_to_root(value, root)
    return value


def to_json_text(value: Any) -> str:
    """Compact JSON (no indentation, UTF-8 as is) of a JSON-ready value."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types (what the SDK would have made of it)."""
    return pydantic_core.to_jsonable_python(value, fallback=str)
