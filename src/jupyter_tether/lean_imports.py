"""Modules our own processes never need and would pay seconds to import.

jsonschema loads all its optional format checkers when it is imported, and
``rfc3987_syntax`` alone builds an IRI grammar then: ~0.9 CPU-s of a Jupyter server's
1.35 s start, and ~1 of the 1.06 CPU-s ``import nbformat`` takes (the others ~30 ms more;
measured with ``-X importtime``). jsonschema skips a checker whose module is missing, and
neither a server nor ``nbformat.validate`` checks these formats: a Jupyter server only
validates the events it emits itself, and nbformat validates without a format checker.
"""

from __future__ import annotations

import sys

#: jsonschema's optional format checkers (``jsonschema[format-nongpl]``)
FORMAT_CHECKERS = ("rfc3987_syntax", "rfc3986_validator", "rfc3339_validator", "isoduration",
                   "fqdn", "uri_template", "webcolors", "jsonpointer")


def skip_format_checkers() -> None:
    """Make jsonschema, when imported later in this process, skip ``FORMAT_CHECKERS``.

    For processes of ours only (the ``jupyter-tether`` command, the MCP server), where
    jsonschema is imported by ``nbformat`` for the notebook tools, in every ``nb edit``: never
    in a user's process through the Python API, whose own jsonschema use must not change.
    A module already imported is left as it is.
    """
    for name in FORMAT_CHECKERS:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # None: "not installed"
