"""What a request costs through the Open Inference Protocol against remoteloss's native API.

    python bench/protocol_cost.py            # 5 interleaved rounds, about 1 minute on 2 cores
    python bench/protocol_cost.py --quick    # 1 short round: a smoke test

One remoteloss server (gRPC and REST, free loopback ports). One caller sends the same ``mse_loss``
with the gradient of its input, small (1,000 float32) and large (1,000,000), one request at a time,
along each path in turn, round after round:

- ``native``: ``remoteloss.v1.LossService/Compute``, a pre-built ``ComputeRequest``'s bytes over grpcio;
- ``oip-grpc``: ``inference.GRPCInferenceService/ModelInfer``, a pre-built ``ModelInferRequest``'s
  bytes (tensors in ``raw_input_contents``) over grpcio;
- ``oip-rest``: ``POST /v2/models/mse_loss/infer`` with the binary tensor data extension (JSON
  header, then the tensors' bytes; outputs asked for as binary) on one keep-alive connection;
- with ``tritonclient`` installed, also the clients a caller uses: the SDK's ``Client.value_and_grad``
  against ``tritonclient.grpc`` and ``tritonclient.http`` (binary data), numpy in and out.

The wire paths send bytes built once, so they compare what the server and the transport cost; the
client paths add each client's own work. Every answer's loss is checked once against the native
one. It prints each path's p50 and its ratio to the native p50 (the target: within 10%), and writes
the ``protocol-cost`` section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import struct
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
    """POST /v2/models/mse_loss/infer with a pre-built body, on one keep-alive connection."""

    def __init__(self, port: int, body: bytes, header_length: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        self.body = body
        self.headers = {"Inference-Header-Content-Length": str(header_length), "Content-Type": "application/octet-stream"}

    def __call__(self) -> tuple[bytes, dict[str, str]]:
        self.connection.request("POST", "/v2/models/mse_loss/infer", body=self.body, headers=self.headers)
        response = self.connection.getresponse()
        answer = response.read()
        if response.status != 200:
            raise RuntimeError(f"REST answered {response.status}: {answer[:500]!r}")
        return answer, dict(response.getheaders())

    @staticmethod
    def loss(answer: bytes, headers: dict[str, str]) -> float:
        length = int({k.lower(): v for k, v in headers.items()}.get("inference-header-content-length", len(answer)))
        header = json.loads(answer[:length])
        names = [output["name"] for output in header["outputs"]]
        assert names[:1] == ["loss"] and "grad_input" in names, f"outputs {names}"
        sizes = [output["parameters"]["binary_data_size"] for output in header["outputs"]]
        assert sum(sizes) == len(answer) - length, f"binary outputs {sizes}, {len(answer) - length} bytes"
        return float(struct.unpack("<f", answer[length:length + 4])[0])


def paths(server: OipServer, size: int) -> dict[str, tuple[Callable[[], Any], Callable[[Any], float]]]:
    """Each path: a call, and how to read the loss from its answer."""
    x, y = arrays(size)
    channel = grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", -1),
                                                            ("grpc.max_send_message_length", -1)])
    native, oip = channel.unary_unary(NATIVE), channel.unary_unary(MODEL_INFER)
    native_request, oip_request = native_bytes(x, y), oip_grpc_bytes(x, y)
    rest = Rest(server.http_port, *rest_body(x, y))
    found: dict[str, tuple[Callable[[], Any], Callable[[Any], float]]] = {
        "native": (lambda: native(native_request, timeout=300), native_loss),
        "oip-grpc": (lambda: oip(oip_request, timeout=300), oip_grpc_loss),
        "oip-rest": (rest, lambda answer: Rest.loss(*answer)),
    }
    found.update(_client_paths(server, x, y))
    return found


def _client_paths(server: OipServer, x: np.ndarray[Any, Any],
                  y: np.ndarray[Any, Any]) -> dict[str, tuple[Callable[[], Any], Callable[[Any], float]]]:
    try:
        import tritonclient.grpc as triton_grpc
        import tritonclient.http as triton_http
    except ImportError:
        return {}
    import remoteloss

    sdk = remoteloss.Client(server.target)
    grpc_client = triton_grpc.InferenceServerClient(server.target)
    http_client = triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}", connection_timeout=300,
                                                    network_timeout=300)

    def triton(module: Any, client: Any, binary: dict[str, bool]) -> Callable[[], Any]:
        inputs = [module.InferInput("input", list(x.shape), "FP32"), module.InferInput("target", list(y.shape), "FP32")]
        inputs[0].set_data_from_numpy(x, **binary)
        inputs[1].set_data_from_numpy(y, **binary)
        inputs[0].set_parameter("requires_grad", True)
        outputs = [module.InferRequestedOutput(name, **binary) for name in ("loss", "grad_input")]
        return lambda: client.infer("mse_loss", inputs, outputs=outputs)

    def grad_loss(result: Any) -> float:
        assert result.as_numpy("grad_input").shape == x.shape
        return float(result.as_numpy("loss").reshape(-1)[0])

    def sdk_call() -> Any:
        return sdk.value_and_grad("mse_loss", x, y, wrt=("input",))

    return {
        "sdk": (sdk_call, lambda answer: float(np.asarray(answer[0]).reshape(-1)[0])),
        "tritonclient-grpc": (triton(triton_grpc, grpc_client, {}), grad_loss),
        "tritonclient-http": (triton(triton_http, http_client, {"binary_data": True}), grad_loss),
    }


def measure(server: OipServer, plan: Plan) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for size_name, size in SIZES.items():
        calls = paths(server, size)
        losses = {name: read(call()) for name, (call, read) in calls.items()}
        reference = losses["native"]
        for name, loss in losses.items():
            assert abs(loss - reference) <= 1e-5 * max(1.0, abs(reference)), f"{name}: loss {loss} != {reference}"
        latencies: dict[str, list[float]] = {name: [] for name in calls}
        for round_index in range(plan.rounds):
            order = list(calls) if round_index % 2 == 0 else list(calls)[::-1]
            for name in order:
                call = calls[name][0]
                for _ in range(plan.warmup if round_index == 0 else 0):
                    call()
                for _ in range(plan.calls[size_name]):
                    started = time.perf_counter()
                    call()
                    latencies[name].append(time.perf_counter() - started)
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
    add("| request | path | p50 | p90 | / native p50 | within 10% |")
    add("|---|---|---|---|---|---|")
    for size_name, by_path in results["figures"].items():
        for name, s in by_path.items():
            verdict = "" if name in ("native", "sdk") else ("yes" if s["ratio"] <= TARGET else "**no**")
            if name.startswith("tritonclient"):
                ratio = s["p50_s"] / by_path["sdk"]["p50_s"]
                relative = f"{s['ratio']:.3f} (/ SDK: {ratio:.3f})"
            else:
                relative = f"{s['ratio']:.3f}"
            add(f"| {SIZES[size_name]:,} float32 + gradient | {name} | {s['p50_s'] * 1e3:.3f} ms | "
                f"{s['p90_s'] * 1e3:.3f} ms | {relative} | {verdict} |")
    if not any("sdk" in by_path for by_path in results["figures"].values()):
        add("\nClients: not measured (`tritonclient` is not installed).")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round: a smoke test")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "RESULTS.md", help="the report (default: %(default)s)")
    args = parser.parse_args()
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
