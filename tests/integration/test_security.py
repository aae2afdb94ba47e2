"""API keys, TLS and mutual TLS, end to end: real servers on loopback, real clients, throwaway
certificates made by ``openssl`` at test time (tests/pki.py).

A refused TLS handshake never becomes a call, so the client sees UNAVAILABLE
(``ServiceUnavailableError``); a missing or wrong key is UNAUTHENTICATED (``UnauthenticatedError``).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import remoteloss
import torch
import torch.nn.functional as F
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from remoteloss import cli
from remoteloss._channel import tls_credentials
from remoteloss._commands import health
from remoteloss.v1 import loss_pb2 as pb
from remoteloss.v1 import loss_pb2_grpc
from remoteloss_server import native_front
from remoteloss_server.app import ServerThread, StartupError
from remoteloss_server.config import ServerConfig

from tests import tools
from tests.catalog import LOSS_NAMES
from tests.pki import Pki, make_pki

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdef01"
KEYS = f"alice:{ALICE}\nbob:{BOB}\n"
X, Y = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((2, 3), np.float32)
EXPECTED = F.mse_loss(torch.from_numpy(X), torch.from_numpy(Y)).numpy()  # the served answer is torch's, bit for bit
REFUSED_TIMEOUT_S = 10.0  # a refused handshake fails after gRPC's retries, well within this


def config(**changes: Any) -> ServerConfig:
    return ServerConfig(port=0, host="127.0.0.1", device="cpu", metrics_port=0, http_port=0, **changes)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    path.write_text("# tenant:key\n" + KEYS)
    return path


@pytest.fixture(scope="module")
def keyed(key_file: Path) -> Iterator[ServerThread]:
    """API keys on, plaintext, on loopback."""
    with ServerThread(config(api_keys_file=str(key_file))) as running:
        yield running


# TLS on each gRPC front: grpc.aio's and, where it was built, the native one (what "auto" picks).
TLS_FRONTS = ["python", *(["native"] if native_front.available() else [])]


@pytest.fixture(scope="module", params=TLS_FRONTS)
def tls_server(pki: Pki, request: pytest.FixtureRequest) -> Iterator[ServerThread]:
    with ServerThread(config(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), front=request.param)) as running:
        yield running


@pytest.fixture(scope="module", params=TLS_FRONTS)
def mtls_server(pki: Pki, request: pytest.FixtureRequest) -> Iterator[ServerThread]:
    """Mutual TLS and API keys: the configuration for a shared cluster."""
    with ServerThread(config(
        tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca), api_keys=KEYS,
        front=request.param,
    )) as running:
        yield running


def mtls_client(server: ServerThread, pki: Pki, **kwargs: Any) -> remoteloss.Client:
    kwargs.setdefault("api_key", ALICE)
    return remoteloss.Client(
        server.target, root_certificates=pki.ca, client_cert=pki.client_cert, client_key=pki.client_key, **kwargs
    )


# ---------------------------------------------------------------------------------- API keys


def test_the_right_key_is_served(keyed: ServerThread) -> None:
    with remoteloss.Client(keyed.target, api_key=BOB) as client:
        assert client.mse_loss(X, Y) == EXPECTED
        assert len(client.list_losses().losses) == len(LOSS_NAMES)


@pytest.mark.parametrize("key", [None, "wrong-key-0123456789abcdef"], ids=["missing", "wrong"])
def test_a_missing_or_wrong_key_is_unauthenticated(
    keyed: ServerThread, key: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REMOTELOSS_API_KEY", raising=False)
    with remoteloss.Client(keyed.target, api_key=key) as client:
        with pytest.raises(remoteloss.UnauthenticatedError) as info:
            client.mse_loss(X, Y)
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer" in info.value.details
        with pytest.raises(remoteloss.UnauthenticatedError):
            client.list_losses()


@pytest.mark.parametrize(
    "value", [ALICE, f"Basic {ALICE}", f"Bearer {ALICE[:-1]}", f"Bearer {ALICE}x", "Bearer", f"Bearer  {ALICE} x"]
)
def test_only_a_bearer_header_with_a_whole_key_passes(keyed: ServerThread, value: str) -> None:
    with grpc.insecure_channel(keyed.target) as channel:
        stub = loss_pb2_grpc.LossServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ListLosses(pb.ListLossesRequest(), metadata=(("authorization", value),), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        stub.ListLosses(pb.ListLossesRequest(), metadata=(("authorization", f"bearer {ALICE}"),), timeout=30)


def test_two_authorization_headers_are_refused(keyed: ServerThread) -> None:
    with grpc.insecure_channel(keyed.target) as channel:
        stub = loss_pb2_grpc.LossServiceStub(channel)
        both = (("authorization", f"Bearer {ALICE}"), ("authorization", f"Bearer {BOB}"))
        with pytest.raises(grpc.RpcError) as info:
            stub.ListLosses(pb.ListLossesRequest(), metadata=both, timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]


def test_the_key_comes_from_the_environment(keyed: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMOTELOSS_API_KEY", ALICE)
    with remoteloss.Client(keyed.target) as client:
        client.mse_loss(X, Y)


def test_streams_and_the_async_client_send_the_key(keyed: ServerThread) -> None:
    import asyncio

    with remoteloss.Client(keyed.target, api_key=ALICE) as client, client.stream() as stream:
        assert stream.mse_loss(X, Y).result() == EXPECTED
    with remoteloss.Client(keyed.target, api_key=None) as client:
        with pytest.raises(remoteloss.UnauthenticatedError), client.stream() as stream:
            stream.mse_loss(X, Y).result()

    async def main() -> None:
        async with remoteloss.AsyncClient(keyed.target, api_key=ALICE) as aclient:
            await aclient.mse_loss(X, Y)
            async with aclient.stream() as astream:
                await astream.mse_loss(X, Y)
        async with remoteloss.AsyncClient(keyed.target, api_key="wrong-key-0123456789abcdef") as aclient:
            with pytest.raises(remoteloss.UnauthenticatedError):
                await aclient.mse_loss(X, Y)

    asyncio.run(main())


def test_with_options_keeps_the_key(keyed: ServerThread) -> None:
    with remoteloss.Client(keyed.target, api_key=ALICE) as client:
        client.with_options(metadata=[("x-request-id", "copy-1")]).mse_loss(X, Y)
        assert ALICE not in repr(client)


def test_health_is_open_without_a_key(keyed: ServerThread) -> None:
    assert health.check(keyed.target) == "SERVING"
    assert health.check(keyed.target, service="remoteloss.v1.LossService") == "SERVING"


def test_reflection_needs_a_key(keyed: ServerThread) -> None:
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with grpc.insecure_channel(keyed.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ServerReflectionInfo(iter([request]), timeout=30))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        (answer,) = stub.ServerReflectionInfo(
            iter([request]), metadata=(("authorization", f"Bearer {ALICE}"),), timeout=30
        )
        assert "remoteloss.v1.LossService" in {s.name for s in answer.list_services_response.service}


def test_logs_name_the_tenant_never_the_key(keyed: ServerThread, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="remoteloss_server"):
        with remoteloss.Client(keyed.target, api_key=BOB, metadata=[("x-request-id", "tenant-1")]) as client:
            with pytest.raises(remoteloss.InvalidArgumentError):
                client.nll_loss(X, np.array([0, 9]))
            client.mse_loss(X, Y)
            with client.stream() as stream:
                with pytest.raises(remoteloss.InvalidArgumentError):
                    stream.nll_loss(X, np.array([0, 9])).result()
        with remoteloss.Client(keyed.target, api_key="wrong-key-0123456789abcdef") as client:
            with pytest.raises(remoteloss.UnauthenticatedError):
                client.mse_loss(X, Y)
    lines = [r.getMessage() for r in caplog.records]
    failed = [line for line in lines if "request_id=tenant-1" in line and "request_failed" in line]
    assert len(failed) == 2 and all("tenant=bob loss=nll_loss" in line for line in failed), failed
    assert any(line.startswith("event=request request_id=tenant-1 tenant=bob loss=mse_loss") for line in lines)
    assert any('event=unauthenticated method=/remoteloss.v1.LossService/Compute reason="unknown API key"' in line
               for line in lines)
    text = "\n".join(lines)
    assert BOB not in text and "wrong-key" not in text


def test_without_keys_the_log_has_no_tenant(server: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="remoteloss_server"), remoteloss.Client(server.target) as client:
        with pytest.raises(remoteloss.InvalidArgumentError):
            client.nll_loss(X, np.array([0, 9]))
    assert not any("tenant=" in r.getMessage() for r in caplog.records)


def test_the_ready_line_says_what_is_on(key_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="remoteloss_server.app"):
        with ServerThread(config()):
            pass
        with ServerThread(config(api_keys_file=str(key_file), api_keys=f"carol:{'c' * 20}")):
            pass
    ready = [r.getMessage() for r in caplog.records if r.getMessage().startswith("event=ready")]
    assert " tls=off auth=off" in ready[0] and " tls=off auth=api_keys tenants=3" in ready[1]
    assert "c" * 20 not in "\n".join(r.getMessage() for r in caplog.records)


def test_open_access_on_every_interface_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="remoteloss_server.app"), ServerThread(
        ServerConfig(port=0, host="0.0.0.0", device="cpu", metrics_port=0, http_port=0)
    ):
        pass
    (warning,) = [r for r in caplog.records if "event=open_access" in r.getMessage()]
    assert warning.levelno == logging.WARNING and "anyone who can reach" in warning.getMessage()


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"api_keys_file": "/nonexistent/keys"}, r"API keys: .*No such file.*/nonexistent/keys"),
        ({"api_keys": "alice:short"}, r"API keys: REMOTELOSS_API_KEYS: entry 1 \(tenant alice\): the key must be"),
        ({"tls_cert": "/nonexistent/cert.pem", "tls_key": "/nonexistent/key.pem"}, r"TLS: .*No such file"),
    ],
)
def test_unusable_security_settings_are_startup_errors(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(StartupError, match=match), ServerThread(config(**changes)):
        pass


def test_mismatched_certificate_and_key_is_a_startup_error(pki: Pki) -> None:
    with pytest.raises(StartupError, match=r"TLS: tls_cert .* and tls_key .* are not"), ServerThread(
        config(tls_cert=str(pki.server_cert), tls_key=str(pki.client_key))
    ):
        pass


# ---------------------------------------------------------------------------------------- TLS


def test_tls_end_to_end(tls_server: ServerThread, pki: Pki) -> None:
    with remoteloss.Client(tls_server.target, root_certificates=pki.ca) as client:
        assert client.mse_loss(X, Y) == EXPECTED
    with remoteloss.Client(tls_server.target, root_certificates=pki.ca.read_bytes()) as client, client.stream() as s:
        assert s.mse_loss(X, Y).result() == EXPECTED
    credentials = grpc.ssl_channel_credentials(pki.ca.read_bytes())
    with remoteloss.Client(tls_server.target, credentials=credentials) as client:
        client.mse_loss(X, Y)
    assert health.check(tls_server.target, credentials=credentials) == "SERVING"


def test_tls_refuses_a_plaintext_client(tls_server: ServerThread) -> None:
    with remoteloss.Client(tls_server.target, timeout=REFUSED_TIMEOUT_S) as client:
        with pytest.raises(remoteloss.ServiceUnavailableError):
            client.mse_loss(X, Y)


def test_a_client_refuses_a_server_of_another_ca(tls_server: ServerThread, pki: Pki) -> None:
    with remoteloss.Client(tls_server.target, root_certificates=pki.other_ca, timeout=REFUSED_TIMEOUT_S) as client:
        with pytest.raises(remoteloss.ServiceUnavailableError):
            client.mse_loss(X, Y)


def test_mutual_tls_with_keys_end_to_end(mtls_server: ServerThread, pki: Pki) -> None:
    with mtls_client(mtls_server, pki) as client:
        assert client.mse_loss(X, Y) == EXPECTED
    with mtls_client(mtls_server, pki, api_key="wrong-key-0123456789abcdef") as client:
        with pytest.raises(remoteloss.UnauthenticatedError):
            client.mse_loss(X, Y)
    credentials = tls_credentials(root_certificates=pki.ca, client_cert=pki.client_cert, client_key=pki.client_key)
    assert health.check(mtls_server.target, credentials=credentials) == "SERVING"


def test_a_stopped_native_front_stops_reading_its_certificate_files(tmp_path: Path) -> None:
    """The core reads the TLS copy again every second; once the server stops (and its copy is
    gone) that reader stops too, even while the stopped server object is still referenced. It
    went on before, once a second for as long as the process lived, logging each failed read."""
    if not native_front.available():
        tools.missing("the native front was not built: gRPC's C++ library (libgrpc++-dev, pkg-config) was missing")
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from tests.pki import make_pki\n"
        "from remoteloss_server.app import ServerThread\n"
        "from remoteloss_server.config import ServerConfig\n"
        "pki = make_pki(Path(sys.argv[1]))\n"
        "config = ServerConfig(port=0, host='127.0.0.1', device='cpu', metrics_port=0, http_port=0, front='native',\n"
        "                      tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))\n"
        "with ServerThread(config) as server:\n"
        "    pass\n"
        "print('stopped', file=sys.stderr, flush=True)\n"
        f"time.sleep({3 * native_front.TLS_REFRESH_S + 0.5})\n"  # three of the core's re-reads
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "GRPC_VERBOSITY": "ERROR"}  # gRPC's core logs a failed read at ERROR: shown, whatever CI sets
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    after = done.stderr.split("stopped", 1)[1]
    assert "Failed to load file" not in after and "stat failed" not in after, after[-2000:]


def test_the_native_front_renews_its_certificate_on_reload_and_keeps_it_through_a_bad_one(tmp_path: Path) -> None:
    """gRPC's C++ core reads the native front's TLS files every second, from the server's copy
    of what it last loaded (``tls_copy``): a certificate replaced by garbage fails its reload and
    changes nothing, even seconds later; one replaced by another CA's pair is served within
    seconds of its reload, and a client of the old CA is then refused."""
    if not native_front.available():
        tools.missing("the native front was not built: gRPC's C++ library (libgrpc++-dev, pkg-config) was missing")
    old, new = make_pki(tmp_path / "old"), make_pki(tmp_path / "new")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    shutil.copy(old.server_cert, cert)
    shutil.copy(old.server_key, key)

    def served(ca: Path, timeout: float = 2) -> bool:
        try:
            with remoteloss.Client(server.target, root_certificates=ca, timeout=timeout) as client:
                return bool(client.mse_loss(X, Y) == EXPECTED)
        except remoteloss.ServiceUnavailableError:
            return False

    with ServerThread(config(tls_cert=str(cert), tls_key=str(key), front="native")) as server:
        assert served(old.ca)
        cert.write_text("not a certificate\n")
        assert not server.reload()
        time.sleep(3 * native_front.TLS_REFRESH_S)  # the core has read its files again meanwhile
        assert served(old.ca)
        shutil.copy(new.server_cert, cert)
        shutil.copy(new.server_key, key)
        assert server.reload()
        deadline = time.monotonic() + 10
        while not served(new.ca):
            assert time.monotonic() < deadline, "the renewed certificate was not served within 10 s of its reload"
            time.sleep(0.2)
        assert not served(old.ca, REFUSED_TIMEOUT_S)


@pytest.mark.parametrize("certificate", ["none", "other_ca"])
def test_mutual_tls_refuses_a_client_without_a_valid_certificate(
    mtls_server: ServerThread, pki: Pki, certificate: str
) -> None:
    mine = {} if certificate == "none" else {"client_cert": pki.other_client_cert, "client_key": pki.other_client_key}
    with remoteloss.Client(
        mtls_server.target, root_certificates=pki.ca, api_key=ALICE, timeout=REFUSED_TIMEOUT_S, **mine
    ) as client:
        with pytest.raises(remoteloss.ServiceUnavailableError):
            client.mse_loss(X, Y)


# ------------------------------------------------------------------------------ command line


def test_the_cli_sends_the_key_and_speaks_mutual_tls(
    mtls_server: ServerThread, pki: Pki, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REMOTELOSS_API_KEY", raising=False)
    tls = ["--target", mtls_server.target, "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
           "--tls-key", str(pki.client_key)]
    assert cli.main([*tls, "--api-key", ALICE, "losses", "--json"]) == 0
    capsys.readouterr()
    assert cli.main([*tls, "losses"]) == 1
    assert "UNAUTHENTICATED: no API key" in capsys.readouterr().err
    monkeypatch.setenv("REMOTELOSS_API_KEY", ALICE)
    assert cli.main(["losses", "mse_loss", *tls]) == 0  # flags after the command word too
    assert cli.main([*tls, "health"]) == 0


def test_the_cli_refuses_a_key_over_plaintext_to_another_host(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--target", "example.com:50051", "--api-key", ALICE, "losses"]) == 2
    assert "plaintext" in capsys.readouterr().err
    assert cli.main(["--target", "localhost:1", "--tls-cert", "x.pem", "losses"]) == 2
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err
