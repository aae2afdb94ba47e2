"""Who may call: API keys checked by a server interceptor, and the server's TLS credentials.

Keys are lines ``tenant:key`` (from ``--api-keys-file`` or ``REMOTELOSS_API_KEYS``); a client
sends ``authorization: Bearer <key>`` metadata. ``ApiKeyInterceptor`` is the only code that reads
that metadata: a call without a valid key gets UNAUTHENTICATED from its headers, before any of its
request is read (``_deny``); a call with one runs with the key's tenant in ``telemetry.TENANT``, which
the request log lines show. Keys are never logged, and only their SHA-256 digests are kept; a
presented key is compared with every configured one in constant time, without an early exit.
``grpc.health.v1.Health`` stays open, so that load balancers and probes need no key.

Both can change while serving (SIGHUP, ``app``): ``ApiKeyInterceptor.keys`` takes a new table for
the calls that start after it, and ``ServerCertificates.reload`` gives new TLS handshakes a new
certificate (gRPC's certificate-config fetcher, and a new ``ssl.SSLContext`` for the HTTP port's
new connections) while open connections keep theirs.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import logging
import re
import ssl
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from remoteloss_server.log_sampling import LogSampler
from remoteloss_server.telemetry import TENANT, quote

__all__ = [
    "Security",
    "AUTHORIZATION_KEY",
    "OPEN_SERVICES",
    "ApiKeyInterceptor",
    "KeyTable",
    "ServerCertificates",
    "load_keys",
    "parse_keys",
]

logger = logging.getLogger(__name__)

AUTHORIZATION_KEY = "authorization"
OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})  # answered without a key: probes and load balancers
MIN_KEY_CHARS = 16
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Printable ASCII (a metadata value) without spaces or commas, which separate entries.
_KEY = re.compile(rf"[!-+\--~]{{{MIN_KEY_CHARS},512}}")
_BEARER = re.compile(r"bearer +(\S+)", re.IGNORECASE)


@dataclass(frozen=True)
class KeyTable:
    """Configured keys as (tenant, SHA-256 digest) pairs; a tenant may have several keys (rotation)."""

    entries: tuple[tuple[str, bytes], ...]

    @property
    def tenants(self) -> frozenset[str]:
        return frozenset(tenant for tenant, _ in self.entries)

    def tenant(self, key: str) -> str | None:
        """The tenant of ``key``, or None. The time taken does not depend on which key matches,
        or on whether one does: every digest is compared, with ``hmac.compare_digest``."""
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found = None
        for tenant, expected in self.entries:
            equal = hmac.compare_digest(digest, expected)
            found = tenant if equal else found
        return found


def parse_keys(text: str, source: str) -> KeyTable:
    """Entries ``tenant:key``, separated by newlines or commas; blank lines and ``#`` comments are
    skipped. Raises ValueError naming ``source`` and the entry's position, never the key."""
    entries: list[tuple[str, bytes]] = []
    seen: set[bytes] = set()
    position = 0
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        for entry in line.split(","):
            entry = entry.strip()
            if not entry:
                continue
            position += 1
            tenant, sep, key = entry.partition(":")
            where = f"{source}: entry {position}"
            if not sep:
                raise ValueError(f"{where} is not 'tenant:key'")
            if not _TENANT.fullmatch(tenant):
                raise ValueError(f"{where}: the tenant must be 1 to 64 letters, digits or '_.-', starting with one of the first two")
            if not _KEY.fullmatch(key):
                raise ValueError(
                    f"{where} (tenant {tenant}): the key must be {MIN_KEY_CHARS} to 512 printable ASCII "
                    "characters without spaces or commas (e.g. from `openssl rand -hex 32`)"
                )
            digest = hashlib.sha256(key.encode()).digest()
            if digest in seen:
                raise ValueError(f"{where} (tenant {tenant}): this key is listed twice")
            seen.add(digest)
            entries.append((tenant, digest))
    if not entries:
        raise ValueError(f"{source}: no keys (expected lines 'tenant:key')")
    return KeyTable(tuple(entries))


def load_keys(path: str | None, text: str | None) -> KeyTable | None:
    """The keys of the file at ``path`` and of ``text`` (REMOTELOSS_API_KEYS) together; None when
    neither is set (the service is open). Raises ValueError, or OSError for an unreadable file."""
    if path is None and text is None:
        return None
    entries: list[tuple[str, bytes]] = []
    if path is not None:
        entries += parse_keys(Path(path).read_text(encoding="utf-8"), path).entries
    if text is not None:
        entries += parse_keys(text, "REMOTELOSS_API_KEYS").entries
    if len({digest for _, digest in entries}) != len(entries):
        raise ValueError("a key is listed both in the API keys file and in REMOTELOSS_API_KEYS")
    return KeyTable(tuple(entries))


