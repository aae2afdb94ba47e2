"""``Payloads``: the tensors' bytes that placeholders stand for."""

from __future__ import annotations

__all__ = ["PLACEHOLDER_SIZE", "Payloads", "placeholder"]

PLACEHOLDER_SIZE = 4  # bytes of a placeholder: a little-endian payload index


def placeholder(index: int) -> bytes:
    return index.to_bytes(PLACEHOLDER_SIZE, "little")


class Payloads:
    """The tensors' bytes of a message stripped by ``split``, or to be put back by ``join``: one
    view per placeholder.

    Each view that ``split`` issues is a read-only slice of the buffer given to it and keeps that
    buffer alive; ``add`` keeps the buffer it is given.
    """

    __slots__ = ("_views",)

    def __init__(self) -> None:
        self._views: list[memoryview] = []

    def resolve(self, placeholder: bytes | memoryview) -> memoryview:
        """The bytes a placeholder stands for; ValueError for one this object did not issue."""
        index = int.from_bytes(placeholder, "little") if len(placeholder) == PLACEHOLDER_SIZE else -1
        if not 0 <= index < len(self._views):
            raise ValueError(f"{bytes(placeholder[:8])!r} is not a tensor placeholder of this message")
        return self._views[index]

    def add(self, data: bytes | memoryview) -> bytes:
        """A new placeholder standing for ``data``, which is kept, not copied (for ``join``)."""
        return placeholder(self.issue(memoryview(data)))

    def __len__(self) -> int:
        return len(self._views)

    @property
    def nbytes(self) -> int:
        """Total bytes of the tensors' data."""
        return sum(view.nbytes for view in self._views)

    def __repr__(self) -> str:
        return f"Payloads({len(self)} tensors, {self.nbytes} bytes)"

    def issue(self, view: memoryview) -> int:
        """A new payload index standing for ``view`` (``split``'s walk)."""
        self._views.append(view)
        return len(self._views) - 1

    def replace(self, index: int, view: memoryview) -> None:
        """What ``index`` stands for, from now on (``split``'s walk: a later value wins)."""
        self._views[index] = view
