"""``put``, ``get`` and ``sync``: files and directories, with progress and a one-line report."""

from __future__ import annotations

import argparse
import os
import posixpath
from pathlib import Path
from typing import Any

from .. import DEFAULT_SYNC_MAX_BYTES, Files, NotFound
from ..formatting import human_bytes, short_bytes
from .context import EXIT_ERROR, EXIT_OK, Ctx, UsageError, add_command, error
from .output import plural, rate, transfer_progress


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


def _report_transfer(ctx: Ctx, verb: str, source: str, dest: str, result: Any) -> None:
    data: dict[str, Any] = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    if ctx.json:
        ctx.emit_json(data)
        return
    size, seconds = int(data.get("bytes") or 0), float(data.get("seconds") or 0.0)
    line = f"{verb} {source} -> {dest}: "
    if "uploaded" in data:  # a sync
        line += (f"{plural(int(data['uploaded']), 'file')} sent ({human_bytes(size)}), "
                 f"{data.get('unchanged', 0)} unchanged, {data.get('deleted', 0)} deleted")
    elif "files" in data:  # a directory download
        line += f"{plural(int(data['files']), 'file')}, {human_bytes(size)}"
        if "unchanged" in data:
            line += f", {data['unchanged']} unchanged"
    else:
        line += human_bytes(size)
        if data.get("resumed_bytes"):
            line += f" (resumed after {human_bytes(data['resumed_bytes'])})"
    skipped = data.get("skipped") or []
    if skipped:
        line += f", {len(skipped)} skipped (links or special files; see --json)"
    line += f" in {seconds:.2f}s{rate(size, seconds)}"
    ctx.out.print(line, markup=False, highlight=False)


def report_dry_run(ctx: Ctx, local: str, result: dict[str, Any]) -> int:
    """What a sync would do; exit 1 when a real run would refuse."""
    if ctx.json:
        ctx.emit_json(result)
    else:
        lines = [f"dry run: sync {local} -> {result.get('remote_dir')} would send "
                 f"{plural(int(result.get('would_upload') or 0), 'file')} "
                 f"({human_bytes(int(result.get('would_upload_bytes') or 0))}) and delete "
                 f"{result.get('would_delete', 0)}; nothing was changed"]
        lines += [f"  send   {p}" for p in result.get("would_upload_paths", [])]
        lines += [f"  delete {p}" for p in result.get("would_delete_paths", [])]
        ctx.out.print("\n".join(lines), markup=False, highlight=False)
    for reason in result.get("would_refuse", []):
        error(f"a real run would refuse: {reason}")
    return EXIT_ERROR if result.get("would_refuse") else EXIT_OK


# --- put --------------------------------------------------------------------------------------


# Both follow cp/scp: a destination that is an existing folder, or that ends with "/" (the
# folder is then created), means "inside it", under the source's own name; a directory goes
# whole (put sends it as a delta sync; get again fetches only what changed).
_PLACEMENT = ("\n\nLike cp and scp: when the destination is an existing folder, or ends with /\n"
              "(created if missing), the file or folder goes inside it under its own name;\n"
              "otherwise the destination is its new name.")


def _ends_with_slash(path: str) -> bool:
    return path.endswith("/") or (os.sep != "/" and path.endswith(os.sep))


def remote_inside(remote: str, name: str) -> str:
    """``name`` inside the remote folder ``remote`` ("" is the server root)."""
    base = remote.rstrip("/") or ("/" if remote.startswith("/") else "")
    return posixpath.join(base, name) if base else name


