"""What a request costs through the Open Inference Protocol against remoteloss's native API.

    python bench/protocol_cost.py            # 5 interleaved rounds, about 1 minute on 2 cores
    python bench/protocol_cost.py --quick    # 1 short round: a smoke test

One remoteloss server (gRPC and REST, free loopback ports). One caller sends the same ``mse_loss``
with the gradient of its input, small (1,000 float32) and large (1,000,000), one request at a time,
one call along each path in turn (so the machine's load drifts alike for all), round after round:

- ``native``: ``remoteloss.v1.LossService/Compute``, a pre-built ``ComputeRequest``'s bytes over grpcio;
- ``oip-grpc``: ``inference.GRPCInferenceService/ModelInfer``, a pre-built ``ModelInferRequest``'s
  bytes (tensors in ``raw_input_contents``) over grpcio;
- ``oip-rest``: ``POST /v2/models/mse_loss/infer`` with the binary tensor data extension (JSON
  header, then the tensors' bytes; outputs asked for as binary) on one keep-alive connection;
- with ``tritonclient`` at hand (here, or in ``.venv-oip``: scripts/install_oip_clients.sh), also the
  clients a caller uses: the SDK's ``Client.value_and_grad`` against ``tritonclient.grpc`` and
  ``tritonclient.http`` (binary data), numpy in and out; tritonclient runs in a process of its own
  (its protobuf pin keeps it out of .venv), which makes its calls after the others in each round.

The wire paths send bytes built once, so they compare what the server and the transport cost; the
client paths add each client's own work. Each round checks every path's loss against the native
one. It prints each path's p50 and its ratio to the native p50 (the target: within 10%), and writes
the ``protocol-cost`` section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

import sections
from perf_analyzer import OipServer, remoteloss_server
from servers import BENCH_DIR

SIZES = {"small": 1000, "large": 1_000_000}
SECTION = "protocol-cost"
NATIVE = "/remoteloss.v1.LossService/Compute"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
TARGET = 1.10  # a request through either protocol costs within 10% of the native one


@dataclass(frozen=True)
class Plan:
    rounds: int
    calls: dict[str, int]  # calls per path per round, by size
    warmup: int


FULL = Plan(rounds=5, calls={"small": 300, "large": 20}, warmup=20)
QUICK = Plan(rounds=1, calls={"small": 100, "large": 5}, warmup=5)


def arrays(size: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    generator = np.random.default_rng(0)
    return (generator.standard_normal(size, dtype=np.float32), generator.standard_normal(size, dtype=np.float32))


def native_bytes(x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]) -> bytes:
    from remoteloss._request import build_request

    return bytes(build_request("mse_loss", {"input": x, "target": y}, wrt=("input",)).SerializeToString())


def native_loss(answer: bytes) -> float:
    from remoteloss.v1 import loss_pb2

    response = loss_pb2.ComputeResponse.FromString(answer)
    assert "input" in response.gradients
    return float(np.frombuffer(response.loss.data, dtype=np.float32)[0])


def _oip_pb2() -> Any:
    """The protocol's generated messages: the server's own, else tritonclient's."""
    for name in ("remoteloss_server.inference.grpc_service_pb2", "tritonclient.grpc.service_pb2"):
        try:
            return __import__(name, fromlist=["ModelInferRequest"])
        except ImportError:
            continue
    raise SystemExit("no generated messages of inference.GRPCInferenceService found")


def oip_grpc_bytes(x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]) -> bytes:
    pb = _oip_pb2()
    request = pb.ModelInferRequest(model_name="mse_loss")
    for name, array in (("input", x), ("target", y)):
        tensor = request.inputs.add(name=name, datatype="FP32", shape=list(array.shape))
        if name == "input":
            tensor.parameters["requires_grad"].bool_param = True
        request.raw_input_contents.append(array.tobytes())
    return bytes(request.SerializeToString())


