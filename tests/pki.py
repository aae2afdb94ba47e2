"""Throwaway certificates for TLS tests, made with the ``openssl`` command at test time.

``make_pki(folder)`` writes a CA, a server certificate for ``localhost`` and ``127.0.0.1`` signed
by it, a client certificate signed by it, and a second, unrelated CA with a client certificate of
its own (one the server must refuse). Elliptic-curve keys (P-256) keep it fast; everything is valid
for two days.
"""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Pki", "make_pki"]

_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA's certificate: the clients' root, and the server's client CA
    server_cert: Path
    server_key: Path
    client_cert: Path  # signed by ca
    client_key: Path
    other_ca: Path  # an unrelated CA
    other_client_cert: Path  # signed by other_ca
    other_client_key: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl(
        "req", "-x509", *_KEY, "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )
    return cert, key


def _leaf(folder: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    cert, key, request, ext = (folder / f"{name}{suffix}" for suffix in (".pem", ".key", ".csr", ".ext"))
    ext.write_text(extensions)
    _openssl("req", *_KEY, "-keyout", key, "-out", request, "-subj", f"/CN={name}", cwd=folder)
    _openssl(
        "x509", "-req", "-in", request, "-CA", ca[0], "-CAkey", ca[1], "-set_serial", str(secrets.randbits(63)),
        "-days", "2", "-extfile", ext, "-out", cert,
        cwd=folder,
    )
    return cert, key


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "test-ca")
    other = _ca(folder, "other-ca")
    common = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
    server = _leaf(
        folder, "server", ca, common + "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
    )
    client = _leaf(folder, "client", ca, common + "extendedKeyUsage=clientAuth\n")
    other_client = _leaf(folder, "other-client", other, common + "extendedKeyUsage=clientAuth\n")
    return Pki(ca[0], *server, *client, other[0], *other_client)
