"""A per-thread on/off setting used as a call, a context manager or a decorator."""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import numpy as np

__all__ = ["ThreadSwitch"]

F = TypeVar("F", bound=Callable[..., Any])

#: objects per thread whose constructor's switch is remembered until their first ``with``
_FRESH_KEPT = 16


class ThreadSwitch:
    """A setting of this thread, switched when the object is made (as
    ``torch.set_grad_enabled``): ``switch(False)`` alone changes it from now on.

    As a context manager it restores, on exit, the setting it found, and every further
    ``with`` of the same object switches it again (as ``torch.no_grad()`` objects may be
    reused; what each thread's ``with`` restores is kept per thread, so threads may share
    the object, and only the thread that built it keeps the constructor's switch at the
    first ``with`` rather than switch again, for the last 16 objects it built and has not
    entered yet); as a decorator
    it leaves the setting as it was and switches it around each call (of a generator
    function: around each resume of its body; a coroutine function is refused).
    Subclasses give their own ``_state`` (a ``threading.local``) and ``default``.
    """

    _state: ClassVar[threading.local]
    default: ClassVar[bool]

    @classmethod
    def current(cls) -> bool:
        """This thread's setting."""
        return getattr(cls._state, "enabled", cls.default)

    def __init__(self, enabled: bool) -> None:
        if not isinstance(enabled, (bool, np.bool_)):
            kind = type(enabled)
            raise TypeError(f"enabled must be a bool, got {kind.__module__}.{kind.__qualname__}")
        self.enabled = enabled = bool(enabled)
        # Per thread, in the class's thread-local state (nothing on the object, which
        # stays copyable, and nothing torch.compile cannot trace): the setting this
        # object's constructor found, until its first ``with`` or decoration in this
        # thread. The entry holds the object, so its id is not reused while it is there
        # (a copy, being another object, never matches); the oldest entries beyond
        # _FRESH_KEPT go (plain calls, never entered, would pile up otherwise)...
        state = type(self)._state
        fresh = getattr(state, "fresh", None)
        if fresh is None:
            fresh = state.fresh = {}
        fresh[id(self)] = (self, self.current())
        while len(fresh) > _FRESH_KEPT:
            del fresh[next(iter(fresh))]
        state.enabled = enabled

    def _stack(self) -> list[bool]:
        """...and what each open ``with`` of this object in this thread restores."""
        state = type(self)._state
        stacks = getattr(state, "stacks", None)
        if stacks is None:
            stacks = state.stacks = {}
        return stacks.setdefault(id(self), [])

    def _found(self) -> bool | None:
        """The setting the constructor found, if this object's switch is still to be
        entered in this thread."""
        fresh = getattr(type(self)._state, "fresh", None)
        entry = None if fresh is None else fresh.get(id(self))
        if entry is None or entry[0] is not self:
            return None
        del fresh[id(self)]
        return entry[1]

    def __enter__(self) -> ThreadSwitch:
        found = self._found()
        if found is None:
            found = self.current()
            type(self)._state.enabled = self.enabled
        self._stack().append(found)
        return self

    def __exit__(self, *exc: object) -> None:
        stack = self._stack()
        type(self)._state.enabled = stack.pop()
        if not stack:
            del type(self)._state.stacks[id(self)]

    def __call__(self, function: F) -> F:
        """Decorate ``function``: this setting around each of its calls only."""
        found = self._found()
        if found is not None:  # undo the constructor's switch
            type(self)._state.enabled = found
        if inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function):
            raise TypeError(
                f"{type(self).__name__} does not decorate coroutine functions (the setting "
                "is per thread, which other coroutines share between awaits): use it as "
                "a `with` block inside"
            )
        cls, enabled = type(self), self.enabled
        if inspect.isgeneratorfunction(function):
            return _switch_each_resume(function, cls, enabled)  # type: ignore[return-value]

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with cls(enabled):
                return function(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


def _switch_each_resume(function: Callable[..., Any], cls: type[ThreadSwitch], enabled: bool):
    """A generator function's decorator: its body runs at each ``next``/``send``/``throw``,
    after the call has returned, so the setting is switched around each resume (as
    ``torch.no_grad`` does), and is the caller's between them."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        inner = function(*args, **kwargs)
        try:
            with cls(enabled):
                value = next(inner)
            while True:
                try:
                    sent = yield value
                except GeneratorExit:
                    with cls(enabled):
                        inner.close()
                    raise
                except BaseException as error:
                    with cls(enabled):
                        value = inner.throw(error)
                else:
                    with cls(enabled):
                        value = inner.send(sent)
        except StopIteration as stop:
            return stop.value

    return wrapper
