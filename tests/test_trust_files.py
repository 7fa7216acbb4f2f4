"""Files under a hostile remote or a misled agent (issue 11, items 1, 6, 7 and 8).

- 1: whatever a submit record says, ``collect`` writes only inside its local directory
  (API, CLI and MCP, with ``"."`` as the destination and ``HOME`` pointed at a temp dir so
  that a failure cannot touch the real home);
- 6: ``download_dir``'s batched small files are checked like big downloads (a short,
  missing or wrong blob writes nothing);
- 7: a deleting sync is refused in the server root, the home directory, ``/`` and above
  them unless ``allow_root_delete``; a file replacing a directory never deletes entries the
  sync excludes; deletions are counted; ``dry_run`` changes nothing;
- 8: a valid 255-byte name travels both ways (part, sidecar and temp names are shortened by
  bytes).

Tests that old code would turn destructive (a deleting sync into a root) run against their
own Jupyter server or an in-process supervisor in a temp dir, never the shared server.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
from mcp import Client

from jupyter_tether import Tether
from jupyter_tether.agent_payload.paths import (
    NAME_MAX_BYTES,
    PART_SUFFIX,
    SIDECAR_SUFFIX,
    TEMP_MARK,
    side_name,
)
from jupyter_tether.controller import submit
from jupyter_tether.controller.embedded import LocalJupyterServer
from jupyter_tether.controller.files import AsyncFiles, check_local_name, safe_local_path
from jupyter_tether.controller.rpc import Reply
from jupyter_tether.errors import ConfigError, RemoteError, TransferError
from jupyter_tether.mcp_server import build_server

from .cli_inprocess import run_cli
from .conftest import fast_options
from .inprocess import InProcess

T = TypeVar("T")
MiB = 1024 * 1024
BIN = Path(sys.executable).parent


def run(t: Tether, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
    return t.portal.call(functools.partial(func, *args, **kwargs))


def tree_of(root: Path) -> dict[str, bytes | None]:
    """Every entry under ``root``: file contents, None for directories (links not followed)."""
    out: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = None if path.is_dir() and not path.is_symlink() else (
            b"->" + os.readlink(path).encode() if path.is_symlink() else path.read_bytes())
    return out


@pytest.fixture
def fake_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME (what ``~`` means here) in a temp dir: a failing test cannot damage the real one."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    assert os.path.expanduser("~") == str(home)
    return home


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalJupyterServer]:
    """A Jupyter server of this module's own: old code would wipe its root, not a shared one."""
    root = tmp_path_factory.mktemp("trust-root")
    with LocalJupyterServer(root, log_path=root.parent / "trust-server.log") as server:
        yield server


@pytest.fixture(scope="module")
def own_tether(own_server: LocalJupyterServer,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tether]:
    with Tether(own_server.url, own_server.token, options=fast_options(),
                output_dir=tmp_path_factory.mktemp("trust-outputs")) as t:
        yield t


# --- an in-process supervisor behind a real AsyncFiles -----------------------------------------


@pytest.fixture
def inproc(tmp_path: Path) -> Iterator[tuple[AsyncFiles, InProcess, Path]]:
    """Real ``AsyncFiles`` on an in-process supervisor; its ``mangle`` plays the hostile
    remote by rewriting replies (the payload data is the hostile input)."""
    root = tmp_path / "remote-root"
    root.mkdir()
    remote = InProcess(root)
    yield AsyncFiles(remote), remote, root
    remote.close()


# --- 1: collect writes only inside its destination ----------------------------------------------


def _finished_job(t: Tether, command: str, artifacts: list[Any]) -> str:
    spec = {"run": {"command": command}, "artifacts": artifacts,
            "idempotency_key": f"test-trust-{time.time_ns()}"}
    result = t.submit(spec)
    assert result["ok"], result
    job_id = str(result["job_id"])
    info = run(t, t.aio.jobs.get(job_id).wait, timeout=60)
    assert info.exit_code == 0, info
    return job_id


def _tamper(t: Tether, job_id: str, artifacts: list[Any]) -> None:
    """Someone with write access to the remote rewrites the record collect trusts."""
    path = submit.record_path(job_id)
    record = json.loads(run(t, t.aio.files.read_text, path))
    record["artifacts"] = artifacts
    run(t, t.aio.files.write_text, path, json.dumps(record))


