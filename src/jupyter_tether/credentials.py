"""Where the credentials come from, and keeping them out of every line shown or logged.

The environment names the default server (``REMOTE_JUPYTER_URL``) and its token
(``REMOTE_JUPYTER_TOKEN``); ``origin`` is where a credential may go; ``redact`` hides the
credentials a URL or message may carry, ``scrub_secrets`` also every known token. Pure;
shared by the controller, the CLI and the MCP server.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlsplit

URL_ENV = "REMOTE_JUPYTER_URL"
TOKEN_ENV = "REMOTE_JUPYTER_TOKEN"

# Kaggle's proxy URLs carry a JWT as a path segment: /k/<run>/<jwt>/proxy.
PATH_TOKEN = re.compile(r"/k/[^/]+/([^/]+)/proxy")


def origin(url: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of a URL, default ports filled in: where a credential may go."""
    parts = urlsplit(url if "://" in url else "http://" + url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port or (443 if scheme == "https" else 80)


def carries_credential(url: str) -> bool:
    """True when the URL itself holds a credential: ``?token=...`` or Kaggle's path JWT."""
    parts = urlsplit(url if "://" in url else "http://" + url)
    return any(k == "token" and v for k, v in parse_qsl(parts.query)) or bool(
        PATH_TOKEN.search(parts.path))


#: Shorter "tokens" are not scrubbed: they would blank out ordinary words.
MIN_SECRET = 4
#: Below this length a secret is replaced only as a whole run of token characters, so a
#: short one ("auth", "test") does not garble words that merely contain it.
_SHORT_SECRET = 16


def scrub_secrets(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every known secret (and URL credential) replaced by ``***``."""
    text = redact(text)
    for secret in sorted({s for s in secrets if len(s) >= MIN_SECRET}, key=len, reverse=True):
        if len(secret) >= _SHORT_SECRET:
            text = text.replace(secret, "***")
        else:
            text = re.sub(rf"(?<![\w-]){re.escape(secret)}(?![\w-])", "***", text)
    return text


def redact(text: str) -> str:
    """Hide credentials that may sit inside a URL or message."""
    text = re.sub(r"(token=)[^&\s]+", r"\1***", text)
    text = PATH_TOKEN.sub(lambda m: m.group(0).replace(m.group(1), "***"), text)
    return re.sub(r"(://[^/:@\s]+:)[^@\s]+@", r"\1***@", text)
