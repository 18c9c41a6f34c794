"""A validated hyper-parameter attribute, so that schedulers and users cannot set bad values."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["FixedAtConstruction", "Hyperparameter", "HyperparameterAttributes"]


class Hyperparameter:
    """Data descriptor that runs ``check(value, name)`` on every assignment.

    Example:
        >>> from pml_margins.validation import check_non_negative
        >>> class Loss:
        ...     margin = Hyperparameter(check_non_negative)
    """

    def __init__(self, check: Callable[[Any, str], Any]) -> None:
        self.check = check

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.storage = "_hp_" + name

    def __get__(self, obj: object, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        try:
            return obj.__dict__[self.storage]
        except KeyError:
            if self.name in obj.__dict__:  # pickled before this attribute was checked
                return obj.__dict__[self.name]
            raise AttributeError(  # not set yet: what hasattr/getattr(..., default) expect
                f"{type(obj).__name__} has no value for {self.name!r} yet"
            ) from None

    def __set__(self, obj: object, value: Any) -> None:
        obj.__dict__[self.storage] = self.check(value, self.name)


class FixedAtConstruction(Hyperparameter):
    """A :class:`Hyperparameter` that the constructor sets once: another value later is an
    ``AttributeError`` (the loss's tensors were shaped by it: Sub-center ArcFace's ``W``
    has ``C K`` columns, Center loss's centres are a buffer or a parameter)."""

    def __set__(self, obj: object, value: Any) -> None:
        checked = self.check(value, self.name)
        current = obj.__dict__.get(self.storage, checked)
        if checked != current:
            raise AttributeError(
                f"{type(obj).__name__}.{self.name} is fixed at construction ({current!r}): "
                "build a new loss for another value"
            )
        obj.__dict__[self.storage] = checked


class HyperparameterAttributes:
    """Routes every assignment of a :class:`Hyperparameter` attribute to its check.

    ``nn.Module.__setattr__`` handles a ``Parameter`` (or a module) before any
    descriptor: ``loss.scale = nn.Parameter(...)`` failed with ``KeyError: attribute
    'scale' already exists`` (``AttributeError`` in a constructor) instead of the check's
    message. Put it first among a loss's bases.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(getattr(type(self), name, None), Hyperparameter):
            object.__setattr__(self, name, value)  # the descriptor's __set__
        else:
            super().__setattr__(name, value)
