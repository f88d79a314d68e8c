"""`python -m kontext queue` for a new user: bounded waits, servers that are not ComfyUI, hints that name the server
given, nothing on disk before the inputs are checked, and the exit statuses (2 mistakes and ComfyUI's errors,
3 out of memory, 130 interrupted, 0 success). Runs through kontext.cli.main, the real dispatcher."""
from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import threading
import time
from contextlib import redirect_stderr, redirect_stdout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kontext import cli

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "workflows" / "api" / "kontext_basic_edit.json"
SUCCESS = {"status_str": "success", "completed": True, "messages": []}


def queue(*argv: str) -> tuple[int, str, float]:
    """(exit status, stderr, seconds taken) of `python -m kontext queue ARGV`, run in this process."""
    err, out = io.StringIO(), io.StringIO()
    t0 = time.monotonic()
    with redirect_stderr(err), redirect_stdout(out):
        rc = cli.main(["queue", *argv])
    return rc, err.getvalue(), time.monotonic() - t0


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------------- servers

class Comfy(BaseHTTPRequestHandler):
    """Enough of ComfyUI for one run: the probe, /prompt, /history, /view; its /ws can be made to hang."""
    status: dict = SUCCESS
    hang_ws = False
    release = threading.Event()

    def log_message(self, *args):
        pass

    def reply(self, obj=None, status=200, body=None):
        data = body if body is not None else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.startswith("/object_info"):
            save_image = {"input": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {}]}}}
            return self.reply({"SaveImage": save_image})
        if self.path.startswith("/ws"):
            if Comfy.hang_ws:  # accepts the upgrade request and never answers it
                Comfy.release.wait(30)
            return self.reply({}, 404)
        if self.path.startswith("/history/p1"):
            images = [{"filename": "out.png", "subfolder": "", "type": "output"}]
            return self.reply({"p1": {"status": Comfy.status, "outputs": {"9": {"images": images}}}})
        if self.path.startswith("/view?"):
            return self.reply(body=b"\x89PNG")
        self.reply({}, 404)

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.reply({"prompt_id": "p1", "number": 0, "node_errors": {}})


class QuietServer(ThreadingHTTPServer):
    """A test server that does not print a traceback when the client hangs up mid-reply (the queue command stops
    reading a foreign server's page after its first bytes): that output would land in the stderr under test."""

    def handle_error(self, request, client_address):
        pass


def serve(handler) -> tuple[ThreadingHTTPServer, str]:
    server = QuietServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def comfy():
    Comfy.status, Comfy.hang_ws = SUCCESS, False
    Comfy.release.clear()
    server, url = serve(Comfy)
    yield url
    Comfy.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def silent_server():
    """Accepts TCP connections and never says a word."""
    sock = socket.create_server(("127.0.0.1", 0))
    held, stop = [], threading.Event()

    def accept():
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    for conn in held:
        conn.close()
    sock.close()