MAKE_TRUST = ("mkdir -p trust/d && echo fine > trust/ok.txt && echo inner > trust/d/in.txt "
              "&& echo tilde > 'trust/~x'")
HOME_ATTACKS: list[Any] = [
    {"remote_path": "trust/ok.txt", "local_path": "~/.bashrc"},
    {"remote_dir": "trust/d", "local_subdir": "~/.ssh"},
    {"remote_path": "trust/ok.txt", "local_path": "~"},
    # ~user: a user that does not exist, so that old code cannot write another user's home.
    {"remote_path": "trust/ok.txt", "local_path": "~no-such-user-4242/.profile"},
    "trust/~x",  # its basename starts with "~"
]


def test_local_names_from_the_remote_are_checked_never_expanded(tmp_path: Path,
                                                                fake_home: Path) -> None:
    for bad in ["~/.bashrc", "~", "~root/.ssh/authorized_keys", "~/", "/etc/passwd",
                str(fake_home / "x"), "../x", "a/../../x", "a\x00b", "evil\nname",
                "tab\there", "\x1b[31mred", "c1\x9bcsi", "", ".", 42, None]:
        with pytest.raises(TransferError, match="refusing remote name"):
            check_local_name(bad)
        with pytest.raises(TransferError, match="refusing remote name"):
            safe_local_path(tmp_path, bad)  # type: ignore[arg-type]
    # Names that merely contain "~" or "$" are literal names inside the destination.
    for fine in ["a/~/b", "backup~", "$HOME/.bashrc", "${HOME}", "x/~root"]:
        assert safe_local_path(tmp_path, fine) == tmp_path.joinpath(*fine.split("/"))
    assert list(fake_home.iterdir()) == []
    # A job spec refuses them up front, with the same reason.
    for bad in ["~/.bashrc", "evil\nname"]:
        with pytest.raises(ConfigError, match="refusing remote name"):
            submit.validate_spec({"run": {"command": "true"},
                                  "artifacts": [{"remote_path": "r", "local_path": bad}]})


def test_collect_into_dot_keeps_every_name_of_a_hostile_record_inside_it(
        tether: Tether, tmp_path: Path, fake_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = _finished_job(tether, MAKE_TRUST, ["trust/ok.txt"])
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "link").symlink_to(fake_home)
    hostile = [
        *HOME_ATTACKS,
        {"remote_path": "trust/ok.txt", "local_path": str(fake_home / "abs.txt")},
        {"remote_dir": "trust/d", "local_subdir": str(fake_home / "absdir")},
        {"remote_path": "trust/ok.txt", "local_path": "../up.txt"},
        {"remote_path": "trust/ok.txt", "local_path": "a\x00b"},
        {"remote_path": "trust/ok.txt", "local_path": "evil\nname.txt"},
        {"remote_path": "trust/ok.txt", "local_path": "link/through.txt"},
        {"remote_dir": "trust/d", "local_subdir": "link"},
        {"remote_dir": "trust/d", "local_subdir": "link/sub"},
    ]
    literal = {"remote_path": "trust/ok.txt", "local_path": "$HOME/.bashrc"}  # never expanded
    _tamper(tether, job_id, [*hostile, literal, "trust/ok.txt"])
    monkeypatch.chdir(dest)

    result = tether.collect(job_id, ".")
    assert Path(result["local_dir"]).resolve() == dest.resolve()
    assert [d["ok"] for d in result["downloads"]] == [False] * len(hostile) + [True, True]
    for refused in result["downloads"][:len(hostile)]:
        assert "refusing" in refused["error"], refused
    assert result["missing"] == hostile
    assert list(fake_home.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "home"]
    assert tree_of(dest) == {"$HOME": None, "$HOME/.bashrc": b"fine\n",
                             "link": b"->" + str(fake_home).encode(), "ok.txt": b"fine\n"}


def _tether_env(server: LocalJupyterServer, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "JUPYTER_TETHER_CONFIG"}
    env.update(REMOTE_JUPYTER_URL=server.url, REMOTE_JUPYTER_TOKEN=server.token,
               HOME=str(home), PYTHONUNBUFFERED="1")
    return env


