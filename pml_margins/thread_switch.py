"""A per-thread on/off setting used as a call, a context manager or a decorator."""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

__all__ = ["ThreadSwitch"]

F = TypeVar("F", bound=Callable[..., Any])


class ThreadSwitch:
    """A setting of this thread, switched when the object is made (as
    ``torch.set_grad_enabled``): ``switch(False)`` alone changes it from now on.

    As a context manager it restores, on exit, the setting it found, and every further
    ``with`` of the same object switches it again (as ``torch.no_grad()`` objects may be
    reused); as a decorator it leaves the setting as it was and switches it around each
    call (of a generator function: around each resume of its body). Subclasses give
    their own ``_state`` (a ``threading.local``) and ``default``.
    """

    _state: ClassVar[threading.local]
    default: ClassVar[bool]

    @classmethod
    def current(cls) -> bool:
        """This thread's setting."""
        return getattr(cls._state, "enabled", cls.default)

    def __init__(self, enabled: bool) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
        self.enabled = enabled
        self._previous = [self.current()]  # what each open ``with`` restores
        self._fresh = True  # switched by the constructor, not yet entered
        type(self)._state.enabled = enabled

    def __enter__(self) -> ThreadSwitch:
        if self._fresh:
            self._fresh = False
        else:
            self._previous.append(self.current())
            type(self)._state.enabled = self.enabled
        return self

    def __exit__(self, *exc: object) -> None:
        type(self)._state.enabled = self._previous.pop()

    def __call__(self, function: F) -> F:
        """Decorate ``function``: this setting around each of its calls only."""
        if self._fresh:  # undo the constructor's switch
            self._fresh = False
            type(self)._state.enabled = self._previous.pop()
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
