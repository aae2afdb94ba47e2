"""The Open Inference Protocol's HTTP door with the standard library's client: body limits,
drain, TLS, statistics and metrics by protocol (tritonclient's runs are in test_oip_clients.py)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import shutil
import socket
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from remoteloss_server import oip, oip_http
from remoteloss_server.app import ServerThread
from remoteloss_server.config import ServerConfig
from remoteloss_server.inference import grpc_service_pb2 as ipb
from tests import tools
from tests.pki import make_pki

from .attack import is_open
from .deploy_files import free_port

BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2], "data": [1, 2]},
                   {"name": "target", "datatype": "FP32", "shape": [2], "data": [0, 0]}]}


def _config(**changes: Any) -> ServerConfig:
    base: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "device": "cpu", "metrics_port": 0,
                            "http_port": free_port(), "shutdown_grace_s": 0.5}
    return ServerConfig(**{**base, **changes})


def _post(url: str, body: bytes, context: ssl.SSLContext | None = None) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=30, context=context) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_body_over_the_limit_is_refused_from_its_length() -> None:
    with ServerThread(_config(max_message_bytes=400)) as server:
        url = f"http://127.0.0.1:{server.config.http_port}/v2/models/mse_loss/infer"
        assert _post(url, json.dumps(BODY).encode())[0] == 200
        status, answer = _post(url, b" " * 401)
        metrics = server.metrics
    assert status == 413 and "error" in answer
    refused = metrics.registry.get_sample_value(
        "remoteloss_protocol_requests_total", {"protocol": "oip_http", "loss": "mse_loss", "code": "RESOURCE_EXHAUSTED"})
    answered = metrics.registry.get_sample_value(
        "remoteloss_protocol_requests_total", {"protocol": "oip_http", "loss": "mse_loss", "code": "OK"})
    assert (refused, answered) == (1.0, 1.0)


def test_a_chunked_body_is_refused_before_it_is_read() -> None:
    """The budgets need a body's size before it is read: a body without Content-Length is refused."""
    with ServerThread(_config()) as server, socket.create_connection(("127.0.0.1", server.config.http_port)) as sock:
        sock.sendall(b"POST /v2/models/mse_loss/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                     b"Connection: close\r\n\r\n10\r\n" + b"{" * 16 + b"\r\n")  # more chunks would follow
        head, body = _answer(sock)
    assert head.startswith(b"HTTP/1.1 400")
    assert "no Content-Length" in json.loads(body)["error"]


def _answer(sock: socket.socket) -> tuple[bytes, bytes]:
    """The status line and the body of one HTTP answer (read by its Content-Length, not to EOF)."""
    reader = sock.makefile("rb")
    status = reader.readline().rstrip()
    length = 0
    while (line := reader.readline().rstrip()) != b"":
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, reader.read(length)


def _head_only(port: int, headers: str) -> tuple[bytes, bytes]:
    """POST an inference's headers alone (its body is never sent); the status line and the body answered."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"POST /v2/models/mse_loss/infer HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        return _answer(sock)


def test_json_past_its_limit_is_refused_before_the_body_is_read() -> None:
    """Parsing JSON holds the GIL (every caller waits): past MAX_JSON_BYTES, tensors must be binary."""
    over = oip_http.MAX_JSON_BYTES + 1
    with ServerThread(_config()) as server:
        port = server.config.http_port
        status, body = _head_only(port, f"Content-Length: {over}\r\n")
        assert status.startswith(b"HTTP/1.1 413") and "binary data" in json.loads(body)["error"]
        status, body = _head_only(port, f"Content-Length: {over + 8}\r\n{oip_http.HEADER_LENGTH}: {over}\r\n")
        assert status.startswith(b"HTTP/1.1 413")
        # A small JSON header in front of a large binary body is computed.
        binary = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [2**20],
                                         "parameters": {"binary_data_size": 2**22}},
                                        {"name": "target", "datatype": "FP32", "shape": [2**20],
                                         "parameters": {"binary_data_size": 2**22}}]}).encode()
        data = np.random.default_rng(0).random(2**21, dtype=np.float32).tobytes()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/mse_loss/infer", data=binary + data,
                                         headers={oip_http.HEADER_LENGTH: str(len(binary))})
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert answer.status == 200 and len(binary + data) > oip_http.MAX_JSON_BYTES


def test_outputs_past_the_json_limit_must_be_asked_as_binary() -> None:
    """Writing JSON holds the GIL too: a gradient of over MAX_LISTED_ELEMENTS comes as binary or not at all."""
    n = oip.MAX_LISTED_ELEMENTS + 1
    data = np.random.default_rng(1).random(2 * n, dtype=np.float32).tobytes()

    def infer(port: int, parameters: dict[str, Any]) -> tuple[int, bytes]:
        inputs = [{"name": "input", "datatype": "FP32", "shape": [n],
                   "parameters": {"binary_data_size": 4 * n, "requires_grad": True}},
                  {"name": "target", "datatype": "FP32", "shape": [n], "parameters": {"binary_data_size": 4 * n}}]
        head = json.dumps({"inputs": inputs, "parameters": parameters}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/mse_loss/infer", data=head + data,
                                         headers={oip_http.HEADER_LENGTH: str(len(head))})
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def computed(server: ServerThread) -> float:
        value = server.metrics.registry.get_sample_value(
            "remoteloss_compute_duration_seconds_count", {"loss": "mse_loss", "device": "cpu"})
        return value or 0.0

    with ServerThread(_config()) as server:
        status, body = infer(server.config.http_port, {})
        assert status == 400 and "as binary data" in json.loads(body)["error"]
        assert computed(server) == 0  # refused from the gradient's size, before it was computed
        status, body = infer(server.config.http_port, {"binary_data_output": True})
        assert computed(server) == 1
    assert status == 200 and len(body) > 4 * n  # the gradient's bytes follow the JSON


def test_a_body_that_does_not_come_gives_its_budget_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """The budgets are taken before the body is read: a caller that announces a body and stalls
    is answered 504 once the body is late, and what it held is free again."""
    monkeypatch.setattr(oip_http, "BODY_BASE_S", 0.5)
    with ServerThread(_config(max_in_flight_bytes=3 * 512 * 1024)) as server:  # one such body fits, two do not
        port = server.config.http_port
        status, body = _head_only(port, f"Content-Length: {1024 * 1024}\r\n")
        assert status.startswith(b"HTTP/1.1 504") and "did not arrive" in json.loads(body)["error"]
        # A second one is admitted (504, not 429): the first gave its budget back.
        status, body = _head_only(port, f"Content-Length: {1024 * 1024}\r\n")
        assert status.startswith(b"HTTP/1.1 504")
        url = f"http://127.0.0.1:{port}/v2/models/mse_loss/infer"
        assert _post(url, json.dumps(BODY).encode())[0] == 200


def test_statistics_count_each_model() -> None:
    with ServerThread(_config()) as server:
        base = f"http://127.0.0.1:{server.config.http_port}/v2/models/mse_loss"
        for _ in range(2):
            _post(base + "/infer", json.dumps(BODY).encode())
        _post(base + "/versions/1/infer", b"{")
        status, stats = _get(base + "/versions/1/stats")
    assert status == 200
    (model,) = stats["model_stats"]
    assert model["inference_count"] == 2 and model["inference_stats"]["fail"]["count"] == 1
    assert model["inference_stats"]["success"]["ns"] > 0 and model["last_inference"] > 0


def test_a_draining_server_is_not_ready_and_takes_no_inference() -> None:
    with ServerThread(_config()) as server:
        running, loop = server._running, server._loop
        assert running is not None and running.oip is not None and loop is not None
        base = f"http://127.0.0.1:{server.config.http_port}/v2"
        assert _get(base + "/health/ready") == (200, {"ready": True})
        loop.call_soon_threadsafe(running.oip.drain)
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(timeout=5)
        assert _get(base + "/health/ready") == (503, {"ready": False})
        assert _get(base + "/health/live") == (200, {"live": True})
        status, answer = _post(base + "/models/mse_loss/infer", json.dumps(BODY).encode())
        with grpc.insecure_channel(server.target) as channel:
            ready = channel.unary_unary(
                "/inference.GRPCInferenceService/ServerReady",
                request_serializer=ipb.ServerReadyRequest.SerializeToString,
                response_deserializer=ipb.ServerReadyResponse.FromString,
            )(ipb.ServerReadyRequest(), timeout=10)
    assert status == 503 and "draining" in answer["error"]
    assert not ready.ready


def test_unserved_rpcs_of_the_service_are_unimplemented() -> None:
    with ServerThread(_config(http_port=0)) as server, grpc.insecure_channel(server.target) as channel:
        index = channel.unary_unary("/inference.GRPCInferenceService/RepositoryIndex")
        with pytest.raises(grpc.RpcError) as caught:
            index(b"", timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_tls_on_the_http_port(tmp_path: Path) -> None:
    tools.find("openssl", "apt-get install openssl")
    pki = make_pki(tmp_path)
    with ServerThread(_config(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))) as server:
        url = f"https://127.0.0.1:{server.config.http_port}/v2/models/mse_loss/infer"
        trusted = ssl.create_default_context(cafile=str(pki.ca))
        status, answer = _post(url, json.dumps(BODY).encode(), trusted)
        with pytest.raises(urllib.error.URLError):
            _post(url, json.dumps(BODY).encode(), ssl.create_default_context())
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            _post(url.replace("https", "http"), json.dumps(BODY).encode())
    expected = F.mse_loss(torch.tensor([1.0, 2.0]), torch.zeros(2))  # BODY's inputs, computed locally
    assert status == 200 and answer["outputs"][0]["data"] == [float(expected)]


def _https_status(port: int, context: ssl.SSLContext, connection: http.client.HTTPSConnection | None = None) -> int:
    """One inference over ``connection`` (else a new one to ``port``, closed after); its HTTP status."""
    if connection is None:
        with contextlib.closing(http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)) as new:
            return _https_status(port, context, new)
    connection.request("POST", "/v2/models/mse_loss/infer", body=json.dumps(BODY).encode())
    answer = connection.getresponse()
    answer.read()
    return answer.status


def _client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    return context


def test_a_reload_renews_the_http_ports_certificate_and_client_ca(tmp_path: Path) -> None:
    """SIGHUP's reload (``ServerThread.reload``) reaches the HTTP port as it does gRPC's: new
    connections get the new certificate, and only clients of the new client CA are let in; a
    connection opened before keeps the TLS it negotiated."""
    tools.find("openssl", "apt-get install openssl")
    old, new = make_pki(tmp_path / "old"), make_pki(tmp_path / "new")
    cert, key, client_ca = tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "client-ca.pem"
    for source, target in ((old.server_cert, cert), (old.server_key, key), (old.ca, client_ca)):
        shutil.copy(source, target)
    config = _config(tls_cert=str(cert), tls_key=str(key), tls_client_ca=str(client_ca))
    old_client = _client_context(old.ca, old.client_cert, old.client_key)
    new_client = _client_context(new.ca, new.client_cert, new.client_key)
    with ServerThread(config) as server:
        port = server.config.http_port
        kept = http.client.HTTPSConnection("127.0.0.1", port, context=old_client, timeout=30)
        assert _https_status(port, old_client, kept) == 200
        for source, target in ((new.server_cert, cert), (new.server_key, key), (new.ca, client_ca)):
            shutil.copy(source, target)
        assert server.reload()
        assert _https_status(port, new_client) == 200
        with pytest.raises(ssl.SSLError):  # the old CA does not sign the new certificate
            _https_status(port, old_client)
        # The server trusts the new client CA alone: the old client's certificate is refused.
        stale_client = _client_context(new.ca, old.client_cert, old.client_key)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _https_status(port, stale_client)
        assert _https_status(port, old_client, kept) == 200  # negotiated before the reload
        kept.close()


@pytest.mark.parametrize("datatype", ["BF16", "FP16", "FP64"])
def test_json_tensors_of_every_floating_datatype(datatype: str) -> None:
    dtype = {"BF16": torch.bfloat16, "FP16": torch.float16, "FP64": torch.float64}[datatype]
    x = torch.tensor([[0.5, -1.25, 3.0], [2.0, 0.0, -0.75]], dtype=dtype)
    t = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.5, 0.25]], dtype=dtype)
    body = {"inputs": [
        {"name": "input", "datatype": datatype, "shape": [2, 3], "data": x.double().tolist(), "parameters": {"requires_grad": True}},
        {"name": "target", "datatype": datatype, "shape": [2, 3], "data": t.double().flatten().tolist()},
    ], "parameters": {"reduction": "none"}}
    leaf = x.clone().requires_grad_()
    loss = torch.nn.functional.huber_loss(leaf, t, reduction="none")
    loss.backward(torch.ones_like(loss))
    assert leaf.grad is not None
    with ServerThread(_config()) as server:
        status, answer = _post(f"http://127.0.0.1:{server.config.http_port}/v2/models/huber_loss/infer", json.dumps(body).encode())
    assert status == 200, answer
    outputs = {o["name"]: o for o in answer["outputs"]}
    for name, expected in (("loss", loss), ("grad_input", leaf.grad)):
        assert outputs[name]["datatype"] == datatype and outputs[name]["shape"] == [2, 3]
        assert outputs[name]["data"] == expected.double().flatten().tolist()


def test_an_idle_or_trickling_connection_is_closed_and_gives_its_place_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """``KEEPALIVE_S`` after it opened or after its last answer, a connection without a request
    in progress is closed: one that stays silent, one whose headers trickle in a byte at a time
    (slowloris), and a keep-alive one after its answer. With ``max_connections=4`` they hold
    three places; a bystander, one request per connection, is served in the fourth meanwhile."""
    monkeypatch.setattr(oip_http, "KEEPALIVE_S", 1.0)
    with ServerThread(_config(max_connections=4)) as server:
        port = server.config.http_port
        silent = socket.create_connection(("127.0.0.1", port))
        trickling = socket.create_connection(("127.0.0.1", port))
        answered = socket.create_connection(("127.0.0.1", port))
        answered.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        answered.settimeout(5)
        assert answered.recv(4096).startswith(b"HTTP/1.1 200")
        begin = time.monotonic()
        slowest = 0.0
        trickle = iter(b"GET /v2/health/live HTTP/1.1\r\nX-Slow: " + b"a" * 1000)
        closed: dict[str, float] = {}
        while len(closed) < 3 and time.monotonic() - begin < 10:
            try:
                trickling.sendall(bytes([next(trickle)]))
            except OSError:
                closed.setdefault("trickling", time.monotonic() - begin)
            for name, sock in (("silent", silent), ("answered", answered), ("trickling", trickling)):
                if name not in closed and not is_open(sock):
                    closed[name] = time.monotonic() - begin
            sent = time.monotonic()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5) as ready:
                assert ready.status == 200
            slowest = max(slowest, time.monotonic() - sent)
            time.sleep(0.1)
        for sock in (silent, trickling, answered):
            sock.close()
    assert set(closed) == {"silent", "trickling", "answered"}, closed
    assert all(0.5 < after < 3.0 for after in closed.values()), closed
    assert slowest < 1.0, slowest


def test_connections_whose_tls_handshake_fails_give_their_place_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``max_connections=1`` on a TLS port: a connection that never finishes its handshake
    (a TCP probe, a scanner) holds the one place only until the handshake's time is up, and one
    that sends garbage not even that long; then an inference is served."""
    tools.find("openssl", "apt-get install openssl")
    monkeypatch.setattr(oip_http, "HANDSHAKE_TIMEOUT_S", 0.5)
    pki = make_pki(tmp_path)
    config = _config(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), max_connections=1)
    trusted = ssl.create_default_context(cafile=str(pki.ca))
    with ServerThread(config) as server:
        port = server.config.http_port
        with socket.create_connection(("127.0.0.1", port)) as silent:  # never starts its handshake
            time.sleep(0.2)
            assert _https_status(port, trusted) == 503  # the place is the silent one's
            silent.settimeout(10)
            assert silent.recv(1) == b""  # closed when the handshake's time is up
        with socket.create_connection(("127.0.0.1", port)) as garbage:
            garbage.sendall(b"GET / HTTP/1.1\r\n\r\n")  # not TLS: the handshake fails at once
            garbage.settimeout(10)
            while garbage.recv(4096):
                pass
        deadline = time.monotonic() + 5
        while (status := _https_status(port, trusted)) != 200:
            assert time.monotonic() < deadline, status
            time.sleep(0.2)


def test_an_inference_whose_client_goes_away_leaves_the_queue_uncomputed() -> None:
    """An HTTP caller that gives up (its own timeout, then perhaps a retry) closes its connection:
    its queued inference is cancelled at once, as a cancelled gRPC call is, and is never computed.
    Otherwise every retry of an impatient client would add a computation for no one."""
    rng = np.random.default_rng(1)
    slow = ipb.ModelInferRequest(model_name="linear_cross_entropy")  # one compute slot, held about a second
    for name, array in (("input", rng.standard_normal((8192, 256), dtype=np.float32)),
                        ("linear_weight", rng.standard_normal((8192, 256), dtype=np.float32)),
                        ("target", rng.integers(0, 8192, 8192))):
        slow.inputs.add(name=name, datatype="FP32" if array.dtype == np.float32 else "INT64", shape=array.shape)
        slow.raw_input_contents.append(array.tobytes())
    body = json.dumps(BODY).encode()
    with ServerThread(_config(compute_threads=1)) as server:
        registry = server.metrics.registry

        def sample(name: str, **labels: str) -> float:
            return registry.get_sample_value(name, labels) or 0.0

        def wait_until(condition: Any, what: str) -> None:
            deadline = time.monotonic() + 30
            while not condition():
                assert time.monotonic() < deadline, f"timed out waiting until {what}"
                time.sleep(0.01)

        with grpc.insecure_channel(server.target) as channel:
            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                        request_serializer=ipb.ModelInferRequest.SerializeToString,
                                        response_deserializer=ipb.ModelInferResponse.FromString)
            holding = infer.future(slow, timeout=120)
            wait_until(lambda: sample("remoteloss_batch_requests_count", loss="linear_cross_entropy") == 1,
                       "the slow inference computes")
            with socket.create_connection(("127.0.0.1", server.config.http_port)) as sock:
                sock.sendall(b"POST /v2/models/mse_loss/infer HTTP/1.1\r\nHost: x\r\n"
                             + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                wait_until(lambda: sample("remoteloss_queue_depth") == 1, "the inference queues")
            cancelled = {"protocol": "oip_http", "loss": "mse_loss", "code": "CANCELLED"}
            wait_until(lambda: sample("remoteloss_protocol_requests_total", **cancelled) == 1,
                       "the server records the cancellation")
            assert not holding.done()  # it went while the slot was still held
            assert sample("remoteloss_queue_depth") == 0
            holding.result()
        assert sample("remoteloss_batch_requests_count", loss="mse_loss") == 0  # never computed
