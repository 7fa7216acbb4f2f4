"""The default sync excludes, defined once, and how an ``exclude`` argument becomes patterns."""

from __future__ import annotations

import re
from collections.abc import Sequence

# Each row: our gitignore-style pattern (a name without "/" matches at any depth), then how
# the reference tool's ``exclude_globs_csv`` default spelled it, or None where the reference
# default lacked it. Everything derives from this table: ``DEFAULT_SYNC_EXCLUDES``
# (``sync(exclude=None)``, the CLI), the reference CSV (the MCP/job-spec default, kept
# verbatim for the tool contract; ``submit.split_globs`` maps that exact string back to
# ``DEFAULT_SYNC_EXCLUDES``, so every default sync leaves out the same things) and the
# submit fingerprint (which skips what sync would skip).
_DEFAULT_EXCLUDE_TABLE: tuple[tuple[str, str | None], ...] = (
    (".git", ".git/**"), (".hg", ".hg/**"), (".svn", ".svn/**"),
    ("__pycache__", "**/__pycache__/**"), ("*.pyc", "**/*.pyc"),
    (".ipynb_checkpoints", None), (".venv", ".venv/**"), ("venv", "venv/**"), ("env", None),
    ("node_modules", None), ("build", "build/**"), ("dist", "dist/**"),
    ("*.egg-info", "*.egg-info/**"), (".mypy_cache", ".mypy_cache/**"),
    (".pytest_cache", ".pytest_cache/**"), (".ruff_cache", ".ruff_cache/**"),
    (".DS_Store", None),
)
#: what ``sync`` leaves out when ``exclude`` is None
DEFAULT_SYNC_EXCLUDES: tuple[str, ...] = tuple(ours for ours, _ in _DEFAULT_EXCLUDE_TABLE)
#: the reference tool's default ``exclude_globs_csv``, verbatim (see the table above)
REFERENCE_EXCLUDE_GLOBS_CSV: str = ",".join(ref for _, ref in _DEFAULT_EXCLUDE_TABLE if ref)


def normal_excludes(exclude: str | Sequence[str] | None) -> list[str]:
    """Patterns from ``exclude``: None is the defaults, a string is split on commas and lines."""
    if exclude is None:
        return list(DEFAULT_SYNC_EXCLUDES)
    if isinstance(exclude, str):
        return [p.strip() for p in re.split(r"[,\n]", exclude) if p.strip()]
    return [str(p) for p in exclude]
