"""Where a ``remoteloss.nn`` module gets its client (no torch needed here).

With ``client=``, that client (shared, never closed here); with ``target=``, the module's own
client, made on first use; with neither, one process-wide client for ``$REMOTELOSS_TARGET``
(default ``localhost:50051``), made on the first forward that needs it and made again when the
variable changes. Copies share the reference; a pickle keeps only the target.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from remoteloss import Client

__all__ = ["ClientRef"]

_TARGET_ENV = "REMOTELOSS_TARGET"
_DEFAULT_TARGET = "localhost:50051"

_lock = threading.Lock()
_default_client: Client | None = None  # made on the first forward without client=/target=
_default_client_target: str | None = None


def _new_client(target: str) -> Client:
    from remoteloss import Client  # the SDK proper, imported on first use only

    return Client(target)


def _get_default_client() -> Client:
    """The process-wide client for ``$REMOTELOSS_TARGET``, made on first use (and again if it changes)."""
    global _default_client, _default_client_target
    target = os.environ.get(_TARGET_ENV, _DEFAULT_TARGET)
    with _lock:
        if _default_client is None or _default_client_target != target:
            # A replaced client is not closed: a call on another thread may still be using it.
            _default_client = _new_client(target)
            _default_client_target = target
        return _default_client


class ClientRef:
    """Where one module gets its client. Copies share it; a pickle keeps only the target."""

    __slots__ = ("_client", "_target", "_lock")

    def __init__(self, client: Client | None = None, target: str | None = None) -> None:
        if client is not None and target is not None:
            raise TypeError("pass either client= or target=, not both")
        if client is not None and hasattr(client, "aclose"):
            raise TypeError("remoteloss.nn needs a synchronous remoteloss.Client, not an async one")
        if target is not None and not isinstance(target, str):
            raise TypeError(f"target must be a str such as 'localhost:50051', got {type(target).__name__}")
        self._client = client
        self._target = target
        self._lock = threading.Lock()

    def get(self) -> Client:
        if self._client is not None:
            return self._client
        if self._target is None:
            return _get_default_client()
        with self._lock:
            if self._client is None:
                self._client = _new_client(self._target)
            return self._client

    def __copy__(self) -> ClientRef:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> ClientRef:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        target = self._target if self._target is not None else getattr(self._client, "target", None)
        return (ClientRef, (None, target if isinstance(target, str) else None))
