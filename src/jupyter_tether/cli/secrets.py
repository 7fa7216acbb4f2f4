"""The tokens this command knows, kept out of every line it prints (errors included)."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Sequence

from .. import parse_target
from ..config import AUTH_TOKEN_ENV, config_path, named_targets, target_from_config
from ..credentials import MIN_SECRET, TOKEN_ENV, scrub_secrets

#: Tokens this command knows (``--token``, a token in ``--url``, the config's targets): no
#: line it prints may show them. Filled by ``main``; ``REMOTE_JUPYTER_TOKEN`` is read live.
SECRETS: set[str] = set()


def remember_secrets(*tokens: str | None) -> None:
    SECRETS.update(t for t in tokens if t and len(t) >= MIN_SECRET)


def scrub(text: str, *tokens: str | None) -> str:
    """``text`` with no credential in it: URL tokens redacted and every known token -> ***."""
    return scrub_secrets(text, {*SECRETS, os.environ.get(TOKEN_ENV, ""),
                                os.environ.get(AUTH_TOKEN_ENV, ""), *(t or "" for t in tokens)})


def tokens_in_argv(argv: Sequence[str]) -> list[str]:
    """``--token``/``--auth-token`` values, before argparse runs (its usage errors may quote
    them)."""
    found = []
    for index, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        # argparse takes unambiguous prefixes of either option
        if len(name) >= 4 and any(option.startswith(name)
                                  for option in ("--token", "--auth-token")):
            if eq:
                found.append(value)
            elif index + 1 < len(argv):
                found.append(argv[index + 1])
    return found


def collect_secrets(args: argparse.Namespace) -> None:
    """Every token this command may hold: --token, --url's, and each configured target's."""
    remember_secrets(args.token)
    if args.url:
        with contextlib.suppress(Exception):
            remember_secrets(parse_target(args.url, args.token).token)
    with contextlib.suppress(Exception):  # a broken config is reported where it is used
        path = config_path()
        for name in named_targets(path):
            with contextlib.suppress(Exception):
                remember_secrets(target_from_config(name, path).token)
