"""The bundled workflows (UI and API formats) and the `queue` command, against the node classes and a fake server."""
from __future__ import annotations

import importlib.util
import io
import json
import sys
import threading
from contextlib import redirect_stderr
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kontext import cli
from kontext import queue as comfy_queue

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
sys.path.insert(0, str(ROOT))
from nodes import NODE_CLASS_MAPPINGS  # noqa: E402

UI_ONLY = {"MarkdownNote"}
RELEASE_FILES = {"flux1-dev-kontext_fp8_scaled.safetensors", "ae.safetensors", "clip_l.safetensors",
                 "t5xxl_fp16.safetensors"}
KINDS = ("basic_edit", "two_references", "iterative_edit", "style_reference", "text_to_image", "ksampler")
UI_FILES = sorted(WORKFLOWS.glob("*.json"))


def _generator():
    spec = importlib.util.spec_from_file_location("kontext_workflow_generator", WORKFLOWS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


GENERATOR = _generator()
CORE = GENERATOR.CORE  # ComfyUI's own nodes the workflows use, as ComfyUI defines them (test_comfyui.py checks it)
CORE_TYPES = set(CORE) | UI_ONLY


def input_types(node_type: str) -> dict:
    return CORE[node_type][0] if node_type in CORE else NODE_CLASS_MAPPINGS[node_type].INPUT_TYPES()


def output_types(node_type: str) -> tuple[str, ...]:
    if node_type in CORE:
        return tuple(t for _, t in CORE[node_type][1])
    return NODE_CLASS_MAPPINGS[node_type].RETURN_TYPES


def object_info() -> dict:
    """What ComfyUI's /object_info says about the node types the workflows use (ours from the classes)."""
    info = {}
    for name in [*NODE_CLASS_MAPPINGS, *CORE]:
        inputs = input_types(name)
        info[name] = {"input": inputs, "input_order": {g: list(inputs.get(g, {})) for g in ("required", "optional")}}
    return json.loads(json.dumps(info))  # as it arrives over HTTP: tuples become lists


def widget_inputs(node_type: str) -> list[tuple[str, object, dict]]:
    spec = input_types(node_type)
    out = []
    for group in ("required", "optional"):
        for name, (typ, *opts) in spec.get(group, {}).items():
            if isinstance(typ, list) or typ in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                out.append((name, typ, opts[0] if opts else {}))
    return out


def socket_inputs(node_type: str) -> list[tuple[str, str]]:
    spec = input_types(node_type)
    return [(n, t) for g in ("required", "optional") for n, (t, *_) in spec.get(g, {}).items()
            if not (isinstance(t, list) or t in ("INT", "FLOAT", "STRING", "BOOLEAN"))]


# ---------------------------------------------------------------------------------------------- the files

def test_files_are_generated_and_up_to_date():
    rendered = GENERATOR.render()
    assert rendered, "no workflows described"
    for path, text in rendered.items():
        assert path.exists(), f"{path} missing: run python workflows/generate.py"
        assert path.read_text() == text, f"{path} is stale: run python workflows/generate.py"


def test_every_kind_of_workflow_is_there_in_both_formats():
    names = {p.stem for p in UI_FILES}
    for kind in KINDS:
        assert f"kontext_{kind}" in names
    assert names == {p.stem for p in (WORKFLOWS / "api").glob("*.json")}
    assert names == {p.stem for p in WORKFLOWS.glob("*.jpg")}  # the template browser's thumbnails


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_links_are_consistent(path):
    wf = json.loads(path.read_text())
    assert wf["version"] == 0.4
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]) and wf["last_node_id"] >= max(nodes)
    links = {l[0]: l for l in wf["links"]}
    assert len(links) == len(wf["links"]) and wf["last_link_id"] >= max(links)
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert link_id in out["links"] and inp["link"] == link_id
        assert typ == out["type"] and typ in inp["type"].split(","), (link_id, typ, inp["type"])
    for n in wf["nodes"]:
        for inp in n["inputs"]:
            assert inp["link"] is None or links[inp["link"]][3] == n["id"]
        for slot, out in enumerate(n["outputs"]):
            for link_id in out["links"] or []:
                assert links[link_id][1:3] == [n["id"], slot]
        assert {"id", "type", "pos", "size", "inputs", "outputs", "widgets_values", "mode", "order"} <= set(n)


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_nodes_and_widgets_match_our_inputs(path):
    wf = json.loads(path.read_text())
    for n in wf["nodes"]:
        assert n["type"] in NODE_CLASS_MAPPINGS or n["type"] in CORE_TYPES, n["type"]
        if n["type"] in UI_ONLY:
            continue
        assert [(i["name"], i["type"]) for i in n["inputs"]] == socket_inputs(n["type"])
        assert [(o["name"], o["type"]) for o in n["outputs"]] == (
            list(CORE[n["type"]][1]) if n["type"] in CORE else
            list(zip(getattr(NODE_CLASS_MAPPINGS[n["type"]], "RETURN_NAMES", None) or
                     NODE_CLASS_MAPPINGS[n["type"]].RETURN_TYPES, NODE_CLASS_MAPPINGS[n["type"]].RETURN_TYPES)))
        values = list(n["widgets_values"])
        for name, typ, opts in widget_inputs(n["type"]):
            value = values.pop(0)
            where = f"{path.stem} node {n['id']} {n['type']}.{name}={value!r}"
            if isinstance(typ, list):
                assert value in typ or value in RELEASE_FILES, where  # model lists depend on the machine
            elif typ == "INT":
                assert isinstance(value, int) and opts["min"] <= value <= opts["max"], where
                if opts.get("control_after_generate"):
                    assert values.pop(0) in ("fixed", "increment", "decrement", "randomize"), where
            elif typ == "FLOAT":
                assert isinstance(value, (int, float)) and opts["min"] <= value <= opts["max"], where
            elif typ == "STRING":
                assert isinstance(value, str), where
        if n["type"] in CORE:
            assert values == CORE[n["type"]][2], f"{path.stem} node {n['id']}: UI-only widget values {values}"
            values = []
        assert values == [], f"{path.stem} node {n['id']}: extra widget values {values}"


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_api_twin_is_the_ui_workflow_converted(path):
    ui = json.loads(path.read_text())
    api = json.loads((WORKFLOWS / "api" / path.name).read_text())
    converted = comfy_queue.ui_to_api(ui, object_info())
    strip = lambda wf: {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in wf.items()}  # noqa
    assert strip(converted) == strip(api)
    assert {n["type"] for n in ui["nodes"]} - UI_ONLY == {v["class_type"] for v in api.values()}


