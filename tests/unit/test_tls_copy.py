"""The native front's copy of the TLS files (``tls_copy.TlsCopy``)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from remoteloss_server.tls_copy import TlsCopy, remove_orphans


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


def test_copies_left_by_killed_servers_go_and_others_stay(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead = int(gone.stdout)  # a process that has exited
    orphan = tmp_path / f"remoteloss-tls-{dead}-abc"
    (orphan / "1").mkdir(parents=True)
    (orphan / "1" / "key.pem").write_bytes(b"secret")
    living = tmp_path / f"remoteloss-tls-{os.getpid()}-def"
    living.mkdir()
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / f"remoteloss-tls-{dead}-link"
    link.symlink_to(target)
    unrelated = tmp_path / f"other-{dead}-abc"
    unrelated.mkdir()
    assert remove_orphans(tmp_path) == [orphan.name]
    assert not orphan.exists() and living.exists() and target.exists() and link.is_symlink() and unrelated.exists()


def test_a_copy_is_named_after_its_server() -> None:
    copy = TlsCopy(client_ca=False)
    try:
        assert Path(copy.paths()[0]).parent.parent.name.startswith(f"remoteloss-tls-{os.getpid()}-")
    finally:
        copy.close()
