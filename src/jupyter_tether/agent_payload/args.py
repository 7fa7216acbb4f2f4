"""Argument checks shared by op handlers, beyond ``wire.arg``: each raises ``invalid_argument``
(or ``too_large``) with a message that names the argument."""

from typing import Any, Dict, List, Optional

from . import wire
from .wire import ErrorCode, OpError, arg


def optional_mtime_ns(args: Dict[str, Any]) -> Optional[int]:
    """``mtime_ns`` (exact, preferred) or ``mtime`` (float seconds), or None."""
    mtime_ns = arg(args, "mtime_ns", int, None, allow_none=True)
    if mtime_ns is not None:
        return int(mtime_ns)
    mtime = arg(args, "mtime", float, None, allow_none=True)
    return None if mtime is None else round(mtime * 1e9)


def optional_mode(args: Dict[str, Any]) -> Optional[int]:
    mode = arg(args, "mode", int, None, allow_none=True)
    if mode is not None and not 0 <= mode <= 0o7777:
        raise OpError(ErrorCode.INVALID_ARGUMENT, "mode must be a permission value 0..0o7777")
    return mode


def string_list(args: Dict[str, Any], name: str, default: Any = None) -> List[str]:
    values = arg(args, name, list, default if default is not None else [])
    for value in values:
        if not isinstance(value, str):
            raise OpError(ErrorCode.INVALID_ARGUMENT, "%r must be a list of strings" % name)
    return list(values)


def check_chunk_length(length: int, name: str = "length") -> None:
    if length > wire.MAX_CHUNK_BYTES:
        raise OpError(ErrorCode.TOO_LARGE, "%s of %d bytes exceeds the %d-byte chunk limit"
                      % (name, length, wire.MAX_CHUNK_BYTES),
                      {"limit": wire.MAX_CHUNK_BYTES})


def int_arg(args: Dict[str, Any], name: str, default: Any, low: int, high: int) -> Any:
    value = arg(args, name, int, default)
    if value is None:
        return None
    if not low <= value <= high:
        raise OpError(ErrorCode.INVALID_ARGUMENT, "argument %r must be between %d and %d, got %d"
                      % (name, low, high, value))
    return value


def float_arg(args: Dict[str, Any], name: str, default: float, low: float, high: float,
              clamp: bool = False) -> float:
    value = float(arg(args, name, float, default))
    if value != value or value < low or (value > high and not clamp):  # NaN fails too
        raise OpError(ErrorCode.INVALID_ARGUMENT, "argument %r must be between %g and %g, got %r"
                      % (name, low, high, value))
    return min(value, high)


def env_arg(args: Dict[str, Any]) -> Dict[str, Optional[str]]:
    overrides = arg(args, "env_overrides", dict, {})
    for key, value in overrides.items():
        if not isinstance(key, str) or not key or "=" in key or "\x00" in key:
            raise OpError(ErrorCode.INVALID_ARGUMENT,
                          "env_overrides keys must be non-empty names without '=', got %r"
                          % (key,))
        if value is not None and (not isinstance(value, str) or "\x00" in value):
            raise OpError(ErrorCode.INVALID_ARGUMENT,
                          "env_overrides[%r] must be a string (or null to unset), got %s"
                          % (key, type(value).__name__))
    return overrides


def command_arg(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise OpError(ErrorCode.INVALID_ARGUMENT, "%s must be a string, got %s"
                      % (name, type(value).__name__))
    if not value.strip():
        raise OpError(ErrorCode.INVALID_ARGUMENT, "%s is empty" % name)
    if "\x00" in value:
        raise OpError(ErrorCode.INVALID_ARGUMENT, "%s contains a NUL byte" % name)
    return value