def oip_grpc_loss(answer: bytes) -> float:
    response = _oip_pb2().ModelInferResponse.FromString(answer)
    names = [output.name for output in response.outputs]
    assert "grad_input" in names, f"no grad_input among {names}"
    return float(np.frombuffer(response.raw_output_contents[names.index("loss")], dtype=np.float32)[0])


def rest_body(x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]) -> tuple[bytes, int]:
    header = {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": list(x.shape), "parameters": {
                "binary_data_size": x.nbytes, "requires_grad": True}},
            {"name": "target", "datatype": "FP32", "shape": list(y.shape), "parameters": {"binary_data_size": y.nbytes}},
        ],
        "outputs": [{"name": "loss", "parameters": {"binary_data": True}},
                    {"name": "grad_input", "parameters": {"binary_data": True}}],
    }
    head = json.dumps(header).encode()
    return head + x.tobytes() + y.tobytes(), len(head)


class Rest:
    """POST /v2/models/mse_loss/infer with a pre-built request, on one keep-alive connection.

    The request's bytes (request line, headers, body) are built once and the answer is read with
    no more parsing than its length needs, as the gRPC rows send pre-built bytes through grpcio's
    C core: ``http.client`` parses every answer's headers in Python (``email``), which cost this
    row about 0.1 ms a call, the client's cost, not the server's."""

    def __init__(self, port: int, body: bytes, header_length: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=300)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = (f"POST /v2/models/mse_loss/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Inference-Header-Content-Length: {header_length}\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        self.request = head.encode() + body
        self.buffer = b""

    def __call__(self) -> tuple[bytes, dict[str, str]]:
        self.sock.sendall(self.request)
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._receive()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status, *lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines)
        length = int({k.lower(): v for k, v in headers.items()}["content-length"])
        while len(self.buffer) < length:
            self.buffer += self._receive()
        answer, self.buffer = self.buffer[:length], self.buffer[length:]
        if status.split(" ", 2)[1] != "200":
            raise RuntimeError(f"REST answered {status}: {answer[:500]!r}")
        return answer, headers

    def _receive(self) -> bytes:
        data = self.sock.recv(1 << 20)
        if not data:
            raise RuntimeError("the REST connection closed")
        return data

    @staticmethod
    def loss(answer: bytes, headers: dict[str, str]) -> float:
        length = int({k.lower(): v for k, v in headers.items()}.get("inference-header-content-length", len(answer)))
        header = json.loads(answer[:length])
        names = [output["name"] for output in header["outputs"]]
        assert names[:1] == ["loss"] and "grad_input" in names, f"outputs {names}"
        sizes = [output["parameters"]["binary_data_size"] for output in header["outputs"]]
        assert sum(sizes) == len(answer) - length, f"binary outputs {sizes}, {len(answer) - length} bytes"
        return float(struct.unpack("<f", answer[length:length + 4])[0])


Call = tuple[Callable[[], Any], Callable[[Any], float]]  # one call, and how to read the loss from its answer
Worker = Callable[[int], tuple[list[float], float]]  # N calls in another process: their latencies (s), a loss


def paths(server: OipServer, size: int) -> tuple[dict[str, Call], dict[str, Worker]]:
    """The paths called from this process, and those called from a tritonclient process."""
    x, y = arrays(size)
    channel = grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", -1),
                                                            ("grpc.max_send_message_length", -1)])
    native, oip = channel.unary_unary(NATIVE), channel.unary_unary(MODEL_INFER)
    native_request, oip_request = native_bytes(x, y), oip_grpc_bytes(x, y)
    rest = Rest(server.http_port, *rest_body(x, y))
    calls: dict[str, Call] = {
        "native": (lambda: native(native_request, timeout=300), native_loss),
        "oip-grpc": (lambda: oip(oip_request, timeout=300), oip_grpc_loss),
        "oip-rest": (rest, lambda answer: Rest.loss(*answer)),
    }
    workers: dict[str, Worker] = {}
    python = _tritonclient_python()
    if python is not None:
        import remoteloss

        sdk = remoteloss.Client(server.target)
        calls["sdk"] = (lambda: sdk.value_and_grad("mse_loss", x, y, wrt=("input",)),
                        lambda answer: float(np.asarray(answer[0]).reshape(-1)[0]))
        for protocol in ("grpc", "http"):
            workers[f"tritonclient-{protocol}"] = _worker(python, protocol, server, size)
    return calls, workers


