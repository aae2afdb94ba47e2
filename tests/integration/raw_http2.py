"""A gRPC caller at the HTTP/2 level (the ``h2`` library), for attacks no well-behaved gRPC client
makes: a connection that never opens its receive window, request bodies sent pre-compressed or a
few bytes at a time, calls left half-sent.

``RawConnection(target, window=0)`` opens one connection whose streams may receive no DATA at all
(``window=0``: the server can send headers and trailers, never an answer's bytes).
``call(path, message, ...)`` starts a call and sends its request (or part of it);
``status(stream)`` waits for the call's ``grpc-status``.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Self

import h2.config
import h2.connection
import h2.events
import h2.settings


def frame(message: bytes, *, compressed: bool = False) -> bytes:
    """A gRPC length-prefixed message: the compressed flag, the length, the bytes."""
    return struct.pack(">BI", 1 if compressed else 0, len(message)) + message


@dataclass
class _Stream:
    headers: dict[str, str] = field(default_factory=dict)
    data: int = 0  # DATA bytes received
    ended: bool = False


class RawConnection:
    """One HTTP/2 connection to a gRPC server on loopback, driven by hand (no TLS)."""

    def __init__(self, target: str, *, window: int | None = None, timeout_s: float = 30.0) -> None:
        host, _, port = target.rpartition(":")
        self.authority = target
        self.sock = socket.create_connection((host, int(port)), timeout=timeout_s)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.conn.initiate_connection()
        if window is not None:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.streams: dict[int, _Stream] = {}
        self._flush()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.conn.close_connection()
            self._flush()
        except OSError:
            pass
        self.sock.close()

    def call(
        self,
        path: str,
        body: bytes,
        *,
        metadata: tuple[tuple[str, str], ...] = (),
        end: bool = True,
        deadline_s: float | None = None,
    ) -> int:
        """Start a call on ``path`` and send ``body`` (already framed, see ``frame``); ``end``
        half-closes it. Returns the stream id."""
        stream = self.conn.get_next_available_stream_id()
        headers = [
            (":method", "POST"), (":scheme", "http"), (":path", path), (":authority", self.authority),
            ("content-type", "application/grpc"), ("te", "trailers"), *metadata,
        ]
        if deadline_s is not None:
            headers.append(("grpc-timeout", f"{max(1, int(deadline_s * 1000))}m"))
        self.conn.send_headers(stream, headers)
        self.streams[stream] = _Stream()
        self.send(stream, body, end=end)
        return stream

    def send(self, stream: int, body: bytes, *, end: bool = False) -> None:
        """Send ``body`` on ``stream`` as the server's flow control allows."""
        view = memoryview(body)
        while view:
            if self.streams[stream].ended or "grpc-status" in self.streams[stream].headers:
                return  # answered (refused) before it was all sent
            room = min(self.conn.local_flow_control_window(stream), self.conn.max_outbound_frame_size, len(view))
            if room <= 0:
                self.receive()
                continue
            self.conn.send_data(stream, bytes(view[:room]))
            view = view[room:]
            self._flush()
        if end and not self.streams[stream].ended:
            self.conn.end_stream(stream)
            self._flush()

    def status(self, stream: int, timeout_s: float = 30.0) -> str | None:
        """The call's ``grpc-status`` (a number, as text) once its trailers (or a trailers-only
        answer) arrive; None if they do not come within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while "grpc-status" not in self.streams[stream].headers and not self.streams[stream].ended:
            if time.monotonic() > deadline:
                return None
            self.receive(max(0.01, deadline - time.monotonic()))
        return self.streams[stream].headers.get("grpc-status")

    def message(self, stream: int) -> str:
        return self.streams[stream].headers.get("grpc-message", "")

    def receive(self, timeout_s: float | None = 1.0) -> None:
        """Read what the server sent within ``timeout_s`` (one read) and take note of it."""
        self.sock.settimeout(timeout_s)
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            return
        if not data:
            raise ConnectionError("the server closed the connection")
        for event in self.conn.receive_data(data):
            if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                self.streams[event.stream_id].headers.update(dict(event.headers))
            elif isinstance(event, h2.events.DataReceived):
                self.streams[event.stream_id].data += len(event.data)
            elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                self.streams[event.stream_id].ended = True
        self._flush()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def reset(self, stream: int) -> None:
        """Cancel ``stream`` (RST_STREAM CANCEL)."""
        self.conn.reset_stream(stream, error_code=8)
        self._flush()