@pytest.mark.parametrize("path", sorted((WORKFLOWS / "api").glob("*.json")), ids=lambda p: p.stem)
def test_api_workflow_is_complete(path):
    api = json.loads(path.read_text())
    named = set()
    for node_id, node in api.items():
        assert node["class_type"] in NODE_CLASS_MAPPINGS or node["class_type"] in CORE
        sockets = dict(socket_inputs(node["class_type"]))
        for name, value in node["inputs"].items():
            if isinstance(value, list):  # a link: [source id, output slot], of the type the input takes
                outputs = output_types(api[value[0]]["class_type"])
                assert 0 <= value[1] < len(outputs) and outputs[value[1]] in sockets[name].split(","), (node_id, name)
            elif isinstance(value, str) and value.endswith(".safetensors"):
                named.add(value)
        assert set(input_types(node["class_type"])["required"]) <= set(node["inputs"]), node_id
    assert named <= RELEASE_FILES
    types = {n["class_type"] for n in api.values()}
    assert "SaveImage" in types and types & {"KontextSampler", "KSampler"}
    if "text_to_image" not in path.stem:
        assert "LoadImage" in types and types & {"KontextReferenceImage", "ReferenceLatent"}


def test_ksampler_workflow_is_comfyuis_kontext_template_with_our_loader():
    """ComfyUI's own Kontext graph (its flux_kontext_dev_basic template, one image): only the model loader is ours."""
    api = json.loads((WORKFLOWS / "api" / "kontext_ksampler.json").read_text())
    by_type = {v["class_type"]: (k, v["inputs"]) for k, v in api.items()}
    assert len(by_type) == len(api) and {t for t in by_type if t in NODE_CLASS_MAPPINGS} == {"KontextModelLoader"}
    src = lambda link: api[link[0]]["class_type"]  # noqa: E731
    _, ks = by_type["KSampler"]
    assert {k: ks[k] for k in ("steps", "cfg", "sampler_name", "scheduler", "denoise")} == {
        "steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}
    assert src(ks["model"]) == "KontextModelLoader"
    guidance = api[ks["positive"][0]]
    assert guidance["class_type"] == "FluxGuidance" and guidance["inputs"]["guidance"] == 2.5
    reference = api[guidance["inputs"]["conditioning"][0]]["inputs"]
    assert src(guidance["inputs"]["conditioning"]) == "ReferenceLatent"
    text_id, text = by_type["CLIPTextEncode"]
    zero_out = api[ks["negative"][0]]
    assert zero_out["class_type"] == "ConditioningZeroOut" and zero_out["inputs"]["conditioning"] == [text_id, 0]
    assert reference["conditioning"] == [text_id, 0]
    assert reference["latent"] == ks["latent_image"] and src(ks["latent_image"]) == "VAEEncode"
    encode = by_type["VAEEncode"][1]
    assert src(encode["pixels"]) == "FluxKontextImageScale" and src(encode["vae"]) == "VAELoader"
    assert src(api[encode["pixels"][0]]["inputs"]["image"]) == "LoadImage"
    clip = api[text["clip"][0]]
    assert clip["class_type"] == "DualCLIPLoader" and clip["inputs"]["type"] == "flux"
    assert {clip["inputs"]["clip_name1"], clip["inputs"]["clip_name2"]} == {"clip_l.safetensors",
                                                                            "t5xxl_fp16.safetensors"}
    assert by_type["VAELoader"][1]["vae_name"] == "ae.safetensors"
    decode = by_type["VAEDecode"][1]
    assert decode["samples"] == [by_type["KSampler"][0], 0] and src(decode["vae"]) == "VAELoader"
    assert src(by_type["SaveImage"][1]["images"]) == "VAEDecode"
    # The queue command finds its prompt and seed as in the other workflows.
    assert comfy_queue.prompt_nodes(api) == [text_id]
    out = comfy_queue.patch(api, ["mine.png"], ["make it night"], 5)
    assert out[text_id]["inputs"]["text"] == "make it night" and out[by_type["KSampler"][0]]["inputs"]["seed"] == 5


# ---------------------------------------------------------------------------------------------- queue: patching

def test_patch_puts_images_prompts_and_seeds_in_order():
    api = json.loads((WORKFLOWS / "api" / "kontext_iterative_edit.json").read_text())
    out = comfy_queue.patch(api, ["mine.png"], ["first edit", "second edit"], 99)
    loaders = [v for v in out.values() if v["class_type"] == "LoadImage"]
    assert loaders[0]["inputs"]["image"] == "mine.png"
    prompts = [out[k]["inputs"]["prompt"] for k in comfy_queue.prompt_nodes(out)]
    assert prompts == ["first edit", "second edit"]
    assert {v["inputs"]["seed"] for v in out.values() if "seed" in v["inputs"]} == {99}
    assert api != out and comfy_queue.patch(api, [], [], None) == api  # a copy; nothing asked, nothing changed
    with pytest.raises(comfy_queue.QueueError, match="2 --image given but the workflow has 1 LoadImage"):
        comfy_queue.patch(api, ["a.png", "b.png"], [], None)
    with pytest.raises(comfy_queue.QueueError, match="positive prompt"):
        comfy_queue.patch(api, [], ["a", "b", "c"], None)


def test_prompt_is_found_through_reference_chains():
    api = json.loads((WORKFLOWS / "api" / "kontext_two_references.json").read_text())
    (node,) = comfy_queue.prompt_nodes(api)
    assert api[node]["class_type"] == "KontextTextEncode"


# ---------------------------------------------------------------------------------------------- queue: a fake server

class FakeComfy(BaseHTTPRequestHandler):
    """Answers like ComfyUI's /object_info, /upload/image, /prompt, /history, /view (no websocket: the client
    polls)."""
    fail_with: dict | None = None
    prompts: list = []
    PNG = bytes.fromhex("89504e470d0a1a0a")  # enough of a PNG for a download test

    def log_message(self, *args):
        pass

    def reply(self, obj, status=200, body=None):
        data = body if body is not None else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        data = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/upload/image":
            assert b'name="image"; filename="in.png"' in data
            return self.reply({"name": "in (1).png", "subfolder": "", "type": "input"})
        prompt = json.loads(data)["prompt"]
        FakeComfy.prompts.append(prompt)
        unknown = [v["class_type"] for v in prompt.values() if v["class_type"] == "NoSuchNode"]
        if unknown:
            return self.reply({"error": {"type": "invalid_prompt", "message": "Cannot execute because node "
                               "NoSuchNode does not exist.", "details": "Node ID '#1'"}, "node_errors": {}}, 400)
        self.reply({"prompt_id": "p1", "number": 0, "node_errors": {}})

    def do_GET(self):
        if self.path == "/object_info":
            return self.reply(object_info())
        if self.path.startswith("/object_info/"):
            name = self.path.rsplit("/", 1)[1]
            return self.reply({name: object_info()[name]} if name in object_info() else {})
        if self.path.startswith("/history/p1"):
            status = {"status_str": "success", "completed": True, "messages": []}
            if FakeComfy.fail_with:
                status = {"status_str": "error", "completed": False,
                          "messages": [["execution_error", FakeComfy.fail_with]]}
            images = [{"filename": "edit_00001_.png", "subfolder": "kontext", "type": "output"},
                      {"filename": "tmp.png", "subfolder": "", "type": "temp"}]
            return self.reply({"p1": {"status": status, "outputs": {"9": {"images": images}}}})
        if self.path.startswith("/view?"):
            return self.reply(None, body=self.PNG)
        self.reply({}, 404)


@pytest.fixture
def fake_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeComfy)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    FakeComfy.prompts, FakeComfy.fail_with = [], None
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def queue(*argv: str) -> tuple[int, str]:
    """Through the command line's dispatcher, which turns the errors into exit statuses."""
    err = io.StringIO()
    with redirect_stderr(err):
        rc = cli.main(["queue", *argv])
    return rc, err.getvalue()