def _tritonclient_python() -> str | None:
    """A Python with tritonclient: this one, else .venv-oip's (tritonclient's protobuf pin keeps it
    out of .venv; scripts/install_oip_clients.sh makes it); None when neither has it."""
    try:
        import tritonclient.grpc  # noqa: F401

        return sys.executable
    except ImportError:
        other = BENCH_DIR.parent / ".venv-oip" / "bin" / "python"
        return str(other) if other.is_file() else None


def _worker(python: str, protocol: str, server: OipServer, size: int) -> Worker:
    """tritonclient's calls, made by ``python`` in a process of its own (this file, ``--worker``)."""
    def run(count: int) -> tuple[list[float], float]:
        done = subprocess.run([python, __file__, "--worker", protocol, "--target", server.target,
                               "--http-port", str(server.http_port), "--size", str(size), "--calls", str(count)],
                              capture_output=True, text=True, check=False, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"tritonclient-{protocol} failed:\n{done.stderr[-2000:]}")
        answer = json.loads(done.stdout)
        return answer["latencies"], answer["loss"]

    return run


def worker(protocol: str, target: str, http_port: int, size: int, calls: int) -> None:
    """tritonclient (gRPC, or HTTP with binary data): one call to warm up, then ``calls`` timed calls;
    prints their latencies and the loss as JSON."""
    x, y = arrays(size)
    if protocol == "grpc":
        import tritonclient.grpc as module

        client: Any = module.InferenceServerClient(target)
        binary: dict[str, bool] = {}
    else:
        import tritonclient.http as module  # type: ignore[no-redef]

        client = module.InferenceServerClient(f"127.0.0.1:{http_port}", connection_timeout=300, network_timeout=300)
        binary = {"binary_data": True}
    inputs = [module.InferInput("input", list(x.shape), "FP32"), module.InferInput("target", list(y.shape), "FP32")]
    inputs[0].set_data_from_numpy(x, **binary)
    inputs[1].set_data_from_numpy(y, **binary)
    # Asking for grad_input asks for the gradient (tritonclient sets no per-input parameters).
    outputs = [module.InferRequestedOutput(name, **binary) for name in ("loss", "grad_input")]
    result = client.infer("mse_loss", inputs, outputs=outputs)
    latencies = []
    for _ in range(calls):
        started = time.perf_counter()
        result = client.infer("mse_loss", inputs, outputs=outputs)
        latencies.append(time.perf_counter() - started)
    assert result.as_numpy("grad_input").shape == x.shape
    print(json.dumps({"latencies": latencies, "loss": float(result.as_numpy("loss").reshape(-1)[0])}))


def measure(server: OipServer, plan: Plan) -> dict[str, Any]:
    """Per round: the in-process paths one call each in turn (the order rotating), then each
    tritonclient process its calls; every path's loss checked against the native one."""
    results: dict[str, Any] = {}
    for size_name, size in SIZES.items():
        calls, workers = paths(server, size)
        latencies: dict[str, list[float]] = {name: [] for name in [*calls, *workers]}
        for name, (call, _) in calls.items():
            for _ in range(plan.warmup):
                call()
        for round_index in range(plan.rounds):
            names, answers = list(calls), {}
            for index in range(plan.calls[size_name]):
                for name in names[index % len(names):] + names[:index % len(names)]:
                    started = time.perf_counter()
                    answers[name] = calls[name][0]()
                    latencies[name].append(time.perf_counter() - started)
            losses = {name: calls[name][1](answer) for name, answer in answers.items()}
            for name, run in workers.items():
                taken, losses[name] = run(plan.calls[size_name])
                latencies[name] += taken
            for name, loss in losses.items():
                assert abs(loss - losses["native"]) <= 1e-5 * max(1.0, abs(losses["native"])), (
                    f"{name}: loss {loss}, native {losses['native']}")
        native_p50 = statistics.median(latencies["native"])
        results[size_name] = {name: {"p50_s": statistics.median(values),
                                     "p90_s": float(np.percentile(values, 90)), "calls": len(values),
                                     "ratio": statistics.median(values) / native_p50}
                              for name, values in latencies.items()}
        for name, figures in results[size_name].items():
            _log(f"{size_name} {name}: p50 {figures['p50_s'] * 1e3:.3f} ms, {figures['ratio']:.3f} x native")
    return results


