"""The ``event=ready`` line a server logs once it serves, and the warnings about its settings
that go with it (tenant weights no key has, an open address without API keys)."""

from __future__ import annotations

import logging

from remoteloss_server import auth, grpc_front
from remoteloss_server.config import ServerConfig
from remoteloss_server.executor import Executor
from remoteloss_server.telemetry import quote

__all__ = ["LOOPBACK_HOSTS", "log_ready"]

logger = logging.getLogger("remoteloss_server.app")  # the lifecycle's lines keep their logger

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})


def log_ready(
    config: ServerConfig, port: int, executor: Executor, metrics_address: str, security: auth.Security,
    http_address: str = "off",
) -> None:
    keys = security.interceptor.keys if security.interceptor is not None else None
    tls = "off" if security.certificates is None else "mutual" if config.tls_client_ca else "on"
    front = grpc_front.kind(config)
    if front == "native":  # the native front's event loop polls this long after its last calls
        front += f" busy_poll_us={config.busy_poll_us}"
    logger.info(
        "event=ready address=%s:%d front=%s device=%s metrics=%s http=%s reflection=%s tls=%s auth=%s",
        config.host, port, front, executor.device, metrics_address, http_address, config.reflection,
        tls,
        "off" if keys is None else f"api_keys tenants={len(keys.tenants)}",
    )
    unknown = sorted({t for t, _ in config.tenant_weights} - (keys.tenants if keys is not None else frozenset()))
    if unknown:
        logger.warning(
            "event=tenant_weights_unknown tenants=%s note=%s", ",".join(unknown),
            quote("no API key has these tenants (a reload may add one); without keys, weights do nothing"),
        )
    if keys is None and config.host not in LOOPBACK_HOSTS:
        logger.warning(
            "event=open_access address=%s:%d note=%s", config.host, port,
            quote("no API keys: anyone who can reach this address may call the service (--api-keys-file, --tls-cert)"),
        )
