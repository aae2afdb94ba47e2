"""The Open Inference Protocol through real clients: tritonclient's gRPC (unary and
ModelStreamInfer) and HTTP clients (run under .venv-oip by ``oip_client.py``), KServe's SDK
(``oip_kserve.py``) and curl, against a real server on loopback; and our protos against
tritonclient's.

For every loss: the loss and its gradients equal torch's, with ``reduction="none"`` and an
incoming gradient (``grad_output``) and with the default reduction; health, metadata,
configuration and statistics as tritonclient reads them; bad input gives the native API's
message; API keys and limits hold at both doors.
"""

from __future__ import annotations

import json
import struct
import subprocess
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

import remoteloss
from remoteloss_server.app import ServerThread
from remoteloss_server.config import ServerConfig
from tests import tools

from .cases import LOSS_NAMES, OMIT, Case, cases, tolerance
from .helpers import run
from .oip_cases import array, drive, encode, expected, request
from .deploy_files import free_port

KEY = "k" * 32


def _start(**changes: Any) -> ServerThread:
    base: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "device": "cpu", "metrics_port": 0,
                            "http_port": free_port(), "shutdown_grace_s": 0.5}
    return ServerThread(ServerConfig(**{**base, **changes}))


@pytest.fixture(scope="module")
def served() -> Iterator[ServerThread]:
    with _start() as running:
        yield running


def _job(server: ServerThread, **job: Any) -> dict[str, Any]:
    return {"grpc": server.target, "http": f"127.0.0.1:{server.config.http_port}", **job}


def _cases(loss: str) -> list[tuple[Case, bool]]:
    """Per loss: float64 with the default options, reduction "none" with an incoming gradient,
    and the default reduction without one."""
    chosen = []
    for case in cases(loss):
        if case.dtype != torch.float64 or case.option_set.name != "default" or not case.batched:
            continue
        if case.reduction == "none" and not any(c[1] for c in chosen):
            chosen.append((case, True))
        if case.reduction == OMIT and not any(not c[1] for c in chosen):
            chosen.append((case, False))
    return chosen


def test_every_loss_and_its_gradients_equal_torch(served: ServerThread) -> None:
    calls, wanted = [], {}
    for loss in LOSS_NAMES:
        for index, (case, incoming) in enumerate(_cases(loss)):
            call = case.build()
            like = run(call.local).value
            grad_output = torch.randn(like.shape, dtype=like.dtype, generator=torch.Generator().manual_seed(
                zlib.crc32(case.id.encode()))) if incoming else None
            wrt, answers = expected(call, grad_output)
            calls.append(request(case.id, call, wrt, grad_output, binary=index % 2 == 0))
            wanted[case.id] = answers
    assert {c["model"] for c in calls} == set(LOSS_NAMES)
    result = drive(_job(served, calls=calls, stream=True))
    for door in ("grpc", "http", "stream"):
        if door == "stream":
            result["stream"] = {"answers": result["stream"]}
        for case_id, answers in wanted.items():
            got = result[door]["answers"][case_id]
            assert "error" not in got, f"{door} {case_id}: {got}"
            assert got["id"] == case_id
            assert set(got["outputs"]) == set(answers), f"{door} {case_id}"
            for name, value in answers.items():
                actual = torch.from_numpy(array(got["outputs"][name]).copy())
                if value.dim() == 0:  # a scalar loss is answered with shape []; tritonclient gives (1,)
                    assert actual.shape == (1,), f"{door} {case_id}"
                    actual = actual.reshape(())
                assert actual.dtype == value.dtype and actual.shape == value.shape, f"{door} {case_id} {name}"
                torch.testing.assert_close(actual, value, equal_nan=True, **tolerance(torch.float64),
                                           msg=lambda m, d=door, c=case_id, n=name: f"{d} {c} {n}: {m}")


def test_outputs_asked_by_name_are_answered_in_that_order(served: ServerThread) -> None:
    x, t = np.linspace(-1, 1, 6, dtype=np.float32), np.zeros(6, dtype=np.float32)
    inputs = [{"name": "input", "datatype": "FP32", "array": encode(x)},
              {"name": "target", "datatype": "FP32", "array": encode(t)}]
    calls = [
        {"id": "both", "model": "mse_loss", "inputs": inputs, "parameters": {"reduction": "sum"},
         "outputs": ["grad_input", "loss"]},
        {"id": "loss", "model": "mse_loss", "inputs": inputs, "outputs": ["loss"], "binary": False},
    ]
    result = drive(_job(served, calls=calls))
    for door in ("grpc", "http"):
        both = result[door]["answers"]["both"]["outputs"]
        assert list(both) == ["grad_input", "loss"]
        np.testing.assert_allclose(array(both["grad_input"]), 2 * x, rtol=1e-6)
        np.testing.assert_allclose(array(both["loss"]), (x**2).sum(), rtol=1e-6)
        assert list(result[door]["answers"]["loss"]["outputs"]) == ["loss"]


