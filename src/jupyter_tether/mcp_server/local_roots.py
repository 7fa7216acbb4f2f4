"""Which local paths the MCP tools may read or write: the allowed roots and the pure check.

Anyone who can reach the MCP server can call its tools, so the tools that touch the local
disk (upload, download, sync, submit, collect) only use paths inside the allowed roots:

* The server's own roots: every ``--local-root DIR``, else the server's working directory.
  These are the ceiling: nothing outside them is ever read or written.
* When the MCP client offers roots (``roots/list``, ``file://`` URIs), the allowed roots are
  the parts of the client's roots that lie inside the server's own. Client roots narrow the
  ceiling and never widen it: a client is whoever reaches the port, and a hostile one would
  simply offer ``file:///``. (The reference filesystem server lets client roots replace its
  command-line ones; that would make the roots no protection against such a client.)
  A client that offers no usable root (none, or none that is a local directory) leaves the
  server's own roots.

A path is resolved before the check: ``~`` is expanded, a relative path is taken from the
first allowed root, and symlinks are resolved (``realpath``) for the part that exists, so a
link inside a root that points outside it is refused, whether it names the file itself or a
directory above a file still to be created. The tools then use the resolved path.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from ..errors import ConfigError

FLAG = "--local-root"


class OutsideLocalRoots(ConfigError):
    """A local path lies outside the roots the MCP server may read and write."""


def _real(path: str) -> str:
    # realpath alone: it resolves each link before applying a later "..", as the kernel does
    # (abspath first would fold "link/.." away lexically).
    return os.path.realpath(path)


def is_within(path: str, root: str) -> bool:
    """True when the resolved ``path`` is ``root`` or lies under it (both already real)."""
    if path == root:
        return True
    prefix = root if root.endswith(os.sep) else root + os.sep
    return path.startswith(prefix)


def server_roots(dirs: Iterable[str | os.PathLike[str]] | None = None,
                 cwd: str | None = None) -> tuple[str, ...]:
    """The server's own roots: each ``--local-root`` directory (real path), else the cwd."""
    given = [os.fspath(d) for d in dirs or ()]
    if not given:
        return (_real(cwd or os.getcwd()),)
    roots: list[str] = []
    for d in given:
        real = _real(os.path.expanduser(d))
        if not os.path.isdir(real):
            raise ConfigError(f"{FLAG} {d}: not a directory; give an existing local directory "
                              "the MCP tools may read and write")
        if real not in roots:
            roots.append(real)
    return tuple(roots)


def roots_from_uris(uris: Iterable[str]) -> tuple[str, ...]:
    """The local directories among a client's root URIs (real paths); others are skipped.

    Only ``file://`` URIs of this machine (no host, or ``localhost``) naming an existing
    directory count, as in the reference filesystem server.
    """
    roots: list[str] = []
    for uri in uris:
        parts = urlsplit(str(uri))
        if parts.scheme.lower() != "file" or parts.netloc.lower() not in ("", "localhost"):
            continue
        path = unquote(parts.path)
        if not path.startswith("/") or "\0" in path:
            continue
        real = _real(path)
        if os.path.isdir(real) and real not in roots:
            roots.append(real)
    return tuple(roots)


def effective_roots(server: Sequence[str], client: Sequence[str] | None) -> tuple[str, ...]:
    """The allowed roots: the client's roots cut down to the server's (all real paths).

    ``client`` None or empty: the server's roots. Otherwise each client root inside a server
    root, then each server root inside a client root; empty when they do not overlap.
    """
    if not client:
        return tuple(server)
    out = [c for c in client if any(is_within(c, s) for s in server)]
    out += [s for s in server
            if any(is_within(s, c) for c in client) and not any(is_within(s, o) for o in out)]
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class AllowedRoots:
    """The server's roots and (when it offered some) the client's: checks local paths."""

    server: tuple[str, ...]
    client: tuple[str, ...] | None = None

    @property
    def roots(self) -> tuple[str, ...]:
        return effective_roots(self.server, self.client)

    def resolve(self, path: str | os.PathLike[str]) -> str:
        """The real absolute path of ``path`` if it lies inside an allowed root.

        Raises OutsideLocalRoots (a ConfigError) naming the roots and the flag otherwise.
        """
        given = os.fspath(path)
        if "\0" in given:
            raise OutsideLocalRoots(f"local path {given!r} contains a NUL byte")
        roots = self.roots
        if not roots:
            raise OutsideLocalRoots(
                f"local path {given} is refused: the MCP client's roots "
                f"[{', '.join(self.client or ())}] all lie outside the MCP server's allowed "
                f"local roots [{', '.join(self.server)}], which bound them; start the server "
                f"with {FLAG} DIR (repeatable) to allow more")
        expanded = os.path.expanduser(given)
        real = _real(os.path.join(roots[0], expanded))
        if any(is_within(real, root) for root in roots):
            return real
        shown = given if real == given else f"{given} (resolved: {real})"
        if not self.client:
            raise OutsideLocalRoots(
                f"local path {shown} is outside the allowed local roots [{', '.join(roots)}]; "
                f"use a path inside them, or start the MCP server with {FLAG} DIR "
                "(repeatable) to allow more")
        raise OutsideLocalRoots(
            f"local path {shown} is outside the allowed local roots [{', '.join(roots)}] "
            f"(the MCP client's roots [{', '.join(self.client)}] within the MCP server's own "
            f"[{', '.join(self.server)}]); use a path inside them, or add its directory to the "
            f"client's roots and, if it is outside the server's own, start the MCP server with "
            f"{FLAG} DIR (repeatable)")
