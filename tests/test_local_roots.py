"""The MCP file tools only touch local paths inside the allowed roots: the pure check, then
the real server through the real MCP client (in process, and over HTTP with --local-root)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp_types import ListRootsResult, Root

from jupyter_tether import cli
from jupyter_tether.controller.embedded import LocalJupyterServer
from jupyter_tether.errors import ConfigError
from jupyter_tether.mcp_server import build_server
from jupyter_tether.mcp_server.local_roots import (
    AllowedRoots,
    OutsideLocalRoots,
    effective_roots,
    is_within,
    roots_from_uris,
    server_roots,
)

from .conftest import fast_options
from .test_mcp import Calls, McpProcess

OUTSIDE = "outside the allowed local roots"


def _real(path: Path) -> str:
    return os.path.realpath(path)


# --- the pure check ---------------------------------------------------------------------------


def test_server_roots_default_to_the_cwd_and_take_each_local_root(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "a")
    monkeypatch.chdir(tmp_path / "b")
    assert server_roots() == (_real(tmp_path / "b"),)
    assert server_roots([]) == (_real(tmp_path / "b"),)
    # Real paths, duplicates (through a link) once, relative ones from the cwd.
    assert server_roots([str(tmp_path / "a"), tmp_path / "alias", "."]) == (
        _real(tmp_path / "a"), _real(tmp_path / "b"))
    with pytest.raises(ConfigError, match=r"--local-root .*not a directory"):
        server_roots([str(tmp_path / "missing")])
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="--local-root"):
        server_roots([str(tmp_path / "file")])


def test_client_root_uris_keep_local_directories_only(tmp_path: Path) -> None:
    spaced = tmp_path / "my proj"
    spaced.mkdir()
    uris = [spaced.as_uri(), f"file://localhost{tmp_path}", "https://example.com/x",
            "file://otherhost/etc", (tmp_path / "missing").as_uri(), "file:relative",
            "file:///etc/passwd", spaced.as_uri()]
    assert roots_from_uris(uris) == (_real(spaced), _real(tmp_path))


def test_is_within_is_by_component() -> None:
    assert is_within("/a/b", "/a") and is_within("/a", "/a") and is_within("/x", "/")
    assert not is_within("/ab", "/a") and not is_within("/", "/a")


def test_client_roots_narrow_the_servers_never_widen() -> None:
    server = ("/home/u/proj", "/data")
    assert effective_roots(server, None) == server
    assert effective_roots(server, ()) == server
    # Inside a server root: kept. Above one: the server root is kept. Elsewhere: dropped.
    assert effective_roots(server, ("/home/u/proj/sub",)) == ("/home/u/proj/sub",)
    assert effective_roots(server, ("/",)) == server
    assert effective_roots(server, ("/home", "/etc")) == ("/home/u/proj",)
    assert effective_roots(server, ("/etc", "/data/x")) == ("/data/x",)
    assert effective_roots(server, ("/etc",)) == ()


def test_paths_inside_come_back_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    root, other = tmp_path / "root", tmp_path / "other"
    (root / "sub").mkdir(parents=True)
    other.mkdir()
    allowed = AllowedRoots((_real(root), _real(other)))
    assert allowed.resolve(str(root / "sub" / "new.bin")) == _real(root / "sub" / "new.bin")
    assert allowed.resolve(str(root)) == _real(root)
    assert allowed.resolve(str(other / "x")) == _real(other / "x")
    # Relative paths start at the first root, not at the process's cwd.
    monkeypatch.chdir(other)
    assert allowed.resolve("sub/x.bin") == _real(root / "sub" / "x.bin")
    assert allowed.resolve("sub/../y") == _real(root / "y")
    # "~" is the server user's home, then checked like any other path.
    monkeypatch.setenv("HOME", str(root))
    assert allowed.resolve("~/sub/z") == _real(root / "sub" / "z")
    # A link inside a root that stays inside is fine.
    (root / "to-sub").symlink_to(root / "sub")
    assert allowed.resolve(str(root / "to-sub" / "f")) == _real(root / "sub" / "f")


def test_paths_outside_are_refused_naming_the_roots_and_the_flag(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    root = tmp_path / "proj"
    root.mkdir()
    (tmp_path / "proj-evil").mkdir()
    allowed = AllowedRoots((_real(root),))
    with pytest.raises(OutsideLocalRoots) as refused:
        allowed.resolve("/etc/x")
    assert str(refused.value) == (
        f"local path /etc/x is outside the allowed local roots [{_real(root)}]; use a path "
        "inside them, or start the MCP server with --local-root DIR (repeatable) to allow more")
    assert isinstance(refused.value, ConfigError)
    monkeypatch.setenv("HOME", str(tmp_path))
    for path in ("../x", str(root / ".." / "x"), str(tmp_path / "proj-evil" / "x"), "~/x",
                 "~/.bashrc", "/", str(tmp_path)):
        with pytest.raises(OutsideLocalRoots, match=OUTSIDE):
            allowed.resolve(path)
    with pytest.raises(OutsideLocalRoots, match="NUL"):
        allowed.resolve(str(root / "a\0b"))


def test_links_are_resolved_before_the_check(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("s")
    allowed = AllowedRoots((_real(root),))
    (root / "leak").symlink_to(outside / "secret")          # an existing file
    (root / "dangling").symlink_to(outside / "not-yet")     # a file to be created
    (root / "out").symlink_to(outside)                      # the parent of a file to create
    (root / "sub").mkdir()
    (root / "sub" / "up").symlink_to("../../outside")       # relative link text
    for path in ("leak", "dangling", "out/new.bin", "out", "sub/up/x/y.bin",
                 str(root / "out" / "deep" / "new.bin")):
        with pytest.raises(OutsideLocalRoots, match=r"resolved: .*outside"):
            allowed.resolve(path)
    # ".." after a link applies to the link's target, as in the kernel.
    with pytest.raises(OutsideLocalRoots, match=OUTSIDE):
        allowed.resolve("out/../outside/secret")


def test_refusal_with_client_roots_says_whose_roots(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    allowed = AllowedRoots((_real(tmp_path),), roots_from_uris([(tmp_path / "a").as_uri()]))
    assert allowed.roots == (_real(tmp_path / "a"),)
    with pytest.raises(OutsideLocalRoots, match=r"the MCP client's roots .* within the MCP "
                                                "server's own") as refused:
        allowed.resolve(str(tmp_path / "b"))
    assert "--local-root" in str(refused.value)
    disjoint = AllowedRoots((_real(tmp_path / "a"),), ("/usr",))
    with pytest.raises(OutsideLocalRoots, match=r"client's roots \[/usr\] all lie outside"):
        disjoint.resolve(str(tmp_path / "a" / "x"))


def test_cli_mcp_passes_each_local_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path
                                        ) -> None:
    import jupyter_tether.mcp_server as mcp_server

    seen: dict[str, object] = {}
    monkeypatch.setattr(mcp_server, "serve", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setenv("JUPYTER_TETHER_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.delenv("REMOTE_JUPYTER_URL", raising=False)
    assert cli.main(["mcp", "--local-root", "a", "--local-root", "b"]) == 0
    assert seen["local_roots"] == ["a", "b"]


def test_build_server_refuses_a_missing_local_root(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--local-root"):
        build_server(url="http://127.0.0.1:9/", local_roots=[str(tmp_path / "nope")])


# --- through the real MCP client --------------------------------------------------------------


def _roots_callback(holder: list[Path]) -> Any:
    async def list_roots(context: Any) -> ListRootsResult:
        return ListRootsResult(roots=[Root(uri=p.as_uri()) for p in holder])
    return list_roots


@asynccontextmanager
async def _in_process(server: LocalJupyterServer, **kw: Any) -> AsyncIterator[Calls]:
    roots = kw.pop("client_roots", None)
    mode = kw.pop("mode", "auto")
    extra = {"list_roots_callback": _roots_callback(roots)} if roots is not None else {}
    app = build_server(url=server.url, token=server.token, options=fast_options(), **kw)
    async with Client(app, mode=mode, **extra) as client:
        yield Calls(client)


async def _remote_file(calls: Calls, content: str = "remote bytes\n") -> str:
    path = f"lr/{uuid.uuid4().hex}.txt"
    await calls.ok("jupyter_write_text", {"path": path, "content": content})
    return path


@pytest.mark.anyio
async def test_without_roots_the_file_tools_stay_in_the_cwd(
        jupyter_server: LocalJupyterServer, server_root: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cwd, outside = tmp_path / "cwd", tmp_path / "outside"
    cwd.mkdir()
    (outside / "dir").mkdir(parents=True)
    (outside / "secret.txt").write_text("local secret")
    monkeypatch.chdir(cwd)
    async with _in_process(jupyter_server) as calls:
        remote = await _remote_file(calls)
        target = outside / "got.txt"
        text = await calls.error("jupyter_download_to_local",
                                 {"remote_path": remote, "local_path": str(target)})
        shown = str(target) if _real(target) == str(target) else \
            f"{target} (resolved: {_real(target)})"
        assert text.endswith(
            f"local path {shown} is outside the allowed local roots [{_real(cwd)}]; use a path "
            "inside them, or start the MCP server with --local-root DIR (repeatable) to allow more")
        assert not target.exists()
        # A relative path lands in the cwd, the one root.
        down = await calls.ok("jupyter_download_to_local",
                              {"remote_path": remote, "local_path": "got.txt"})
        assert down["local_path"] == _real(cwd / "got.txt")
        assert (cwd / "got.txt").read_text() == "remote bytes\n"

        refusals = [
            ("jupyter_upload_local_file", {"local_path": str(outside / "secret.txt"),
                                           "remote_path": "lr/stolen.txt"}),
            ("jupyter_download_dir_to_local", {"remote_dir": "lr",
                                               "local_dir": str(outside / "dir")}),
            ("jupyter_sync_dir", {"local_dir": str(outside), "remote_dir": "lr/synced"}),
            ("jupyter_job_collect", {"job_id": "any", "local_dir": str(outside / "dir")}),
            ("jupyter_job_submit", {"spec": {
                "sync": [{"local_dir": str(outside), "remote_dir": "lr/sub"}],
                "run": {"command": "true"}}}),
        ]
        for name, args in refusals:
            text = await calls.error(name, args)
            assert OUTSIDE in text and "--local-root" in text, (name, text)
        assert not (server_root / "lr" / "stolen.txt").exists()
        assert not (server_root / "lr" / "synced").exists()
        assert not (server_root / "lr" / "sub").exists()
        assert list((outside / "dir").iterdir()) == []


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_client_roots_narrow_the_servers_and_are_asked_per_call(
        jupyter_server: LocalJupyterServer, tmp_path: Path, mode: str) -> None:
    a, b, outside = tmp_path / "a", tmp_path / "b", tmp_path.parent / f"out-{uuid.uuid4().hex}"
    a.mkdir()
    b.mkdir()
    offered = [a]
    async with _in_process(jupyter_server, local_roots=[str(tmp_path)], client_roots=offered,
                           mode=mode) as calls:
        remote = await _remote_file(calls)
        ok = await calls.ok("jupyter_download_to_local",
                            {"remote_path": remote, "local_path": str(a / "x.txt")})
        assert ok["local_path"] == _real(a / "x.txt") and (a / "x.txt").exists()
        await calls.ok("jupyter_download_to_local", {"remote_path": remote, "local_path": "r.txt"})
        assert (a / "r.txt").exists(), "relative paths start at the client's first root"
        # Inside the server's root but outside the client's: refused.
        text = await calls.error("jupyter_download_to_local",
                                 {"remote_path": remote, "local_path": str(b / "x.txt")})
        assert OUTSIDE in text and "client's roots" in text and not (b / "x.txt").exists()
        # The roots are asked on every call: a changed list counts at once.
        offered[:] = [b]
        await calls.ok("jupyter_download_to_local",
                       {"remote_path": remote, "local_path": str(b / "x.txt")})
        assert (b / "x.txt").exists()
        # A client cannot widen the server's roots, whatever it offers.
        offered[:] = [Path("/")]
        text = await calls.error("jupyter_download_to_local",
                                 {"remote_path": remote, "local_path": str(outside)})
        assert OUTSIDE in text and not outside.exists()
        offered[:] = [outside.parent]
        text = await calls.error("jupyter_upload_local_file",
                                 {"local_path": "/etc/hostname", "remote_path": "lr/h"})
        assert OUTSIDE in text


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_local_root_flag_over_http_and_links_out_of_it(
        jupyter_server: LocalJupyterServer, server_root: Path, tmp_path: Path, mode: str
        ) -> None:
    root, outside, state = tmp_path / "root", tmp_path / "outside", tmp_path / "state"
    root.mkdir()
    state.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("local secret")
    (root / "out").symlink_to(outside)
    (root / "leak.txt").symlink_to(outside / "secret.txt")
    proc = McpProcess(jupyter_server, state, tmp_path / "mcp.log", "--local-root", str(root))
    try:
        async with Client(proc.url, mode=mode) as client:
            calls = Calls(client)
            remote = await _remote_file(calls)
            ok = await calls.ok("jupyter_download_to_local",
                                {"remote_path": remote, "local_path": str(root / "in.txt")})
            assert ok["local_path"] == _real(root / "in.txt")
            assert (root / "in.txt").read_text() == "remote bytes\n"
            text = await calls.error("jupyter_download_to_local",
                                     {"remote_path": remote, "local_path": str(tmp_path / "x")})
            assert OUTSIDE in text and f"[{_real(root)}]" in text and "--local-root" in text
            # Links inside the root that lead out of it: refused, nothing written or read.
            for name, args in [
                    ("jupyter_download_to_local", {"remote_path": remote,
                                                   "local_path": str(root / "out" / "x.txt")}),
                    ("jupyter_download_dir_to_local", {"remote_dir": "lr",
                                                       "local_dir": str(root / "out")}),
                    ("jupyter_upload_local_file", {"local_path": str(root / "leak.txt"),
                                                   "remote_path": "lr/leaked.txt"}),
                    ("jupyter_sync_dir", {"local_dir": str(root / "out"),
                                          "remote_dir": "lr/leaked"})]:
                text = await calls.error(name, args)
                assert OUTSIDE in text and "resolved:" in text, (name, text)
            assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
            assert not (server_root / "lr" / "leaked.txt").exists()
            assert not (server_root / "lr" / "leaked").exists()
        # The client's roots work over HTTP too (both protocol eras), inside the flag's root.
        (root / "sub").mkdir()
        async with Client(proc.url, mode=mode,
                          list_roots_callback=_roots_callback([root / "sub"])) as client:
            calls = Calls(client)
            await calls.ok("jupyter_download_to_local", {"remote_path": remote,
                                                         "local_path": "y.txt"})
            assert (root / "sub" / "y.txt").exists()
            text = await calls.error("jupyter_download_to_local",
                                     {"remote_path": remote, "local_path": str(root / "z.txt")})
            assert OUTSIDE in text and not (root / "z.txt").exists()
    finally:
        proc.stop()
