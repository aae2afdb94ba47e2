"""The job of ``bench/peers.py`` (float32 ``mse_loss`` and the gradient of its input) served by a peer.

Run by ``bench/peers.py`` with the peer's own virtual environment's Python, one server per process::

    python bench/peer_serve.py pytriton --grpc-port P --http-port Q --metrics-port R [--no-batching]
    python bench/peer_serve.py ray --port P [--no-batching]
    python bench/peer_serve.py litserve --port P [--no-batching]

Each computes with torch, one torch thread (as remoteloss's default), ``F.mse_loss`` and autograd;
a batch computes ``reduction="none"``, takes each request's mean and calls ``backward`` once, so every
request gets its own loss and gradient. SIGTERM or SIGINT stops the server and everything it
started (Ray included: ``serve.shutdown()`` and ``ray.shutdown()``).

Wire formats, as each peer's documentation shows them:
- PyTriton: model ``mse_loss``; inputs ``input`` and ``target`` (FP32, shape [-1]); outputs ``loss``
  (FP32, [1]) and ``grad_input`` (FP32, [-1]); with batching a request carries a leading batch
  dimension of 1, as Triton's clients and ``perf_analyzer`` send it.
- Ray Serve: ``POST /`` with the raw bytes of ``input`` then ``target`` (float32, little-endian);
  the answer is the loss's 4 bytes then the gradient's bytes.
- LitServe: ``POST /predict`` with JSON ``{"input": b64, "target": b64}`` (base64 of the float32
  bytes, LitServe's idiom for binary inputs); the answer is ``{"loss": float, "grad_input": b64}``.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import signal
import threading
from typing import Any

MAX_BATCH = 64  # as remoteloss's --max-batch-size default


def _torch() -> Any:
    import torch

    torch.set_num_threads(1)
    return torch


def mse_rows(torch: Any, inputs: Any, targets: Any) -> tuple[Any, Any]:
    """Loss per row and the gradient of each row's loss with respect to its input (numpy in, numpy out)."""
    x = torch.from_numpy(inputs).requires_grad_()
    losses = torch.nn.functional.mse_loss(x, torch.from_numpy(targets), reduction="none").mean(dim=-1)
    losses.sum().backward()
    return losses.detach().numpy(), x.grad.numpy()


def _wait_for_signal() -> None:
    stop = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def serve_pytriton(grpc_port: int, http_port: int, metrics_port: int, batching: bool) -> None:
    import numpy as np
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    torch = _torch()

    def infer(input: Any, target: Any) -> dict[str, Any]:  # noqa: A002 - the tensor's name
        loss, grad = mse_rows(torch, input, target)
        return {"loss": np.asarray(loss, dtype=np.float32).reshape(*loss.shape, 1), "grad_input": grad}

    if batching:
        infer = batch(infer)
        config = ModelConfig(max_batch_size=MAX_BATCH, batcher=DynamicBatcher(max_queue_delay_microseconds=0))
    else:
        config = ModelConfig(batching=False)
        plain = infer
        infer = lambda requests: [plain(**request) for request in requests]  # noqa: E731
    triton_config = TritonConfig(grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port,
                                 grpc_address="127.0.0.1", http_address="127.0.0.1")
    with Triton(config=triton_config) as triton:
        triton.bind(model_name="mse_loss", infer_func=infer,
                    inputs=[Tensor(name="input", dtype=np.float32, shape=(-1,)),
                            Tensor(name="target", dtype=np.float32, shape=(-1,))],
                    outputs=[Tensor(name="loss", dtype=np.float32, shape=(1,)),
                             Tensor(name="grad_input", dtype=np.float32, shape=(-1,))],
                    config=config, strict=True)
        triton.run()
        _wait_for_signal()


def serve_ray(port: int, batching: bool) -> None:
    import numpy as np
    import ray
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    torch = _torch()

    def compute(bodies: list[bytes]) -> list[bytes]:
        pairs = np.stack([np.frombuffer(body, dtype="<f4") for body in bodies])
        half = pairs.shape[1] // 2
        losses, grads = mse_rows(torch, pairs[:, :half], pairs[:, half:])
        return [losses[i].astype("<f4").tobytes() + grads[i].tobytes() for i in range(len(bodies))]

    # The default of 5 requests in flight per replica would cap a batch at 5.
    @serve.deployment(max_ongoing_requests=4 * MAX_BATCH, ray_actor_options={"num_cpus": 0},
                      logging_config={"enable_access_log": False, "log_level": "WARNING"})
    class MseLoss:
        def __init__(self) -> None:
            _torch()

        @serve.batch(max_batch_size=MAX_BATCH if batching else 1, batch_wait_timeout_s=0.0)
        async def compute(self, bodies: list[bytes]) -> list[bytes]:
            return compute(bodies)

        async def __call__(self, request: Request) -> Response:
            body = await request.body()
            answer = await self.compute(body) if batching else compute([body])[0]
            return Response(answer, media_type="application/octet-stream")

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(MseLoss.bind(), route_prefix="/")  # type: ignore[attr-defined]
        _wait_for_signal()  # after ray.init, which replaces the SIGTERM handler
    finally:
        serve.shutdown()
        ray.shutdown()


def _litserve_api() -> Any:
    """The LitAPI class; at module level, as LitServe's workers are spawned and unpickle it by name."""
    import litserve as ls
    import numpy as np

    class MseLossAPI(ls.LitAPI):  # type: ignore[misc]
        def setup(self, device: str) -> None:
            self.torch = _torch()

        # Unannotated: LitServe reads the annotations to pick how it parses the request (JSON here).
        def decode_request(self, request):  # type: ignore[no-untyped-def]
            return (np.frombuffer(base64.b64decode(request["input"]), dtype="<f4"),
                    np.frombuffer(base64.b64decode(request["target"]), dtype="<f4"))

        def batch(self, inputs: list[tuple[Any, Any]]) -> tuple[Any, Any]:
            return np.stack([pair[0] for pair in inputs]), np.stack([pair[1] for pair in inputs])

        def predict(self, pair: tuple[Any, Any]) -> tuple[Any, Any]:
            return mse_rows(self.torch, *pair)

        def unbatch(self, output: tuple[Any, Any]) -> list[tuple[Any, Any]]:
            return list(zip(*output, strict=True))

        def encode_response(self, output):  # type: ignore[no-untyped-def]
            return {"loss": float(output[0]), "grad_input": base64.b64encode(output[1].tobytes()).decode()}

    MseLossAPI.__qualname__ = "MseLossAPI"
    return MseLossAPI


if importlib.util.find_spec("litserve") is not None:
    MseLossAPI = _litserve_api()


def serve_litserve(port: int, batching: bool) -> None:
    import litserve as ls

    api = MseLossAPI(max_batch_size=MAX_BATCH, batch_timeout=0.0) if batching else MseLossAPI()
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=300)
    server.run(host="127.0.0.1", port=port, num_api_servers=1, generate_client_file=False, log_level="warning")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("peer", choices=("pytriton", "ray", "litserve"))
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (Ray Serve, LitServe)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="Triton's gRPC port")
    parser.add_argument("--http-port", type=int, default=8000, help="Triton's HTTP port")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Triton's metrics port")
    parser.add_argument("--no-batching", dest="batching", action="store_false", help="each request alone")
    args = parser.parse_args(argv)
    if args.peer == "pytriton":
        serve_pytriton(args.grpc_port, args.http_port, args.metrics_port, args.batching)
    elif args.peer == "ray":
        serve_ray(args.port, args.batching)
    else:
        serve_litserve(args.port, args.batching)


if __name__ == "__main__":
    main()
