"""Gitignore-like exclude patterns for tree walks (shared with the controller).

``make_matcher(patterns)`` returns a callable ``matcher(relpath, is_dir)`` that says whether
to skip an entry; the same rules run on both sides, so a sync compares like with like.
"""

import re
from typing import Callable, Iterable, List, Optional, Union

Matcher = Callable[[str, bool], bool]


def _translate_glob(pattern: str) -> str:
    """Regex source for a gitignore-style glob: ``*`` and ``?`` stop at ``/``, ``**`` does not."""
    out: List[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if pattern.startswith("**/", i):
                out.append("(?:.*/)?")  # zero or more whole directories
                i += 3
                continue
            if pattern.startswith("**", i):
                out.append(".*")
                i += 2
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = i + 1
            if j < n and pattern[j] in "!^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                out.append("\\[")
            else:
                body = pattern[i + 1:j]
                if body[:1] in ("!", "^"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j + 1
                continue
        elif c == "\\" and i + 1 < n:
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


class _Rule:
    __slots__ = ("anchored", "dir_only", "negate", "regex")

    def __init__(self, regex: "re.Pattern[str]", negate: bool, dir_only: bool, anchored: bool):
        self.regex = regex
        self.negate = negate
        self.dir_only = dir_only
        self.anchored = anchored


def _compile_rule(line: str) -> Optional[_Rule]:
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    negate = text.startswith("!")
    if negate or text.startswith(("\\!", "\\#")):  # "\!" and "\#" escape a literal
        text = text[1:]
    dir_only = text.endswith("/")
    text = text.rstrip("/")
    if text.startswith("./"):
        text = text[2:]
    # As in .gitignore: a pattern with a slash (other than a trailing one) is anchored to the
    # root; one without matches a name at any depth.
    anchored = "/" in text
    text = text.lstrip("/")
    if not text:
        return None
    try:
        regex = re.compile("(?:%s)\\Z" % _translate_glob(text), re.DOTALL)
    except re.error:  # an unbalanced class: match the pattern literally rather than fail
        regex = re.compile(re.escape(text) + "\\Z")
    return _Rule(regex, negate, dir_only, anchored)


class ExcludeMatcher:
    """Gitignore-like exclude patterns; ``matcher(relpath, is_dir)`` says whether to skip it.

    ``relpath`` is relative to the tree's root, with ``/`` separators. A pattern without
    ``/`` matches a name at any depth (``.git``, ``*.pyc``, ``node_modules``); one with a
    ``/`` matches the whole relative path (``build/out``, ``**/cache/*.bin``); a trailing
    ``/`` matches directories only; ``!pattern`` re-includes; ``#`` lines are comments, so
    the lines of a ``.gitignore`` can be passed as they are. The last matching pattern wins,
    and anything under an excluded directory is excluded.
    """

    def __init__(self, patterns: Iterable[str] = ()):
        self.patterns = [p for p in patterns if isinstance(p, str)]
        self._rules = [r for r in (_compile_rule(p) for p in self.patterns) if r is not None]

    def __bool__(self) -> bool:
        return bool(self._rules)

    def excludes_entry(self, relpath: str, is_dir: bool) -> bool:
        """Whether this entry itself is excluded, assuming its parents were not (for walks)."""
        excluded = False
        name = relpath.rsplit("/", 1)[-1]
        for rule in self._rules:
            # Only a rule that would flip the current verdict needs testing.
            if rule.negate != excluded or (rule.dir_only and not is_dir):
                continue
            if rule.regex.match(relpath if rule.anchored else name):
                excluded = not excluded
        return excluded

    def __call__(self, relpath: str, is_dir: bool = False) -> bool:
        parts = [p for p in relpath.replace("\\", "/").split("/") if p not in ("", ".")]
        if not parts or not self._rules:
            return False
        for depth in range(1, len(parts)):
            if self.excludes_entry("/".join(parts[:depth]), True):
                return True
        return self.excludes_entry("/".join(parts), is_dir)


def make_matcher(patterns: Union[str, Iterable[str], None]) -> ExcludeMatcher:
    """Build an exclude matcher from a list of patterns, or from a comma/newline separated str."""
    if patterns is None:
        return ExcludeMatcher(())
    if isinstance(patterns, str):
        patterns = re.split(r"[,\n]", patterns)
    return ExcludeMatcher(patterns)
