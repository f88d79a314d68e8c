"""The pack inside a real ComfyUI server: import, every API workflow over HTTP, the queue command, bad input, cancel,
model caching and release, memory over 20 queued edits, and our MODEL under ComfyUI's own KSampler, LoRA loader and
ModelSamplingFlux.

Needs a ComfyUI checkout with its own Python environment (CPU is enough); tests/comfyui_env.sh builds one:
    tests/comfyui_env.sh /tmp/comfyui          # ComfyUI v0.8.0 from GitHub, or: DEST SOURCE_GIT_DIR_OR_URL REV
    COMFYUI_DIR=/tmp/comfyui pytest -m comfyui tests/test_comfyui.py
The server runs with COMFYUI_PYTHON, by default $COMFYUI_DIR/.venv/bin/python.
The server runs on loopback with a throwaway base directory; the pack is mounted through an extra_model_paths.yaml
`custom_nodes:` entry and the tiny models are linked under the release file names the workflows use.
Steps are cut to 2 (CPU time): everything else in the API workflows runs as shipped.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import kontext
from kontext.queue import Server, WebSocket, execution_error, ui_to_api
from kontext.references import preferred_size

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(
    not COMFYUI_DIR, reason="needs a real ComfyUI: set COMFYUI_DIR (and optionally COMFYUI_PYTHON); "
                            "`tests/comfyui_env.sh DEST` builds one")]

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "workflows" / "api"
OUR_NODES = {"KontextModelLoader", "KontextTextEncoderLoader", "KontextVAELoader", "KontextTextEncode",
             "KontextReferenceImage", "KontextSampler", "KontextVAEDecode", "KontextVAEEncode", "KontextImageScale"}
RELEASE_NAMES = {"diffusion_models/flux1-dev-kontext_fp8_scaled.safetensors": "kontext-tiny-fp8_scaled.safetensors",
                 "vae/ae.safetensors": "ae-tiny.safetensors",
                 "text_encoders/clip_l.safetensors": "clip_l-tiny.safetensors",
                 "text_encoders/t5xxl_fp16.safetensors": "t5xxl-tiny.safetensors",
                 "diffusion_models/wrong_kind.safetensors": "../vae/ae-tiny.safetensors"}
IMAGES = {"first.png": (320, 256), "second.png": (256, 384)}  # (width, height)


class Comfy:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path, work: Path):
        self.url, self.proc, self.log, self.work = url, proc, log, work
        self.server = Server(url, timeout=30)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def run(self, prompt: dict, timeout: float = 600.0, client_id: str | None = None) -> dict:
        """Queue an API prompt and wait for its history entry."""
        body = {"prompt": prompt} | ({"client_id": client_id} if client_id else {})
        prompt_id = self.server.post_json("/prompt", body)["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.server.get_json(f"/history/{prompt_id}").get(prompt_id)
            if entry:
                return entry
            assert self.proc.poll() is None, "ComfyUI died:\n" + self.log_text()[-3000:]
            time.sleep(0.3)
        raise TimeoutError(prompt_id)

    def images(self, entry: dict) -> list[Image.Image]:
        out = []
        for output in entry["outputs"].values():
            for img in output.get("images", []):
                if img["type"] == "output":
                    q = f"filename={img['filename']}&subfolder={img['subfolder']}&type={img['type']}"
                    path = self.work / "dl.png"
                    path.write_bytes(self.server.request(f"/view?{q}"))
                    out.append(Image.open(path).convert("RGB"))
        return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def comfy(tmp_path_factory) -> Comfy:
    work = tmp_path_factory.mktemp("comfyui")
    models = work / "models"
    kontext.make_tiny(models)
    for link, target in RELEASE_NAMES.items():
        (models / link).symlink_to(target)
    (work / "mount").mkdir()
    (work / "mount" / "comfyui-kontext").symlink_to(ROOT)  # the pack, as it would sit in custom_nodes/
    for sub in ("base/custom_nodes", "base/input", "base/output", "models/loras"):
        (work / sub).mkdir(parents=True)
    for name, size in IMAGES.items():
        rng = np.random.default_rng(len(name))
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(work / name)
    yaml = work / "extra_model_paths.yaml"
    yaml.write_text(f"kontext_tests:\n  base_path: {work}\n  diffusion_models: models/diffusion_models\n"
                    f"  vae: models/vae\n  text_encoders: models/text_encoders\n  loras: models/loras\n"
                    f"  custom_nodes: mount\n")
    python = os.environ.get("COMFYUI_PYTHON") or next(
        (str(p) for p in [Path(COMFYUI_DIR) / ".venv" / "bin" / "python"] if p.exists()), sys.executable)
    port = _free_port()
    log = work / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "KONTEXT_TOKENIZERS"}  # ComfyUI's own tokenizer files
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
             str(work / "base"), "--extra-model-paths-config", str(yaml), "--database-url", "sqlite:///:memory:",
             "--disable-auto-launch", "--preview-method", "latent2rgb"],
            cwd=COMFYUI_DIR, stdout=fh, stderr=subprocess.STDOUT, env=env)
    c = Comfy(f"http://127.0.0.1:{port}", proc, log, work)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, "ComfyUI exited:\n" + c.log_text()[-3000:]
            try:
                c.server.get_json("/system_stats")
                break
            except Exception:
                assert time.monotonic() < deadline, "ComfyUI did not start:\n" + c.log_text()[-3000:]
                time.sleep(1)
        c.uploaded = {name: c.server.upload_image(work / name) for name in IMAGES}
        yield c
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        print("\n--- ComfyUI log tail ---\n" + c.log_text()[-2000:])


def workflow(name: str, steps: int = 2, **inputs_by_class) -> dict:
    """An API workflow with our uploaded images, fewer steps, and optional input overrides per class type."""
    wf = json.loads((API / f"{name}.json").read_text())
    loaders = sorted((k for k, v in wf.items() if v["class_type"] == "LoadImage"), key=int)
    for key, image in zip(loaders, IMAGES):
        wf[key]["inputs"]["image"] = image
    for node in wf.values():
        if node["class_type"] == "KontextSampler":
            node["inputs"]["steps"] = steps
        node["inputs"].update(inputs_by_class.get(node["class_type"], {}))
    return wf


def queue_cli(comfy: Comfy, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kontext", "queue", *args, "--server", comfy.url],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def assert_still_serving(comfy: Comfy) -> None:
    entry = comfy.run(workflow("kontext_basic_edit", steps=1, KontextReferenceImage={"resize": "keep"}))
    assert entry["status"]["status_str"] == "success", execution_error(entry)


# ---------------------------------------------------------------------------------------------- the tests

def test_pack_imports_without_error(comfy):
    info = comfy.server.get_json("/object_info")
    assert OUR_NODES <= set(info)
    assert info["KontextSampler"]["category"] == "Kontext/sampling"
    assert info["KontextModelLoader"]["display_name"] == "Load Kontext Model"
    assert "flux1-dev-kontext_fp8_scaled.safetensors" in info["KontextModelLoader"]["input"]["required"]["dit_name"][0]
    log = comfy.log_text()
    assert "comfyui-kontext" in log  # listed among the loaded custom nodes ...
    assert not [l for l in log.splitlines() if "IMPORT FAILED" in l and "kontext" in l]  # ... without failure
    assert "Cannot import" not in "".join(l for l in log.splitlines() if "kontext" in l)


EXPECTED_SIZES = {"kontext_basic_edit": preferred_size(*IMAGES["first.png"]),
                  "kontext_two_references": preferred_size(*IMAGES["first.png"]),
                  "kontext_iterative_edit": preferred_size(*preferred_size(*IMAGES["first.png"])),
                  "kontext_style_reference": (1024, 1024), "kontext_text_to_image": (1024, 1024)}
# kontext_ksampler loads its text encoders and VAE with ComfyUI's own DualCLIPLoader and VAELoader, which cannot load
# make-tiny's small models (ComfyUI fixes T5-XXL's and the VAE's sizes): it is validated by the server below, and its
# graph runs with our loaders in test_our_model_under_comfyuis_ksampler_lora_and_model_sampling.
NOT_RUN = {"kontext_ksampler"}


def test_every_shipped_api_workflow_is_run_or_named_as_not_run():
    assert {p.stem for p in API.glob("*.json")} == set(EXPECTED_SIZES) | NOT_RUN


@pytest.mark.parametrize("name", sorted(EXPECTED_SIZES))
def test_every_api_workflow_succeeds(comfy, name):
    assert (API / f"{name}.json").exists()
    entry = comfy.run(workflow(name))
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    images = comfy.images(entry)
    assert len(images) == 1 and images[0].size == EXPECTED_SIZES[name]
    assert np.asarray(images[0]).std() > 1.0  # a picture, not a flat colour


def test_queue_command_uploads_patches_and_downloads(comfy, tmp_path):
    wf = tmp_path / "edit.json"
    wf.write_text(json.dumps(workflow("kontext_basic_edit", KontextReferenceImage={"resize": "keep"})))
    res = queue_cli(comfy, str(wf), "--image", str(comfy.work / "second.png"), "--prompt", "make it blue",
                    "--seed", "11", "--out", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    (saved,) = [Path(line) for line in res.stdout.split()]
    assert Image.open(saved).size == IMAGES["second.png"]  # keep: the uploaded image's own size
    assert "step 2/2" in res.stderr  # progress from the websocket


def test_progress_previews_and_model_reuse(comfy):
    ws = WebSocket(comfy.url.replace("http", "ws") + "/ws?clientId=previewtest")
    try:
        before = comfy.log_text().count("loading Flux DiT")
        entry = comfy.run(workflow("kontext_basic_edit", steps=3, KontextReferenceImage={"resize": "keep"},
                                   KontextSampler={"seed": 123}), client_id="previewtest")
        assert entry["status"]["status_str"] == "success"
        progress = []
        while (msg := ws.recv_text(0.5)) is not None:
            data = json.loads(msg)
            if data["type"] == "progress":
                progress.append((data["data"]["value"], data["data"]["max"]))
        assert progress[-3:] == [(1, 3), (2, 3), (3, 3)]
        assert ws.binary_frames >= 3  # a live preview per step
        assert comfy.log_text().count("loading Flux DiT") == before  # cached between queue runs: no reload
        assert "Requested to load Flux\n" in comfy.log_text()  # our MODEL goes through ComfyUI's memory manager
    finally:
        ws.close()


def test_changed_model_file_is_reloaded_and_free_memory_releases_ours(comfy):
    count = lambda: comfy.log_text().count("loading Flux DiT")  # noqa: E731
    base = count()
    target = comfy.work / "models" / "diffusion_models" / "kontext-tiny-fp8_scaled.safetensors"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert_still_serving(comfy)
    assert count() == base + 1  # IS_CHANGED saw the new mtime: the loader re-ran and read the file again
    for _ in range(3):  # ComfyUI acts on the flag when its worker next wakes; a notify sent while it is busy
        comfy.server.post_json("/free", {"unload_models": True, "free_memory": True})  # (gc) is lost: repeat
        time.sleep(1)
    assert_still_serving(comfy)
    # After "Free memory" ComfyUI dropped its caches; had anything of ours kept the model alive, the loader
    # would have logged "reusing the loaded dit" instead of reading the file.
    assert count() == base + 2
    assert "reusing the loaded dit" not in comfy.log_text().split("loading Flux DiT")[-1]


@pytest.mark.parametrize("case,expected", [
    ("unknown_node", "Cannot execute because node NoSuchKontextNode does not exist."),
    ("missing_model", "Value not in list"),
    ("wrong_kind", "is not a Flux DiT checkpoint: it looks like a Flux VAE"),
])
def test_bad_input_gives_comfyui_error_text_and_the_server_keeps_serving(comfy, tmp_path, case, expected):
    wf = workflow("kontext_basic_edit", KontextReferenceImage={"resize": "keep"})
    if case == "unknown_node":
        wf["99"] = {"class_type": "NoSuchKontextNode", "inputs": {}}
    elif case == "missing_model":
        wf["1"]["inputs"]["dit_name"] = "flux1-kontext-dev-missing.safetensors"
    else:
        wf["1"]["inputs"]["dit_name"] = "wrong_kind.safetensors"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(wf))
    res = queue_cli(comfy, str(path), "--out", str(tmp_path / "out"))
    assert res.returncode == 2 and expected in res.stderr, res.stderr  # 2: a user's or ComfyUI-side error
    assert_still_serving(comfy)


def test_unreachable_server(tmp_path):
    res = subprocess.run([sys.executable, "-m", "kontext", "queue", str(API / "kontext_basic_edit.json"),
                          "--server", f"http://127.0.0.1:{_free_port()}", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 2 and "cannot reach ComfyUI" in res.stderr, res.stderr


def test_cancel_mid_run(comfy):
    ws = WebSocket(comfy.url.replace("http", "ws") + "/ws?clientId=canceltest")
    try:
        wf = workflow("kontext_basic_edit", steps=200)  # ~1 MP reference: seconds per step on a CPU
        prompt_id = comfy.server.post_json("/prompt", {"prompt": wf, "client_id": "canceltest"})["prompt_id"]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # wait until the sampler is stepping
            msg = ws.recv_text(1.0)
            if msg and json.loads(msg)["type"] == "progress" and json.loads(msg)["data"]["value"] >= 2:
                break
        comfy.server.post_json("/interrupt", {})
        t0 = time.monotonic()
        while not (entry := comfy.server.get_json(f"/history/{prompt_id}").get(prompt_id)):
            time.sleep(0.2)
        assert time.monotonic() - t0 < 30  # stopped at the next step, not after 200
        assert "interrupted at node 7 (KontextSampler)" in execution_error(entry)
    finally:
        ws.close()
    assert_still_serving(comfy)


def test_twenty_queued_edits_keep_memory_flat(comfy):
    rss = []
    for i in range(20):
        wf = workflow("kontext_basic_edit", steps=2, KontextReferenceImage={"resize": "keep"},
                      KontextSampler={"seed": 1000 + i}, KontextTextEncode={"prompt": f"edit number {i}"})
        entry = comfy.run(wf)
        assert entry["status"]["status_str"] == "success", execution_error(entry)
        rss.append(comfy.rss_mb())
    print("\nComfyUI RSS (MB) after each of 20 edits:", " ".join(f"{r:.0f}" for r in rss))
    # The first edits warm caches and allocator pools; from then on growth means a leak per run.
    assert rss[-1] - rss[4] < 40, rss


def test_mixes_with_comfyui_core_nodes(comfy):
    """ComfyUI's ReferenceLatent, FluxGuidance and ConditioningZeroOut act on our conditioning as on their own."""
    wf = {
        "1": {"class_type": "KontextModelLoader", "inputs": {"dit_name": "flux1-dev-kontext_fp8_scaled.safetensors",
                                                             "weight_dtype": "auto", "device": "auto"}},
        "2": {"class_type": "KontextTextEncoderLoader", "inputs": {"clip_name": "clip_l.safetensors",
                                                                   "t5_name": "t5xxl_fp16.safetensors",
                                                                   "device": "auto"}},
        "3": {"class_type": "KontextVAELoader", "inputs": {"vae_name": "ae.safetensors", "device": "auto"}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "first.png"}},
        "5": {"class_type": "KontextImageScale", "inputs": {"image": ["4", 0], "fit": "crop"}},
        "6": {"class_type": "KontextVAEEncode", "inputs": {"pixels": ["5", 0], "vae": ["3", 0]}},
        "7": {"class_type": "KontextTextEncode", "inputs": {"text_encoders": ["2", 0], "prompt": "a red door",
                                                            "guidance": 2.5}},
        "8": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["7", 0], "latent": ["6", 0]}},
        "9": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["8", 0], "guidance": 3.25}},
        "10": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["7", 0]}},
        "11": {"class_type": "KontextSampler", "inputs": {
            "model": ["1", 0], "positive": ["9", 0], "negative": ["10", 0], "latent": ["6", 0], "seed": 5,
            "steps": 2, "guidance": 0.0, "true_cfg": 1.5, "width": 0, "height": 0, "denoise": 0.6}},
        "12": {"class_type": "KontextVAEDecode", "inputs": {"samples": ["11", 0], "vae": ["3", 0]}},
        "13": {"class_type": "SaveImage", "inputs": {"images": ["12", 0], "filename_prefix": "kontext/mixed"}},
    }
    entry = comfy.run(wf)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    (image,) = comfy.images(entry)
    assert image.size == preferred_size(*IMAGES["first.png"])
    assert "guidance 3.25, true_cfg 1.50" in comfy.log_text()  # FluxGuidance's value reached our sampler