def test_health_metadata_config_and_statistics(served: ServerThread) -> None:
    result = drive(_job(served, calls=[], info=["mse_loss", "cross_entropy", "no_such_loss"]))
    for door in ("grpc", "http"):
        info = result[door]["info"]
        mse = info["mse_loss"]
        assert mse["live"] and mse["ready"] and mse["model_ready"]
        assert mse["server"]["name"] == "remoteloss"
        metadata, config = mse["metadata"], mse["config"]
        config = config.get("config", config)  # gRPC wraps it in ModelConfigResponse
        assert [(i["name"], i["datatype"], [int(s) for s in i["shape"]]) for i in metadata["inputs"]] == [
            ("input", "FP32", [-1]), ("target", "FP32", [-1])]
        assert [o["name"] for o in metadata["outputs"]] == [o["name"] for o in config["output"]] == ["loss"]
        assert config["parameters"]["gradient_outputs"]["string_value"] == "grad_input, grad_target, grad_weight"
        assert int(config.get("max_batch_size", 0)) == 0
        assert [i["name"] for i in config["input"]] == [i["name"] for i in metadata["inputs"]]
        assert config["parameters"]["optional_inputs"]["string_value"] == "weight, grad_output"
        assert [i["name"] for i in info["cross_entropy"]["metadata"]["inputs"]] == ["input", "target"]
        stats = mse["stats"]["model_stats"][0]
        assert stats["name"] == "mse_loss" and stats["version"] == "1"
        assert "error" in info["no_such_loss"] and "no model 'no_such_loss'" in info["no_such_loss"]["error"]


def _bad_requests() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(loss, native keyword arguments, the same as an inference job's call)."""
    x = np.zeros((4, 3))
    return [
        ("mse_loss", {"input": x, "target": np.zeros((4, 2))}, {}),
        ("nll_loss", {"input": x, "target": np.zeros(4, dtype=np.float64)}, {}),
        ("cross_entropy", {"input": x, "target": np.array([0, 1, 2, 7])}, {}),
        ("mse_loss", {"input": x, "target": x, "reduction": "batchmean"}, {"reduction": "batchmean"}),
        ("cross_entropy", {"input": x, "target": np.array([0, 1, 2, 1]), "label_smoothing": 1.5},
         {"label_smoothing": 1.5}),
        ("cross_entropy", {"input": x.astype(np.int64), "target": np.array([0, 1, 2, 1])}, {}),
    ]


def test_bad_input_gives_the_native_message(served: ServerThread) -> None:
    calls, native = [], {}
    with remoteloss.Client(served.target) as client:
        for index, (loss, kwargs, parameters) in enumerate(_bad_requests()):
            with pytest.raises(remoteloss.InvalidArgumentError) as caught:
                getattr(client, loss)(**kwargs)
            native[str(index)] = caught.value.details
            inputs = [{"name": k, "datatype": {"f": "FP64", "i": "INT64"}[v.dtype.kind], "array": encode(v)}
                      for k, v in kwargs.items() if isinstance(v, np.ndarray)]
            calls.append({"id": str(index), "model": loss, "inputs": inputs, "parameters": parameters})
    result = drive(_job(served, calls=calls))
    for door, code in (("grpc", "StatusCode.INVALID_ARGUMENT"), ("http", "400")):
        for key, message in native.items():
            got = result[door]["answers"][key]
            assert got.get("error") == message and got["status"] == code, (door, got, message)


def test_api_keys_and_limits_at_both_doors() -> None:
    x = np.zeros(200, dtype=np.float32)
    inputs = [{"name": "input", "datatype": "FP32", "array": encode(x)},
              {"name": "target", "datatype": "FP32", "array": encode(x)}]
    small = [{"name": n, "datatype": "FP32", "array": encode(x[:10])} for n in ("input", "target")]
    calls = [{"id": "large", "model": "mse_loss", "inputs": inputs}, {"id": "small", "model": "mse_loss", "inputs": small}]
    with _start(api_keys=f"team:{KEY}", max_request_elements=100) as server, \
            remoteloss.Client(server.target, api_key=KEY) as client:
        with pytest.raises(remoteloss.InvalidArgumentError) as caught:
            client.mse_loss(x, x)
        denied = drive(_job(server, calls=calls, info=["mse_loss"]))
        allowed = drive(_job(server, calls=calls, headers={"authorization": f"Bearer {KEY}"}))
    for door, (unauthenticated, invalid) in (("grpc", ("StatusCode.UNAUTHENTICATED", "StatusCode.INVALID_ARGUMENT")),
                                             ("http", ("401", "400"))):
        assert denied[door]["answers"]["small"]["status"] == unauthenticated
        assert "Bearer" in denied[door]["answers"]["small"]["error"]
        assert denied[door]["info"]["mse_loss"]["status"] == unauthenticated
        assert "outputs" in allowed[door]["answers"]["small"]
        assert allowed[door]["answers"]["large"] == {"error": caught.value.details, "status": invalid}


def test_curl_json_and_binary(served: ServerThread) -> None:
    curl = tools.find("curl", "apt-get install curl")
    url = f"http://127.0.0.1:{served.config.http_port}/v2/models/mse_loss/infer"
    body = {"inputs": [
        {"name": "input", "datatype": "FP32", "shape": [3], "data": [1, 2, 3], "parameters": {"requires_grad": True}},
        {"name": "target", "datatype": "FP32", "shape": [3], "data": [0, 0, 0]}], "parameters": {"reduction": "sum"}}
    run = tools.run([curl, "-sS", "--fail-with-body", url, "-d", json.dumps(body)])
    assert run.returncode == 0, run.stdout + run.stderr
    answer = json.loads(run.stdout)
    assert answer["outputs"] == [
        {"name": "loss", "datatype": "FP32", "shape": [], "data": [14.0]},
        {"name": "grad_input", "datatype": "FP32", "shape": [3], "data": [2.0, 4.0, 6.0]},
    ]
    header = json.dumps({"inputs": [
        {"name": n, "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}} for n in ("input", "target")
    ], "outputs": [{"name": "loss", "parameters": {"binary_data": True}}]}).encode()
    data = header + struct.pack("<2f", 1, 2) + struct.pack("<2f", 0, 0)
    raw = subprocess.run([curl, "-sS", "--fail-with-body", "-D", "-", url, "-H", f"Inference-Header-Content-Length: {len(header)}",
                          "--data-binary", "@-"], input=data, capture_output=True, timeout=60, check=False)
    assert raw.returncode == 0, raw.stderr
    head, _, payload = raw.stdout.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"inference-header-content-length")))
    assert json.loads(payload[:length])["outputs"][0]["parameters"] == {"binary_data_size": 4}
    assert struct.unpack("<f", payload[length:]) == (2.5,)
    missing = tools.run([curl, "-sS", url.replace("mse_loss", "mse_lss"), "-d", "{}"])
    assert json.loads(missing.stdout) == {"error": "no model 'mse_lss': the models are the losses, e.g. mse_loss (GET /v2/models/mse_loss)"}


