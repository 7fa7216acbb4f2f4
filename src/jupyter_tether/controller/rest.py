"""The Jupyter Server REST API (``/api``): kernels, sessions and contents, over httpx2."""

from __future__ import annotations

import logging
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import httpx2

from ..credentials import redact
from ..errors import (
    AuthError,
    ConfigError,
    ConnectionLost,
    LimitExceeded,
    NotFound,
    ServerError,
)
from .target import Target, tls_context, tls_hint

#: the most bytes read from one REST answer (after decompression): kernel and session
#: listings are kilobytes; a server sending more is broken or hostile
MAX_REST_BODY_BYTES = 32 * 1024 * 1024
#: a proxy's "the upstream did not answer (in time)": a GET asked to (``retry=True``) is
#: tried again after each of these pauses. Only side lookups ask: the link's reconnect
#: loop retries on its own schedule, and a write may have been done upstream.
RETRY_STATUSES = frozenset({502, 503, 504})
RETRY_PAUSES_S = (0.5, 1.5)
log = logging.getLogger(__name__)
# Headers that describe the body as it came off the wire, not the bytes we kept of it.
_WIRE_HEADERS = {"content-encoding", "content-length", "transfer-encoding"}

_LISTING_FORBIDDEN = (
    "the server at {url} refused to list {what} (HTTP 403): either the token is refused, or the "
    "server does not allow listing (a Kernel Gateway needs KG_LIST_KERNELS=True)"
)