Pems = tuple[bytes, bytes, "bytes | None"]  # a certificate chain, its key and client CAs (None: none), as PEM


def _load_tls(cert: str, key: str, client_ca: str | None) -> tuple[grpc.ServerCertificateConfiguration, ssl.SSLContext, Pems]:
    """TLS from PEM files, for gRPC and for the HTTP port, and what the files held; with
    ``client_ca``, the CAs whose client certificates are accepted (and required).

    The files are first loaded with Python's ``ssl``, whose errors say which file is wrong (gRPC's
    would only fail to bind the port, or the handshake); that context is the HTTP port's. Raises
    ValueError for an unusable file, OSError for an unreadable one.
    """
    cert_pem, key_pem = Path(cert).read_bytes(), Path(key).read_bytes()
    root = Path(client_ca).read_bytes() if client_ca is not None else None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=b"")  # an encrypted key fails here instead of prompting
    except ssl.SSLError as exc:
        raise ValueError(f"tls_cert {cert} and tls_key {key} are not a PEM certificate chain and its key: {exc}") from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as exc:
            raise ValueError(f"tls_client_ca {client_ca} holds no PEM CA certificate: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    configuration = grpc.ssl_server_certificate_configuration([(key_pem, cert_pem)], root_certificates=root)
    return configuration, context, (cert_pem, key_pem, root)


class _LatestContext(ssl.SSLContext):
    """The HTTP port's TLS: each connection takes the configuration that is ``current`` when it
    starts. asyncio wraps every accepted connection with ``wrap_bio``, which this hands to the
    latest context, so a reload reaches new connections without touching open ones; an
    ``SSLContext`` cannot drop a client CA it has loaded, so replacing it is the only way."""

    current: ssl.SSLContext

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        return self.current.wrap_bio(*args, **kwargs)


class ServerCertificates:
    """The server's TLS, from PEM files that ``reload`` reads again: ``credentials`` for gRPC,
    ``ssl_context`` for the HTTP port.

    With ``client_ca``, clients must present a certificate it signed. gRPC asks ``_fetch`` before
    each new handshake; after a reload it gets the new configuration once, and keeps using it; the
    HTTP port's new connections get the new context. Connections already open are not touched.
    ``follow`` hands what was loaded, at once and after each reload, to another reader (the native
    front's copy of the files). Raises as ``_load_tls``.
    """

    def __init__(self, cert: str, key: str, client_ca: str | None) -> None:
        self._files = (cert, key, client_ca)
        self._lock = threading.Lock()  # _fetch runs on a gRPC core thread
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._followers: list[Callable[[Pems], None]] = []
        configuration, context, self._pems = _load_tls(cert, key, client_ca)
        self.ssl_context = _LatestContext(ssl.PROTOCOL_TLS_SERVER)
        self.ssl_context.current = context
        self.credentials = grpc.dynamic_ssl_server_credentials(
            configuration,
            self._fetch,  # type: ignore[arg-type]  # the stubs forget that None means "no change"
            require_client_authentication=client_ca is not None,
        )

    def reload(self) -> None:
        """Read the files again; new handshakes use them. Raises (and changes nothing) for
        unusable files, as at start."""
        configuration, context, pems = _load_tls(*self._files)
        for follower in self._followers:
            follower(pems)
        with self._lock:
            self._pending = configuration
        self.ssl_context.current = context
        self._pems = pems

    def follow(self, follower: Callable[[Pems], None]) -> None:
        """Call ``follower`` with the PEM bytes loaded now, and after each reload that loads."""
        follower(self._pems)
        self._followers.append(follower)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            pending, self._pending = self._pending, None
        return pending  # None: no change


if TYPE_CHECKING:  # the stubs' generics, which grpc lacks at run time
    _Handler = grpc.RpcMethodHandler[Any, Any]
    _Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]]
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