@pytest.fixture
def full_backlog():
    """A listening socket whose accept queue is full: a new connection attempt never completes."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(0)
    port = sock.getsockname()[1]
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    for s in fillers:
        s.close()
    sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- timeouts

@pytest.mark.parametrize("server", ["silent_server", "full_backlog"])
def test_timeout_bounds_a_server_that_never_answers(request, server, tmp_path):
    url = request.getfixturevalue(server)
    rc, err, took = queue(str(WORKFLOW), "--server", url, "--timeout", "1", "--out", str(tmp_path / "out"))
    assert rc == 2 and took < 1 + 3, (took, err)
    assert url in error_line(err)
    assert not (tmp_path / "out").exists()


def test_a_stuck_websocket_leaves_time_for_the_result(comfy, tmp_path):
    Comfy.hang_ws = True
    rc, err, took = queue(str(WORKFLOW), "--server", comfy, "--timeout", "2", "--out", str(tmp_path / "out"))
    assert rc == 0 and took < 2 + 3, (took, err)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["out.png"]


# ---------------------------------------------------------------------------------------------- other servers

HTML = (b"<!DOCTYPE html><html><head><title>Welcome to nginx!</title></head><body>" + b"<p>filler</p>" * 500
        + b"</body></html>")


def web_server(status: int, body: bytes):
    class Web(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

    return Web


@pytest.mark.parametrize("status, body", [(404, HTML), (200, HTML), (200, b'{"status": "ok"}')],
                         ids=["html_404", "html_200", "other_json_api"])
def test_a_web_server_that_is_not_comfyui_is_named_not_dumped(status, body, tmp_path):
    server, url = serve(web_server(status, body))
    try:
        rc, err, _ = queue(str(WORKFLOW), "--server", url, "--out", str(tmp_path / "out"))
    finally:
        server.shutdown()
        server.server_close()
    line = error_line(err)
    assert rc == 2 and f"{url} is not a ComfyUI server (no /object_info" in line
    assert "<" not in line and "filler" not in line and len(line) < 200
    assert not (tmp_path / "out").exists()


def test_a_service_that_does_not_speak_http_is_not_comfyui(tmp_path):
    sock = socket.create_server(("127.0.0.1", 0))

    def greet():  # what an SSH server says on connecting
        conn = sock.accept()[0]
        conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
        conn.close()

    threading.Thread(target=greet, daemon=True).start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        rc, err, _ = queue(str(WORKFLOW), "--server", url, "--out", str(tmp_path / "out"))
    finally:
        sock.close()
    assert rc == 2 and f"{url} is not a ComfyUI server" in error_line(err)


def test_unreachable_server_hint_names_the_given_server(tmp_path):
    port = free_port()
    rc, err, _ = queue(str(WORKFLOW), "--server", f"127.0.0.1:{port}", "--out", str(tmp_path / "out"))
    line = error_line(err)
    assert rc == 2 and f"cannot reach ComfyUI at http://127.0.0.1:{port}" in line
    assert f"--listen 127.0.0.1 --port {port}" in line and "8188" not in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- inputs first

@pytest.mark.parametrize("change, message", [
    ({"workflow": "missing.json"}, "no such workflow file"),
    ({"workflow": "broken.json"}, "cannot read the workflow"),
    ({"workflow": "bypassed.json"}, "is bypassed"),
    ({"image": "missing.png"}, "no such file"),
    ({"image": "two"}, "2 --image given but the workflow has 1 LoadImage"),
    ({"prompt": "three"}, "positive prompt"),
    ({"timeout": "0"}, "--timeout must be a positive number"),
    ({"seed": "-1"}, "--seed must be between 0 and"),
    ({"server": "http://127.0.0.1:99999"}, "not a server address"),
    ({"out": "a_file/sub"}, "is not a folder"),
])
def test_nothing_is_created_before_the_inputs_are_checked(tmp_path, change, message):
    """Each mistake is found before the server is contacted (there is none here) and before --out is created."""
    (tmp_path / "in.png").write_bytes(b"\x89PNG")
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "bypassed.json").write_text(json.dumps({"nodes": [{"id": 1, "type": "KontextSampler", "mode": 4}],
                                                        "links": []}))
    (tmp_path / "a_file").write_text("x")
    workflow = str(tmp_path / change["workflow"]) if "workflow" in change else str(WORKFLOW)
    out = tmp_path / change.get("out", "new/out")
    argv = [workflow, "--server", change.get("server", f"127.0.0.1:{free_port()}"), "--out", str(out)]
    images = {"missing.png": [tmp_path / "missing.png"], "two": [tmp_path / "in.png"] * 2}.get(change.get("image"), [])
    for img in images:
        argv += ["--image", str(img)]
    if change.get("prompt") == "three":
        argv += ["--prompt", "a", "--prompt", "b", "--prompt", "c"]
    for option in ("timeout", "seed"):
        if option in change:
            argv += [f"--{option}", change[option]]
    rc, err, _ = queue(*argv)
    assert rc == 2 and message in error_line(err)
    assert not (tmp_path / "new").exists() and (tmp_path / "a_file").read_text() == "x"


# ---------------------------------------------------------------------------------------------- exit statuses

def failed(event: str, **data) -> dict:
    return {"status_str": "error", "completed": False, "messages": [[event, data]]}


@pytest.mark.parametrize("status, rc, message", [
    (SUCCESS, 0, ""),
    (failed("execution_error", node_id="7", node_type="KontextSampler", exception_type="ValueError",
            exception_message="bad size"), 2, "error: the workflow failed on {url}: node 7 (KontextSampler) failed"),
    (failed("execution_error", node_id="7", node_type="KontextSampler", exception_type="torch.OutOfMemoryError",
            exception_message="CUDA out of memory"), 3, "error: ComfyUI at {url} ran out of memory"),
    (failed("execution_interrupted", node_id="7", node_type="KontextSampler"), 130,
     "interrupted at node 7 (KontextSampler) on {url}"),
], ids=["success", "comfyui_error", "out_of_memory", "interrupted_in_comfyui"])
def test_exit_status_of_a_finished_run(comfy, tmp_path, status, rc, message):
    Comfy.status = status
    got, err, _ = queue(str(WORKFLOW), "--server", comfy, "--out", str(tmp_path / "out"))
    assert got == rc and message.format(url=comfy) in err and "Traceback" not in err, err


def test_ctrl_c_while_waiting_exits_130_and_says_the_prompt_stays_queued(comfy, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("kontext.cli.queue.wait", interrupted)
    rc, err, _ = queue(str(WORKFLOW), "--server", comfy, "--out", str(tmp_path / "out"))
    assert rc == 130 and f"prompt p1 stays queued on {comfy}" in err


def test_the_real_command_exits_2_without_a_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "kontext", "queue", str(tmp_path / "missing.json"),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         check=False)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1 and not (tmp_path / "out").exists()
