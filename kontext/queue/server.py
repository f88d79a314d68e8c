"""A ComfyUI server over HTTP: its address, requests with a deadline, the ComfyUI probe, image uploads, and
ComfyUI's own error texts. Failures raise QueueError (a KontextError: the command line prints it on one line and
exits 2)."""
from __future__ import annotations

import html
import http.client
import json
import mimetypes
import re
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from ..errors import InputError

REQUEST_TIMEOUT = 60.0  # seconds one HTTP request may wait for an answer, whatever the overall timeout
PROBE = "/object_info/SaveImage"  # small, and only ComfyUI answers it with {"SaveImage": {...}}


class QueueError(InputError):
    """A failure to report to the user (the message says what happened, in ComfyUI's words where it has them)."""


# ---------------------------------------------------------------------------------------------- HTTP

def server_url(text: str) -> str:
    """--server as a base URL: "127.0.0.1:8188" (common) gets http://; anything unusable is an InputError."""
    url = (text if "://" in text else "http://" + text).rstrip("/")
    u = urllib.parse.urlsplit(url)
    try:
        port = u.port
    except ValueError:
        port = -1
    if u.scheme not in ("http", "https") or not u.hostname or port == -1 or u.query or u.fragment:
        raise InputError(f"--server {text}: not a server address (expected something like http://127.0.0.1:8188)")
    return url


def excerpt(body: bytes, limit: int = 80) -> str:
    """A short, one-line taste of a non-ComfyUI answer: an HTML page's title, else its first words; never the body."""
    text = body[:4096].decode(errors="replace")
    title = re.search(r"<title[^>]*>(.*?)</title>", text, re.I | re.S)
    if title:
        text = title.group(1)
    elif text.lstrip().startswith("<"):
        text = re.sub(r"<[^>]*>", " ", text)
    text = " ".join(html.unescape(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Server:
    """ComfyUI's HTTP API. `timeout` bounds each request; `deadline` (time.monotonic()), when set, bounds them all."""

    def __init__(self, url: str, timeout: float = REQUEST_TIMEOUT):
        self.url, self.timeout = url.rstrip("/"), timeout
        self.deadline: float | None = None
        self.budget = 0.0  # the seconds the deadline was set to, for messages

    def set_deadline(self, seconds: float | None) -> None:
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self.budget = seconds or 0.0

    def time_left(self) -> float:
        """Seconds a request may wait now: the per-request timeout, or less once the deadline is near."""
        if self.deadline is None:
            return self.timeout
        return min(self.timeout, self.deadline - time.monotonic())

    def answer(self, path: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
        """(HTTP status, body) of any HTTP answer; QueueError naming the server if there is none in time."""
        method = "POST" if data is not None else "GET"
        wait = self.time_left()
        limit = f"{self.timeout:g} s" if wait >= self.timeout else f"the --timeout of {self.budget:g} s"
        if wait <= 0:
            raise QueueError(f"gave up on {self.url}: {limit} ran out before {method} {path}")
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {}, method=method)
        try:
            try:
                with urllib.request.urlopen(req, timeout=wait) as resp:
                    return resp.status, resp.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read()
        except OSError as exc:  # URLError, TimeoutError, ConnectionRefusedError, ...
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError):
                raise QueueError(f"no answer from {self.url} within {limit} ({method} {path}); "
                                 "is the server stuck, or --timeout too short?") from None
            raise QueueError(f"cannot reach ComfyUI at {self.url} ({reason}); {self.start_hint()}") from None
        except http.client.HTTPException as exc:  # not an HTTP server at all (another service on that port)
            raise QueueError(f"{self.url} is not a ComfyUI server (no HTTP answer: {type(exc).__name__})") from None

    def start_hint(self) -> str:
        """How to start ComfyUI where --server points (not always the default 127.0.0.1:8188)."""
        u = urllib.parse.urlsplit(self.url)
        port = u.port or (443 if u.scheme == "https" else 80)
        return f"is the server running (python main.py --listen {u.hostname} --port {port})?"

    def request(self, path: str, data: bytes | None = None, headers: dict | None = None) -> bytes:
        status, body = self.answer(path, data, headers)
        if status < 400:
            return body
        reply = parse_json(body)
        if isinstance(reply, dict) and ("error" in reply or "node_errors" in reply):
            raise QueueError(format_prompt_error(reply))
        taste = excerpt(body)
        raise QueueError(f"{self.url}{path}: HTTP {status}" + (f" ({taste})" if taste else ""))

    def check(self) -> None:
        """Fail early, naming the server, when what answers there is not ComfyUI (a wrong port, another web app)."""
        status, body = self.answer(PROBE)
        reply = parse_json(body) if status < 400 else None
        if status in (401, 403):
            raise QueueError(f"{self.url} refused access (HTTP {status} for /object_info): a server behind a login "
                             "is not supported")
        if not (isinstance(reply, dict) and "SaveImage" in reply):
            taste = excerpt(body)
            what = f"HTTP {status}" if status >= 400 else "not ComfyUI's answer"
            raise QueueError(f"{self.url} is not a ComfyUI server (no /object_info: {what}"
                             + (f", {taste!r})" if taste else ")"))

    def get_json(self, path: str):
        return self._decode(path, self.request(path))

    def post_json(self, path: str, obj) -> dict:
        return self._decode(path, self.request(path, json.dumps(obj).encode(),
                                               {"Content-Type": "application/json"}) or b"{}")

    def _decode(self, path: str, body: bytes):
        reply = parse_json(body)
        if reply is None:
            raise QueueError(f"{self.url}{path} did not answer in JSON ({excerpt(body) or 'empty'}); "
                             f"is {self.url} a ComfyUI server?")
        return reply

    def upload_image(self, path: Path) -> str:
        """Upload to ComfyUI's input folder; returns the name to use (ComfyUI renames on a clash)."""
        boundary = uuid.uuid4().hex
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
                 f"Content-Type: {mime}\r\n\r\n".encode() + path.read_bytes() + b"\r\n"]
        for k, v in (("type", "input"), ("overwrite", "false")):
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        reply = self._decode("/upload/image", self.request("/upload/image", body, headers))
        if not isinstance(reply, dict) or not isinstance(reply.get("name"), str):
            raise QueueError(f"{self.url}/upload/image: unexpected answer uploading {path.name}")
        return f"{reply['subfolder']}/{reply['name']}" if reply.get("subfolder") else reply["name"]


def parse_json(body: bytes):
    """The parsed body, or None when it is not JSON (an HTML error page, an empty answer)."""
    try:
        return json.loads(body)
    except ValueError:
        return None


def format_prompt_error(reply: dict) -> str:
    """ComfyUI's /prompt rejection ({"error": {...}, "node_errors": {...}}) as readable lines."""
    err = reply.get("error", reply)
    lines = [err.get("message", "prompt rejected") if isinstance(err, dict) else str(err)]
    if isinstance(err, dict) and err.get("details"):
        lines[0] += f": {err['details']}"
    node_errors = reply.get("node_errors")
    for node_id, info in (node_errors.items() if isinstance(node_errors, dict) else ()):
        for e in info.get("errors", []) if isinstance(info, dict) else ():
            lines.append(f"  node {node_id} ({info.get('class_type', '?')}): {e.get('message')}: {e.get('details')}")
    return "\n".join(lines)
