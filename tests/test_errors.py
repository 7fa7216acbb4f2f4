"""The exception tree: every wire error code has exactly one class, and the tree is drawn."""

from __future__ import annotations

import pytest

from jupyter_tether import errors
from jupyter_tether.agent_payload.wire import ErrorCode

CODES = sorted(v for k, v in vars(ErrorCode).items() if k.isupper())


@pytest.mark.parametrize("code", CODES)
def test_every_error_code_maps_to_its_own_class(code: str) -> None:
    exc = errors.RemoteError.from_wire({"code": code, "message": "m", "details": {"x": 1}})
    assert type(exc) is not errors.RemoteError, f"{code} has no class of its own"
    assert exc.code == code and exc.message == "m" and exc.details == {"x": 1}
    assert type(exc).__name__ in (errors.__doc__ or ""), "the tree in the docstring misses it"


def test_classes_are_distinct_and_unknown_codes_stay_generic() -> None:
    classes = {type(errors.RemoteError.from_wire({"code": c})) for c in CODES}
    assert len(classes) == len(CODES)
    exc = errors.RemoteError.from_wire({"code": "from_the_future", "message": "?"})
    assert type(exc) is errors.RemoteError and exc.code == "from_the_future"


def test_remote_timeout_is_caught_as_a_timeout() -> None:
    exc = errors.RemoteError.from_wire({"code": ErrorCode.TIMEOUT, "message": "slow"})
    assert isinstance(exc, errors.TetherTimeout) and isinstance(exc, TimeoutError)
    assert str(exc) == "slow [timeout]"
