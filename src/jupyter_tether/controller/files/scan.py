"""The local tree a sync sends: a walk with excludes and ``.gitignore`` files scoped as git does."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ...agent_payload.excludes import ExcludeMatcher
from ...agent_payload.paths import PART_SUFFIX, SIDECAR_SUFFIX, TEMP_MARK, is_inside
from ...errors import TransferError


@dataclass
class LocalEntry:
    rel: str
    path: str
    st: os.stat_result

    @property
    def size(self) -> int:
        return self.st.st_size


@dataclass
class LocalTree:
    root: str
    files: dict[str, LocalEntry]
    dirs: list[str]
    skipped: list[dict[str, str]]
    errors: list[dict[str, str]]
    #: root-relative exclude patterns (the given ones plus every .gitignore, scoped)
    patterns: list[str]


def _glob_escape(text: str) -> str:
    escaped = re.sub(r"([*?\[\\])", r"\\\1", text)
    return "\\" + escaped if escaped[:1] in ("!", "#") else escaped


def scoped_gitignore_pattern(line: str, rel_dir: str) -> str | None:
    """A ``.gitignore`` line of directory ``rel_dir`` rewritten relative to the tree's root.

    As in git, a pattern without a slash matches at any depth below its directory, one with
    a slash is anchored to it, and deeper files come later so they take precedence.
    """
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    if not rel_dir:
        return text
    negate = ""
    if text.startswith("!"):
        negate, text = "!", text[1:]
    dir_only = text.endswith("/")
    body = text.rstrip("/")
    anchored = "/" in body
    body = body.lstrip("/")
    if not body:
        return None
    prefix = _glob_escape(rel_dir)
    scoped = f"{prefix}/{body}" if anchored else f"{prefix}/**/{body}"
    return negate + scoped + ("/" if dir_only else "")


def _is_debris(name: str) -> bool:
    return name.endswith((PART_SUFFIX, SIDECAR_SUFFIX)) or TEMP_MARK in name


def scan_local(root: str | os.PathLike[str], patterns: Sequence[str], *,
               gitignore: bool = True) -> LocalTree:
    """Walk a local tree for ``sync``: regular files (and in-tree file links), dirs, skips.

    Symlinks are followed only to regular files inside the tree; links to directories (which
    could loop or duplicate content) and links leading outside are reported in ``skipped``,
    as are sockets, FIFOs and devices. ``.gitignore`` files apply to their own directory and
    below; the given ``patterns`` come last, so a ``.gitignore`` cannot re-include them.
    """
    root_str = os.fspath(root)
    real_root = os.path.realpath(root_str)
    base = [p for p in patterns if p and p.strip()]
    tree = LocalTree(root_str, {}, [], [], [], [])
    scoped_all: list[str] = []
    stack: list[tuple[str, str, list[str], ExcludeMatcher]] = [
        ("", root_str, [], ExcludeMatcher(base))]
    while stack:
        rel_dir, abs_dir, inherited, matcher = stack.pop()
        if gitignore:
            ignore_file = os.path.join(abs_dir, ".gitignore")
            try:
                if os.path.isfile(ignore_file):
                    with open(ignore_file, encoding="utf-8", errors="replace") as handle:
                        lines = handle.read().splitlines()
                    scoped = [s for s in (scoped_gitignore_pattern(x, rel_dir) for x in lines) if s]
                    if scoped:
                        inherited = inherited + scoped
                        scoped_all.extend(scoped)
                        matcher = ExcludeMatcher(inherited + base)
            except OSError as exc:
                tree.errors.append({"path": rel_dir + "/.gitignore" if rel_dir else ".gitignore",
                                    "error": f"{ignore_file}: {exc.strerror or exc}"})
        try:
            iterator = os.scandir(abs_dir)
        except OSError as exc:
            if not rel_dir:
                raise TransferError(f"cannot read local directory {abs_dir}: "
                                    f"{exc.strerror or exc}") from None
            tree.errors.append({"path": rel_dir, "error": f"{abs_dir}: {exc.strerror or exc}"})
            continue
        with iterator:
            for entry in iterator:
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                try:
                    _scan_entry(tree, entry, rel, real_root, matcher, stack, inherited)
                except OSError as exc:  # vanished or unreadable meanwhile: say so, go on
                    tree.errors.append({"path": rel, "error": f"{entry.path}: "
                                                              f"{exc.strerror or exc}"})
    tree.dirs.sort()
    tree.skipped.sort(key=lambda s: s["path"])
    tree.patterns = scoped_all + base
    return tree


def _scan_entry(tree: LocalTree, entry: os.DirEntry[str], rel: str, real_root: str,
                matcher: ExcludeMatcher, stack: list[tuple[str, str, list[str], ExcludeMatcher]],
                inherited: list[str]) -> None:
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        tree.skipped.append({"path": os.fsencode(rel).decode("utf-8", "replace"),
                             "reason": "name is not valid UTF-8"})
        return
    if entry.is_symlink():
        target = os.path.realpath(entry.path)
        is_dir = os.path.isdir(target)
        if matcher and matcher.excludes_entry(rel, is_dir):
            return
        if not is_inside(target, real_root):
            tree.skipped.append({"path": rel, "reason": f"symlink to {target}, outside the "
                                                        "local directory: not followed"})
        elif is_dir:
            tree.skipped.append({"path": rel, "reason": "symlink to a directory: not followed"})
        elif os.path.isfile(target):
            tree.files[rel] = LocalEntry(rel, entry.path, os.stat(entry.path))
        else:
            tree.skipped.append({"path": rel, "reason": "dangling symlink or not a regular file"})
        return
    if entry.is_dir(follow_symlinks=False):
        if matcher and matcher.excludes_entry(rel, True):
            return
        tree.dirs.append(rel)
        stack.append((rel, entry.path, inherited, matcher))
        return
    if matcher and matcher.excludes_entry(rel, False):
        return
    if entry.is_file(follow_symlinks=False):
        if _is_debris(entry.name):
            return
        tree.files[rel] = LocalEntry(rel, entry.path, entry.stat(follow_symlinks=False))
    else:
        tree.skipped.append({"path": rel, "reason": "not a regular file (socket, FIFO or "
                                                    "device)"})