def test_workflows_are_offered_as_templates(comfy):
    listed = comfy.server.get_json("/workflow_templates")
    assert sorted(listed["comfyui-kontext"]) == sorted(p.stem for p in API.glob("*.json"))
    served = json.loads(comfy.server.request("/api/workflow_templates/comfyui-kontext/kontext_basic_edit.json"))
    assert served == json.loads((ROOT / "workflows" / "kontext_basic_edit.json").read_text())
    assert comfy.server.request("/api/workflow_templates/comfyui-kontext/kontext_basic_edit.jpg")[:2] == b"\xff\xd8"


def test_comfyui_vae_links_pass_validation_into_our_vae_inputs(comfy):
    """Our VAE inputs are typed "KONTEXT_VAE,VAE": ComfyUI's validation accepts its own Load VAE there.

    (Its VAE class cannot load make-tiny's small VAE, so the run itself stops in Load VAE; that it gets that far
    shows the link was accepted. The VAE object itself is exercised in test_nodes.py.)"""
    wf = workflow("kontext_basic_edit", KontextReferenceImage={"resize": "keep"})
    wf["3"] = {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}}
    entry = comfy.run(wf)
    assert "node 3 (VAELoader) failed" in execution_error(entry)
    assert_still_serving(comfy)


# ---------------------------------------------------------------------------------------------- ComfyUI's own nodes