_DESCRIBE = """
import json
from tritonclient.grpc import service_pb2, model_config_pb2
def walk(d, out):
    out[d.full_name] = {f.name: [f.number, f.type, f.label == 3 if hasattr(f, 'label') else f.is_repeated, f.message_type.full_name if f.message_type else
                                 f.enum_type.full_name if f.enum_type else ""] for f in d.fields}
    for e in d.enum_types:
        out[e.full_name] = {v.name: v.number for v in e.values}
    for n in d.nested_types:
        walk(n, out)
out = {}
for module in (service_pb2, model_config_pb2):
    for d in module.DESCRIPTOR.message_types_by_name.values():
        walk(d, out)
    for e in module.DESCRIPTOR.enum_types_by_name.values():
        out[e.full_name] = {v.name: v.number for v in e.values}
    for s in module.DESCRIPTOR.services_by_name.values():
        for m in s.methods:
            out[m.full_name] = [m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming]
print(json.dumps(out))
"""


def test_our_inference_protos_match_tritonclients() -> None:
    """Every message, field, enum value and RPC of protos/inference/ is, name for name and number
    for number, the one tritonclient ships: the two speak the same wire format."""
    from remoteloss_server.inference import grpc_service_pb2 as ipb

    from .oip_cases import PYTHON

    if not PYTHON.is_file():
        tools.missing("tritonclient is not installed in .venv-oip (scripts/install_oip_clients.sh)")
    run_ = subprocess.run([str(PYTHON), "-c", _DESCRIBE], capture_output=True, text=True, timeout=120, check=False)
    assert run_.returncode == 0, run_.stderr
    theirs = json.loads(run_.stdout)
    ours: dict[str, Any] = {}

    def walk(d: Any) -> None:
        ours[d.full_name] = {f.name: [f.number, f.type, f.label == 3 if hasattr(f, 'label') else f.is_repeated, f.message_type.full_name if f.message_type else
                                      f.enum_type.full_name if f.enum_type else ""] for f in d.fields}
        for e in d.enum_types:
            ours[e.full_name] = {v.name: v.number for v in e.values}
        for n in d.nested_types:
            walk(n)

    for d in ipb.DESCRIPTOR.message_types_by_name.values():
        walk(d)
    for e in ipb.DESCRIPTOR.enum_types_by_name.values():
        ours[e.full_name] = {v.name: v.number for v in e.values}
    for s in ipb.DESCRIPTOR.services_by_name.values():
        for m in s.methods:
            ours[m.full_name] = [m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming]
    assert len(ours) > 40
    for name, described in ours.items():
        assert name in theirs, f"{name} is not in tritonclient's protos"
        if isinstance(described, dict):
            for key, value in described.items():
                assert theirs[name].get(key) == value, f"{name}.{key}: ours {value}, tritonclient's {theirs[name].get(key)}"
        else:
            assert theirs[name] == described, name


