"""One raw HTTP/1.1 exchange over a socket: for what httpx does not send (request trailers) or
report (response trailers)."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field


@dataclass
class RawReply:
    status: int
    headers: dict[str, str]
    body: bytes
    trailers: dict[str, str] = field(default_factory=dict)


def _fields(block: str) -> dict[str, str]:
    lines = (t.partition(":") for t in block.split("\r\n") if t)
    return {k.strip().lower(): v.strip() for k, _, v in lines}


def chunked_request(path: str, body: bytes, trailers: dict[str, str], headers: dict[str, str],
                    pieces: int = 1) -> bytes:
    """A chunked POST of ``body`` in ``pieces`` chunks, ending with ``trailers``
    (``connection: close``)."""
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    step = max(1, -(-len(body) // pieces))
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + step]), body[i:i + step])
                      for i in range(0, len(body), step))
    tail = "".join(f"{k}: {v}\r\n" for k, v in trailers.items()).encode()
    start = (f"POST {path} HTTP/1.1\r\nhost: e2e\r\n{head}te: trailers\r\n"
             "transfer-encoding: chunked\r\nconnection: close\r\n\r\n").encode()
    return start + chunks + b"0\r\n" + tail + b"\r\n"


def raw_exchange(port: int, request: bytes, timeout: float = 5.0) -> RawReply:
    """Send ``request`` (which asks for ``connection: close``) to 127.0.0.1:``port``; the reply,
    chunked or with a content-length. A reply cut short raises (``socket.timeout`` too)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(request)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, _, header_block = head.decode("latin-1").partition("\r\n")
    headers = _fields(header_block)
    status = int(status_line.split()[1])
    if headers.get("transfer-encoding") != "chunked":
        length = int(headers.get("content-length", len(rest)))
        if len(rest) < length:
            raise ConnectionError(f"reply cut short: {len(rest)} of {length} bytes")
        return RawReply(status, headers, rest[:length])
    parts: list[bytes] = []
    while True:
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            raise ConnectionError("chunked reply cut short")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        parts.append(rest[:size])
        rest = rest[size + 2:]
    trailer_block = rest.partition(b"\r\n\r\n")[0].decode("latin-1")
    return RawReply(status, headers, b"".join(parts), _fields(trailer_block))