def _generator():
    import importlib.util

    spec = importlib.util.spec_from_file_location("kontext_workflow_generator", ROOT / "workflows" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_generators_core_node_table_is_comfyuis(comfy):
    """workflows/generate.py describes ComfyUI's nodes by hand (the UI format's widget order follows it): the same
    inputs in the same order, types, options and outputs as the server's /object_info."""
    info = comfy.server.get_json("/object_info")
    for name, (inputs, outputs, _) in _generator().CORE.items():
        real = info[name]
        for group in ("required", "optional"):
            assert list(inputs.get(group, {})) == real["input_order"].get(group, []), (name, group)
            for inp, (typ, *opts) in inputs.get(group, {}).items():
                real_typ, real_opts = real["input"][group][inp][0], (real["input"][group][inp][1:] or [{}])[0]
                where = f"{name}.{inp}"
                if isinstance(typ, list):
                    assert isinstance(real_typ, list), where
                    if not (opts and opts[0].get("image_upload")):  # the input folder's files: the server's own
                        assert set(typ) <= set(real_typ), (where, sorted(set(typ) - set(real_typ)))
                else:
                    assert typ == real_typ, where
                for key, value in (opts[0] if opts else {}).items():
                    assert real_opts.get(key) == value, (where, key, real_opts.get(key), value)
        assert real["output"] == [t for _, t in outputs] and real["output_name"] == [n for n, _ in outputs], name


def test_ksampler_workflow_passes_comfyuis_validation(comfy):
    """The shipped kontext_ksampler: its UI format converts with the server's /object_info to the API file, and the
    server accepts the graph (links, types, widget values) and runs it up to ComfyUI's own loaders, which stop at
    make-tiny's small text encoders or VAE."""
    ui = json.loads((ROOT / "workflows" / "kontext_ksampler.json").read_text())
    api = json.loads((API / "kontext_ksampler.json").read_text())
    converted = ui_to_api(ui, comfy.server.get_json("/object_info"))
    assert {k: v["inputs"] for k, v in converted.items()} == {k: v["inputs"] for k, v in api.items()}
    api["4"]["inputs"]["image"] = "first.png"
    entry = comfy.run(api)
    error = execution_error(entry)
    assert "(DualCLIPLoader) failed" in error or "(VAELoader) failed" in error, error
    assert_still_serving(comfy)


LORA_LAYERS = {"double_blocks.0.img_attn.qkv": (384, 128), "double_blocks.0.img_mlp.0": (512, 128),
               "double_blocks.0.txt_attn.proj": (128, 128), "single_blocks.0.linear1": (896, 128)}


@pytest.fixture(scope="module")
def tiny_lora(comfy) -> str:
    """A rank-4 LoRA for a few layers of the tiny DiT, under BFL / ComfyUI key names, in the server's loras folder."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for layer, (out, inp) in LORA_LAYERS.items():
        sd[f"diffusion_model.{layer}.lora_up.weight"] = torch.randn(out, 4, generator=g) * 0.3
        sd[f"diffusion_model.{layer}.lora_down.weight"] = torch.randn(4, inp, generator=g) * 0.3
        sd[f"diffusion_model.{layer}.alpha"] = torch.tensor(4.0)
    save_file(sd, comfy.work / "models" / "loras" / "kontext-tiny-lora.safetensors")
    return "kontext-tiny-lora.safetensors"


def comfy_sampling_graph(dit_name: str, lora: tuple[str, float] | None = None, model_sampling: bool = False,
                         prefix: str = "kontext/ksampler_test") -> dict:
    """Load Kontext Model -> [LoraLoaderModelOnly] -> [ModelSamplingFlux] -> ComfyUI's KSampler, with our text
    encoders and VAE: positive = FluxGuidance(ReferenceLatent(text, the reference's latent)), negative = its
    ConditioningZeroOut, latent_image = the reference's latent (ComfyUI's Kontext template, our loaders)."""
    wf = {
        "1": {"class_type": "KontextModelLoader", "inputs": {"dit_name": dit_name, "weight_dtype": "auto",
                                                             "device": "cpu"}},
        "2": {"class_type": "KontextTextEncoderLoader", "inputs": {"clip_name": "clip_l.safetensors",
                                                                   "t5_name": "t5xxl_fp16.safetensors",
                                                                   "device": "cpu"}},
        "3": {"class_type": "KontextVAELoader", "inputs": {"vae_name": "ae.safetensors", "device": "cpu"}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "first.png"}},
        "5": {"class_type": "KontextVAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["3", 0]}},
        "6": {"class_type": "KontextTextEncode", "inputs": {"text_encoders": ["2", 0], "prompt": "make it night",
                                                            "guidance": 2.5}},
        "7": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["6", 0], "latent": ["5", 0]}},
        "8": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["7", 0], "guidance": 2.5}},
        "9": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}},
        "10": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 3, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["8", 0], "negative": ["9", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "11": {"class_type": "KontextVAEDecode", "inputs": {"samples": ["10", 0], "vae": ["3", 0]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": prefix}},
    }
    model = ["1", 0]
    if lora is not None:
        wf["20"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": lora[0],
                                                                    "strength_model": lora[1]}}
        model = ["20", 0]
    if model_sampling:
        w, h = IMAGES["first.png"]
        wf["21"] = {"class_type": "ModelSamplingFlux", "inputs": {"model": model, "max_shift": 1.15,
                                                                  "base_shift": 0.5, "width": w, "height": h}}
        model = ["21", 0]
    wf["10"]["inputs"]["model"] = model
    return wf


@pytest.mark.parametrize("dit_name", ["kontext-tiny.safetensors", "flux1-dev-kontext_fp8_scaled.safetensors"],
                         ids=["dense", "fp8_scaled"])
def test_our_model_under_comfyuis_ksampler_lora_and_model_sampling(comfy, tiny_lora, dit_name):
    """Load Kontext Model's MODEL under ComfyUI's KSampler, LoraLoaderModelOnly and ModelSamplingFlux. The LoRA
    changes the picture (merged into dense weights; on fp8 layers applied to the dequantised weight at each call);
    strength 0 and no LoRA give the same pixels, also after a LoRA run (its patches were taken off again), and a
    second LoRA run repeats the first (not applied twice)."""
    def run(**kw) -> np.ndarray:
        entry = comfy.run(comfy_sampling_graph(dit_name, **kw))
        assert entry["status"]["status_str"] == "success", execution_error(entry)
        (saved,) = [img for out in entry["outputs"].values() for img in out.get("images", [])]
        assert (comfy.work / "base" / "output" / saved["subfolder"] / saved["filename"]).is_file()
        (image,) = comfy.images(entry)
        assert image.size == IMAGES["first.png"]  # the reference's latent (320x256 are multiples of 16)
        return np.asarray(image).astype(np.int16)

    plain = run()
    assert plain.std() > 1.0  # a picture, not a flat colour
    with_lora = run(lora=(tiny_lora, 1.0))
    assert np.abs(with_lora - plain).mean() > 1.0, "the LoRA changed nothing: it was not applied"
    assert np.array_equal(run(lora=(tiny_lora, 0.0)), plain)
    assert np.array_equal(run(), plain)
    assert np.array_equal(run(lora=(tiny_lora, 1.0), prefix="kontext/ksampler_again"), with_lora)
    shifted = run(model_sampling=True)
    assert shifted.std() > 1.0
