"""The `queue` verb: `python -m kontext queue WORKFLOW.json --server URL --out DIR` (see kontext.comfy_queue)."""
from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

from .comfy_queue import (QueueError, Server, WebSocket, download, execution_error, load_workflow, patch,
                          wait)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("workflow", type=Path,
                   help="workflow JSON: API format (workflows/api/*.json) or a simple UI-format file")
    p.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI's address (default %(default)s)")
    p.add_argument("--image", action="append", default=[], type=Path,
                   help="upload and use in the n-th LoadImage node, in node-id order (repeatable)")
    p.add_argument("--prompt", action="append", default=[],
                   help="replace the n-th positive prompt, in node-id order of the samplers (repeatable)")
    p.add_argument("--seed", type=int, help="set every seed input")
    p.add_argument("--out", type=Path, required=True, help="folder for the downloaded images (created)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the result")
    p.add_argument("--previews", action="store_true", help="also download PreviewImage (temp) images")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except QueueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    url = args.server if "://" in args.server else "http://" + args.server  # "127.0.0.1:8188" is common
    server = Server(url)
    for img in args.image:
        if not img.is_file():
            raise QueueError(f"--image {img}: no such file")
    # Checked before anything is queued: a finished run must never fail on where its images go.
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QueueError(f"--out {args.out}: cannot use it as the output folder ({exc.strerror or exc})") from None
    wf = load_workflow(args.workflow, server)
    names = [server.upload_image(img) for img in args.image]
    wf = patch(wf, names, args.prompt, args.seed)
    client_id = uuid.uuid4().hex
    ws_url = server.url.replace("http", "ws", 1) + f"/ws?clientId={client_id}"
    try:
        ws = WebSocket(ws_url)
    except OSError:
        ws = None  # progress is then only polled
    try:
        reply = server.post_json("/prompt", {"prompt": wf, "client_id": client_id})
        prompt_id = reply["prompt_id"]
        print(f"queued {args.workflow.name} as {prompt_id}", file=sys.stderr)
        entry = wait(server, prompt_id, ws, args.timeout, wf)
    finally:
        if ws is not None:
            ws.close()
    problem = execution_error(entry)
    if problem:
        raise QueueError(problem)
    saved = download(server, entry, args.out, args.previews)
    for path in saved:
        print(path)
    if not saved:
        print("warning: the workflow finished but saved no images", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kontext queue", description="Run a ComfyUI workflow headless: upload, patch, queue, download.")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
