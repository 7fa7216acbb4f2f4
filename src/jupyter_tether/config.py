"""Named targets: a small TOML file of Jupyter servers to reach by name (API, CLI, MCP server).

``targets.toml`` lives in the platform's config dir (``JUPYTER_TETHER_CONFIG`` overrides it)::

    [kaggle]
    url = "https://kkb-production.jupyter-proxy.kaggle.net/k/123/eyJ.../proxy"

    [gpu-box]
    url = "http://gpu-box:8888/"
    token_env = "GPU_BOX_TOKEN"    # read the token from this env var (keeps it out of the file)

    [lab]
    url = "http://127.0.0.1:8888/"
    token = "abc123"

A top-level ``default = "gpu-box"`` names the target used when nothing else is given.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import platformdirs

from .controller.target import Target, parse_target
from .credentials import TOKEN_ENV, URL_ENV, origin, redact
from .errors import ConfigError

CONFIG_ENV = "JUPYTER_TETHER_CONFIG"
#: The MCP HTTP server's bearer token (kept out of argv, where any local user can read it).
AUTH_TOKEN_ENV = "JUPYTER_TETHER_AUTH_TOKEN"


def resolve_auth_token(flag: str | None = None, file: str | os.PathLike[str] | None = None
                       ) -> str | None:
    """The MCP server's bearer token: ``--auth-token``, else ``--auth-token-file``, else
    ``$JUPYTER_TETHER_AUTH_TOKEN``; None when none is given."""
    if flag is not None and file is not None:
        raise ConfigError("give either --auth-token or --auth-token-file, not both")
    if file is not None:
        path = Path(file).expanduser()
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the auth token file {path}: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
        if not token:
            raise ConfigError(f"the auth token file {path} is empty")
        return token
    token = (flag if flag is not None else os.environ.get(AUTH_TOKEN_ENV, "")).strip()
    if flag is not None and not token:
        raise ConfigError("--auth-token is empty")
    return token or None


def config_path() -> Path:
    override = os.environ.get(CONFIG_ENV)
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_config_dir("jupyter-tether")) / "targets.toml"


def default_root() -> Path:
    """Where the embedded server's root is when none is given: a workspace folder under the
    user data dir, never the folder jupyter-tether was started from (jobs, synced trees and
    the supervisor's state would otherwise land there)."""
    return Path(platformdirs.user_data_dir("jupyter-tether")) / "workspace"


def load_config(path: Path | None = None) -> dict[str, Any]:
    """The parsed config file; ``{}`` when it does not exist."""
    path = path or config_path()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        # The decoder's message names a line and column, never the file's values.
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


def named_targets(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """Every ``[name]`` table of the config file (the ``default`` key is not a target)."""
    return {name: value for name, value in load_config(path).items() if isinstance(value, dict)}


def target_from_config(name: str, path: Path | None = None) -> Target:
    path = path or config_path()
    targets = named_targets(path)
    entry = targets.get(name)
    if entry is None:
        known = ", ".join(sorted(targets)) or "none"
        raise ConfigError(f"no target named {name!r} in {path} (known: {known})")
    url = entry.get("url")
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"target {name!r} in {path} has no url")
    token = entry.get("token")
    token_env = entry.get("token_env")
    if token is None and isinstance(token_env, str):
        token = os.environ.get(token_env)
        if token is None:
            raise ConfigError(f"target {name!r} reads its token from ${token_env}, which is not set")
    if token is not None and not isinstance(token, str):
        raise ConfigError(f"target {name!r} in {path}: token must be a string")
    return parse_target(url, token, name=name)


def _bare_word(value: str) -> bool:
    """No scheme, port, path, query or dot: a target name, never meant as a URL."""
    return bool(value) and not any(c in value for c in ":/.?@")


def resolve_name(value: str, path: Path | None = None) -> Target | None:
    """The configured target ``value`` names, or None when ``value`` is a URL.

    For places that take a server URL and also accept a target's name (the MCP tools'
    ``server_url``): a value with ``://`` is always a URL; otherwise a configured name wins;
    a bare word (no port, path or dot) that names no target is an error listing the names.
    """
    value = value.strip()
    if "://" in value:
        return None
    path = path or config_path()
    try:
        targets = named_targets(path)
    except ConfigError:
        if _bare_word(value):
            raise
        return None  # "host:8888" is a URL even when the config file is broken
    if value in targets:
        return target_from_config(value, path)
    if _bare_word(value):
        known = ", ".join(sorted(targets)) or "none"
        raise ConfigError(f"{value!r} is neither a URL nor a target named in {path} "
                          f"(known targets: {known}); give a target name or a URL such as "
                          "http://host:8888/")
    return None


def configured_for(url: str, path: Path | None = None) -> Target | None:
    """The configured target a URL points at (same base URL, else same origin), token included.

    Lets a tool's ``server_url`` given as a URL use that target's token, which is bound to
    the target's origin. None when no target matches; an unusable exact match raises.
    """
    path = path or config_path()
    try:
        entries = named_targets(path)
    except ConfigError:
        return None
    wanted = parse_target(url, token="")
    same_origin: list[str] = []
    for name, entry in entries.items():
        entry_url = entry.get("url")
        if not isinstance(entry_url, str):
            continue
        try:
            candidate = parse_target(entry_url, token="")
        except ConfigError:
            continue
        if redact(candidate.base_url) == redact(wanted.base_url):
            return target_from_config(name, path)
        if origin(candidate.base_url) == origin(wanted.base_url):
            same_origin.append(name)
    for name in same_origin:
        try:
            return target_from_config(name, path)
        except ConfigError:
            continue
    return None


@dataclass(frozen=True)
class Selection:
    """Which server a command talks to, and how to say so again without the secret."""

    target: Target | None  # None: start the embedded local server
    source: str  # "target", "url", "env", "default" or "embedded"
    #: ``--url`` names another origin than $REMOTE_JUPYTER_URL, so $REMOTE_JUPYTER_TOKEN
    #: was not sent there (it is bound to its own server).
    env_token_withheld: bool = False

    def auth_hint(self) -> str:
        """What to add to an auth failure when the env token was held back (else "")."""
        if not self.env_token_withheld or self.target is None:
            return ""
        env_url = os.environ.get(URL_ENV, "")
        bound = f"{URL_ENV}'s server ({redact(env_url)})" if env_url else \
            f"no server ({URL_ENV} is not set)"
        return (f" ${TOKEN_ENV} is sent only to {bound}, not to {self.target.display_url}: "
                "pass that server's token with --token (or ?token= in --url), or add it as "
                "a named target (see `jupyter-tether targets`).")

    def cli_args(self) -> str:
        """Options that select the same server again, for hints like "re-attach with ..."."""
        if self.target is None or self.source in ("env", "default"):
            return ""
        if self.source == "target":
            return f" --target {self.target.name}"
        url = self.target.display_url
        if "***" in url:  # the credential lives in the URL: never echo it
            return " --url <URL>"
        return f" --url {url}" + (" --token <TOKEN>" if self.target.token else "")


def select_target(url: str | None = None, token: str | None = None, name: str | None = None,
                  *, path: Path | None = None) -> Selection:
    """Which server to talk to: the one rule of the Python API, the CLI and the MCP server.

    In order: an explicit URL (``url``, ``--url``) or target name (``name``, ``--target``,
    or a name given where a URL goes, as ``connect("lab")`` does: a configured name wins
    where the value has no ``://``); then ``$REMOTE_JUPYTER_URL``; then the config file's
    ``default``; else None, the embedded local server. A bare word that is neither a URL
    nor a configured name is an error that lists the names.

    ``token`` goes with whatever server is chosen. Without one a URL keeps its own
    (``?token=``), a named target uses its configured token, and ``$REMOTE_JUPYTER_TOKEN``
    goes only to ``$REMOTE_JUPYTER_URL``'s origin (``env_token_for``).
    """
    if name and url:
        raise ConfigError("give either a URL (--url, url=) or a target name (--target, "
                          "target=), not both")
    if url and not name:
        named = resolve_name(url, path)
        if named is not None:
            return Selection(_with_token(named, token), "target")
    if name:
        return Selection(_with_token(target_from_config(name, path), token), "target")
    if url:
        target = parse_target(url, token)
        withheld = token is None and not target.token and bool(os.environ.get(TOKEN_ENV))
        return Selection(target, "url", env_token_withheld=withheld)
    if os.environ.get(URL_ENV):
        return Selection(parse_target(None, token), "env")
    default = load_config(path).get("default")
    if isinstance(default, str) and default:
        return Selection(_with_token(target_from_config(default, path), token), "default")
    if token:
        raise ConfigError(f"a token was given but no server: pass a URL (--url, url=) or a "
                          f"target name, or set {URL_ENV}")
    return Selection(None, "embedded")


def _with_token(target: Target, token: str | None) -> Target:
    """``target`` with a token given alongside its name (it goes where the name points)."""
    return target if token is None else replace(target, token=token.strip())


def describe_targets(path: Path | None = None) -> list[dict[str, Any]]:
    """The named targets as safe-to-print rows: URLs redacted, tokens reduced to a yes/no."""
    path = path or config_path()
    config = load_config(path)
    rows = []
    for name, entry in named_targets(path).items():
        url = entry.get("url")
        rows.append({
            "name": name,
            "url": redact(url) if isinstance(url, str) else None,
            "token": ("env:" + entry["token_env"]) if isinstance(entry.get("token_env"), str)
            else ("set" if entry.get("token") else "none"),
            "default": config.get("default") == name,
        })
    return rows