def test_cli_collect_dot_writes_nothing_into_home(jupyter_server: LocalJupyterServer,
                                                   tether: Tether, tmp_path: Path,
                                                   fake_home: Path) -> None:
    job_id = _finished_job(tether, MAKE_TRUST, ["trust/ok.txt"])
    _tamper(tether, job_id, [*HOME_ATTACKS, "trust/ok.txt"])
    dest = tmp_path / "dest"
    dest.mkdir()
    proc = subprocess.run([str(BIN / "jupyter-tether"), "collect", job_id, "."],
                          capture_output=True, text=True, timeout=120, cwd=dest,
                          env=_tether_env(jupyter_server, fake_home))
    assert proc.returncode == 1, proc.stderr
    assert f"{len(HOME_ATTACKS)} artifact(s) could not be collected" in proc.stderr
    assert list(fake_home.iterdir()) == []
    assert tree_of(dest) == {"ok.txt": b"fine\n"}


@asynccontextmanager
async def mcp_client(server: LocalJupyterServer, cwd: Path,
                     monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Client]:
    """The MCP server as ``jupyter-tether mcp`` builds it from its environment, here in this
    process, run from ``cwd`` (HOME is ``fake_home``): where its file tools write is the
    question, and that is the same in any process."""
    monkeypatch.delenv("JUPYTER_TETHER_CONFIG", raising=False)
    monkeypatch.setenv("REMOTE_JUPYTER_URL", server.url)
    monkeypatch.setenv("REMOTE_JUPYTER_TOKEN", server.token)
    monkeypatch.setenv("JUPYTER_TETHER_STATE_DIR", str(cwd.parent / "mcp-state"))
    monkeypatch.chdir(cwd)
    async with Client(build_server()) as client:
        yield client


async def _tool(client: Client, name: str, args: dict[str, Any]) -> tuple[bool, Any, str]:
    result = await client.call_tool(name, args)
    text = "".join(getattr(c, "text", "") for c in result.content)
    return not result.is_error, result.structured_content, text


