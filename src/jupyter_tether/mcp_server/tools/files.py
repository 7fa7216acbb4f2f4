"""Remote file tools: list, read and write text, bytes as base64, and moving local files and
directories to and from the remote (local paths confined to the allowed roots)."""
# No ``from __future__ import annotations``: the SDK reads these signatures at runtime.

import base64
import binascii
import os
from typing import Annotated, Any

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from ... import DEFAULT_SYNC_MAX_BYTES
from ...controller.submit import DEFAULT_SYNC_EXCLUDES, split_globs
from ..limits import bounded, cap_head, cap_value
from ..progress import activity
from .common import (
    COMPAT,
    ClientRoots,
    KernelCompat,
    ServerUrl,
    ToolContext,
    ToolTable,
    hints,
    timeout_arg,
)

DOWNLOAD_BASE64_MAX = 16 * 1024 * 1024

TOOLS = ToolTable()


@TOOLS.tool(hints(True, title="List a remote directory"))
async def jupyter_list_dir(
    tc: ToolContext,
    path: Annotated[str, Field(description="Remote directory; '' is the server root.")] = "",
    server_url: ServerUrl = None,
    timeout_s: Annotated[float, timeout_arg()] = 30.0,
    max_entries: Annotated[int, Field(description="Cap on entries returned.", ge=1)] = 1000,
) -> dict[str, Any]:
    """List a remote directory: name, type, size, mtime of each entry."""
    async with bounded(timeout_s, "list dir"):
        # One more than asked: tells whether there were more.
        entries = await (await tc.tether(server_url)).files.list(
            path, max_entries=max_entries + 1)
    out: dict[str, Any] = {"path": path, "entries": entries[:max_entries],
                           "count": min(len(entries), max_entries)}
    if len(entries) > max_entries:
        out["truncated"] = (f"showing the first {max_entries} entries; raise max_entries "
                            "or list a subdirectory")
    return out


@TOOLS.tool(hints(True, title="Read a remote text file"))
async def jupyter_read_text(
    tc: ToolContext,
    path: Annotated[str, Field(description="Remote file path.", min_length=1)],
    server_url: ServerUrl = None,
    timeout_s: Annotated[float, timeout_arg()] = 30.0,
    max_chars: Annotated[int, Field(description="Cap on returned chars (the head is kept).",
                                    ge=100)] = 100_000,
) -> dict[str, Any]:
    """Read a remote text file (a long one is cut; jupyter_download_to_local fetches it
    whole)."""
    async with bounded(timeout_s, "read text"):
        tether = await tc.tether(server_url)
        # Never more than the cap needs (UTF-8 is at most 4 bytes a char), plus one to
        # tell whether the file goes on.
        text = await tether.files.read_text(path, max_bytes=4 * max_chars + 1)
        size = None
        if len(text) > max_chars:
            size = (await tether.files.stat(path)).get("size")
    content, truncated = cap_head(text, max_chars, f"remote file {path} (of {size} bytes; "
                                  "jupyter_download_to_local fetches it whole)")
    return {"path": path, "content": content, "truncated": truncated,
            "bytes": size if size is not None else len(text.encode())}


@TOOLS.tool(hints(False, destructive=True, idempotent=True, title="Write a remote text file"))
async def jupyter_write_text(
    tc: ToolContext,
    path: Annotated[str, Field(description="Remote file path; parents are created.",
                               min_length=1)],
    content: Annotated[str, Field(description="The text (replaces the file).")],
    server_url: ServerUrl = None,
    timeout_s: Annotated[float, timeout_arg()] = 30.0,
) -> dict[str, Any]:
    """Create or replace a remote text file, atomically."""
    async with bounded(timeout_s, "write text"):
        result = await (await tc.tether(server_url)).files.write_text(path, content)
    return {**result, "path": path, "resolved_path": result.get("path")}


