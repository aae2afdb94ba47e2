"""The native front's TLS files: a private copy of what the server last loaded.

gRPC's C++ core (1.51) takes TLS for the native front as file paths that it reads again every
second, and it keeps nothing: a certificate that does not load, or does not match its key, fails
every new handshake until the files are right again. So the core reads a copy, written only with
PEM bytes that loaded (``auth.ServerCertificates``: at start, and on each SIGHUP reload that
loads), into a new folder that one rename of a link makes current. The core never sees a pair
that did not load, nor one half written, and renewals keep SIGHUP's contract on either front.

The copy goes when the server stops. A server killed (SIGKILL, a crash) cannot remove it, so the
folder's name holds the server's process id, and the next copy made by the same user removes
those whose process is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

from remoteloss_server.auth import Pems

__all__ = ["TlsCopy", "remove_orphans"]

_PREFIX = "remoteloss-tls-"
_NAME = re.compile(re.escape(_PREFIX) + r"(\d+)-")  # the process id of the server that made it


class TlsCopy:
    """PEM files under a private folder (mode 0700), replaced whole by ``write``; ``close``
    removes them."""

    def __init__(self, client_ca: bool) -> None:
        remove_orphans(Path(tempfile.gettempdir()))
        self._folder = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-"))
        self._client_ca = client_ca
        self._written = 0
        self._closed = False

    def paths(self) -> tuple[str, str, str | None]:
        """The certificate chain's, key's and client CA's (None: none) paths, through the link."""
        current = self._folder / "current"
        return str(current / "cert.pem"), str(current / "key.pem"), str(current / "ca.pem") if self._client_ca else None

    def write(self, pems: Pems) -> None:
        """Make ``pems`` current: written into a new folder, then the link swapped by a rename.
        The folder before stays (the core may be reading it); older ones go."""
        if self._closed:
            return
        self._written += 1
        folder = self._folder / str(self._written)
        folder.mkdir(mode=0o700)
        for name, data in zip(("cert.pem", "key.pem", "ca.pem"), pems, strict=True):
            if data is not None:
                descriptor = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(descriptor, "wb") as file:
                    file.write(data)
        link = self._folder / "next"
        link.unlink(missing_ok=True)
        link.symlink_to(folder.name)
        link.replace(self._folder / "current")
        stale = self._folder / str(self._written - 2)
        if stale.exists():
            shutil.rmtree(stale)

    def close(self) -> None:
        self._closed = True
        shutil.rmtree(self._folder, ignore_errors=True)


def remove_orphans(parent: Path) -> list[str]:
    """Remove the copies under ``parent`` that this user's servers left when killed: real folders
    (not links) of this user whose server's process is gone. Their names, removed."""
    removed = []
    with os.scandir(parent) as entries:
        for entry in entries:
            found = _NAME.match(entry.name)
            if found is None or _alive(int(found.group(1))):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; an id no process can have
        return True
    return True
