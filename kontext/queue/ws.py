"""A minimal WebSocket client (RFC 6455, standard library only) for ComfyUI's progress messages."""
from __future__ import annotations

import base64
import hashlib
import os
import select
import socket
import time
import urllib.parse


class WebSocket:
    """Just enough of RFC 6455 to read ComfyUI's progress messages (text frames; binary previews are skipped)."""

    def __init__(self, url: str, timeout: float = 10.0):
        """Connect and shake hands within `timeout` seconds in all; later reads of a frame wait at most that long
        for each chunk. Failures are OSError (TimeoutError included)."""
        u = urllib.parse.urlparse(url)
        deadline = time.monotonic() + timeout
        self.buf, self.binary_frames = b"", 0
        self.sock = socket.create_connection((u.hostname, u.port or (443 if u.scheme == "wss" else 80)), timeout)
        try:
            if u.scheme == "wss":
                import ssl

                self.sock = ssl.create_default_context().wrap_socket(self.sock, server_hostname=u.hostname)
            self._handshake(u, deadline)
        except BaseException:
            self.close()
            raise
        self.sock.settimeout(timeout)

    def _handshake(self, u: urllib.parse.ParseResult, deadline: float) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {u.path}?{u.query} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            left = deadline - time.monotonic()
            if left <= 0:  # a server trickling bytes must not hold us past the timeout either
                raise TimeoutError("websocket handshake: no complete answer in time")
            if len(head) > 65536:
                raise OSError("websocket handshake: not an HTTP answer")
            self.sock.settimeout(left)
            chunk = self.sock.recv(4096)
            if not chunk:
                raise OSError("websocket handshake: connection closed")
            head += chunk
        head, self.buf = head.split(b"\r\n\r\n", 1)
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        if b" 101 " not in head.split(b"\r\n", 1)[0] or accept not in head:
            raise OSError("websocket handshake refused")

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("websocket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = self._read(2)
        n = b1 & 0x7F
        n = int.from_bytes(self._read(2 if n == 126 else 8), "big") if n >= 126 else n
        mask = self._read(4) if b1 & 0x80 else None  # servers do not mask; tolerate it anyway
        data = self._read(n)
        if mask:
            data = bytes(c ^ mask[i % 4] for i, c in enumerate(data))
        return bool(b0 & 0x80), b0 & 0x0F, data

    def recv_text(self, wait: float) -> str | None:
        """The next text message, or None if none starts within `wait` seconds."""
        message, kind, deadline = b"", 1, time.monotonic() + wait
        while True:
            if not self.buf and not message and not select.select(
                    [self.sock], [], [], max(0.0, deadline - time.monotonic()))[0]:
                return None
            fin, opcode, data = self._frame()
            if opcode == 8:
                raise OSError("websocket closed by the server")
            if opcode == 9:  # ping: answer with a pong (masked, as clients must)
                self.sock.sendall(bytes([0x8A, 0x80 | len(data)]) + b"\0\0\0\0" + data)
                continue
            if opcode in (1, 2):
                message, kind = b"", opcode
            if opcode in (0, 1, 2):
                message += data
                if fin and kind == 2:
                    self.binary_frames += 1  # ComfyUI's live previews (JPEG): counted, not shown
                    message = b""
                elif fin:
                    return message.decode(errors="replace")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
