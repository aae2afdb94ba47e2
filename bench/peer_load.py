"""Closed-loop callers of one server of ``bench/peers.py``, each through the server's own client.

Run with the Python that has the client (the peer's virtual environment, or the project's for
remoteloss)::

    python bench/peer_load.py remoteloss 127.0.0.1:P --elements 1000 --callers 64 --duration 5 --json out.json

Every caller is a thread with its own client object (a ``remoteloss.Client``, a
``tritonclient.grpc.InferenceServerClient``, a ``requests.Session``), except ``remoteloss-stream``,
whose callers share one ``client.stream()``. Each sends the same float32 pair, waits for the loss
and the input's gradient, and sends again. The first answer of each caller is checked against the
job computed here with numpy. Prints (or writes) JSON: requests, seconds, req/s and latency
percentiles in milliseconds.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

Call = Callable[[], tuple[float, Any]]
PEERS = ("remoteloss", "remoteloss-stream", "pytriton", "ray", "litserve")


def job(elements: int) -> tuple[np.ndarray, np.ndarray]:
    """The pair every server gets: the same seed, whoever is measured."""
    generator = np.random.default_rng(12)
    return (generator.standard_normal(elements, dtype=np.float32),
            generator.standard_normal(elements, dtype=np.float32))


def _remoteloss(address: str, x: np.ndarray, y: np.ndarray, shared: dict[str, Any]) -> Call:
    import remoteloss

    client = remoteloss.Client(address, timeout=300)

    def call() -> tuple[float, Any]:
        loss, grads = client.value_and_grad("mse_loss", x, y, wrt=("input",))
        return float(loss), grads["input"]
    return call


def _remoteloss_stream(address: str, x: np.ndarray, y: np.ndarray, shared: dict[str, Any]) -> Call:
    import remoteloss

    if "stream" not in shared:
        shared["client"] = remoteloss.Client(address, timeout=300)
        shared["stream"] = shared["client"].stream()
    stream = shared["stream"]

    def call() -> tuple[float, Any]:
        loss, grads = stream.value_and_grad("mse_loss", x, y, wrt=("input",)).result()
        return float(loss), grads["input"]
    return call


def _pytriton(address: str, x: np.ndarray, y: np.ndarray, shared: dict[str, Any]) -> Call:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(address)
    batched = client.get_model_config("mse_loss").config.max_batch_size > 0
    shape = [1, x.size] if batched else [x.size]
    inputs = [grpcclient.InferInput("input", shape, "FP32"), grpcclient.InferInput("target", shape, "FP32")]
    inputs[0].set_data_from_numpy(x.reshape(shape))
    inputs[1].set_data_from_numpy(y.reshape(shape))
    outputs = [grpcclient.InferRequestedOutput("loss"), grpcclient.InferRequestedOutput("grad_input")]

    def call() -> tuple[float, Any]:
        result = client.infer("mse_loss", inputs, outputs=outputs, client_timeout=300)
        return float(result.as_numpy("loss").reshape(-1)[0]), result.as_numpy("grad_input").reshape(-1)
    return call


def _ray(address: str, x: np.ndarray, y: np.ndarray, shared: dict[str, Any]) -> Call:
    import requests

    session = requests.Session()
    body = x.astype("<f4").tobytes() + y.astype("<f4").tobytes()
    headers = {"Content-Type": "application/octet-stream"}

    def call() -> tuple[float, Any]:
        answer = session.post(f"http://{address}/", data=body, headers=headers, timeout=300)
        answer.raise_for_status()
        values = np.frombuffer(answer.content, dtype="<f4")
        return float(values[0]), values[1:]
    return call


def _litserve(address: str, x: np.ndarray, y: np.ndarray, shared: dict[str, Any]) -> Call:
    import requests

    session = requests.Session()
    payload = {"input": base64.b64encode(x.tobytes()).decode(), "target": base64.b64encode(y.tobytes()).decode()}

    def call() -> tuple[float, Any]:
        answer = session.post(f"http://{address}/predict", json=payload, timeout=300)
        answer.raise_for_status()
        body = answer.json()
        return float(body["loss"]), np.frombuffer(base64.b64decode(body["grad_input"]), dtype="<f4")
    return call


CLIENTS: dict[str, Callable[[str, np.ndarray, np.ndarray, dict[str, Any]], Call]] = {
    "remoteloss": _remoteloss, "remoteloss-stream": _remoteloss_stream, "pytriton": _pytriton,
    "ray": _ray, "litserve": _litserve,
}


def check(call: Call, x: np.ndarray, y: np.ndarray) -> None:
    """One call; raises unless its loss and gradient are the job's."""
    loss, grad = call()
    diff = x.astype(np.float64) - y
    expected_loss, expected_grad = float(np.mean(diff * diff)), 2.0 * diff / x.size
    if not np.isclose(loss, expected_loss, rtol=1e-4) or not np.allclose(grad, expected_grad, rtol=1e-4, atol=1e-9):
        raise RuntimeError(f"wrong answer: loss {loss} (expected {expected_loss})")


def measure(peer: str, address: str, elements: int, callers: int, duration_s: float,
            warmup_s: float) -> dict[str, Any]:
    """``callers`` threads in a closed loop: ``warmup_s`` unrecorded, then ``duration_s`` recorded."""
    x, y = job(elements)
    shared: dict[str, Any] = {}
    calls = [CLIENTS[peer](address, x, y, shared) for _ in range(callers)]
    for call in calls:
        check(call, x, y)
    latencies: list[list[float]] = [[] for _ in calls]
    errors: list[str] = []
    start = time.perf_counter() + 0.05
    record_from, stop_at = start + warmup_s, start + warmup_s + duration_s
    hard_stop = stop_at + 10 * duration_s

    def loop(index: int) -> None:
        mine = latencies[index]
        while time.perf_counter() < start:
            time.sleep(0.001)
        try:
            # One caller records at least 5 answers, however slow (within 10 times the window).
            while (began := time.perf_counter()) < stop_at or (callers == 1 and len(mine) < 5 and began < hard_stop):
                calls[index]()
                if began >= record_from:
                    mine.append(time.perf_counter() - began)
        except Exception as exc:  # noqa: BLE001 - reported, and the run fails
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ended = max(stop_at, time.perf_counter())
    if "stream" in shared:
        shared["stream"].close()
        shared["client"].close()
    every = np.sort(np.concatenate([np.asarray(mine) for mine in latencies])) * 1000.0
    if errors or every.size == 0:
        raise RuntimeError(f"{peer}: {len(errors)} callers failed: {errors[:1] or 'no answer recorded'}")
    # Requests that began in the recorded window, over the window (those still in flight end it).
    seconds = ended - record_from
    return {"peer": peer, "elements": elements, "callers": callers, "requests": int(every.size),
            "seconds": seconds, "rps": every.size / seconds, "p50_ms": float(np.percentile(every, 50)),
            "p90_ms": float(np.percentile(every, 90)), "p99_ms": float(np.percentile(every, 99))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("peer", choices=PEERS)
    parser.add_argument("address", help="HOST:PORT (Triton's gRPC port for pytriton)")
    parser.add_argument("--elements", type=int, default=1000)
    parser.add_argument("--callers", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds recorded")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before recording")
    parser.add_argument("--json", help="write the result here instead of stdout")
    args = parser.parse_args(argv)
    result = measure(args.peer, args.address, args.elements, args.callers, args.duration, args.warmup)
    text = json.dumps(result)
    if args.json:
        with open(args.json, "w") as out:
            out.write(text)
    else:
        sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