class JupyterRest:
    """Thin async client for the REST endpoints jupyter-tether needs."""

    def __init__(self, target: Target, *, timeout: float = 30.0) -> None:
        self.target = target
        self._client = httpx2.AsyncClient(
            headers={**target.auth_headers(), "User-Agent": "jupyter-tether"},
            timeout=timeout,
            follow_redirects=True,
            verify=tls_context(),
        )
        self._xsrf: str | None = None
        #: False once the server answered 404 on /api/status (Kernel Gateway has none)
        self._has_status = True

    def cookie_header(self, path: str) -> str | None:
        """The ``Cookie`` header a request for ``path`` gets: only the cookies whose domain,
        path and secure flag match it (a hub sets ``_xsrf`` on two paths; other hosts'
        cookies from redirects stay with their hosts)."""
        request = httpx2.Request("GET", self.target.http_url(path))
        self._client.cookies.set_cookie_header(request)
        return request.headers.get("cookie")

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _ensure_xsrf(self) -> None:
        # Token-less servers check _xsrf on writes; fetching any page sets the cookie (from
        # the headers: the bodies are never read).
        if self.target.token or self._xsrf is not None:
            return
        try:
            for url in (self.target.http_url("api"), self.target.base_url):
                async with self._client.stream("GET", url):
                    pass
        except httpx2.HTTPError:
            return
        self._xsrf = self._client.cookies.get("_xsrf") or ""

    @staticmethod
    async def _read_bounded(response: httpx2.Response, what: str) -> httpx2.Response:
        """``response`` with its body read, refusing more than ``MAX_REST_BODY_BYTES``."""
        parts: list[bytes] = []
        size = 0
        try:
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > MAX_REST_BODY_BYTES:
                    raise LimitExceeded(
                        f"{what}: the server sent more than {MAX_REST_BODY_BYTES // 2**20} MiB "
                        "(MAX_REST_BODY_BYTES); stopped reading. A broken or hostile server, "
                        "or a proxy's error page", limit="MAX_REST_BODY_BYTES",
                        value=MAX_REST_BODY_BYTES)
                parts.append(chunk)
        finally:
            await response.aclose()
        headers = [(k, v) for k, v in response.headers.multi_items()
                   if k.lower() not in _WIRE_HEADERS]
        return httpx2.Response(response.status_code, headers=headers, content=b"".join(parts),
                               request=response.request)

    async def request(self, method: str, path: str, *, json: Any = None,
                      params: dict[str, Any] | None = None,
                      ok: tuple[int, ...] = (200, 201, 204),
                      retry: bool = False) -> httpx2.Response:
        headers = {}
        if method != "GET":
            await self._ensure_xsrf()
            if self._xsrf:
                headers["X-XSRFToken"] = self._xsrf
        url = self.target.http_url(path)
        pauses = list(RETRY_PAUSES_S) if retry and method == "GET" else []
        while True:
            try:
                request = self._client.build_request(method, url, json=json, params=params,
                                                     headers=headers)
                response = await self._read_bounded(
                    await self._client.send(request, stream=True), f"{method} {redact(url)}")
            except httpx2.TimeoutException as exc:
                raise ConnectionLost(f"{method} {redact(url)} timed out: {exc}") from None
            except httpx2.HTTPError as exc:
                raise ConnectionLost(
                    f"cannot reach the Jupyter server at {self.target.display_url}: "
                    f"{redact(str(exc)) or type(exc).__name__}{tls_hint(str(exc))}"
                ) from None
            if response.status_code not in RETRY_STATUSES or not pauses:
                break
            log.info("%s %s -> HTTP %d; trying again", method, redact(url), response.status_code)
            await anyio.sleep(pauses.pop(0))
        if response.status_code in ok:
            return response
        if response.status_code in (401, 403):
            raise AuthError(
                f"the Jupyter server at {self.target.display_url} refused the credentials "
                f"(HTTP {response.status_code}). The token or the URL may have expired "
                "(Kaggle rotates its proxy URL): pass the fresh URL/token."
            )
        if response.status_code == 404:
            raise NotFound("not_found", f"{method} {redact(url)}: 404 Not Found")
        detail = response.text[:300]
        raise ServerError(
            f"{method} {redact(url)} -> HTTP {response.status_code}: {redact(detail)}",
            status=response.status_code,
        )

    def stream_get(self, path: str, headers: dict[str, str] | None = None
                   ) -> AbstractAsyncContextManager[httpx2.Response]:
        """``async with rest.stream_get(path) as response``: a streamed GET, for bulk bytes."""
        return self._client.stream("GET", self.target.http_url(path), headers=headers,
                                   timeout=httpx2.Timeout(30.0, read=120.0))

    async def get_json(self, path: str, **params: Any) -> Any:
        return (await self.request("GET", path, params=params or None)).json()

    # --- server ---------------------------------------------------------------------------

    async def version(self) -> dict[str, Any]:
        """``/api``: asked beside a ping, so a proxy's passing 502/504 is tried again rather
        than failing a ping whose round trip worked."""
        result: dict[str, Any] = (await self.request("GET", "api", retry=True)).json()
        return result

    async def status(self) -> dict[str, Any]:
        """``/api/status``; a Kernel Gateway has none, so there ``/api`` (which it guards with
        its token) answers instead, with the server version."""
        if self._has_status:
            try:
                result: dict[str, Any] = await self.get_json("api/status")
                return result
            except NotFound:
                self._has_status = False
        try:
            return await self.version()
        except NotFound:
            # Neither /api/status nor /api: whatever answers there is no Jupyter server.
            raise ConfigError(f"no Jupyter server at {self.target.display_url} (404): check the "
                              "path (the server's base URL: what comes before /lab or /tree "
                              "in the browser)") from None

    # --- kernels ----------------------------------------------------------------------------

    async def list_kernels(self) -> list[dict[str, Any]]:
        response = await self.request("GET", "api/kernels", ok=(200, 403))
        if response.status_code == 403:
            raise AuthError(_LISTING_FORBIDDEN.format(what="kernels", url=self.target.display_url))
        result: list[dict[str, Any]] = response.json()
        return result

    async def get_kernel(self, kernel_id: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = await self.get_json(f"api/kernels/{kernel_id}")
            return result
        except NotFound:
            return None

    async def start_kernel(self, name: str = "python3", path: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name}
        if path is not None:
            body["path"] = path
        result: dict[str, Any] = (await self.request("POST", "api/kernels", json=body)).json()
        return result

    async def shutdown_kernel(self, kernel_id: str) -> None:
        await self.request("DELETE", f"api/kernels/{kernel_id}")

    async def interrupt_kernel(self, kernel_id: str) -> None:
        await self.request("POST", f"api/kernels/{kernel_id}/interrupt")

    async def list_sessions(self) -> list[dict[str, Any]]:
        """The server's sessions; ``[]`` where there is no sessions API."""
        response = await self.request("GET", "api/sessions", ok=(200, 403, 404))
        if response.status_code == 403:
            raise AuthError(_LISTING_FORBIDDEN.format(what="sessions", url=self.target.display_url))
        result: list[dict[str, Any]] = [] if response.status_code == 404 else response.json()
        return result

    async def listable_sessions(self) -> list[dict[str, Any]] | None:
        """The sessions, or None where the server cannot list them.

        None means no sessions API (404), or a Kernel Gateway that refuses to list (403 to
        ``GET /api/sessions`` and ``/api/kernels`` unless it runs with ``KG_LIST_KERNELS=True``,
        even with the right token; a wrong token gets 401 there), or a listing that fails
        twice (Kernel Gateway 3 answers 500 once after a listed session's kernel went away,
        dropping that session, so the second try lists the rest).
        """
        for attempt in (1, 2):
            try:
                response = await self.request("GET", "api/sessions", ok=(200, 403, 404))
                break
            except ServerError:
                if attempt == 2:
                    return None
        if response.status_code != 200:
            return None
        result: list[dict[str, Any]] = response.json()
        return result

    async def create_session(self, *, name: str, path: str, kernel_name: str = "python3",
                             session_type: str = "console") -> dict[str, Any]:
        body = {"name": name, "path": path, "type": session_type,
                "kernel": {"name": kernel_name}}
        result: dict[str, Any] = (await self.request("POST", "api/sessions", json=body)).json()
        return result

    async def delete_session(self, session_id: str) -> None:
        await self.request("DELETE", f"api/sessions/{session_id}")
