"""The Open Inference Protocol beside the native API: both of its front ends (``oip_grpc`` on the
gRPC port, ``oip_http`` on ``http_port``) on one ``oip_door.Door``, started, drained and stopped
with the server (``app``)."""

from __future__ import annotations

import grpc

from remoteloss_server import oip_grpc, oip_http
from remoteloss_server.auth import Security
from remoteloss_server.batcher import Batcher
from remoteloss_server.config import ServerConfig
from remoteloss_server.intake import Intake
from remoteloss_server.limits import Admission
from remoteloss_server.metrics import Metrics
from remoteloss_server.oip_door import Door

__all__ = ["SERVICE_NAME", "OpenInference"]

SERVICE_NAME = oip_grpc.SERVICE_NAME


class OpenInference:
    """``inference.GRPCInferenceService`` registered on ``server``; ``start_http`` adds the HTTP
    endpoints. ``drain`` makes both say not ready and refuse new inferences (streams end as
    ComputeStream's do); ``stop`` closes the HTTP port once its requests have finished."""

    def __init__(
        self, server: grpc.aio.Server, metrics: Metrics, intake: Intake, batcher: Batcher, admission: Admission,
    ) -> None:
        self.door = Door(metrics, intake, batcher, admission)
        oip_grpc.add_to_server(oip_grpc.InferenceServicer(self.door), server)
        self.http: oip_http.HttpServer | None = None

    async def start_http(self, config: ServerConfig, security: Security) -> str:
        """Serve HTTP when ``http_port`` is set; its address for the ready line ("off" without).
        Raises OSError, naming the address, when it cannot be bound."""
        if not config.http_port:
            return "off"
        tls = None if security.certificates is None else security.certificates.ssl_context  # SIGHUP renews it
        address = f"{config.host}:{config.http_port}"
        try:
            self.http = await oip_http.start(
                self.door, config.host, config.http_port, keys=security.interceptor,
                max_body_bytes=config.max_message_bytes, tls=tls, reuse_port=config.workers > 1,
                max_connections=config.max_connections, busy_poll_s=config.busy_poll_us / 1e6,
            )
        except OSError as exc:
            raise OSError(f"cannot bind {address} for HTTP: {exc} (http_port=0 turns it off)") from None
        return f"{config.host}:{self.http.port}"

    def drain(self) -> None:
        self.door.drain()

    async def stop(self, grace_s: float) -> None:
        if self.http is not None:
            await self.http.stop(grace_s)
            self.http = None
