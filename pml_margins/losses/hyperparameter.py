"""A validated hyper-parameter attribute, so that schedulers and users cannot set bad values."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["Hyperparameter"]


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
        return obj.__dict__[self.storage]

    def __set__(self, obj: object, value: Any) -> None:
        obj.__dict__[self.storage] = self.check(value, self.name)
