"""Records the warnings torch raises on one thread, so that each request gets back its own.

Until Python 3.14 the warnings filters and ``showwarning`` are process-wide, so
``warnings.catch_warnings`` in two compute threads at once would restore each other's state and
lose warnings. Instead, while any thread records, one hook with an "always" filter is installed,
and it files each warning under the thread that raised it; warnings from other threads go to the
previous hook. Recordings on one thread do not nest.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["record"]


class _WarningRecorder:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._local = threading.local()
        self._saved: contextlib.AbstractContextManager[Any] | None = None

    @contextlib.contextmanager
    def record(self) -> Iterator[list[str]]:
        texts: list[str] = []
        with self._lock:
            if self._depth == 0:
                saved = warnings.catch_warnings()  # restores filters and showwarning on exit
                saved.__enter__()
                warnings.simplefilter("always")
                warnings.showwarning = functools.partial(self._show, warnings.showwarning)
                self._saved = saved
            self._depth += 1
        self._local.texts = texts
        try:
            yield texts
        finally:
            self._local.texts = None
            with self._lock:
                self._depth -= 1
                if self._depth == 0 and self._saved is not None:
                    self._saved.__exit__(None, None, None)
                    self._saved = None

    def _show(self, previous: Callable[..., None], message: Warning | str, *args: Any, **kwargs: Any) -> None:
        """``warnings.showwarning`` while recording: keep this thread's warning, pass others on."""
        texts: list[str] | None = getattr(self._local, "texts", None)
        if texts is None:
            previous(message, *args, **kwargs)
        else:
            texts.append(str(message))


_recorder = _WarningRecorder()


def record() -> contextlib.AbstractContextManager[list[str]]:
    """``with record() as texts:`` collects the text of every warning this thread raises inside."""
    return _recorder.record()
