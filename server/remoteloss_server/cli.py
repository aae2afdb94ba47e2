"""``remoteloss-server``: flags and environment -> ``ServerConfig`` -> ``app.serve``.

Every setting is a flag and an environment variable ``REMOTELOSS_<FLAG>`` (``--torch-threads``
-> ``REMOTELOSS_TORCH_THREADS``); a flag wins over the environment, which wins over the default.
``--grace-period`` sets ``shutdown_grace_s``, so ``REMOTELOSS_SHUTDOWN_GRACE_S`` works too; likewise
``--max-batch-delay`` and ``REMOTELOSS_MAX_BATCH_DELAY_S``. API keys themselves come only from the
environment (``REMOTELOSS_API_KEYS``) or a file (``--api-keys-file``), never from a flag.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from remoteloss_server import __version__, app
from remoteloss_server.config import LOG_LEVELS, ServerConfig, parse_tenant_weights

__all__ = ["main"]

PROG = "remoteloss-server"
_ENV_PREFIX = "REMOTELOSS_"
_API_KEYS_ENV = _ENV_PREFIX + "API_KEYS"  # "tenant:key" entries, separated by commas or newlines


@dataclass(frozen=True)
class _Setting:
    flag: str
    field: str
    parse: Callable[[str], Any]
    metavar: str
    help: str
    aliases: tuple[str, ...] = ()  # extra environment variable names
    switch: bool = False  # a bool that is on by default: the flag is --no-<flag>, the env var true/false
    default: str | None = None  # the default as --help shows it, when not the field's own value

    @property
    def env(self) -> tuple[str, ...]:
        return (_ENV_PREFIX + self.flag.upper().replace("-", "_"), *self.aliases)


def boolean(text: str) -> bool:
    value = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
    try:
        return value[text.strip().lower()]
    except KeyError:
        raise ValueError(text) from None


def tenant_weights(text: str) -> tuple[tuple[str, float], ...]:
    try:
        return parse_tenant_weights(text)
    except ValueError as exc:  # argparse and the environment show this message as it is
        raise argparse.ArgumentTypeError(str(exc)) from None


_SETTINGS = (
    _Setting("host", "host", str, "HOST", "address to bind; [::] is every interface"),
    _Setting("port", "port", int, "PORT", "port to bind; 0 picks a free one"),
    _Setting("device", "device", str, "DEVICE", "auto, cpu, cuda or cuda:N"),
    _Setting("torch-threads", "torch_threads", int, "N", "torch intra-op threads per computation"),
    _Setting("compute-threads", "compute_threads", int, "N", "computations running at once"),
    _Setting("max-message-bytes", "max_message_bytes", int, "BYTES", "largest request or response"),
    _Setting("log-level", "log_level", str.upper, "LEVEL", "one of " + ", ".join(LOG_LEVELS)),
    _Setting(
        "grace-period",
        "shutdown_grace_s",
        float,
        "SECONDS",
        "how long in-flight requests may finish after SIGTERM",
        aliases=(_ENV_PREFIX + "SHUTDOWN_GRACE_S",),
    ),
    _Setting("workers", "workers", int, "N", "server processes sharing the port (SO_REUSEPORT)"),
    _Setting(
        "http-port", "http_port", int, "PORT",
        "port of the Open Inference Protocol's HTTP/REST endpoints (/v2/...); 0 turns them off",
    ),
    _Setting("metrics-port", "metrics_port", int, "PORT", "port of the Prometheus /metrics endpoint; 0 turns it off"),
    _Setting("metrics-host", "metrics_host", str, "HOST", "address for /metrics; unset means the --host address"),
    _Setting("reflection", "reflection", boolean, "", "turn off gRPC server reflection", switch=True),
    _Setting(
        "front", "front", str, "FRONT",
        "what carries gRPC calls: native (gRPC's C++ core), python (grpc.aio), or auto: native where installed",
    ),
    _Setting(
        "busy-poll-us", "busy_poll_us", int, "MICROSECONDS",
        "after the last calls (gRPC on the native front, and HTTP), poll this long for the next instead of "
        "sleeping (lower latency for back-to-back calls, for up to that much CPU after each); 0: sleep at once",
    ),
    _Setting(
        "request-templates", "request_templates", int, "N",
        "request sizes whose recent structures are kept, so that a small call like one before skips its parse and "
        "checks (its loss's value checks still run); 0 turns it off",
    ),
    _Setting("batching", "batching", boolean, "", "turn off dynamic batching: each request alone", switch=True),
    _Setting("max-batch-size", "max_batch_size", int, "N", "requests in one batch"),
    _Setting("max-batch-elements", "max_batch_elements", int, "N", "tensor elements in one batch; 0 picks by device"),
    _Setting(
        "max-batch-delay",
        "max_batch_delay_s",
        float,
        "SECONDS",
        "how long a batch may wait for more requests; 0 takes only what queued meanwhile",
        aliases=(_ENV_PREFIX + "MAX_BATCH_DELAY_S",),
    ),
    _Setting(
        "max-elements", "max_elements", int, "N", "tensor elements one request may make the server hold"
    ),
    _Setting(
        "max-request-elements",
        "max_request_elements",
        int,
        "N",
        "tensor elements one request may declare, summed over its tensors",
    ),
    _Setting(
        "max-in-flight", "max_in_flight", int, "N",
        "requests queued, computing or with answers not yet sent; more are RESOURCE_EXHAUSTED",
    ),
    _Setting(
        "max-in-flight-bytes", "max_in_flight_bytes", int, "BYTES",
        "bytes of those requests and their unsent answers; more are RESOURCE_EXHAUSTED",
    ),
    _Setting(
        "max-tenant-in-flight", "max_tenant_in_flight", int, "N", "as --max-in-flight, for each API key's tenant"
    ),
    _Setting(
        "max-tenant-in-flight-bytes", "max_tenant_in_flight_bytes", int, "BYTES",
        "as --max-in-flight-bytes, for each API key's tenant",
    ),
    _Setting(
        "max-connection-in-flight", "max_connection_in_flight", int, "N",
        "as --max-in-flight, for each client connection",
    ),
    _Setting(
        "max-connection-in-flight-bytes", "max_connection_in_flight_bytes", int, "BYTES",
        "as --max-in-flight-bytes, for each client connection",
    ),
    _Setting(
        "max-connections", "max_connections", int, "N",
        "open client connections on each port (gRPC, HTTP); one more is closed at once",
    ),
    _Setting(
        "connection-idle", "connection_idle_s", float, "SECONDS",
        "close a gRPC connection without a call for this long (clients reconnect); 0: never",
    ),
    _Setting(
        "api-keys-file",
        "api_keys_file",
        str,
        "FILE",
        "require an API key on every call but health checks: lines 'tenant:key' (keys may also come in "
        f"{_ENV_PREFIX}API_KEYS); re-read on SIGHUP",
    ),
    _Setting(
        "tenant-weights",
        "tenant_weights",
        tenant_weights,
        "TENANT=W,...",
        "fair queueing: under contention each tenant (of the API keys) gets compute time in proportion "
        "to its weight, e.g. alice=3,bob=1",
        default="1 for every tenant",
    ),
    _Setting(
        "tls-cert", "tls_cert", str, "FILE", "PEM certificate chain: serve TLS (with --tls-key); re-read on SIGHUP"
    ),
    _Setting("tls-key", "tls_key", str, "FILE", "PEM private key of --tls-cert"),
    _Setting(
        "tls-client-ca", "tls_client_ca", str, "FILE", "PEM CA certificates: require client certificates they signed"
    ),
    _Setting(
        "malloc-mmap-threshold-bytes",
        "malloc_mmap_threshold_bytes",
        int,
        "BYTES",
        "glibc malloc reuses heap memory for blocks up to this size instead of fresh mmap pages; 0 keeps glibc's default",
    ),
)


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    defaults = ServerConfig()
    # No abbreviations: "--api-keys alice:KEY" must not pass for --api-keys-file (and echo the key).
    parser = _Parser(
        prog=PROG,
        description="Serve every torch.nn loss over gRPC.",
        epilog="Signals: SIGTERM or SIGINT drains and stops the server (a second one exits at once); SIGHUP "
        "reads the API keys (--api-keys-file, and REMOTELOSS_API_KEYS as it was at start) and the TLS files "
        "again, without dropping a call: an unusable file keeps what was loaded before.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    for s in _SETTINGS:
        if s.switch:
            parser.add_argument(
                f"--no-{s.flag}", dest=s.field, action="store_const", const=False, help=f"{s.help} (env {s.env[0]}=false)"
            )
            parser.add_argument(f"--{s.flag}", dest=s.field, action="store_const", const=True, help=argparse.SUPPRESS)
            continue
        parser.add_argument(
            f"--{s.flag}",
            dest=s.field,
            type=s.parse,
            metavar=s.metavar,
            help=f"{s.help} (env {s.env[0]}{_default(s.default or getattr(defaults, s.field))})",
        )
    return parser


def _default(value: Any) -> str:
    """``; default X`` for --help, or nothing for a setting that is unset by default (its help says
    what unset means)."""
    return "" if value is None else f"; default {value}"


def _config(args: argparse.Namespace, environ: Mapping[str, str]) -> ServerConfig:
    values: dict[str, Any] = {}
    for s in _SETTINGS:
        value = getattr(args, s.field)
        if value is None:
            name = next((n for n in s.env if n in environ), None)
            if name is None:
                continue
            try:
                value = s.parse(environ[name])
            except ValueError:
                raise _UsageError(f"{name}: invalid {s.parse.__name__} value {environ[name]!r}") from None
            except argparse.ArgumentTypeError as exc:
                raise _UsageError(f"{name}: {exc}") from None
        values[s.field] = value
    if _API_KEYS_ENV in environ:  # no flag: a command line is visible to every user of the machine
        values["api_keys"] = environ[_API_KEYS_ENV]
    config = ServerConfig(**values)
    config.validate()
    return config


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGTERM or SIGINT; return the process exit status."""
    try:
        config = _config(_parser().parse_args(argv), os.environ)
    except (_UsageError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    try:
        app.serve(config)
    except (app.StartupError, app.WorkerError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second SIGINT while draining
        return 130
    return 0
