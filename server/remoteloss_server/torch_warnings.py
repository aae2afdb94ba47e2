"""Records the warnings torch raises on one thread, so that each request gets back its own.

Until Python 3.14 the warnings filters and ``showwarning`` are process-wide, so
``warnings.catch_warnings`` in two compute threads at once would restore each other's state and
lose warnings. Instead, while any thread records, one hook with an "always" filter is installed,
and it files each warning under the thread that raised it; warnings from other threads go to the
previous hook. Recordings on one thread do not nest.

Every small call records (a lone one on the event loop's thread), so a recording is a plain
object with ``__enter__`` and ``__exit__``, and the hook goes in and out by hand: what
``catch_warnings`` and ``simplefilter`` would do, at about half their cost (a lone small call's
handler, in a loop: 6 us of recording against 12).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

__all__ = ["record"]

_ALWAYS = ("always", None, Warning, None, 0)  # warnings.simplefilter("always")'s entry


class _WarningRecorder:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._local = threading.local()
        # What the first recording replaced: the filters (the list itself) and showwarning.
        self._saved: tuple[Sequence[Any], Callable[..., None]] | None = None

    def enter(self, texts: list[str]) -> None:
        with self._lock:
            if self._depth == 0:
                previous = warnings.showwarning
                self._saved = (warnings.filters, previous)
                warnings.filters = [_ALWAYS, *warnings.filters]
                warnings._filters_mutated()  # type: ignore[attr-defined]  # as catch_warnings calls it

                def show(message: Warning | str, *args: Any, **kwargs: Any) -> None:
                    self._show(previous, message, *args, **kwargs)

                warnings.showwarning = show
            self._depth += 1
        self._local.texts = texts

    def exit(self) -> None:
        self._local.texts = None
        with self._lock:
            self._depth -= 1
            if self._depth == 0 and self._saved is not None:
                warnings.filters, warnings.showwarning = self._saved
                warnings._filters_mutated()  # type: ignore[attr-defined]
                self._saved = None

    def _show(self, previous: Callable[..., None], message: Warning | str, *args: Any, **kwargs: Any) -> None:
        """``warnings.showwarning`` while recording: keep this thread's warning, pass others on."""
        texts: list[str] | None = getattr(self._local, "texts", None)
        if texts is None:
            previous(message, *args, **kwargs)
        else:
            texts.append(str(message))


class _Recording:
    __slots__ = ("texts",)

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __enter__(self) -> list[str]:
        _recorder.enter(self.texts)
        return self.texts

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        _recorder.exit()


_recorder = _WarningRecorder()


def record() -> _Recording:
    """``with record() as texts:`` collects the text of every warning this thread raises inside."""
    return _Recording()