@TOOLS.tool(hints(False, destructive=True, idempotent=True, title="Write remote bytes"))
async def jupyter_upload_base64(
    tc: ToolContext,
    path: Annotated[str, Field(description="Remote file path; parents are created.",
                               min_length=1)],
    content_base64: Annotated[str, Field(description="The file's bytes, base64-encoded.")],
    server_url: ServerUrl = None,
    timeout_s: Annotated[float, timeout_arg()] = 60.0,
) -> dict[str, Any]:
    """Write base64 bytes to a remote file. Local files: jupyter_upload_local_file."""
    try:
        data = base64.b64decode(content_base64.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ToolError(f"content_base64 is not valid base64 ({exc}); encode the bytes "
                        "with standard base64 (A-Z, a-z, 0-9, +, /, = padding)") from None
    async with bounded(timeout_s, "upload"):
        result = await (await tc.tether(server_url)).files.write_bytes(path, data)
    return {**result, "path": path, "resolved_path": result.get("path")}


@TOOLS.tool(hints(False, destructive=True, idempotent=True, title="Upload a local file"))
async def jupyter_upload_local_file(
    tc: ToolContext,
    ctx: Context,
    local_path: Annotated[str, Field(description="File on this MCP server's machine.",
                                     min_length=1)],
    remote_path: Annotated[str, Field(description="Remote destination.", min_length=1)],
    server_url: ServerUrl = None,
    timeout_s: Annotated[float, timeout_arg()] = 120.0,
    client_roots: ClientRoots = None,
) -> dict[str, Any]:
    """Upload a local file (inside the allowed local roots) in chunks, SHA-256 verified,
    renamed into place atomically; sends progress. Returns bytes, seconds, sha256."""
    local = tc.confine(local_path, client_roots)
    if not os.path.isfile(local):
        raise ToolError(f"local file not found: {local_path}")
    async with bounded(timeout_s, f"upload of {local_path}"), \
            activity(ctx, f"upload {os.path.basename(local)}") as act:
        tether = await tc.tether(server_url)
        result = await tether.files.upload(local, remote_path, progress=act.transfer)
    return {"local_path": local, "remote_path": remote_path, **result.to_dict()}


@TOOLS.tool(hints(True, title="Read remote bytes as base64"))
async def jupyter_download_base64(
    tc: ToolContext,
    remote_path: Annotated[str, Field(description="Remote file path.", min_length=1)],
    server_url: ServerUrl = None,
    timeout_s: Annotated[float, timeout_arg()] = 120.0,
    max_bytes: Annotated[int, Field(description="Refuse files larger than this.",
                                    ge=1)] = DOWNLOAD_BASE64_MAX,
) -> dict[str, Any]:
    """A remote file's bytes as base64: small files only (it costs context); else
    jupyter_download_to_local."""
    async with bounded(timeout_s, "download"):
        tether = await tc.tether(server_url)
        data = await tether.files.read_bytes(remote_path, max_bytes=max_bytes + 1)
    if len(data) > max_bytes:
        raise ToolError(f"{remote_path} is larger than max_bytes={max_bytes}; use "
                        "jupyter_download_to_local instead (no base64, any size)")
    return {"remote_path": remote_path, "bytes": len(data),
            "content_base64": base64.b64encode(data).decode("ascii")}


@TOOLS.tool(hints(False, idempotent=True, title="Download a remote file"))
async def jupyter_download_to_local(
    tc: ToolContext,
    ctx: Context,
    remote_path: Annotated[str, Field(description="Remote file path.", min_length=1)],
    local_path: Annotated[str, Field(description="Destination on this MCP server's "
                                                 "machine.", min_length=1)],
    server_url: ServerUrl = None,
    timeout_s: Annotated[float, timeout_arg()] = 120.0,
    client_roots: ClientRoots = None,
) -> dict[str, Any]:
    """Download a remote file to a local path (inside the allowed local roots) in chunks,
    checked against the remote, written atomically; sends progress. Returns bytes, seconds,
    sha256."""
    local = tc.confine(local_path, client_roots)
    async with bounded(timeout_s, f"download of {remote_path}"), \
            activity(ctx, f"download {os.path.basename(remote_path)}") as act:
        tether = await tc.tether(server_url)
        result = await tether.files.download(remote_path, local, progress=act.transfer)
    return {"remote_path": remote_path, "local_path": local, **result.to_dict()}


@TOOLS.tool(hints(False, idempotent=True, title="Download a remote directory"))
async def jupyter_download_dir_to_local(
    tc: ToolContext,
    ctx: Context,
    remote_dir: Annotated[str, Field(description="Remote directory.", min_length=1)],
    local_dir: Annotated[str, Field(description="Local destination directory.",
                                    min_length=1)],
    archive_remote_path: Annotated[str | None, Field(description=COMPAT)] = None,
    kernel_id: KernelCompat = None,
    server_url: ServerUrl = None,
    timeout_s: Annotated[float, timeout_arg()] = 600.0,
    client_roots: ClientRoots = None,
) -> dict[str, Any]:
    """Download a remote directory tree into local_dir (inside the allowed local roots);
    entries that would land outside it (absolute, '..', links, devices) are refused."""
    local = tc.confine(local_dir, client_roots)
    async with bounded(timeout_s, f"download of {remote_dir}"), \
            activity(ctx, f"download {remote_dir}") as act:
        tether = await tc.tether(server_url)
        result = await tether.files.download_dir(remote_dir, local, progress=act.transfer)
    return dict(cap_value({"remote_dir": remote_dir, "local_dir": local, **result}))


@TOOLS.tool(hints(False, destructive=True, idempotent=True,
                  title="Sync a local directory to the remote"))
async def jupyter_sync_dir(
    tc: ToolContext,
    ctx: Context,
    local_dir: Annotated[str, Field(description="Local directory to send.", min_length=1)],
    remote_dir: Annotated[str, Field(description="Remote destination directory.",
                                     min_length=1)],
    exclude_globs_csv: Annotated[str, Field(
        description="Comma-separated globs to leave out.")] = DEFAULT_SYNC_EXCLUDES,
    clean_remote: Annotated[bool, Field(
        description="Delete remote files not in local_dir (refused at the server root, "
                    "home, / or above unless allow_root_delete).")] = True,
    dry_run: Annotated[bool, Field(
        description="Change nothing; report would_upload_paths, would_delete_paths, "
                    "would_refuse.")] = False,
    allow_root_delete: Annotated[bool, Field(
        description="Let clean_remote delete there; only if the user asked.")] = False,
    keep_archive: Annotated[bool, Field(description=COMPAT)] = False,
    max_bytes: Annotated[int, Field(description="Refuse if the files to send exceed this "
                                                "(0: no limit).", ge=0)] = DEFAULT_SYNC_MAX_BYTES,
    kernel_id: KernelCompat = None,
    server_url: ServerUrl = None,
    timeout_s: Annotated[float, timeout_arg()] = 600.0,
    client_roots: ClientRoots = None,
) -> dict[str, Any]:
    """Make a remote directory match a local one (inside the allowed local roots); only
    changed files travel (size, mtime, hash compared); sends progress."""
    local = tc.confine(local_dir, client_roots)
    if not os.path.isdir(local):
        raise ToolError(f"local directory not found: {local_dir}")
    async with bounded(timeout_s, f"sync of {local_dir}"), \
            activity(ctx, f"sync {os.path.basename(local.rstrip('/'))}") as act:
        tether = await tc.tether(server_url)
        result = await tether.files.sync(
            local, remote_dir, exclude=split_globs(exclude_globs_csv),
            delete=clean_remote, max_bytes=max_bytes, progress=act.transfer,
            dry_run=dry_run, allow_root_delete=allow_root_delete)
    return dict(cap_value({"local_dir": local, "remote_dir": remote_dir, **result}))