@pytest.mark.anyio
async def test_mcp_collect_dot_writes_nothing_into_home(
        jupyter_server: LocalJupyterServer, tether: Tether, tmp_path: Path, fake_home: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = await anyio.to_thread.run_sync(_finished_job, tether, MAKE_TRUST, ["trust/ok.txt"])
    await anyio.to_thread.run_sync(_tamper, tether, job_id, [*HOME_ATTACKS, "trust/ok.txt"])
    dest = tmp_path / "dest"
    dest.mkdir()
    async with mcp_client(jupyter_server, dest, monkeypatch) as client:
        ok, out, text = await _tool(client, "jupyter_job_collect",
                                    {"job_id": job_id, "local_dir": "."})
    assert ok, text
    assert not out["ok"] and out["missing"] == HOME_ATTACKS
    assert list(fake_home.iterdir()) == []
    assert tree_of(dest) == {"ok.txt": b"fine\n"}


def test_download_dir_skips_remote_names_a_shell_would_misread(
        tether: Tether, server_root: Path, tmp_path: Path, fake_home: Path) -> None:
    remote = server_root / "trust_names"
    for rel in ["~/.bashrc", "~x", "new\nline", "esc\x1b[2J", "ok.txt", "sub/~/kept.txt"]:
        (remote / rel).parent.mkdir(parents=True, exist_ok=True)
        (remote / rel).write_text(rel)
    dest = tmp_path / "dest"
    result = run(tether, tether.aio.files.download_dir, "trust_names", dest)
    assert sorted(s["path"] for s in result["skipped"]) == sorted(
        ["~", "~/.bashrc", "~x", "new\nline", "esc\x1b[2J"])
    assert tree_of(dest) == {"ok.txt": b"ok.txt", "sub": None, "sub/~": None,
                             "sub/~/kept.txt": b"sub/~/kept.txt"}
    assert list(fake_home.iterdir()) == []


# --- 6: batched small files are verified --------------------------------------------------------


def _small_tree(root: Path) -> dict[str, bytes]:
    files = {f"f{i}.txt": f"content {i}\n".encode() * (i + 1) for i in range(6)}
    for name, data in files.items():
        (root / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "src" / name).write_bytes(data)
    return files


def _mangle_batch(change: Callable[[list[dict[str, Any]], list[bytes]],
                                   tuple[list[dict[str, Any]], list[bytes]]]) \
        -> Callable[[str, Reply], Reply]:
    def mangle(op: str, reply: Reply) -> Reply:
        if op != "batch_read":
            return reply
        entries, blobs = change([dict(e) for e in reply.result["files"]], list(reply.buffers))
        return Reply({**reply.result, "files": entries}, blobs)
    return mangle


def _by_name(entries: list[dict[str, Any]], name: str) -> int:
    return next(i for i, e in enumerate(entries) if e["path"] == name)


def _drop_last_blob(entries: list[dict[str, Any]], blobs: list[bytes]) -> Any:
    return entries, blobs[:-1]


def _short_blob(entries: list[dict[str, Any]], blobs: list[bytes]) -> Any:
    i = _by_name(entries, "f3.txt")
    blobs[i] = blobs[i][:5]
    return entries, blobs


def _short_blob_and_size(entries: list[dict[str, Any]], blobs: list[bytes]) -> Any:
    i = _by_name(entries, "f3.txt")
    blobs[i] = blobs[i][:5]
    entries[i]["size"] = 5  # the size agrees with the blob; the sha256 does not
    return entries, blobs


def _other_bytes(entries: list[dict[str, Any]], blobs: list[bytes]) -> Any:
    i = _by_name(entries, "f3.txt")
    blobs[i] = bytes(len(blobs[i]))
    return entries, blobs


def _left_out(entries: list[dict[str, Any]], blobs: list[bytes]) -> Any:
    i = _by_name(entries, "f3.txt")
    return entries[:i] + entries[i + 1:], blobs[:i] + blobs[i + 1:]


def _no_sha(entries: list[dict[str, Any]], blobs: list[bytes]) -> Any:
    for entry in entries:
        entry.pop("sha256", None)
    return entries, blobs


@pytest.mark.anyio
@pytest.mark.parametrize(("change", "bad"), [
    (_drop_last_blob, None), (_short_blob, {"f3.txt"}), (_short_blob_and_size, {"f3.txt"}),
    (_other_bytes, {"f3.txt"}), (_left_out, {"f3.txt"}), (_no_sha, None)])
async def test_download_dir_writes_no_small_file_whose_blob_does_not_check_out(
        inproc: tuple[AsyncFiles, InProcess, Path], tmp_path: Path,
        change: Any, bad: set[str] | None) -> None:
    files, link, root = inproc
    data = _small_tree(root)
    dest = tmp_path / "dest"
    dest.mkdir()
    old = {name: b"the local copy, kept\n" for name in data}
    for name, content in old.items():
        (dest / name).write_bytes(content)
    link.mangle = _mangle_batch(change)
    with pytest.raises(TransferError) as info:
        await files.download_dir("src", dest)
    refused = set(data) if bad is None else bad
    for name in data:
        expected = old[name] if name in refused else data[name]
        assert (dest / name).read_bytes() == expected, name
    assert "not written" in str(info.value)
    if bad is not None:
        assert f"{len(bad)} entries failed" in str(info.value)
        assert all(name in str(info.value) for name in bad)
    assert sorted(p.name for p in dest.iterdir()) == sorted(data)  # no temp files left


@pytest.mark.anyio
async def test_download_dir_of_an_honest_remote_checks_and_writes_every_file(
        inproc: tuple[AsyncFiles, InProcess, Path], tmp_path: Path) -> None:
    files, _, root = inproc
    data = _small_tree(root)
    result = await files.download_dir("src", tmp_path / "dest")
    assert result["files"] == len(data) and not result["errors"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "dest").iterdir()} == data


# --- 7: deleting syncs and protected roots -----------------------------------------------------


def _project(base: Path, names: tuple[str, ...] = ("main.py",)) -> Path:
    base.mkdir(parents=True, exist_ok=True)
    for name in names:
        (base / name).write_text(f"# {name}\n")
    return base