def add_put(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = add_command(subparsers, "put", cmd_put, "upload a file or a directory", """
        jupyter-tether put model.ckpt work/           # -> work/model.ckpt (work/ created)
        jupyter-tether put model.ckpt work/best.ckpt  # -> work/best.ckpt
        jupyter-tether put ./data work                # -> work/data if work is a folder
        jupyter-tether put notes.txt                  # -> notes.txt in the server root
        """, common)
    p.description = (str(p.description) + _PLACEMENT + "\nA folder goes up as a delta sync "
                     "(unchanged files are not sent); `sync` mirrors\na folder onto a path.")
    p.add_argument("local", help="local file or directory")
    p.add_argument("remote", nargs="?", default="",
                   help="remote destination, relative to the server root (default: the root)")
    _add_max_bytes(p, "for a directory: refuse to send more")


def _add_max_bytes(p: argparse.ArgumentParser, what: str) -> None:
    """``--max-bytes`` (put's folders and sync): ``what`` the limit does."""
    p.add_argument("--max-bytes", type=_parse_size, default=DEFAULT_SYNC_MAX_BYTES,
                   metavar="SIZE",
                   help=f"{what} (default: {short_bytes(DEFAULT_SYNC_MAX_BYTES)}; 0 = no limit)")


def cmd_put(ctx: Ctx) -> int:
    local = Path(ctx.args.local)
    if not local.exists():
        raise UsageError(f"{local}: no such file or directory")
    files = ctx.connect().files
    remote: str = ctx.args.remote
    if _ends_with_slash(remote):
        files.mkdir(remote.rstrip("/") or remote, parents=True)
        remote = remote_inside(remote, local.absolute().name)
    elif not remote or _remote_kind(files, remote)[0] == "directory":
        remote = remote_inside(remote, local.absolute().name)
    with transfer_progress(ctx, f"put {local.name}") as progress:
        if local.is_dir():  # a directory goes up as a (delta) sync
            result: Any = files.sync(local, remote, max_bytes=ctx.args.max_bytes,
                                     progress=progress or False)
        else:
            result = files.upload(local, remote, progress=progress or False)
    _report_transfer(ctx, "uploaded", str(local), remote, result)
    return EXIT_OK


# --- get --------------------------------------------------------------------------------------


def add_get(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = add_command(subparsers, "get", cmd_get, "download a remote file or directory", """
        jupyter-tether get work/out/metrics.json      # -> ./metrics.json
        jupyter-tether get work/out/metrics.json dl/  # -> dl/metrics.json (dl/ created)
        jupyter-tether get work/out                   # -> ./out; again: only what changed
        jupyter-tether get work/out results           # -> results/out if results is a folder
        """, common)
    p.description = (str(p.description) + _PLACEMENT + "\nA folder fetched again brings "
                     "only what changed.")
    p.add_argument("remote", help="remote file or directory")
    p.add_argument("local", nargs="?", default=".",
                   help="local destination (default: the current folder)")


def _remote_kind(files: Files, remote: str) -> tuple[str | None, str]:
    """The remote path's type ("file", "directory", ...; links followed; None if missing)
    and its resolved path."""
    info = files.stat(remote)
    path = str(info.get("path") or remote)
    if not info.get("exists"):
        return None, path
    kind = info.get("target_type") if info.get("type") == "symlink" else info.get("type")
    return (str(kind) if kind else None), path


def local_destination(local: str, remote_name: str) -> tuple[Path, bool]:
    """Where ``get`` writes (cp rules) and whether the folder named by a trailing ``/`` must
    be created first: inside ``local`` when it is a folder or ends with ``/``."""
    into = _ends_with_slash(local) or Path(local).is_dir()
    if not into:
        return Path(local), False
    return (Path(local) / remote_name if remote_name else Path(local)), not Path(local).is_dir()


def cmd_get(ctx: Ctx) -> int:
    files = ctx.connect().files
    remote: str = ctx.args.remote
    kind, path = _remote_kind(files, remote)
    if kind is None:
        raise NotFound("not_found", f"no such remote file or directory: {path}")
    is_dir = kind == "directory"
    # The resolved path's name: `get .` or `get work/..` still have one.
    name = posixpath.basename(path.rstrip("/"))
    local, create = local_destination(ctx.args.local, name)
    if create:
        Path(ctx.args.local).mkdir(parents=True, exist_ok=True)
    with transfer_progress(ctx, f"get {name or remote}") as progress:
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
    _add_max_bytes(p, "refuse, before sending, when more would travel")


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
