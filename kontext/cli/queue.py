"""The `queue` verb: `python -m kontext queue WORKFLOW.json --server URL --out DIR` (see kontext.queue).

Every input (the workflow file, the images, the options, --out) is checked before the server is contacted, and
nothing is written to disk before the server has been found to be ComfyUI. Mistakes and server-side failures raise
KontextErrors, which the dispatcher (kontext.cli.common) prints as one "error: ..." line with exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import uuid
from pathlib import Path

from ..errors import InputError
from ..queue import (REQUEST_TIMEOUT, QueueError, Server, WebSocket, download, execution_error, is_ui_format, patch,
                     ran_out_of_memory, read_workflow, server_url, to_api, wait, was_interrupted)

SEED_LIMIT = 2**64  # ComfyUI's seed inputs take 0 .. 2**64 - 1


def add_parser(sub) -> None:
    p = sub.add_parser("queue", help="queue a workflow on a ComfyUI server and download its images")
    p.add_argument("workflow", type=Path,
                   help="workflow JSON: API format (workflows/api/*.json) or a simple UI-format file")
    p.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI's address (default %(default)s)")
    p.add_argument("--image", action="append", default=[], type=Path,
                   help="upload and use in the n-th LoadImage node, in node-id order (repeatable)")
    p.add_argument("--prompt", action="append", default=[],
                   help="replace the n-th positive prompt, in node-id order of the samplers (repeatable)")
    p.add_argument("--seed", type=int, help="set every seed input")
    p.add_argument("--out", type=Path, required=True, help="folder for the downloaded images (created)")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds to wait for the result, from the first request on (default %(default)g); each "
                        f"request waits at most this long for an answer, and at most {REQUEST_TIMEOUT:g} s")
    p.add_argument("--previews", action="store_true", help="also download PreviewImage (temp) images")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    url = server_url(args.server)
    check_options(args)
    wf = read_workflow(args.workflow)
    ui = is_ui_format(wf)
    if not ui:  # the counts of --image and --prompt can be checked before the server is asked
        check_counts(wf, args)
    server = Server(url, min(args.timeout, REQUEST_TIMEOUT))
    server.set_deadline(args.timeout)
    server.check()
    if ui:
        wf = to_api(wf, server, args.workflow)
        check_counts(wf, args)
    names = [server.upload_image(img) for img in args.image]
    wf = patch(wf, names, args.prompt, args.seed)
    make_out(args.out)  # only now: a mistake found above leaves nothing behind on disk
    entry = queue_and_wait(server, wf, args)
    server.set_deadline(None)  # the result exists: fetching its images gets the per-request timeout, not the rest
    status = report_failure(entry, server)
    if status:
        return status
    saved = download(server, entry, args.out, args.previews)
    for path in saved:
        print(path)
    if not saved:
        print("warning: the workflow finished but saved no images", file=sys.stderr)
    return 0


def check_options(args: argparse.Namespace) -> None:
    if not args.timeout > 0:  # also refuses nan
        raise InputError(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
    if args.seed is not None and not 0 <= args.seed < SEED_LIMIT:
        raise InputError(f"--seed must be between 0 and {SEED_LIMIT - 1}, got {args.seed}")
    for img in args.image:
        if not img.exists():
            raise InputError(f"--image {img}: no such file")
        if not img.is_file() or not os.access(img, os.R_OK):
            raise InputError(f"--image {img}: not a readable file")
    check_out(args.out)


def check_out(out: Path) -> None:
    """--out must be a folder, or creatable as one; it is created only once everything else has been checked."""
    if out.exists():
        if not out.is_dir():
            raise InputError(f"--out {out}: exists and is not a folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise InputError(f"--out {out}: the folder is not writable")
        return
    above = out.absolute().parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise InputError(f"--out {out}: cannot create it, {above} is not a folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: cannot create it, {above} is not writable")


def check_counts(wf: dict, args: argparse.Namespace) -> None:
    """Too many --image or --prompt for the workflow: found by a trial patch, before anything is uploaded."""
    patch(wf, [img.name for img in args.image], args.prompt, args.seed)


def make_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out {out}: cannot use it as the output folder ({exc.strerror or exc})") from None


def open_progress(server: Server, client_id: str) -> WebSocket | None:
    """ComfyUI's progress messages, if its websocket answers. They are optional, so the handshake gets at most half
    the time left: a server whose websocket hangs still leaves the rest for polling the result."""
    ws_url = server.url.replace("http", "ws", 1) + f"/ws?clientId={client_id}"
    try:
        return WebSocket(ws_url, timeout=max(0.1, server.time_left() / 2))
    except OSError:
        return None  # progress is then only polled


def draw_progress(line: str) -> None:
    """One status line on stderr, redrawn in place; a newline when the prompt has finished."""
    sys.stderr.write(f"\r{line}".ljust(73) if line else "\n")
    sys.stderr.flush()


def queue_and_wait(server: Server, wf: dict, args: argparse.Namespace) -> dict:
    """Queue the patched workflow and return its history entry once ComfyUI has finished it."""
    client_id = uuid.uuid4().hex
    ws = open_progress(server, client_id)
    prompt_id = None
    try:
        reply = server.post_json("/prompt", {"prompt": wf, "client_id": client_id})
        prompt_id = reply.get("prompt_id") if isinstance(reply, dict) else None
        if not prompt_id:
            raise QueueError(f"{server.url}/prompt: the answer names no prompt_id; is it a ComfyUI server?")
        print(f"queued {args.workflow.name} as {prompt_id}", file=sys.stderr)
        return wait(server, prompt_id, ws, args.timeout, wf, on_progress=draw_progress)
    except KeyboardInterrupt:
        if prompt_id:  # stopping here does not stop the server
            print(f"\nprompt {prompt_id} stays queued on {server.url}; cancel it there if it is not wanted",
                  file=sys.stderr)
        raise
    finally:
        if ws is not None:
            ws.close()


def report_failure(entry: dict, server: Server) -> int:
    """0 for a run that succeeded; else the exit status, with ComfyUI's reason printed or raised."""
    problem = execution_error(entry)
    if problem is None:
        return 0
    if ran_out_of_memory(entry):
        print(f"error: ComfyUI at {server.url} ran out of memory: {problem}", file=sys.stderr)
        return 3
    if was_interrupted(entry):  # someone pressed Cancel in ComfyUI, or another client interrupted it
        print(f"{problem} on {server.url}", file=sys.stderr)
        return 130
    raise QueueError(f"the workflow failed on {server.url}: {problem}")