def test_queue_uploads_patches_queues_and_downloads(fake_server, tmp_path):
    (tmp_path / "in.png").write_bytes(FakeComfy.PNG)
    rc, err = queue(str(WORKFLOWS / "api" / "kontext_basic_edit.json"), "--server", fake_server, "--image",
                    str(tmp_path / "in.png"), "--prompt", "make it blue", "--seed", "7", "--out", str(tmp_path / "o"))
    assert rc == 0, err
    sent = FakeComfy.prompts[-1]
    assert sent["4"]["inputs"]["image"] == "in (1).png" and sent["5"]["inputs"]["prompt"] == "make it blue"
    assert sent["7"]["inputs"]["seed"] == 7
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["edit_00001_.png"]  # outputs only, not temp previews


def test_queue_accepts_the_ui_format_too(fake_server, tmp_path):
    rc, err = queue(str(WORKFLOWS / "kontext_text_to_image.json"), "--server", fake_server, "--out", str(tmp_path))
    assert rc == 0, err
    api = json.loads((WORKFLOWS / "api" / "kontext_text_to_image.json").read_text())
    assert {k: v["inputs"] for k, v in FakeComfy.prompts[-1].items()} == {k: v["inputs"] for k, v in api.items()}


def test_queue_reports_comfyui_errors(fake_server, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"1": {"class_type": "NoSuchNode", "inputs": {}}}))
    rc, err = queue(str(bad), "--server", fake_server, "--out", str(tmp_path))
    assert rc == 2 and "Cannot execute because node NoSuchNode does not exist." in err
    FakeComfy.fail_with = {"node_id": "1", "node_type": "KontextModelLoader", "exception_type": "CheckpointError",
                           "exception_message": "x.safetensors: is not a Flux DiT checkpoint"}
    rc, err = queue(str(WORKFLOWS / "api" / "kontext_basic_edit.json"), "--server", fake_server, "--out",
                    str(tmp_path))
    assert rc == 2 and "node 1 (KontextModelLoader) failed: CheckpointError: x.safetensors: is not a Flux DiT" in err


