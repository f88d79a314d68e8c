"""Running a workflow on a ComfyUI server, headless: the library behind `python -m kontext queue`.

Uploads the --image files, patches the workflow's image, prompt and seed inputs, queues it over HTTP, shows progress
(ComfyUI's websocket, with polling of /history as the fallback) and downloads the saved images. Failures raise
QueueError (a KontextError: the command line prints it on one line and exits 2) with ComfyUI's own error text where
it has one. Standard library only (urllib, a minimal websocket reader): no ComfyUI import, and no engine import, so
that the client runs where torch is not installed.

Accepts API-format workflows (workflows/api/*.json, or ComfyUI's "Export (API)") and simple UI-format ones, which are
converted with the server's /object_info (no bypassed nodes; reroutes are followed).

Modules: `server` (HTTP), `workflow` (files, UI -> API, patching), `results` (waiting, failures, downloads), `ws`
(the websocket reader).
"""
from __future__ import annotations

from .results import download, execution_error, progress_line, ran_out_of_memory, wait, was_interrupted
from .server import REQUEST_TIMEOUT, QueueError, Server, format_prompt_error, server_url
from .workflow import is_ui_format, load_workflow, patch, prompt_nodes, read_workflow, to_api, ui_to_api
from .ws import WebSocket

__all__ = ["REQUEST_TIMEOUT", "QueueError", "Server", "WebSocket", "download", "execution_error",
           "format_prompt_error", "is_ui_format", "load_workflow", "patch", "progress_line", "prompt_nodes",
           "ran_out_of_memory", "read_workflow", "server_url", "to_api", "ui_to_api", "wait", "was_interrupted"]
