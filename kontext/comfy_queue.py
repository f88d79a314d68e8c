"""Running a workflow on a ComfyUI server, headless: the library behind `python -m kontext queue` (cli_queue.py).

Uploads the --image files, patches the workflow's image, prompt and seed inputs, queues it over HTTP, shows progress
(ComfyUI's websocket, with polling of /history as the fallback) and downloads the saved images. On failure it prints
ComfyUI's own error text and exits 1. Standard library only (urllib, a minimal websocket reader): no ComfyUI import.

Accepts API-format workflows (workflows/api/*.json, or ComfyUI's "Export (API)") and simple UI-format ones, which are
converted with the server's /object_info (no bypassed nodes; reroutes are followed).
"""
from __future__ import annotations

import json
import mimetypes
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from .comfy_ws import WebSocket

WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
UI_ONLY = ("Note", "MarkdownNote", "PrimitiveNode", "Reroute")


class QueueError(Exception):
    """A failure to report to the user (the message says what happened, in ComfyUI's words where it has them)."""


# ---------------------------------------------------------------------------------------------- HTTP

class Server:
    def __init__(self, url: str, timeout: float = 60.0):
        self.url, self.timeout = url.rstrip("/"), timeout

    def request(self, path: str, data: bytes | None = None, headers: dict | None = None) -> bytes:
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {},
                                     method="POST" if data is not None else "GET")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            body = exc.read()
            try:
                reply = json.loads(body)
            except ValueError:
                reply = None
            if isinstance(reply, dict) and ("error" in reply or "node_errors" in reply):
                raise QueueError(format_prompt_error(reply)) from None
            raise QueueError(f"{self.url}{path}: HTTP {exc.code} {body[:300].decode(errors='replace')}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise QueueError(f"cannot reach ComfyUI at {self.url} ({reason}); is the server running "
                             "(python main.py --listen 127.0.0.1 --port 8188)?") from None

    def get_json(self, path: str):
        return json.loads(self.request(path))

    def post_json(self, path: str, obj) -> dict:
        return json.loads(self.request(path, json.dumps(obj).encode(), {"Content-Type": "application/json"}) or b"{}")

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
        reply = json.loads(self.request("/upload/image", body, headers))
        return f"{reply['subfolder']}/{reply['name']}" if reply.get("subfolder") else reply["name"]


def format_prompt_error(reply: dict) -> str:
    """ComfyUI's /prompt rejection ({"error": {...}, "node_errors": {...}}) as readable lines."""
    err = reply.get("error", reply)
    lines = [err.get("message", "prompt rejected") if isinstance(err, dict) else str(err)]
    if isinstance(err, dict) and err.get("details"):
        lines[0] += f": {err['details']}"
    for node_id, info in (reply.get("node_errors") or {}).items():
        for e in info.get("errors", []):
            lines.append(f"  node {node_id} ({info.get('class_type', '?')}): {e.get('message')}: {e.get('details')}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- workflows

def load_workflow(path: Path, server: Server) -> dict:
    try:
        wf = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise QueueError(f"{path}: cannot read the workflow ({exc})") from None
    if isinstance(wf, dict) and "nodes" in wf and "links" in wf:
        return ui_to_api(wf, server.get_json("/object_info"))
    if isinstance(wf, dict) and "prompt" in wf and isinstance(wf["prompt"], dict):
        wf = wf["prompt"]  # a saved /prompt request body
    if not isinstance(wf, dict) or not all(isinstance(v, dict) and "class_type" in v for v in wf.values()):
        raise QueueError(f"{path}: not a ComfyUI workflow (API format: {{id: {{class_type, inputs}}}}; "
                         "or the UI format with nodes and links)")
    return wf


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

def wait(server: Server, prompt_id: str, ws: WebSocket | None, timeout: float, wf: dict) -> dict:
    """Show progress until the prompt is in the history; returns its history entry."""
    deadline, last_poll = time.monotonic() + timeout, 0.0
    while time.monotonic() < deadline:
        if ws is not None:
            try:
                msg = ws.recv_text(1.0)
            except OSError:
                ws = None
                msg = None
            if msg:
                show_progress(json.loads(msg), prompt_id, wf)
        else:
            time.sleep(0.5)
        if time.monotonic() - last_poll > 1.0:
            last_poll = time.monotonic()
            entry = server.get_json(f"/history/{prompt_id}").get(prompt_id)
            if entry:  # ComfyUI files a prompt in the history once it has finished, either way
                sys.stderr.write("\n")
                return entry
    raise QueueError(f"prompt {prompt_id} did not finish within {timeout:.0f} s (still queued or running)")


def show_progress(msg: dict, prompt_id: str, wf: dict) -> None:
    data = msg.get("data") or {}
    if data.get("prompt_id") not in (None, prompt_id):
        return
    node = data.get("node")
    label = f"{node} {wf.get(str(node), {}).get('class_type', '')}".strip() if node else ""
    if msg.get("type") == "progress":
        sys.stderr.write(f"\r[{label}] step {data['value']}/{data['max']}".ljust(72))
    elif msg.get("type") == "executing" and node:
        sys.stderr.write(f"\r[{label}] running".ljust(72))
    sys.stderr.flush()


def execution_error(entry: dict) -> str | None:
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_error":
            return (f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                    f"{data.get('exception_type', 'error')}: {str(data.get('exception_message', '')).strip()}")
        if event == "execution_interrupted":
            return f"interrupted at node {data.get('node_id')} ({data.get('node_type')})"
    if entry.get("status", {}).get("status_str") == "error":
        return "execution failed (no details in the history)"
    return None


def download(server: Server, entry: dict, out: Path, previews: bool) -> list[Path]:
    saved = []
    for node_id, output in sorted(entry.get("outputs", {}).items()):
        for img in output.get("images", []):
            if img.get("type") != "output" and not previews:
                continue
            query = urllib.parse.urlencode({k: img.get(k, "") for k in ("filename", "subfolder", "type")})
            target = out / img["filename"]
            for i in range(1, 10000):
                if not target.exists():
                    break
                target = out / f"{Path(img['filename']).stem}_{i}{Path(img['filename']).suffix}"
            target.write_bytes(server.request(f"/view?{query}"))
            saved.append(target)
    return saved
