"""Where the remote Jupyter server is and how to authenticate: URL and token parsing."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import ConfigError

URL_ENV = "REMOTE_JUPYTER_URL"
TOKEN_ENV = "REMOTE_JUPYTER_TOKEN"

# Kaggle's proxy URLs carry a JWT as a path segment: /k/<run>/<jwt>/proxy.
_PATH_TOKEN = re.compile(r"/k/[^/]+/([^/]+)/proxy")


@dataclass(frozen=True)
class Target:
    """A remote Jupyter server: its base URL (no query) and its token (may be empty)."""

    base_url: str
    token: str = field(default="", repr=False)
    name: str = ""

    def __repr__(self) -> str:
        # Never the credentials: a Kaggle URL carries its JWT in the path.
        return f"Target({self.display_url!r}, name={self.name!r})"

    @property
    def key(self) -> str:
        """A stable local identity for this target (state file key): never the token itself."""
        # Redacted: a rotated Kaggle URL (new JWT in the path) is still the same machine.
        return hashlib.sha256(redact(self.base_url).encode()).hexdigest()[:16]

    @property
    def display_url(self) -> str:
        return redact(self.base_url)

    def http_url(self, path: str) -> str:
        return self.base_url.rstrip("/") + "/" + path.lstrip("/")

    def ws_url(self, path: str, **query: str) -> str:
        scheme, netloc, base_path, _, _ = urlsplit(self.base_url)
        ws_scheme = {"http": "ws", "https": "wss"}[scheme]
        full_path = base_path.rstrip("/") + "/" + path.lstrip("/")
        return urlunsplit((ws_scheme, netloc, full_path, urlencode(query), ""))

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"} if self.token else {}


def parse_target(url: str | None = None, token: str | None = None, name: str = "") -> Target:
    """Build a Target from a URL as users paste it, with the token in it or given apart.

    Accepted: ``http://host:8888/`` plus a token; ``...?token=XYZ`` (Kaggle's "VSCode
    compatible URL"); ``.../k/<run>/<jwt>/proxy`` (the JWT in the path is the credential);
    a JupyterHub ``.../user/<name>/`` URL with a hub API token. ``/lab`` or ``/tree`` suffixes
    copied from a browser are dropped.
    """
    url = (url or os.environ.get(URL_ENV, "")).strip()
    if not url:
        raise ConfigError(
            f"no Jupyter server URL: pass --url / url=..., or set {URL_ENV}"
        )
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"unsupported URL scheme {parts.scheme!r}: use http:// or https://")
    if not parts.hostname:
        raise ConfigError(f"URL has no host: {redact(url)}")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    url_token = query.pop("token", "")
    path = re.sub(r"/(lab|tree|notebooks|doc)(/.*)?$", "", parts.path).rstrip("/")
    # Other query parameters (a browser URL's ?reset, say) are dropped: kept, they would
    # end up in front of every API path built from the base URL.
    base = urlunsplit((parts.scheme, parts.netloc, path + "/", "", ""))
    if token is None:
        token = url_token or os.environ.get(TOKEN_ENV, "")
    return Target(base_url=base, token=token.strip(), name=name)


def redact(text: str) -> str:
    """Hide credentials that may sit inside a URL or message."""
    text = re.sub(r"(token=)[^&\s]+", r"\1***", text)
    text = _PATH_TOKEN.sub(lambda m: m.group(0).replace(m.group(1), "***"), text)
    return re.sub(r"(://[^/:@\s]+:)[^@\s]+@", r"\1***@", text)
