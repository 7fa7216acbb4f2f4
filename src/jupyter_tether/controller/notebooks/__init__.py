"""Notebooks on the remote: read, edit (atomic, validated, revision-checked), run in a kernel
with outputs written back, or run whole as a detached job.

- ``document``       the pure core: parsing within limits, revisions, views, edit ops;
- ``outputs``        one cell run in a kernel, its messages recorded as nbformat outputs;
- ``runs``           a run of cells in the background, written back as it goes;
- ``service``        ``AsyncNotebooks``, the face (``tether.notebooks``);
- ``remote_runner``  the script a notebook job runs on the Jupyter host (stdlib +
                     jupyter_client only);
- ``blocking``       ``Notebooks``, the blocking face (``Tether.notebooks``).
"""

from .blocking import Notebooks
from .document import DOC_LIMITS, DocLimits
from .service import AsyncNotebooks

__all__ = ["DOC_LIMITS", "AsyncNotebooks", "DocLimits", "Notebooks"]