def test_supervisor_refuses_sync_delete_in_protected_dirs(
        inproc: tuple[AsyncFiles, InProcess, Path], fake_home: Path) -> None:
    _, link, root = inproc
    (root / "victim.txt").write_text("keep me")
    (fake_home / "victim.txt").write_text("keep me")
    for where in ["", ".", str(root), str(root.parent), "~", str(fake_home), "/", "sub/.."]:
        reply, _ = link.request("sync_delete", {"root": where, "paths": ["victim.txt"]})
        assert not reply["ok"], where
        error = reply["error"]
        assert error["code"] == "permission_denied", error
        assert "allow_root_delete" in error["message"] and "--allow-root-delete" in \
            error["message"]
        assert error["details"]["reason"] == "protected_root"
        manifest = link.request("manifest", {"path": where, "hash": False,
                                             "as_blob": False})[0] \
            if where not in ("/", str(root.parent)) else None
        if manifest is not None:
            assert manifest["result"]["delete_protected"], where
    assert (root / "victim.txt").read_text() == "keep me"
    assert (fake_home / "victim.txt").read_text() == "keep me"
    # A subdirectory is not protected; the explicit flag lifts the refusal in the root.
    (root / "sub").mkdir()
    (root / "sub" / "extra.txt").write_text("x")
    sub, _ = link.request("manifest", {"path": "sub", "hash": False})
    assert sub["result"]["delete_protected"] is None
    assert link.request("sync_delete", {"root": "sub", "paths": ["extra.txt"]})[0]["ok"]
    allowed, _ = link.request("sync_delete", {"root": "", "paths": ["victim.txt"],
                                              "allow_root_delete": True})
    assert allowed["ok"] and allowed["result"]["deleted"] == ["victim.txt"]
    assert link.ok("ping")["pong"]


@pytest.mark.anyio
async def test_deleting_sync_into_the_root_or_home_is_refused_before_anything_changes(
        inproc: tuple[AsyncFiles, InProcess, Path], tmp_path: Path,
        fake_home: Path) -> None:
    files, _, root = inproc
    local = _project(tmp_path / "proj")
    (root / "data.bin").write_text("precious")
    (fake_home / "notes.txt").write_text("precious")
    for where in ["", "~", str(root.parent)]:
        with pytest.raises(TransferError, match="allow_root_delete") as info:
            await files.sync(local, where, delete=True)
        assert "--allow-root-delete" in str(info.value)
    assert _names(root) == ["data.bin"]  # nothing sent either
    assert sorted(p.name for p in fake_home.iterdir()) == ["notes.txt"]
    # Without delete it is an ordinary sync; with the flag the root is synced as asked.
    plain = await files.sync(local, "", delete=False)
    assert plain["uploaded"] == 1 and plain["deleted"] == 0
    dry = await files.sync(local, "", delete=True, dry_run=True)
    assert dry["would_delete_paths"] == ["data.bin"] and "allow_root_delete" in \
        dry["would_refuse"][0]
    assert (root / "data.bin").exists()
    done = await files.sync(local, "", delete=True, allow_root_delete=True)
    assert done["deleted"] == 1 and done["deleted_paths"] == ["data.bin"]
    assert _names(root) == ["main.py"]


def _names(root: Path) -> list[str]:
    # The supervisor's state folder lives in its root; no sync ever sees or touches it.
    return sorted(p.name for p in root.iterdir() if p.name != ".jupyter_tether")


def test_a_file_replacing_a_directory_never_deletes_what_the_sync_excludes(
        tether: Tether, server_root: Path, tmp_path: Path) -> None:
    remote = server_root / "trust_replace"
    (remote / "d" / "__pycache__").mkdir(parents=True)
    (remote / "d" / "__pycache__" / "m.pyc").write_bytes(b"excluded")
    (remote / "d" / "a.txt").write_text("extra")
    (remote / "e" / "sub" / "deeper").mkdir(parents=True)
    (remote / "e" / "b.txt").write_text("extra")
    (remote / "e" / "sub" / "c.txt").write_text("extra")
    local = _project(tmp_path / "proj", ("d", "e"))
    with pytest.raises(RemoteError, match="__pycache__") as info:
        run(tether, tether.aio.files.sync, local, "trust_replace", delete=True)
    assert info.value.code == "conflict" and "nothing was sent or deleted" in str(info.value)
    # All or nothing: not even the other directory's files went.
    assert (remote / "d" / "__pycache__" / "m.pyc").read_bytes() == b"excluded"
    assert (remote / "d" / "a.txt").exists() and (remote / "e" / "sub" / "c.txt").exists()
    # Without the excluded entry the directories are replaced, entry by entry, and counted.
    (remote / "d" / "__pycache__" / "m.pyc").unlink()
    (remote / "d" / "__pycache__").rmdir()
    result = run(tether, tether.aio.files.sync, local, "trust_replace", delete=True)
    # Files go one by one; directories left empty go with them (listed, or pruned).
    assert {"d/a.txt", "e/b.txt", "e/sub/c.txt"} <= set(result["deleted_paths"])
    assert result["deleted"] == len(result["deleted_paths"]) and result["uploaded"] == 2
    assert tree_of(remote) == {"d": b"# d\n", "e": b"# e\n"}


