"""Running a workflow on a ComfyUI server, headless: the library behind `python -m kontext queue` (cli_queue.py).

Uploads the --image files, patches the workflow's image, prompt and seed inputs, queues it over HTTP, shows progress
(ComfyUI's websocket, with polling of /history as the fallback) and downloads the saved images. Failures raise
QueueError (a KontextError: the command line prints it on one line and exits 2) with ComfyUI's own error text where
it has one. Standard library only (urllib, a minimal websocket reader): no ComfyUI import.

Accepts API-format workflows (workflows/api/*.json, or ComfyUI's "Export (API)") and simple UI-format ones, which are
converted with the server's /object_info (no bypassed nodes; reroutes are followed).
"""
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
from typing import Callable

from .comfy_ws import WebSocket
from .errors import InputError, KontextError

WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
UI_ONLY = ("Note", "MarkdownNote", "PrimitiveNode", "Reroute")
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
        reply = _json(body)
        if isinstance(reply, dict) and ("error" in reply or "node_errors" in reply):
            raise QueueError(format_prompt_error(reply))
        taste = excerpt(body)
        raise QueueError(f"{self.url}{path}: HTTP {status}" + (f" ({taste})" if taste else ""))

    def check(self) -> None:
        """Fail early, naming the server, when what answers there is not ComfyUI (a wrong port, another web app)."""
        status, body = self.answer(PROBE)
        reply = _json(body) if status < 400 else None
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
        reply = _json(body)
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


def _json(body: bytes):
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


# ---------------------------------------------------------------------------------------------- workflows

def read_workflow(path: Path) -> dict:
    """The workflow file as found (API or UI format), checked as far as it can be without a server."""
    try:
        wf = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such workflow file") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the workflow ({exc})") from None
    if is_ui_format(wf):
        for n in wf["nodes"]:
            if isinstance(n, dict) and n.get("mode", 0) == 4:
                raise InputError(f"{path}: node {n.get('id')} ({n.get('type')}) is bypassed; remove it or queue "
                                 "the API-format export")
        return wf
    if isinstance(wf, dict) and "prompt" in wf and isinstance(wf["prompt"], dict):
        wf = wf["prompt"]  # a saved /prompt request body
    if not wf or not isinstance(wf, dict) or not all(
            isinstance(v, dict) and "class_type" in v and isinstance(v.get("inputs", {}), dict) for v in wf.values()):
        raise InputError(f"{path}: not a ComfyUI workflow (API format: {{id: {{class_type, inputs}}}}; "
                         "or the UI format with nodes and links)")
    for node in wf.values():
        node.setdefault("inputs", {})
    return wf


def is_ui_format(wf) -> bool:
    return isinstance(wf, dict) and isinstance(wf.get("nodes"), list) and isinstance(wf.get("links"), list)


def to_api(wf: dict, server: Server, path: Path) -> dict:
    """An API-format workflow: as it is, or converted from the UI format with the server's /object_info."""
    if not is_ui_format(wf):
        return wf
    object_info = server.get_json("/object_info")
    try:
        return ui_to_api(wf, object_info)
    except (KeyError, IndexError, TypeError, ValueError) as exc:  # a hand-edited or newer UI file
        raise InputError(f"{path}: cannot convert this UI-format workflow ({type(exc).__name__}: {exc}); "
                         "queue ComfyUI's \"Export (API)\" of it instead") from None


def load_workflow(path: Path, server: Server) -> dict:
    return to_api(read_workflow(path), server, path)