def test_the_readmes_tritonclient_example_runs(served: ServerThread) -> None:
    from .oip_cases import PYTHON

    text = (tools.ROOT / "README.md").read_text()
    section = text[text.index("## For Triton and KServe callers"):]
    code = section[section.index("```python\n") + len("```python\n"):]
    code = code[:code.index("```")].replace("localhost:50051", served.target)
    check = "\nassert np.allclose(loss, ((x - t) ** 2).sum(), rtol=1e-5) and np.allclose(grad_input, 2 * (x - t), rtol=1e-5)\n"
    if not PYTHON.is_file():
        tools.missing("tritonclient is not installed in .venv-oip (scripts/install_oip_clients.sh)")
    run_ = subprocess.run([str(PYTHON), "-c", code + check], capture_output=True, text=True, timeout=120, check=False)
    assert run_.returncode == 0, run_.stderr


def test_kserves_clients(served: ServerThread) -> None:
    """KServe's Python SDK (gRPC and REST clients), where it installs beside tritonclient."""
    from .oip_cases import PYTHON

    if not PYTHON.is_file() or subprocess.run([str(PYTHON), "-c", "import kserve"], capture_output=True,
                                              timeout=120, check=False).returncode != 0:
        tools.missing("kserve is not installed in .venv-oip (scripts/install_oip_clients.sh)")
    script = tools.ROOT / "tests" / "integration" / "oip_kserve.py"
    run_ = subprocess.run([str(PYTHON), str(script), served.target, f"127.0.0.1:{served.config.http_port}"],
                          capture_output=True, text=True, timeout=180, check=False)
    assert run_.returncode == 0, run_.stderr[-4000:]
    got = json.loads(run_.stdout)
    x, t = torch.tensor(got["x"]).requires_grad_(), torch.tensor(got["t"])
    loss = torch.nn.functional.mse_loss(x, t, reduction="sum")
    loss.backward()
    for door in ("grpc", "rest"):
        assert set(got[door]) == {"loss", "grad_input"}, door
        torch.testing.assert_close(torch.tensor(got[door]["loss"]).reshape(()), loss.detach())
        torch.testing.assert_close(torch.tensor(got[door]["grad_input"]), x.grad)


def test_every_loss_refuses_a_bad_dtype_as_the_native_api(served: ServerThread) -> None:
    """For every loss, its first tensor argument sent as BOOL: refused with the native API's message,
    word for word, or computed by both where the loss takes it."""
    from .helpers import remote

    calls, native = [], {}
    with remoteloss.Client(served.target) as client:
        for loss in LOSS_NAMES:
            case, _ = _cases(loss)[0]
            call = case.build()
            first = next(iter(call.tensors()))
            bad = call.replace({first: call.tensors()[first].bool()})
            error = run(lambda bad=bad: remote(client, bad)).error
            assert error is None or isinstance(error, remoteloss.InvalidArgumentError), (loss, error)
            native[loss] = None if error is None else error.details
            calls.append(request(loss, bad, (), None))
    result = drive(_job(served, calls=calls, stream=True))
    streamed = result["stream"]  # ModelStreamInfer: each failure is its item's error_message
    assert sorted(v["error"] for k, v in streamed.items() if k.startswith("error-")) == sorted(
        m for m in native.values() if m is not None)
    assert {k for k in streamed if not k.startswith("error-")} == {k for k, m in native.items() if m is None}
    for door, code in (("grpc", "StatusCode.INVALID_ARGUMENT"), ("http", "400")):
        for loss, message in native.items():
            got = result[door]["answers"][loss]
            if message is None:
                assert "outputs" in got, (door, loss, got)
            else:
                assert got == {"error": message, "status": code}, (door, loss)
    assert sum(message is not None for message in native.values()) > len(native) // 2
