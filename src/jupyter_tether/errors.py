"""Every exception jupyter-tether raises, in one tree, so callers can catch at the right level.

::

    TetherError
    ├── ConfigError            bad target URL, missing token, unreadable config file
    ├── ConnectionLost         the link is down and did not come back within the wait
    ├── AuthError              401/403 from the server (expired or wrong token / URL)
    ├── ServerError            the Jupyter REST API answered with an unexpected error
    ├── KernelError            a kernel died, or would not start
    ├── TetherTimeout          a bounded wait ran out (the remote work may still go on)
    ├── RemoteError            the supervisor answered with a typed error (``.code``)
    │   ├── NotFound           not_found          no such path, job or transfer
    │   ├── InvalidArgument    invalid_argument   an argument was refused
    │   ├── Conflict           conflict           the state moved under the call (retry)
    │   ├── Busy               busy               too many at once on the remote (retry)
    │   ├── PermissionDenied   permission_denied  the remote OS, or a protected root
    │   ├── TooLarge           too_large          over a remote limit
    │   ├── IsADirectory       is_a_directory
    │   ├── NotADirectory      not_a_directory
    │   ├── RemoteTimeout      timeout            (also a TetherTimeout)
    │   ├── UnknownOp          unknown_op         an older supervisor; reconnect upgrades it
    │   ├── Malformed          malformed          the request did not decode
    │   └── RemoteInternal     internal           a bug on the remote side; it stays up
    ├── ExecError              code run with ``exec`` raised (``.ename``, ``.traceback``)
    ├── JobError               a job failed to start, or ``wait(check=True)`` saw a failure
    ├── TransferError          an upload / download / sync could not complete
    └── LimitExceeded          the remote sent more than a named limit allows (``.limit``)
"""

from __future__ import annotations

from typing import Any, ClassVar

from .agent_payload.wire import ErrorCode


class TetherError(Exception):
    """Base class of every jupyter-tether error."""


class ConfigError(TetherError):
    """The target or configuration is unusable; the message says what to fix."""


class ConnectionLost(TetherError):
    """The connection to the remote Jupyter server is down and did not come back in time."""


class AuthError(TetherError):
    """The server refused our credentials (401/403)."""


class ServerError(TetherError):
    """The Jupyter REST API answered with an unexpected status."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class KernelError(TetherError):
    """A kernel died, restarted under us, or could not be started."""


class TetherTimeout(TetherError, TimeoutError):
    """A bounded wait ran out. The remote work itself may still be running."""


class RemoteError(TetherError):
    """The supervisor answered a request with a typed error."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{message} [{code}]")
        self.code = code
        self.message = message
        self.details = details or {}

    @staticmethod
    def from_wire(error: dict[str, Any]) -> RemoteError:
        """The exception for an error reply: one class per ``wire.ErrorCode``."""
        code = str(error.get("code", ErrorCode.INTERNAL))
        message = str(error.get("message", "remote error"))
        details = error.get("details") or {}
        return _BY_CODE.get(code, RemoteError)(code, message, details)


class NotFound(RemoteError):
    """The remote path, job or kernel does not exist."""

    code_name: ClassVar[str] = ErrorCode.NOT_FOUND


class InvalidArgument(RemoteError):
    """The supervisor rejected an argument."""

    code_name: ClassVar[str] = ErrorCode.INVALID_ARGUMENT


class Conflict(RemoteError):
    """The remote state changed under the call (a file moved mid-transfer); retrying may work."""

    code_name: ClassVar[str] = ErrorCode.CONFLICT


class Busy(RemoteError):
    """The remote has too many of these at once (open transfers, say); retry shortly."""

    code_name: ClassVar[str] = ErrorCode.BUSY


class PermissionDenied(RemoteError):
    """The remote OS refused, or the call would delete a protected root."""

    code_name: ClassVar[str] = ErrorCode.PERMISSION_DENIED


class TooLarge(RemoteError):
    """The request or its answer is over a limit the supervisor enforces."""

    code_name: ClassVar[str] = ErrorCode.TOO_LARGE


class IsADirectory(RemoteError):
    """A file operation named a remote directory."""

    code_name: ClassVar[str] = ErrorCode.IS_A_DIRECTORY


class NotADirectory(RemoteError):
    """A directory operation named a remote file."""

    code_name: ClassVar[str] = ErrorCode.NOT_A_DIRECTORY


class RemoteTimeout(RemoteError, TetherTimeout):
    """A wait bounded on the remote side ran out (a command's timeout, say)."""

    code_name: ClassVar[str] = ErrorCode.TIMEOUT


class UnknownOp(RemoteError):
    """The supervisor does not know the op: it is older than this controller."""

    code_name: ClassVar[str] = ErrorCode.UNKNOWN_OP


class Malformed(RemoteError):
    """The supervisor could not decode the request."""

    code_name: ClassVar[str] = ErrorCode.MALFORMED


class RemoteInternal(RemoteError):
    """An unexpected failure inside the supervisor (it keeps serving other calls)."""

    code_name: ClassVar[str] = ErrorCode.INTERNAL


_BY_CODE: dict[str, type[RemoteError]] = {
    cls.code_name: cls for cls in RemoteError.__subclasses__() if hasattr(cls, "code_name")}


class ExecError(TetherError):
    """Code run through ``exec`` raised an exception on the remote kernel."""

    def __init__(self, ename: str, evalue: str, traceback: list[str]) -> None:
        super().__init__(f"{ename}: {evalue}")
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback


class JobError(TetherError):
    """A job could not be started, or finished with a failure the caller asked to check."""


class TransferError(TetherError):
    """A file transfer or sync could not be completed."""


class LimitExceeded(TetherError):
    """The remote sent more than a limit allows (an oversized message, a flood, a listing
    too long) or a reply no honest peer sends.

    ``limit`` names the limit (a constant in ``jupyter_tether``), ``value`` is its size.
    Where a connection carried it, that connection was closed rather than risk the
    controller's memory; retrying asks the same remote for the same thing.
    """

    def __init__(self, message: str, *, limit: str, value: int) -> None:
        super().__init__(message)
        self.limit = limit
        self.value = value