class ApiKeyInterceptor(_Interceptor):
    """UNAUTHENTICATED for a call to a closed service without a valid ``authorization: Bearer``
    key; the key's tenant in ``telemetry.TENANT`` for the handler of every other call."""

    def __init__(self, keys: KeyTable, open_services: frozenset[str] = OPEN_SERVICES) -> None:
        self._keys = keys
        self._open = open_services
        self.log_sampler = LogSampler()  # event=unauthenticated, on both ports

    @property
    def keys(self) -> KeyTable:
        return self._keys

    @keys.setter
    def keys(self, keys: KeyTable) -> None:
        """The calls that start from now on are checked against ``keys`` (SIGHUP's reload)."""
        self._keys = keys

    async def intercept_service(  # type: ignore[override]  # None is gRPC's "no such method"
        self, continuation: _Continuation, details: grpc.HandlerCallDetails
    ) -> _Handler | None:
        method: str = details.method  # "/package.Service/Method"
        if method.split("/")[1] in self._open:
            return await continuation(details)
        tenant, reason = self._authenticate(details.invocation_metadata)
        handler = await continuation(details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED
            return None
        if tenant is None:
            self.log_sampler.log(logger, logging.INFO, ("unauthenticated", "grpc"),
                                 "event=unauthenticated method=%s reason=%s", quote(method), quote(reason))
            return _deny(reason)
        return _replace_behavior(handler, _with_tenant(handler, tenant))

    def tenant_of(self, authorization: Sequence[str]) -> tuple[str | None, str]:
        """The tenant of the ``authorization`` values a call sent (e.g. HTTP headers), or None and
        why not: the same check as a gRPC call's metadata gets."""
        return self._authenticate([(AUTHORIZATION_KEY, value) for value in authorization])

    def _authenticate(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> tuple[str | None, str]:
        values = [v for k, v in metadata or () if k == AUTHORIZATION_KEY]
        if not values:
            return None, "no API key"
        if len(values) > 1:
            return None, "more than one authorization header"
        match = _BEARER.fullmatch(values[0]) if isinstance(values[0], str) else None
        if match is None:
            return None, "the authorization header is not 'Bearer <key>'"
        tenant = self._keys.tenant(match.group(1))
        return (tenant, "") if tenant is not None else (None, "unknown API key")


_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def _kind(handler: _Handler) -> str:
    return _KINDS[2 * bool(handler.request_streaming) + bool(handler.response_streaming)]


def _replace_behavior(handler: _Handler, behavior: Any) -> _Handler:
    replaced: _Handler = handler._replace(**{_kind(handler): behavior})  # type: ignore[attr-defined]  # a namedtuple
    return replaced


def _deny(reason: str) -> _Handler:
    """A handler that aborts with UNAUTHENTICATED without reading the request.

    It is a stream-stream handler whatever the method's kind: HTTP/2 frames a unary call like a
    stream of one message, and grpc.aio reads a unary request whole before its handler runs (a
    200 MiB body would be buffered only to be refused), while a streaming handler reads nothing
    until it asks. The refusal then costs the server the call's headers alone: gRPC ends the
    stream, and flow control stops the sender.
    """
    details = f"{reason}: send the metadata 'authorization: Bearer <key>' with a key this server accepts"

    async def deny(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, details)

    return grpc.stream_stream_rpc_method_handler(deny)


def _with_tenant(handler: _Handler, tenant: str) -> Any:
    """The handler's behavior, run with ``TENANT`` set. Each RPC runs in its own task, whose
    context the handler and the tasks it starts share; a synchronous behavior (run on a thread
    by grpc.aio; none of this server's) is left as it is."""
    behavior = getattr(handler, _kind(handler))
    if inspect.isasyncgenfunction(behavior):

        async def tenant_stream(request: Any, context: Any) -> Any:
            TENANT.set(tenant)
            async for response in behavior(request, context):
                yield response
                del response  # not held while the next is awaited: an idle stream pins nothing

        return tenant_stream
    if inspect.iscoroutinefunction(behavior):

        async def tenant_call(request: Any, context: Any) -> Any:
            TENANT.set(tenant)
            return await behavior(request, context)

        return tenant_call
    return behavior


@dataclass
class Security:
    """What SIGHUP reloads: the API keys (file and REMOTELOSS_API_KEYS as at start) and TLS files."""

    keys_file: str | None
    keys_text: str | None
    interceptor: ApiKeyInterceptor | None = None  # None: no keys (a reload cannot turn them on)
    certificates: ServerCertificates | None = None  # None: plaintext

    def reload(self) -> bool:
        """Read the keys and certificates again; True if every one was replaced. One that cannot
        be used keeps the old, with an ``event=reload ... status=failed`` line at ERROR."""
        replaced = True
        if self.interceptor is not None:
            try:
                keys = load_keys(self.keys_file, self.keys_text)
            except (OSError, ValueError) as exc:  # the messages name the file and entry, never a key
                logger.error("event=reload what=api_keys status=failed kept=previous error=%s", quote(str(exc)))
                replaced = False
            else:
                assert keys is not None  # both were set at start, and are the same now
                self.interceptor.keys = keys
                logger.info(
                    "event=reload what=api_keys status=ok tenants=%d keys=%d", len(keys.tenants), len(keys.entries)
                )
        if self.certificates is not None:
            try:
                self.certificates.reload()
            except (OSError, ValueError) as exc:
                logger.error("event=reload what=tls status=failed kept=previous error=%s", quote(str(exc)))
                replaced = False
            else:
                logger.info("event=reload what=tls status=ok note=%s", quote("new connections get the new certificate"))
        if self.interceptor is None and self.certificates is None:
            logger.info("event=reload what=nothing note=%s", quote("no API keys or TLS configured"))
        return replaced