def render(results: dict[str, Any]) -> str:
    plan = results["plan"]
    lines = ["## The Open Inference Protocol against the native API\n"]
    add = lines.append
    add(f"Written by `python bench/protocol_cost.py{' --quick' if results['quick'] else ''}` ({results['date']}, "
        f"{results['elapsed_s']:.0f} s, load average {results['load_average'][0]:.1f} before): one caller, one "
        f"request at a time, `mse_loss` with the gradient of `input`, against one server "
        f"(`{results['server']}`); p50 over {plan['rounds']} interleaved round(s). Target: each protocol's "
        f"p50 within {TARGET:.2f} x the native p50. The wire rows send pre-built bytes (the server's and the "
        "transport's cost); the client rows add each client's work, numpy in and out."
        + (" **Quick run: a smoke test, not for the record.**" if results["quick"] else "") + "\n")
    add("| request | path | p50 | p90 | / native p50 | within 10% (wire: of native; tritonclient: of the SDK) |")
    add("|---|---|---|---|---|---|")
    for size_name, by_path in results["figures"].items():
        for name, s in by_path.items():
            # The wire paths against the native bytes; tritonclient against the SDK.
            ratio = s["p50_s"] / by_path["sdk"]["p50_s"] if name.startswith("tritonclient") else s["ratio"]
            verdict = "" if name in ("native", "sdk") else ("yes" if ratio <= TARGET else "**no**")
            relative = f"{s['ratio']:.3f}" + (f" (/ SDK: {ratio:.3f})" if name.startswith("tritonclient") else "")
            add(f"| {SIZES[size_name]:,} float32 + gradient | {name} | {s['p50_s'] * 1e3:.3f} ms | "
                f"{s['p90_s'] * 1e3:.3f} ms | {relative} | {verdict} |")
    if not any("sdk" in by_path for by_path in results["figures"].values()):
        add("\nClients: not measured (no `tritonclient`: scripts/install_oip_clients.sh installs it).")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round: a smoke test")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "RESULTS.md", help="the report (default: %(default)s)")
    parser.add_argument("--worker", choices=("grpc", "http"), help=argparse.SUPPRESS)
    for name in ("--target", "--http-port", "--size", "--calls"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.target, int(args.http_port), int(args.size), int(args.calls))
        return 0
    plan = QUICK if args.quick else FULL
    started, load = time.monotonic(), os.getloadavg()
    results: dict[str, Any] = {"plan": {"rounds": plan.rounds, "calls": plan.calls}, "quick": args.quick,
                               "load_average": load, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="remoteloss-protocol-cost-") as folder:
        server = remoteloss_server(Path(folder))
        try:
            server.start()
            server.wait_ready()
            results["server"] = server.command.replace(str(server.http_port), "$HTTP_PORT")
            results["figures"] = measure(server, plan)
        finally:
            server.stop()
    results["elapsed_s"] = time.monotonic() - started
    (args.out.parent / "protocol_cost.json").write_text(json.dumps(results, indent=2) + "\n")
    sections.write(args.out, SECTION, render(results))
    worst = max(s["ratio"] for by_path in results["figures"].values()
                for name, s in by_path.items() if name.startswith("oip"))
    print(f"worst protocol p50 / native p50: {worst:.2f} (target <= {TARGET:.2f})")
    return 0 if worst <= TARGET else 1


def _log(message: str) -> None:
    print(f"[protocol_cost] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
