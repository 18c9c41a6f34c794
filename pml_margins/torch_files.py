"""What a file that ``torch.load`` cannot read holds, for the messages that name it.

``torch.save`` writes a zip archive; files of torch < 1.6 are a bare pickle. Anything
else reaches ``torch.load``'s legacy reader, which takes its first byte for a pickle
opcode: a text file fails as ``KeyError: 101`` (the ``e`` of its first word).
"""

from __future__ import annotations

import os

__all__ = ["error_name", "not_written_by_torch_save"]

#: how a file ``torch.save`` wrote starts: a zip archive's first record, or a pickle's
#: PROTO opcode (protocol 2 and later, the legacy format)
TORCH_SAVE_HEADERS = (b"PK\x03\x04", b"\x80")


def not_written_by_torch_save(path: str | os.PathLike[str]) -> str | None:
    """Why a non-empty file cannot be one ``torch.save`` wrote, from its first bytes, or
    ``None`` (it may be one, it is empty, or it cannot be opened).

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp(), "notes.pt")
        >>> _ = path.write_text("epoch 3")
        >>> not_written_by_torch_save(path)
        "not written by torch.save: it starts with b'epoc', not a zip or pickle header"
    """
    try:
        with open(path, "rb") as file:
            head = file.read(4)
    except OSError:
        return None
    if not head or head.startswith(TORCH_SAVE_HEADERS):
        return None
    return f"not written by torch.save: it starts with {head!r}, not a zip or pickle header"


def error_name(error: BaseException) -> str:
    """The exception's class name, with its module where that is not Python's own or the
    pickle's (a damaged pickle raises ``struct.error``: ``error`` alone says nothing)."""
    kind = type(error)
    if kind.__module__ in ("builtins", "_pickle", "pickle"):
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"
