"""Blocking twins of async methods: one definition, the same signature and docstring.

The blocking classes (``Tether``, ``Jobs``, ``Job``, ``Files``, ``Notebooks``) hold an async
object as ``aio`` and a ``BlockingPortal`` as ``_portal``. ``twin(AsyncX.method)`` makes the
blocking method from the async one: it calls ``self.aio.method`` on the portal and carries
the async method's ``__doc__``, ``__signature__`` and annotations, so ``help()`` and
``inspect.signature`` show the same thing on both faces and cannot drift apart.
"""

from __future__ import annotations

import concurrent.futures
import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

from anyio.from_thread import BlockingPortal

P = ParamSpec("P")
T = TypeVar("T")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])

_TICK_S = 0.1


def run_on_portal(portal: BlockingPortal, func: Callable[..., Awaitable[T]], *args: Any,
                  tick: Callable[[], None] | None = None) -> T:
    """``portal.call`` that cancels its task when the waiting thread is interrupted."""
    future: concurrent.futures.Future[T] = portal.start_task_soon(func, *args)
    try:
        while True:
            done, _ = concurrent.futures.wait([future], timeout=_TICK_S)
            if tick is not None:
                tick()
            if done:
                return future.result()
    except BaseException:
        future.cancel()  # cancels the task's scope on the loop (a no-op once it is done)
        raise


def share_doc(source: Callable[..., Any], *, returns: str | None = None,
              annotations: dict[str, str] | None = None, intro: str = "",
              drop_self: bool = False) -> Callable[[F], F]:
    """Give a hand-written blocking function ``source``'s docstring and signature.

    For the few whose body cannot be generated (a log follower, a progress bar, the
    constructor): ``returns`` replaces the return annotation, ``annotations`` those of some
    parameters, ``intro`` goes before the docstring, and ``drop_self`` makes a plain
    function of a method. The hand-written parameters must match ``source``'s (checked here,
    at import), so the two cannot drift apart.
    """

    def apply(func: F) -> F:
        changed = annotations or {}
        signature = inspect.signature(source)
        parameters = list(signature.parameters.values())[1 if drop_self else 0:]
        parameters = [p.replace(annotation=changed[p.name]) if p.name in changed else p
                      for p in parameters]
        mine = list(inspect.signature(func).parameters.values())
        if mine != parameters:  # fail at import when a hand-written twin drifts
            raise TypeError(f"{func.__qualname__}{inspect.signature(func)} does not match "
                            f"{source.__qualname__}{signature}")
        _copy_face(func, source, signature.replace(parameters=parameters), returns)
        if intro:
            func.__doc__ = intro + ("\n\n" + inspect.cleandoc(source.__doc__ or ""))
        if not drop_self:
            func.__name__ = func.__qualname__ = source.__name__
        return func

    return apply


def _copy_face(func: Callable[..., Any], source: Callable[..., Any],
               signature: inspect.Signature, returns: str | None) -> None:
    if returns is not None:
        signature = signature.replace(return_annotation=returns)
    func.__doc__ = source.__doc__
    func.__signature__ = signature  # type: ignore[attr-defined]
    func.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()
                            if p.annotation is not inspect.Parameter.empty}
    if signature.return_annotation is not inspect.Signature.empty:
        func.__annotations__["return"] = signature.return_annotation
    func.__twin_of__ = source  # type: ignore[attr-defined]  # read by the twin tests


def _blocking(source: Callable[..., Any], convert: Callable[[BlockingPortal, Any], Any] | None,
              returns: str | None) -> Callable[..., Any]:
    name = source.__name__
    is_async = inspect.iscoroutinefunction(source)

    def method(self: Any, /, *args: Any, **kwargs: Any) -> Any:
        bound = functools.partial(getattr(self.aio, name), *args, **kwargs)
        portal: BlockingPortal = self._portal
        # A plain method of the async object still runs on the loop's thread: its state
        # belongs to that loop.
        result = run_on_portal(portal, bound) if is_async else portal.call(bound)
        return convert(portal, result) if convert is not None else result

    _copy_face(method, source, inspect.signature(source), returns)
    method.__name__ = method.__qualname__ = name
    return method


def twin(source: Callable[Concatenate[Any, P], Awaitable[T]]) -> Callable[Concatenate[Any, P], T]:
    """The blocking method that runs ``source`` (an async method of ``self.aio``) on the portal."""
    return _blocking(source, None, None)


def twin_sync(source: Callable[Concatenate[Any, P], T]) -> Callable[Concatenate[Any, P], T]:
    """The blocking twin of a plain (not async) method of ``self.aio``, run on the loop thread."""
    return _blocking(source, None, None)


def twin_wrapping(source: Callable[Concatenate[Any, P], Awaitable[T] | T],
                  wrap: Callable[[BlockingPortal, T], R], returns: str
                  ) -> Callable[Concatenate[Any, P], R]:
    """Like ``twin``, with the async result wrapped into its blocking handle
    (``wrap(portal, result)``, e.g. ``Job``), whose name ``returns`` gives."""
    return _blocking(source, wrap, returns)
