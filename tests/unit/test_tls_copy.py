"""The native front's copy of the TLS files (``tls_copy.TlsCopy``)."""

from __future__ import annotations

import stat
from pathlib import Path

from remoteloss_server.tls_copy import TlsCopy


def test_each_write_is_current_whole_and_private_and_close_removes_it() -> None:
    copy = TlsCopy(client_ca=True)
    cert, key, ca = copy.paths()
    assert ca is not None
    folder = Path(cert).parent.parent
    try:
        for n in range(1, 5):
            copy.write((b"cert %d" % n, b"key %d" % n, b"ca %d" % n))
            assert (Path(cert).read_bytes(), Path(key).read_bytes(), Path(ca).read_bytes()) == (
                b"cert %d" % n, b"key %d" % n, b"ca %d" % n,
            )
        assert sorted(p.name for p in folder.iterdir()) == ["3", "4", "current"]  # the one before stays
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_IMODE(Path(key).stat().st_mode) == 0o600
    finally:
        copy.close()
    assert not folder.exists()
    copy.write((b"late", b"late", None))  # a reload after the server stopped writes nothing
    assert not folder.exists()


def test_without_a_client_ca_there_is_no_ca_file() -> None:
    copy = TlsCopy(client_ca=False)
    try:
        copy.write((b"cert", b"key", None))
        cert, key, ca = copy.paths()
        assert ca is None and Path(cert).read_bytes() == b"cert" and Path(key).read_bytes() == b"key"
    finally:
        copy.close()