def test_dry_run_reports_uploads_and_deletions_and_changes_nothing(
        tether: Tether, server_root: Path, tmp_path: Path) -> None:
    local = _project(tmp_path / "proj", ("new.py", "same.py"))
    run(tether, tether.aio.files.sync, local, "trust_dry")
    remote = server_root / "trust_dry"
    (remote / "old.txt").write_text("old")
    (remote / "olddir").mkdir()
    (remote / "olddir" / "x.txt").write_text("x")
    (local / "new.py").write_text("# changed, longer\n")
    (local / "added.py").write_text("# added\n")
    before = tree_of(remote)
    result = run(tether, tether.aio.files.sync, local, "trust_dry", delete=True, dry_run=True)
    assert result["dry_run"] and result["would_refuse"] == []
    assert result["would_upload_paths"] == ["added.py", "new.py"]
    assert result["would_upload"] == 2 and result["would_upload_bytes"] == 26
    assert result["would_delete_paths"] == ["old.txt", "olddir/x.txt"]
    assert (result["would_delete"], result["uploaded"], result["deleted"]) == (2, 0, 0)
    assert tree_of(remote) == before
    real = run(tether, tether.aio.files.sync, local, "trust_dry", delete=True)
    assert real["uploaded"] == 2 and real["deleted"] == 2
    assert sorted(real["deleted_paths"]) == ["old.txt", "olddir/x.txt"]


def test_submit_clean_remote_into_the_root_is_refused_and_dry_run_runs_nothing(
        own_tether: Tether, own_server: LocalJupyterServer, tmp_path: Path) -> None:
    root = own_server.root_dir
    (root / "precious.txt").write_text("keep")
    local = _project(tmp_path / "proj")
    spec = {"sync": [{"local_dir": str(local), "remote_dir": "."}],  # clean_remote defaults on
            "run": {"command": "touch ran.txt"}, "idempotency_key": f"k-{time.time_ns()}"}
    dry = own_tether.submit(spec, dry_run=True)
    assert dry["dry_run"] and not dry["ok"] and dry["job_id"] is None
    assert "allow_root_delete" in dry["would_refuse"][0]
    assert "precious.txt" in dry["sync"][0]["would_delete_paths"]
    with pytest.raises(TransferError, match="allow_root_delete"):
        own_tether.submit(spec)
    assert (root / "precious.txt").read_text() == "keep"
    assert not (root / "main.py").exists() and not (root / "ran.txt").exists()
    assert run(own_tether, own_tether.aio.jobs.list) == []
    with pytest.raises(ConfigError, match="allow_root_delete must be true or false"):
        submit.validate_spec({**spec, "sync": [{**spec["sync"][0], "allow_root_delete": "yes"}]})


def test_cli_sync_delete_into_the_root_needs_the_flag(own_server: LocalJupyterServer,
                                                       tmp_path: Path, fake_home: Path) -> None:
    root = own_server.root_dir
    (root / "cli-precious.txt").write_text("keep")
    local = _project(tmp_path / "proj", ("cli_main.py",))
    env = _tether_env(own_server, fake_home)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(list(args), env)

    refused = cli("sync", str(local), "", "--delete")
    assert refused.returncode == 1 and "--allow-root-delete" in refused.stderr, refused.stderr
    dry = cli("sync", str(local), "", "--delete", "--dry-run")
    assert dry.returncode == 1 and "a real run would refuse" in dry.stderr
    assert "delete cli-precious.txt" in dry.stdout and "send   cli_main.py" in dry.stdout
    dry_json = json.loads(cli("--json", "sync", str(local), "", "--delete", "--dry-run",
                              "--allow-root-delete").stdout)
    assert dry_json["would_refuse"] == [] and "cli-precious.txt" in dry_json["would_delete_paths"]
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"sync": [{"local_dir": str(local), "remote_dir": "."}],
                                "run": {"command": "touch cli-ran.txt"}}))
    submitted = cli("submit", str(spec), "--dry-run")
    assert submitted.returncode == 1 and "a real submit would refuse" in submitted.stderr
    assert "--allow-root-delete" in submitted.stderr and "delete cli-precious.txt" in \
        submitted.stdout
    assert (root / "cli-precious.txt").exists() and not (root / "cli_main.py").exists()
    assert not (root / "cli-ran.txt").exists()


