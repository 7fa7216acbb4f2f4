"""The ``jupyter-tether`` command (also ``jupyter tether``, which jupyter_core dispatches to it).

Exit codes: 0 ok; ``run`` (and ``submit --follow``) exit with the job's own exit code
(128+N when a signal ended it); 1 remote or connection errors, and a failed ``exec``;
2 usage and configuration errors; 130 when Ctrl-C detaches from (or interrupts) the work.
Errors are one ``error: ...`` line on stderr; ``--json`` puts only JSON on stdout, an error
too (``{"error": ..., "code": ...}``). A job's end reads the same everywhere: ``exit_code``
(or null) and ``signal`` (a name) in JSON, "exited with code N" / "killed by SIGX" in text.

``app`` builds the parser and runs ``main``; each command module (``info``, ``jobs``,
``files``, ``submit``, ``mcp``) adds its sub-parsers next to their handlers; ``context``
(``Ctx``, exit codes), ``output`` and ``secrets`` serve them all.
"""

from .app import main

__all__ = ["main"]
