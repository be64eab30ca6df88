"""A hand-made HTTP/2-over-TLS peer that does what gRPC clients never do: open streams and send no
body, trickle a body, hold connections silent. For the stall tests and bench/bench_attack.py only.

Just enough HTTP/2 (RFC 9113) and HPACK (RFC 7541, literal header fields without indexing, no
Huffman) to reproduce the attacks honestly at the frame level; no dependency beyond the standard
library. Import as ``h2raw`` (tests/ is on sys.path; the bench adds it).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import time
from dataclasses import dataclass

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
REFUSED_STREAM = 0x7


@dataclass(frozen=True)
class Frame:
    type: int
    flags: int
    stream: int
    payload: bytes

    @property
    def error_code(self) -> int | None:
        """RST_STREAM's error code, or GOAWAY's."""
        if self.type == RST_STREAM and len(self.payload) >= 4:
            return struct.unpack(">I", self.payload[:4])[0]
        if self.type == GOAWAY and len(self.payload) >= 8:
            return struct.unpack(">I", self.payload[4:8])[0]
        return None


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out, value = [first | limit], value - limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes([*out, value])


def hpack_literal(headers: list[tuple[str, str]]) -> bytes:
    """Each header as a literal field without indexing, with a new (literal) name."""
    out = b""
    for name, value in headers:
        n, v = name.encode(), value.encode()
        out += b"\x00" + _hpack_int(len(n), 7) + n + _hpack_int(len(v), 7) + v
    return out


def grpc_message(payload: bytes) -> bytes:
    """gRPC's length-prefixed message: uncompressed flag, 4-byte length, the bytes."""
    return b"\x00" + struct.pack(">I", len(payload)) + payload


class RawH2:
    """One TLS connection speaking raw HTTP/2 to a gRPC server (answers its SETTINGS and PINGs)."""

    def __init__(
        self, host: str, port: int, ca: bytes | None, *, server_name: str = "localhost", timeout: float = 10
    ) -> None:
        ctx = ssl.create_default_context(cadata=ca.decode() if ca else None)
        if ca is None:
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        raw = socket.create_connection((host, port), timeout=timeout)
        self.sock = ctx.wrap_socket(raw, server_hostname=server_name)
        self.authority = f"{server_name}:{port}"
        self.next_stream = 1
        self.frames: list[Frame] = []  # everything received, in order
        self.eof = False
        self._buf = b""
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0))

    def open_stream(self, path: str, *, end_stream: bool = False) -> int:
        """HEADERS for a gRPC call to `path` (e.g. /asps.v1.SecretProvision/GetChallenge), no DATA."""
        sid, self.next_stream = self.next_stream, self.next_stream + 2
        block = hpack_literal(
            [
                (":method", "POST"),
                (":scheme", "https"),
                (":path", path),
                (":authority", self.authority),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ]
        )
        flags = END_HEADERS | (END_STREAM if end_stream else 0)
        self.sock.sendall(frame(HEADERS, flags, sid, block))
        return sid

    def send_data(self, stream: int, data: bytes, *, end_stream: bool = False) -> None:
        self.sock.sendall(frame(DATA, END_STREAM if end_stream else 0, stream, data))

    def ping(self, payload: bytes = b"12345678") -> None:
        self._send(frame(PING, 0, 0, payload))

    def pump(self, seconds: float) -> list[Frame]:
        """Read for up to `seconds` (less once the peer closes); the frames received meanwhile."""
        got: list[Frame] = []
        deadline = time.monotonic() + seconds
        while not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                break
            except (ssl.SSLError, OSError):
                chunk = b""
            if not chunk:
                self.eof = True
                break
            self._buf += chunk
            got += self._parse()
        return got

    def wait_for(self, match, seconds: float) -> Frame | None:
        """The first frame (already received or arriving within `seconds`) for which `match` holds."""
        for f in self.frames:
            if match(f):
                return f
        deadline = time.monotonic() + seconds
        while not self.eof and time.monotonic() < deadline:
            for f in self.pump(min(0.2, max(0.0, deadline - time.monotonic()))):
                if match(f):
                    return f
        return None

    def stream_ended(self, stream: int, seconds: float) -> Frame | None:
        """The RST_STREAM or END_STREAM-flagged frame that ended `stream` (None if it did not end)."""
        return self.wait_for(
            lambda f: (
                f.stream == stream
                and (f.type == RST_STREAM or (f.type in (HEADERS, DATA) and f.flags & END_STREAM))
            ),
            seconds,
        )

    def closed_within(self, seconds: float) -> bool:
        """The server closed the connection (EOF) within `seconds`."""
        deadline = time.monotonic() + seconds
        while not self.eof and time.monotonic() < deadline:
            self.pump(min(0.5, deadline - time.monotonic()))
        return self.eof

    def _parse(self) -> list[Frame]:
        out = []
        while len(self._buf) >= 9:
            length = int.from_bytes(self._buf[:3], "big")
            if len(self._buf) < 9 + length:
                break
            kind, flags = self._buf[3], self._buf[4]
            stream = struct.unpack(">I", self._buf[5:9])[0] & 0x7FFFFFFF
            f = Frame(kind, flags, stream, self._buf[9 : 9 + length])
            self._buf = self._buf[9 + length :]
            if kind == SETTINGS and not flags & ACK:
                self._send(frame(SETTINGS, ACK, 0))
            elif kind == PING and not flags & ACK:
                self._send(frame(PING, ACK, 0, f.payload))
            out.append(f)
        self.frames += out
        return out

    def settings(self) -> dict[int, int]:
        """The server's SETTINGS parameters received so far."""
        found: dict[int, int] = {}
        for f in self.frames:
            if f.type == SETTINGS and not f.flags & ACK:
                for i in range(0, len(f.payload) - 5, 6):
                    ident, value = struct.unpack(">HI", f.payload[i : i + 6])
                    found[ident] = value
        return found

    def _send(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class SilentTls:
    """A TLS connection that completes its handshake and then says nothing (no HTTP/2 preface)."""

    def __init__(self, host: str, port: int, *, timeout: float = 10) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        self.sock = ctx.wrap_socket(socket.create_connection((host, port), timeout=timeout))

    def closed_within(self, seconds: float) -> bool:
        """The server closed the connection (EOF) within `seconds` (whatever it sent before)."""
        return _eof_within(self.sock, seconds)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class SilentTcp:
    """A TCP connection that never starts TLS."""

    def __init__(self, host: str, port: int, *, timeout: float = 10) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)

    def closed_within(self, seconds: float) -> bool:
        """The server closed the connection (EOF) within `seconds` (whatever it sent before)."""
        return _eof_within(self.sock, seconds)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _eof_within(sock: socket.socket, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            return False
        except OSError:  # reset, or TLS torn down
            return True