def test_queue_explains_an_unreachable_server_and_bad_files(tmp_path):
    rc, err = queue(str(WORKFLOWS / "api" / "kontext_basic_edit.json"), "--server", "http://127.0.0.1:9",
                    "--out", str(tmp_path))
    assert rc == 2 and "cannot reach ComfyUI at http://127.0.0.1:9" in err
    rc, err = queue(str(tmp_path / "none.json"), "--server", "http://127.0.0.1:9", "--out", str(tmp_path))
    assert rc == 2 and "no such workflow file" in err
    rc, err = queue(str(WORKFLOWS / "api" / "kontext_basic_edit.json"), "--image", str(tmp_path / "no.png"),
                    "--out", str(tmp_path))
    assert rc == 2 and "no such file" in err


def test_ui_conversion_takes_primitive_node_values_and_drops_muted_sources():
    """A seed driven by a PrimitiveNode becomes its value; a link from a muted node is left out, as the front end does."""
    ui = json.loads((WORKFLOWS / "kontext_text_to_image.json").read_text())
    sampler = next(n for n in ui["nodes"] if n["type"] == "KontextSampler")
    link_id = max(l[0] for l in ui["links"]) + 1
    prim_id = max(n["id"] for n in ui["nodes"]) + 1
    ui["nodes"].append({"id": prim_id, "type": "PrimitiveNode", "mode": 0, "widgets_values": [123456, "fixed"],
                        "outputs": [{"name": "INT", "type": "INT", "links": [link_id]}]})
    ui["links"].append([link_id, prim_id, 0, sampler["id"], 99, "INT"])
    sampler["inputs"].append({"name": "seed", "type": "INT", "link": link_id, "widget": {"name": "seed"}})
    api = comfy_queue.ui_to_api(ui, object_info())
    assert api[str(sampler["id"])]["inputs"]["seed"] == 123456 and str(prim_id) not in api
    decoder = next(n for n in ui["nodes"] if n["type"] == "KontextVAEDecode")
    sampler["mode"] = 2  # muted
    api = comfy_queue.ui_to_api(ui, object_info())
    assert str(sampler["id"]) not in api and "samples" not in api[str(decoder["id"])]["inputs"]


def test_queue_out_that_is_a_file_fails_before_queueing(fake_server, tmp_path):
    out = tmp_path / "taken"
    out.write_text("x")
    before = len(FakeComfy.prompts)
    rc, err = queue(str(WORKFLOWS / "api" / "kontext_text_to_image.json"), "--server", fake_server.removeprefix("http://"),
                    "--out", str(out))
    assert rc == 2 and "--out" in err and len(FakeComfy.prompts) == before and out.read_text() == "x"
