"""``put``, ``get`` and ``sync``: files and directories, with progress and a one-line report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import Files, NotFound
from ..controller.blocking_services import human_bytes
from ..controller.files import DEFAULT_SYNC_MAX_BYTES
from .context import EXIT_ERROR, EXIT_OK, Ctx, UsageError, add_command, error
from .output import transfer_progress


def _parse_size(value: str) -> int | None:
    """``200M``, ``2G``, ``5000`` (bytes); ``0`` or ``none`` lifts the limit."""
    text = value.strip().lower()
    if text in ("0", "none", "unlimited"):
        return None
    units = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
    scale = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        return int(float(number.removesuffix("i")) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {value!r} (like 500M or 2G)") from None


def _rate(size: int, seconds: float) -> str:
    return f", {human_bytes(size / seconds)}/s" if seconds > 0 else ""


def _report_transfer(ctx: Ctx, verb: str, source: str, dest: str, result: Any) -> None:
    data: dict[str, Any] = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    if ctx.json:
        ctx.emit_json(data)
        return
    size, seconds = int(data.get("bytes") or 0), float(data.get("seconds") or 0.0)
    line = f"{verb} {source} -> {dest}: "
    if "uploaded" in data:  # a sync
        line += (f"{data['uploaded']} files sent ({human_bytes(size)}), "
                 f"{data.get('unchanged', 0)} unchanged, {data.get('deleted', 0)} deleted")
        skipped = data.get("skipped") or []
        if skipped:
            line += f", {len(skipped)} skipped (links or special files; see --json)"
    elif "files" in data:  # a directory download
        line += f"{data['files']} files, {human_bytes(size)}"
    else:
        line += human_bytes(size)
        if data.get("resumed_bytes"):
            line += f" (resumed after {human_bytes(data['resumed_bytes'])})"
    line += f" in {seconds:.2f}s{_rate(size, seconds)}"
    ctx.out.print(line, markup=False, highlight=False)


def report_dry_run(ctx: Ctx, local: str, result: dict[str, Any]) -> int:
    """What a sync would do; exit 1 when a real run would refuse."""
    if ctx.json:
        ctx.emit_json(result)
    else:
        lines = [f"dry run: sync {local} -> {result.get('remote_dir')} would send "
                 f"{result.get('would_upload', 0)} files "
                 f"({human_bytes(int(result.get('would_upload_bytes') or 0))}) and delete "
                 f"{result.get('would_delete', 0)}; nothing was changed"]
        lines += [f"  send   {p}" for p in result.get("would_upload_paths", [])]
        lines += [f"  delete {p}" for p in result.get("would_delete_paths", [])]
        ctx.out.print("\n".join(lines), markup=False, highlight=False)
    for reason in result.get("would_refuse", []):
        error(f"a real run would refuse: {reason}")
    return EXIT_ERROR if result.get("would_refuse") else EXIT_OK


# --- put --------------------------------------------------------------------------------------


def add_put(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = add_command(subparsers, "put", cmd_put, "upload a file (or a directory, as a sync)", """
        jupyter-tether put model.ckpt work/model.ckpt
        jupyter-tether put ./data work/data
        """, common)
    p.add_argument("local", help="local file or directory")
    p.add_argument("remote", help="remote path (relative to the server root)")
    p.add_argument("--max-bytes", type=_parse_size, default=DEFAULT_SYNC_MAX_BYTES,
                   metavar="SIZE", help="for a directory: refuse to send more (default: 200M; "
                   "0 = no limit)")


def cmd_put(ctx: Ctx) -> int:
    local = Path(ctx.args.local)
    if not local.exists():
        raise UsageError(f"{local}: no such file or directory")
    files = ctx.connect().files
    with transfer_progress(ctx, f"put {local.name}") as progress:
        if local.is_dir():  # a directory goes up as a (delta) sync
            result: Any = files.sync(local, ctx.args.remote, max_bytes=ctx.args.max_bytes,
                                     progress=progress or False)
        else:
            result = files.upload(local, ctx.args.remote, progress=progress or False)
    _report_transfer(ctx, "uploaded", str(local), ctx.args.remote, result)
    return EXIT_OK


# --- get --------------------------------------------------------------------------------------


def add_get(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = add_command(subparsers, "get", cmd_get, "download a remote file or directory", """
        jupyter-tether get work/out/metrics.json .
        jupyter-tether get work/out ./out
        """, common)
    p.add_argument("remote", help="remote file or directory")
    p.add_argument("local", help="local destination")


def _remote_is_dir(files: Files, remote: str) -> bool:
    info = files.stat(remote)
    if not info.get("exists"):
        raise NotFound("not_found", f"no such remote file or directory: {info.get('path', remote)}")
    kind = info.get("target_type") if info.get("type") == "symlink" else info.get("type")
    return kind == "directory"


def cmd_get(ctx: Ctx) -> int:
    files = ctx.connect().files
    remote, local = ctx.args.remote, Path(ctx.args.local)
    is_dir = _remote_is_dir(files, remote)
    if not is_dir and local.is_dir():
        local = local / Path(remote.rstrip("/")).name  # like cp: into an existing directory
    with transfer_progress(ctx, f"get {Path(remote).name}") as progress:
        if is_dir:
            result: Any = files.download_dir(remote, local, progress=progress or False)
        else:
            result = files.download(remote, local, progress=progress or False)
    _report_transfer(ctx, "downloaded", remote, str(local), result)
    return EXIT_OK


# --- sync -------------------------------------------------------------------------------------


def add_sync(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = add_command(subparsers, "sync", cmd_sync, "send only what changed in a directory", """
        jupyter-tether sync ./src work/src
        jupyter-tether sync ./src work/src --delete --exclude '*.pyc' --exclude .git
        """, common)
    p.add_argument("local_dir", help="local directory")
    p.add_argument("remote_dir", help="remote directory")
    p.add_argument("--delete", action="store_true", help="delete remote files absent locally")
    p.add_argument("--dry-run", action="store_true",
                   help="change nothing: list what would be sent and deleted")
    p.add_argument("--allow-root-delete", action="store_true",
                   help="let --delete work in the server root, the home directory, / or a "
                   "directory above them (refused by default)")
    p.add_argument("--exclude", action="append", metavar="GLOB",
                   help="skip matching paths (repeatable; .gitignore-style; default: VCS "
                   "dirs, caches, venvs, build outputs)")
    p.add_argument("--no-gitignore", action="store_true",
                   help="do not apply the tree's .gitignore files")
    p.add_argument("--max-bytes", type=_parse_size, default=DEFAULT_SYNC_MAX_BYTES,
                   metavar="SIZE", help="refuse, before sending, when more would travel "
                   "(default: 200M; 0 = no limit)")


def cmd_sync(ctx: Ctx) -> int:
    local = Path(ctx.args.local_dir)
    if not local.is_dir():
        raise UsageError(f"{local}: not a directory")
    files = ctx.connect().files
    with transfer_progress(ctx, f"sync {local.name or local}") as progress:
        result = files.sync(local, ctx.args.remote_dir, exclude=ctx.args.exclude or None,
                            delete=ctx.args.delete, max_bytes=ctx.args.max_bytes,
                            gitignore=not ctx.args.no_gitignore, progress=progress or False,
                            dry_run=ctx.args.dry_run,
                            allow_root_delete=ctx.args.allow_root_delete)
    if result.get("dry_run"):
        return report_dry_run(ctx, str(local), result)
    _report_transfer(ctx, "synced", str(local), ctx.args.remote_dir, result)
    return EXIT_OK
