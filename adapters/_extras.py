"""Import an optional ecosystem, or fail with the pip command that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise ``ImportError`` telling which extra of pml-margins to install.

    Args:
        module: the module to import, e.g. ``"lightning.pytorch"``.
        extra: the pml-margins extra that installs it, e.g. ``"lightning"``.

    Raises:
        ImportError: ``module`` (or one of its own dependencies) cannot be imported.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"this pml_margins adapter needs {module!r}, which could not be imported "
            f"({err}); install it with: pip install 'pml-margins[{extra}]'"
        ) from err
