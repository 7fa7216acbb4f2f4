"""Where the remote Jupyter server is and how to authenticate: URL and token parsing."""

from __future__ import annotations

import functools
import hashlib
import os
import ssl
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..credentials import TOKEN_ENV, URL_ENV, origin, redact
from ..errors import ConfigError


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The TLS client context every connection of this process uses: the system's trust
    store, as httpx2 builds it. Building one loads the whole CA store (~20 ms of CPU), so it
    is built once per process, not per client or per reconnect."""
    import httpx2  # here: the rest of this module is plain URL handling

    return httpx2.create_ssl_context()


def tls_hint(error: str) -> str:
    """What to do about a refused server certificate (appended to the error), else ""."""
    if "CERTIFICATE_VERIFY_FAILED" not in error:
        return ""
    return ("; the server's TLS certificate is not trusted here: if a private CA signed it, "
            "set SSL_CERT_FILE to that CA's certificate (PEM)")


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
    a JupyterHub ``.../user/<name>/`` URL with a hub API token. A page's path copied from a
    browser (``/lab``, ``/tree/...``, ``/notebooks/...``) or a REST path (``/api``,
    ``/api/kernels``) is dropped (``strip_ui_path``).

    With ``token=None`` the token is the one in the URL, else the environment's credential,
    but only where the URL has ``REMOTE_JUPYTER_URL``'s origin (see ``env_token_for``).
    """
    from_env = not url
    url = (url or os.environ.get(URL_ENV, "")).strip()
    if not url:
        raise ConfigError(
            f"no Jupyter server URL: pass --url / url=..., or set {URL_ENV}"
        )
    base, url_token = split_url(url)
    if token is None:
        if url_token:
            token = url_token
        elif from_env:
            token = os.environ.get(TOKEN_ENV, "")
        else:
            token = env_token_for(base)
    return Target(base_url=base, token=token.strip(), name=name)


def split_url(url: str) -> tuple[str, str]:
    """``(base URL, token from its query)`` of a URL as pasted; ConfigError when unusable."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"unsupported URL scheme {parts.scheme!r}: use http:// or https://")
    try:
        hostname, _ = parts.hostname, parts.port
    except ValueError:  # a port that is no number
        raise ConfigError(f"URL has a bad port: {redact(url)}") from None
    if not hostname:
        raise ConfigError(f"URL has no host: {redact(url)}")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    url_token = query.pop("token", "")
    path = strip_ui_path(parts.path).rstrip("/")
    # Other query parameters (a browser URL's ?reset, say) are dropped: kept, they would
    # end up in front of every API path built from the base URL.
    return urlunsplit((parts.scheme, parts.netloc, path + "/", "", "")), url_token


#: Path segments that start a browser page (``/lab``, ``/tree/x``, ``/notebooks/x.ipynb``...)
#: rather than the server's base URL.
_UI_SEGMENTS = frozenset({"lab", "tree", "notebooks", "doc", "edit", "consoles", "terminals"})
#: What may follow ``/api`` in a pasted REST URL (``/api/kernels/...``).
_API_SEGMENTS = frozenset({"", "kernels", "sessions", "contents", "status", "kernelspecs",
                           "terminals", "me", "spec.yaml"})


def strip_ui_path(path: str) -> str:
    """A URL path up to where a browser page or a REST path starts: ``/lab``, ``/tree/...``,
    ``/notebooks/...``, a trailing ``/api`` or ``/api/kernels/...``.

    The segment right after ``/user/`` is a JupyterHub user's name, never a page.
    """
    segments = path.split("/")
    for index, segment in enumerate(segments):
        if index and segments[index - 1] == "user":
            continue
        after = segments[index + 1] if index + 1 < len(segments) else ""
        if segment in _UI_SEGMENTS or (segment == "api" and after in _API_SEGMENTS):
            return "/".join(segments[:index])
    return path


def env_token_for(url: str) -> str:
    """The environment's token for ``url``: ``REMOTE_JUPYTER_TOKEN`` (or a ``?token=`` in
    ``REMOTE_JUPYTER_URL``), but only when ``url`` has ``REMOTE_JUPYTER_URL``'s origin.

    The env token is a credential for one server: sent to any URL an agent or a pasted
    command names, it would leak. With ``REMOTE_JUPYTER_URL`` unset it goes nowhere.
    """
    env_url = os.environ.get(URL_ENV, "").strip()
    if not env_url:
        return ""
    try:
        env_base, env_url_token = split_url(env_url)
    except ConfigError:
        return ""
    if origin(env_base) != origin(url):
        return ""
    return env_url_token or os.environ.get(TOKEN_ENV, "")