@pytest.mark.anyio
async def test_mcp_sync_dir_default_clean_remote_is_refused_in_the_root(
        own_server: LocalJupyterServer, tmp_path: Path, fake_home: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    root = own_server.root_dir
    (root / "mcp-precious.txt").write_text("keep")
    local = _project(tmp_path / "proj", ("mcp_main.py",))
    async with mcp_client(own_server, tmp_path, monkeypatch) as client:
        ok, _, text = await _tool(client, "jupyter_sync_dir",
                                  {"local_dir": str(local), "remote_dir": "."})
        assert not ok and "allow_root_delete" in text
        ok, out, text = await _tool(client, "jupyter_sync_dir",
                                    {"local_dir": str(local), "remote_dir": ".", "dry_run": True})
        assert ok, text
        assert out["dry_run"] and "mcp-precious.txt" in out["would_delete_paths"]
        assert "mcp_main.py" in out["would_upload_paths"] and out["would_refuse"]
        ok, out, text = await _tool(client, "jupyter_sync_dir",
                                    {"local_dir": str(local), "remote_dir": "mcp_sub"})
        assert ok and out["uploaded"] == 1 and out["deleted"] == 0, text
    assert (root / "mcp-precious.txt").read_text() == "keep"
    assert not (root / "mcp_main.py").exists()


# --- 8: names at the limits ----------------------------------------------------------------------


LONG_NAMES = ["a" * 255, "é" * 127 + "x", "日" * 85, "😀" * 63 + "abc"]


def test_side_names_are_shortened_by_bytes_with_a_hash() -> None:
    for name in [*LONG_NAMES, "short.txt"]:
        assert len(name.encode()) <= NAME_MAX_BYTES
        seen = set()
        for suffix in (PART_SUFFIX, SIDECAR_SUFFIX, TEMP_MARK + "0123abcd"):
            side = side_name(name, suffix)
            assert side.endswith(suffix) and len(side.encode()) <= NAME_MAX_BYTES, side
            assert side not in seen
            seen.add(side)
        assert side_name(name, PART_SUFFIX) == side_name(name, PART_SUFFIX)
    assert side_name("short.txt", PART_SUFFIX) == "short.txt" + PART_SUFFIX
    # Two long names sharing a prefix get different side files.
    assert side_name("a" * 254 + "b", PART_SUFFIX) != side_name("a" * 254 + "c", PART_SUFFIX)


def test_255_byte_names_travel_both_ways(tether: Tether, server_root: Path,
                                         tmp_path: Path) -> None:
    local = tmp_path / "long"
    local.mkdir()
    big = os.urandom(MiB + 4096)  # above the batch limit: the chunked path, with a part file
    for i, name in enumerate(LONG_NAMES):
        (local / name).write_bytes(name.encode() * 3 if i else big)
    files = tether.aio.files
    # Single files, both ways.
    for name in LONG_NAMES[:2]:
        up = run(tether, files.upload, local / name, f"trust_long_one/{name}")
        assert up.sha256 == hashlib.sha256((local / name).read_bytes()).hexdigest()
        back = tmp_path / "one" / name
        run(tether, files.download, f"trust_long_one/{name}", back, via="comm")
        assert back.read_bytes() == (local / name).read_bytes()
    # A directory, both ways (batched small files and one big one).
    result = run(tether, files.sync, local, "trust_long")
    assert result["uploaded"] == len(LONG_NAMES) and not result["errors"]
    assert {p.name for p in (server_root / "trust_long").iterdir()} == set(LONG_NAMES)
    dest = tmp_path / "back"
    got = run(tether, files.download_dir, "trust_long", dest)
    assert got["files"] == len(LONG_NAMES) and not got["errors"]
    for name in LONG_NAMES:
        assert (dest / name).read_bytes() == (local / name).read_bytes(), name
    assert sorted(p.name for p in dest.iterdir()) == sorted(LONG_NAMES)  # no debris