def ui_to_api(wf: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow: links become [node, slot], widget values are matched to input names."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {l[0]: l for l in wf["links"]}

    def source(link_id):
        """What a link feeds: [node, slot] of the real output (through reroutes), a PrimitiveNode's value, or
        None for a muted node (the front end drops such links too)."""
        _, node, slot = links[link_id][:3]
        while nodes[node]["type"] == "Reroute":
            node, slot = links[nodes[node]["inputs"][0]["link"]][1:3]
        if nodes[node]["type"] == "PrimitiveNode":  # a widget promoted to its own node: its value is the input
            return ("value", (nodes[node].get("widgets_values") or [None])[0])
        if nodes[node].get("mode", 0) == 2:
            return None
        return [str(node), slot]

    out = {}
    for n in wf["nodes"]:
        if n["type"] in UI_ONLY or n.get("mode", 0) == 2:
            continue
        if n.get("mode", 0) == 4:
            raise QueueError(f"node {n['id']} ({n['type']}) is bypassed; remove it or queue the API-format export")
        info = object_info.get(n["type"])
        inputs, linked = {}, {i["name"]: i["link"] for i in n.get("inputs", []) if i.get("link") is not None}
        values = list(n.get("widgets_values") or []) if isinstance(n.get("widgets_values"), list) else []
        if info is not None:
            order = info.get("input_order") or {g: list(info["input"].get(g, {})) for g in ("required", "optional")}
            for group in ("required", "optional"):
                for name in order.get(group, []):
                    spec = info["input"][group][name]
                    typ, opts = spec[0], (spec[1] if len(spec) > 1 else {})
                    widget = (isinstance(typ, list) or typ in WIDGETS) and not opts.get("forceInput")
                    if widget and values:
                        inputs[name] = values.pop(0)
                        if typ == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
                            values = values[1:]  # the front end's "control after generate" value
                    if name in linked:
                        fed = source(linked[name])
                        if isinstance(fed, tuple):
                            inputs[name] = fed[1]
                        elif fed is not None:
                            inputs[name] = fed
                        else:
                            inputs.pop(name, None)
        out[str(n["id"])] = {"class_type": n["type"], "inputs": inputs, "_meta": {"title": n.get("title", n["type"])}}
    return out


def _ordered(wf: dict) -> list[str]:
    return sorted(wf, key=lambda k: (0, int(k)) if str(k).isdigit() else (1, str(k)))


def prompt_nodes(wf: dict) -> list[str]:
    """Ids of the positive-prompt nodes: walk up from each sampler's `positive` through conditioning nodes."""
    found = []
    for nid in _ordered(wf):
        link = wf[nid]["inputs"].get("positive")
        while isinstance(link, list) and link[0] in wf:
            node = wf[link[0]]["inputs"]
            text = next((k for k in ("prompt", "text") if isinstance(node.get(k), str)), None)
            if text:
                if link[0] not in found:
                    found.append(link[0])
                break
            link = node.get("conditioning")
    return found


def patch(wf: dict, images: list[str], prompts: list[str], seed: int | None) -> dict:
    """A copy with the i-th image/prompt put into the i-th LoadImage / positive prompt node, and every seed set."""
    wf = json.loads(json.dumps(wf))
    loaders = [k for k in _ordered(wf) if wf[k]["class_type"] == "LoadImage"]
    if len(images) > len(loaders):
        raise QueueError(f"{len(images)} --image given but the workflow has {len(loaders)} LoadImage node(s)")
    for nid, name in zip(loaders, images):
        wf[nid]["inputs"]["image"] = name
    targets = prompt_nodes(wf)
    if len(prompts) > len(targets):
        raise QueueError(f"{len(prompts)} --prompt given but the workflow has {len(targets)} positive prompt node(s)")
    for nid, text in zip(targets, prompts):
        node = wf[nid]["inputs"]
        node["prompt" if "prompt" in node else "text"] = text
    if seed is not None:
        for nid in wf:
            for key in ("seed", "noise_seed"):
                if key in wf[nid]["inputs"] and not isinstance(wf[nid]["inputs"][key], list):
                    wf[nid]["inputs"][key] = seed
    return wf


# ---------------------------------------------------------------------------------------------- running

def wait(server: Server, prompt_id: str, ws: WebSocket | None, timeout: float, wf: dict,
         on_progress: Callable[[str], None] | None = None) -> dict:
    """Wait until the prompt is in the history; returns its history entry. Bounded by `timeout` and by the server's
    deadline, whichever comes first. `on_progress(line)` gets a one-line status per ComfyUI progress message, and ""
    when the prompt has finished (the command line draws them on stderr)."""
    report = on_progress or (lambda line: None)
    deadline = time.monotonic() + timeout
    if server.deadline is not None:
        deadline = min(deadline, server.deadline)
    last_poll = 0.0
    while (left := deadline - time.monotonic()) > 0:
        if time.monotonic() - last_poll >= 1.0:
            last_poll = time.monotonic()
            history = server.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id) if isinstance(history, dict) else None
            if entry:  # ComfyUI files a prompt in the history once it has finished, either way
                report("")
                return entry
        left = deadline - time.monotonic()
        if ws is not None and left > 0:
            try:
                msg = ws.recv_text(min(1.0, left))
            except OSError:  # a dropped or stalled websocket: progress is then only polled
                ws, msg = None, None
            line = progress_line(msg, prompt_id, wf) if msg else None
            if line:
                report(line)
        elif left > 0:
            time.sleep(min(0.5, left))
    raise QueueError(f"prompt {prompt_id} did not finish within {server.budget or timeout:g} s "
                     f"(still queued or running on {server.url})")


