"""The Jupyter Server REST API (``/api``): kernels, sessions and contents, over httpx2."""

from __future__ import annotations

from typing import Any

import httpx2

from ..errors import AuthError, ConnectionLost, NotFound, ServerError
from .target import Target, redact


class JupyterRest:
    """Thin async client for the REST endpoints jupyter-tether needs."""

    def __init__(self, target: Target, *, timeout: float = 30.0) -> None:
        self.target = target
        self._client = httpx2.AsyncClient(
            headers={**target.auth_headers(), "User-Agent": "jupyter-tether"},
            timeout=timeout,
            follow_redirects=True,
        )
        self._xsrf: str | None = None

    @property
    def cookies(self) -> dict[str, str]:
        return dict(self._client.cookies.items())

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _ensure_xsrf(self) -> None:
        # Token-less servers check _xsrf on writes; fetching any page sets the cookie.
        if self.target.token or self._xsrf is not None:
            return
        try:
            await self._client.get(self.target.http_url("api"))
            await self._client.get(self.target.base_url)
        except httpx2.HTTPError:
            return
        self._xsrf = self._client.cookies.get("_xsrf") or ""

    async def request(self, method: str, path: str, *, json: Any = None,
                      params: dict[str, Any] | None = None,
                      ok: tuple[int, ...] = (200, 201, 204)) -> httpx2.Response:
        headers = {}
        if method != "GET":
            await self._ensure_xsrf()
            if self._xsrf:
                headers["X-XSRFToken"] = self._xsrf
        url = self.target.http_url(path)
        try:
            response = await self._client.request(method, url, json=json, params=params,
                                                  headers=headers)
        except httpx2.TimeoutException as exc:
            raise ConnectionLost(f"{method} {redact(url)} timed out: {exc}") from None
        except httpx2.HTTPError as exc:
            raise ConnectionLost(
                f"cannot reach the Jupyter server at {self.target.display_url}: "
                f"{redact(str(exc)) or type(exc).__name__}"
            ) from None
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

    async def get_json(self, path: str, **params: Any) -> Any:
        return (await self.request("GET", path, params=params or None)).json()

    # --- server ---------------------------------------------------------------------------

    async def version(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.get_json("api")
        return result

    async def status(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.get_json("api/status")
        return result

    # --- kernels ----------------------------------------------------------------------------

    async def list_kernels(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.get_json("api/kernels")
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

    async def restart_kernel(self, kernel_id: str) -> None:
        await self.request("POST", f"api/kernels/{kernel_id}/restart")

    async def kernelspecs(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.get_json("api/kernelspecs")
        return result

    # --- sessions ---------------------------------------------------------------------------

    async def list_sessions(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.get_json("api/sessions")
        return result

    async def create_session(self, *, name: str, path: str, kernel_name: str = "python3",
                             session_type: str = "console") -> dict[str, Any]:
        body = {"name": name, "path": path, "type": session_type,
                "kernel": {"name": kernel_name}}
        result: dict[str, Any] = (await self.request("POST", "api/sessions", json=body)).json()
        return result

    async def delete_session(self, session_id: str) -> None:
        await self.request("DELETE", f"api/sessions/{session_id}")

    # --- contents (listing and small text only; bulk data goes over the comm) ----------------

    async def contents(self, path: str, *, content: bool = True) -> dict[str, Any]:
        result: dict[str, Any] = await self.get_json(
            f"api/contents/{path.lstrip('/')}", content=int(content))
        return result
