"""``Tether.notebooks``: the blocking face of ``AsyncNotebooks``, driven through the portal."""

from __future__ import annotations

from anyio.from_thread import BlockingPortal

from ..blocking_services import Job
from ..twins import twin, twin_wrapping
from .service import AsyncNotebooks


class Notebooks:
    """Read, edit and run remote notebooks; ``start`` runs one as a job (see AsyncNotebooks).

    Every method is the blocking twin of ``AsyncNotebooks``'s, with the same arguments and
    docstring.
    """

    def __init__(self, portal: BlockingPortal, aio: AsyncNotebooks) -> None:
        self._portal = portal
        self.aio = aio

    read = twin(AsyncNotebooks.read)
    edit = twin(AsyncNotebooks.edit)
    run = twin(AsyncNotebooks.run)
    wait = twin(AsyncNotebooks.wait)
    cancel = twin(AsyncNotebooks.cancel)
    start = twin_wrapping(AsyncNotebooks.start, Job, "Job")
    collaboration = twin(AsyncNotebooks.collaboration)