def progress_line(text: str, prompt_id: str, wf: dict) -> str | None:
    """A websocket message of this prompt as a one-line status ("[7 KontextSampler] step 3/28"), else None."""
    msg = _json(text.encode())
    if not isinstance(msg, dict):
        return None  # not one of ComfyUI's messages: nothing to show
    data = msg.get("data") if isinstance(msg.get("data"), dict) else {}
    if data.get("prompt_id") not in (None, prompt_id):
        return None
    node = data.get("node")
    label = f"{node} {wf.get(str(node), {}).get('class_type', '')}".strip() if node else ""
    if msg.get("type") == "progress":
        return f"[{label}] step {data.get('value')}/{data.get('max')}"
    if msg.get("type") == "executing" and node:
        return f"[{label}] running"
    return None


def failure(entry: dict) -> tuple[str, dict] | None:
    """The history entry's execution_error or execution_interrupted event, as (event, data)."""
    for item in entry.get("status", {}).get("messages", []):
        if isinstance(item, list) and len(item) == 2 and item[0] in ("execution_error", "execution_interrupted"):
            return item[0], item[1] if isinstance(item[1], dict) else {}
    return None


def execution_error(entry: dict) -> str | None:
    found = failure(entry)
    if found:
        event, data = found
        if event == "execution_error":
            return (f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                    f"{data.get('exception_type', 'error')}: {str(data.get('exception_message', '')).strip()}")
        return f"interrupted at node {data.get('node_id')} ({data.get('node_type')})"
    if entry.get("status", {}).get("status_str") == "error":
        return "execution failed (no details in the history)"
    return None


def ran_out_of_memory(entry: dict) -> bool:
    """torch.OutOfMemoryError (ComfyUI names it with its module) or a plain MemoryError on the server."""
    found = failure(entry)
    kind = str(found[1].get("exception_type", "")) if found and found[0] == "execution_error" else ""
    return kind.rsplit(".", 1)[-1] in ("OutOfMemoryError", "MemoryError")


def was_interrupted(entry: dict) -> bool:
    found = failure(entry)
    return found is not None and found[0] == "execution_interrupted"


def download(server: Server, entry: dict, out: Path, previews: bool) -> list[Path]:
    saved = []
    for node_id, output in sorted(entry.get("outputs", {}).items()):
        for img in output.get("images", []):
            if img.get("type") != "output" and not previews:
                continue
            name = Path(str(img.get("filename", ""))).name  # never a path from the server: it stays under out
            if not name:
                continue
            query = urllib.parse.urlencode({k: img.get(k, "") for k in ("filename", "subfolder", "type")})
            target = out / name
            for i in range(1, 10000):
                if not target.exists():
                    break
                target = out / f"{Path(name).stem}_{i}{Path(name).suffix}"
            data = server.request(f"/view?{query}")
            try:
                target.write_bytes(data)
            except OSError as exc:
                raise KontextError(f"cannot write {target} ({exc.strerror or exc})") from None
            saved.append(target)
    return saved
