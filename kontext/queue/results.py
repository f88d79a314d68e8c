"""A queued prompt: waiting for it (ComfyUI's websocket for progress, /history polled as the fallback), reading
its failure from the history entry, and downloading the images it saved."""
from __future__ import annotations

import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from ..errors import KontextError
from .server import QueueError, Server, parse_json
from .ws import WebSocket


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
    msg = parse_json(text.encode())
    if not isinstance(msg, dict):
        return None  # not one of ComfyUI's messages: nothing to show
    data: dict = msg["data"] if isinstance(msg.get("data"), dict) else {}
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
