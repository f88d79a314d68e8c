"""Writes the example workflows, each in ComfyUI's UI format (workflows/*.json) and API format (workflows/api/*.json).

One description per workflow below; the widget order, sockets and defaults come from the node classes themselves, so
the two formats cannot drift from each other or from the nodes. Run after changing a node's inputs:

    python workflows/generate.py          # rewrite the files
    python workflows/generate.py --check  # exit 1 if a file is out of date (the tests do this too)

A workflow without a thumbnail (workflows/NAME.jpg, shown by ComfyUI's template browser) gets a drawing of its graph.
"""
from __future__ import annotations

import argparse
import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository root: our `nodes` package and the `kontext` engine

from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
DIT, VAE = "flux1-dev-kontext_fp8_scaled.safetensors", "ae.safetensors"
CLIP_L, T5 = "clip_l.safetensors", "t5xxl_fp16.safetensors"
MODEL_URLS = {  # shown by ComfyUI's "missing models" dialog, which offers the downloads
    DIT: ("diffusion_models", "https://huggingface.co/Comfy-Org/flux1-kontext-dev_ComfyUI/resolve/main/"
                              "split_files/diffusion_models/flux1-dev-kontext_fp8_scaled.safetensors"),
    VAE: ("vae", "https://huggingface.co/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/"
                 "ae.safetensors"),
    CLIP_L: ("text_encoders", "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/"
                              "clip_l.safetensors"),
    T5: ("text_encoders", "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/"
                          "t5xxl_fp16.safetensors"),
}

# The ComfyUI core nodes the workflows use, described as ComfyUI v0.8.0 defines them (INPUT_TYPES in its nodes.py and
# comfy_extras/, in the same order: the UI format's widget values follow it), with their outputs (name, type) and any
# UI-only widget values. A combo lists the choices the workflows use: ComfyUI's own lists are longer, or are the files
# in a model folder. tests/test_comfyui.py checks this table against a real server's /object_info.
SAMPLERS = ["euler", "euler_ancestral", "heun", "dpmpp_2m", "ddim", "uni_pc"]
SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic",
              "kl_optimal"]
CORE = {
    "LoadImage": ({"required": {"image": (["example.png"], {"image_upload": True})}},
                  [("IMAGE", "IMAGE"), ("MASK", "MASK")], ["image"]),  # "image": the upload button's value
    "SaveImage": ({"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}}, [], []),
    "PreviewImage": ({"required": {"images": ("IMAGE",)}}, [], []),
    "VAELoader": ({"required": {"vae_name": ([VAE],)}}, [("VAE", "VAE")], []),
    "DualCLIPLoader": ({"required": {"clip_name1": ([CLIP_L],), "clip_name2": ([T5],), "type": (["flux"],)},
                        "optional": {"device": (["default", "cpu"], {"advanced": True})}}, [("CLIP", "CLIP")], []),
    "CLIPTextEncode": ({"required": {"text": ("STRING", {"multiline": True, "dynamicPrompts": True}),
                                     "clip": ("CLIP",)}}, [("CONDITIONING", "CONDITIONING")], []),
    "FluxKontextImageScale": ({"required": {"image": ("IMAGE",)}}, [("IMAGE", "IMAGE")], []),
    "VAEEncode": ({"required": {"pixels": ("IMAGE",), "vae": ("VAE",)}}, [("LATENT", "LATENT")], []),
    "VAEDecode": ({"required": {"samples": ("LATENT",), "vae": ("VAE",)}}, [("IMAGE", "IMAGE")], []),
    "ReferenceLatent": ({"required": {"conditioning": ("CONDITIONING",)}, "optional": {"latent": ("LATENT",)}},
                        [("CONDITIONING", "CONDITIONING")], []),
    "FluxGuidance": ({"required": {"conditioning": ("CONDITIONING",),
                                   "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1})}},
                     [("CONDITIONING", "CONDITIONING")], []),
    "ConditioningZeroOut": ({"required": {"conditioning": ("CONDITIONING",)}}, [("CONDITIONING", "CONDITIONING")], []),
    "KSampler": ({"required": {
        "model": ("MODEL",),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
        "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
        "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
        "sampler_name": (SAMPLERS,),
        "scheduler": (SCHEDULERS,),
        "positive": ("CONDITIONING",),
        "negative": ("CONDITIONING",),
        "latent_image": ("LATENT",),
        "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
    }}, [("LATENT", "LATENT")], []),
}
UI_ONLY = ("MarkdownNote",)


@dataclass
class N:
    """One node of a workflow description: type, position, widget values, incoming links {input: (node, slot)}."""
    id: int
    type: str
    pos: tuple[int, int]
    widgets: dict = field(default_factory=dict)
    links: dict = field(default_factory=dict)
    title: str | None = None
    size: tuple[int, int] | None = None


def input_types(node_type: str) -> dict:
    """The node type's INPUT_TYPES: from our classes, or from CORE for ComfyUI's own nodes."""
    return CORE[node_type][0] if node_type in CORE else NODE_CLASS_MAPPINGS[node_type].INPUT_TYPES()


def spec(node_type: str) -> tuple[list[tuple[str, str, bool, dict]], list[tuple[str, str]], list]:
    """(inputs [(name, type, optional, options)], outputs [(name, type)], extra UI widget values) of a node type."""
    inputs = []
    for group in ("required", "optional"):
        for name, (typ, *opts) in input_types(node_type).get(group, {}).items():
            options = dict(opts[0]) if opts else {}
            if isinstance(typ, list) and typ and "default" not in options and node_type in CORE:
                options["default"] = typ[0]  # the front end's default for a combo: its first choice
            kind = "WIDGET" if isinstance(typ, list) or typ in WIDGET_TYPES else typ
            inputs.append((name, kind, group == "optional", options))
    if node_type in CORE:
        return inputs, CORE[node_type][1], CORE[node_type][2]
    cls = NODE_CLASS_MAPPINGS[node_type]
    names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    return inputs, list(zip(names, cls.RETURN_TYPES)), []


def widget_values(n: N) -> list:
    """The node's widget values in ComfyUI's order, defaults filled in; seeds get their "control after generate"."""
    inputs, _, extra = spec(n.type)
    values = []
    for name, kind, _, options in inputs:
        if kind != "WIDGET":
            continue
        if name not in n.widgets and "default" not in options:
            raise ValueError(f"node {n.id} ({n.type}): no value for widget {name!r}")
        values.append(n.widgets.get(name, options.get("default")))
        if options.get("control_after_generate") or name in ("seed", "noise_seed"):
            values.append("fixed")  # reproducible examples; the user may switch to "randomize"
    return values + extra


def ui_workflow(nodes: list[N], about: str) -> dict:
    by_id = {n.id: n for n in nodes}
    links, out_links = [], {}
    for n in nodes:
        inputs, _, _ = spec(n.type)
        sockets = [(name, kind) for name, kind, _, _ in inputs if kind != "WIDGET"]
        for name, (src, slot) in n.links.items():
            slot_index = [s for s, _ in sockets].index(name)
            _, src_outputs, _ = spec(by_id[src].type)
            link = [len(links) + 1, src, slot, n.id, slot_index, src_outputs[slot][1]]
            links.append(link)
            out_links.setdefault((src, slot), []).append(link[0])
    order = _topological(nodes)
    out_nodes = []
    for n in nodes:
        inputs, outputs, _ = spec(n.type)
        ui_inputs = []
        for name, kind, optional, _ in inputs:
            if kind == "WIDGET":
                continue
            entry = {"name": name, "type": kind, "link": None}
            if optional:
                entry["shape"] = 7  # how the front end marks an optional socket
            if name in n.links:
                entry["link"] = next(l[0] for l in links if l[3] == n.id and l[4] == len(ui_inputs))
            ui_inputs.append(entry)
        ui_outputs = [{"name": name, "type": typ, "slot_index": i, "links": out_links.get((n.id, i))}
                      for i, (name, typ) in enumerate(outputs)]
        props = {"Node name for S&R": n.type, "cnr_id": "comfy-core" if n.type in CORE else "comfyui-kontext"}
        models = [v for v in n.widgets.values() if isinstance(v, str) and v in MODEL_URLS]
        if models:
            props["models"] = [{"name": m, "url": MODEL_URLS[m][1], "directory": MODEL_URLS[m][0]} for m in models]
        node = {"id": n.id, "type": n.type, "pos": list(n.pos), "size": list(n.size or _size(n.type)), "flags": {},
                "order": order[n.id], "mode": 0, "inputs": ui_inputs, "outputs": ui_outputs, "properties": props,
                "widgets_values": widget_values(n)}
        if n.title:
            node["title"] = n.title
        out_nodes.append(node)
    note_id = max(by_id) + 1
    # Left of the graph, a little lower than its top row, so ComfyUI's workflow tab does not hide its title.
    out_nodes.append({"id": note_id, "type": "MarkdownNote", "pos": [-440, 80], "size": [400, 420], "flags": {},
                      "order": len(nodes), "mode": 0, "inputs": [], "outputs": [], "title": "About this workflow",
                      "properties": {}, "widgets_values": [about]})
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, "comfyui-kontext/" + about[:40])), "revision": 0,
            "last_node_id": note_id, "last_link_id": len(links), "nodes": out_nodes, "links": links, "groups": [],
            "config": {}, "extra": {"ds": {"scale": 0.7, "offset": [40, 60]}}, "version": 0.4}


def api_workflow(nodes: list[N]) -> dict:
    out = {}
    for n in sorted(nodes, key=lambda n: n.id):
        inputs, _, _ = spec(n.type)
        values = {}
        for name, kind, optional, options in inputs:
            if name in n.links:
                src, slot = n.links[name]
                values[name] = [str(src), slot]
            elif kind == "WIDGET":
                values[name] = n.widgets.get(name, options.get("default"))
        title = n.title or NODE_DISPLAY_NAME_MAPPINGS.get(n.type, n.type)
        out[str(n.id)] = {"inputs": values, "class_type": n.type, "_meta": {"title": title}}
    return out


def _topological(nodes: list[N]) -> dict[int, int]:
    order, done = {}, set()
    while len(done) < len(nodes):
        for n in nodes:
            if n.id not in done and all(src in done for src, _ in n.links.values()):
                order[n.id] = len(done)
                done.add(n.id)
    return order


def _size(node_type: str) -> tuple[int, int]:
    return {"LoadImage": (320, 340), "SaveImage": (440, 480), "PreviewImage": (320, 340),
            "KontextTextEncode": (400, 200), "KontextSampler": (320, 330), "KontextReferenceImage": (330, 150),
            "KontextVAEDecode": (220, 50), "KontextModelLoader": (400, 110),
            "KontextTextEncoderLoader": (400, 110), "KontextVAELoader": (400, 85), "DualCLIPLoader": (400, 130),
            "VAELoader": (400, 60), "CLIPTextEncode": (400, 200), "FluxKontextImageScale": (270, 30),
            "VAEEncode": (240, 50), "VAEDecode": (220, 50), "ReferenceLatent": (280, 50), "FluxGuidance": (280, 60),
            "ConditioningZeroOut": (280, 30), "KSampler": (320, 270)}.get(node_type, (320, 120))


# ---------------------------------------------------------------------------------------------- the workflows

MODELS = (f"- **Models**, the release files (as in ComfyUI's own Kontext template):\n"
          f"  - models/diffusion_models/{DIT} (or flux1-kontext-dev.safetensors)\n  - models/vae/{VAE}\n"
          f"  - models/text_encoders/{CLIP_L}\n  - models/text_encoders/{T5}\n")


def note(text: str) -> str:
    """The workflow's MarkdownNote: what it does, then the models it needs (as list items, which ComfyUI indents)."""
    return f"- {text}\n{MODELS}"


def loaders() -> list[N]:
    return [N(1, "KontextModelLoader", (0, 0), {"dit_name": DIT}),
            N(2, "KontextTextEncoderLoader", (0, 150), {"clip_name": CLIP_L, "t5_name": T5}),
            N(3, "KontextVAELoader", (0, 300), {"vae_name": VAE})]


def basic_edit() -> tuple[list[N], str]:
    return loaders() + [
        N(4, "LoadImage", (0, 430), {"image": "example.png"}, title="Image to edit"),
        N(5, "KontextTextEncode", (440, 0), {"prompt": "Change the background to a snowy mountain village at dusk, "
                                                       "keep the subject exactly as it is"}, {"text_encoders": (2, 0)}),
        N(6, "KontextReferenceImage", (440, 250), {}, {"conditioning": (5, 0), "vae": (3, 0), "image": (4, 0)}),
        N(7, "KontextSampler", (860, 0), {"seed": 42}, {"model": (1, 0), "positive": (6, 0)}),
        N(8, "KontextVAEDecode", (860, 380), {}, {"samples": (7, 0), "vae": (3, 0)}),
        N(9, "SaveImage", (1260, 0), {"filename_prefix": "kontext/edit"}, {"images": (8, 0)}),
    ], note("**Basic edit**: load an image, say what to change. The output keeps the image's size "
                 "(after Kontext's preferred-resolution resize); set width/height on the sampler to override.")


def two_references() -> tuple[list[N], str]:
    return loaders() + [
        N(4, "LoadImage", (0, 430), {"image": "example.png"}, title="Reference 1 (scene)"),
        N(5, "LoadImage", (0, 800), {"image": "example.png"}, title="Reference 2 (object)"),
        N(6, "KontextTextEncode", (440, 0), {"prompt": "Place the object from the second image on the table in the "
                                                       "first image, matching its lighting"},
          {"text_encoders": (2, 0)}),
        N(7, "KontextReferenceImage", (440, 250), {}, {"conditioning": (6, 0), "vae": (3, 0), "image": (4, 0)}),
        N(8, "KontextReferenceImage", (440, 430), {}, {"conditioning": (7, 0), "vae": (3, 0), "image": (5, 0)}),
        N(9, "KontextSampler", (860, 0), {"seed": 7}, {"model": (1, 0), "positive": (8, 0)}),
        N(10, "KontextVAEDecode", (860, 380), {}, {"samples": (9, 0), "vae": (3, 0)}),
        N(11, "SaveImage", (1260, 0), {"filename_prefix": "kontext/two_references"}, {"images": (10, 0)}),
    ], note("**Two references**: chain one Kontext Reference Image per picture. The output size "
                 "follows the first reference; \"offset\" places the second beside it, as Kontext was trained.")


def iterative_edit() -> tuple[list[N], str]:
    return loaders() + [
        N(4, "LoadImage", (0, 430), {"image": "example.png"}, title="Image to edit"),
        N(5, "KontextTextEncode", (440, 0), {"prompt": "Turn the scene into a rainy night, keep the composition"},
          {"text_encoders": (2, 0)}, title="Edit 1"),
        N(6, "KontextReferenceImage", (440, 250), {}, {"conditioning": (5, 0), "vae": (3, 0), "image": (4, 0)}),
        N(7, "KontextSampler", (860, 0), {"seed": 1}, {"model": (1, 0), "positive": (6, 0)}),
        N(8, "KontextVAEDecode", (860, 380), {}, {"samples": (7, 0), "vae": (3, 0)}),
        N(9, "PreviewImage", (1260, 0), {}, {"images": (8, 0)}, title="After edit 1"),
        N(10, "KontextTextEncode", (440, 560), {"prompt": "Add warm glowing street lamps, keep everything else"},
          {"text_encoders": (2, 0)}, title="Edit 2"),
        N(11, "KontextReferenceImage", (440, 810), {}, {"conditioning": (10, 0), "vae": (3, 0), "image": (8, 0)}),
        N(12, "KontextSampler", (860, 560), {"seed": 2}, {"model": (1, 0), "positive": (11, 0)}),
        N(13, "KontextVAEDecode", (860, 940), {}, {"samples": (12, 0), "vae": (3, 0)}),
        N(14, "SaveImage", (1260, 560), {"filename_prefix": "kontext/iterative"}, {"images": (13, 0)}),
    ], note("**Iterative edit**: the first edit's image is the reference of the second. Small steps "
                 "keep identity better than one long instruction; add more stages the same way.")


def style_reference() -> tuple[list[N], str]:
    return loaders() + [
        N(4, "LoadImage", (0, 430), {"image": "example.png"}, title="Style reference"),
        N(5, "KontextTextEncode", (440, 0), {"prompt": "Using this style, paint a lighthouse on a cliff above a "
                                                       "stormy sea"}, {"text_encoders": (2, 0)}),
        N(6, "KontextReferenceImage", (440, 250), {}, {"conditioning": (5, 0), "vae": (3, 0), "image": (4, 0)}),
        N(7, "KontextSampler", (860, 0), {"seed": 3, "width": 1024, "height": 1024},
          {"model": (1, 0), "positive": (6, 0)}),
        N(8, "KontextVAEDecode", (860, 380), {}, {"samples": (7, 0), "vae": (3, 0)}),
        N(9, "SaveImage", (1260, 0), {"filename_prefix": "kontext/style"}, {"images": (8, 0)}),
    ], note("**Style reference**: the reference gives the look, the prompt the content (start it with "
                 "\"Using this style\"). The output size is set on the sampler, not taken from the reference.")


def text_to_image() -> tuple[list[N], str]:
    return [n for n in loaders()] + [
        N(4, "KontextTextEncode", (440, 0), {"prompt": "A red vintage bicycle leaning against a blue wooden door, "
                                                       "morning light, photograph"}, {"text_encoders": (2, 0)}),
        N(5, "KontextSampler", (860, 0), {"seed": 4, "width": 1024, "height": 1024},
          {"model": (1, 0), "positive": (4, 0)}),
        N(6, "KontextVAEDecode", (860, 380), {}, {"samples": (5, 0), "vae": (3, 0)}),
        N(7, "SaveImage", (1260, 0), {"filename_prefix": "kontext/text_to_image"}, {"images": (6, 0)}),
    ], note("**Text to image**: no reference, so Kontext [dev] works as a plain FLUX.1 [dev] model. "
                 "Set the size on the sampler.")


def ksampler() -> tuple[list[N], str]:
    """ComfyUI's own Kontext template (flux_kontext_dev_basic), one image, with our loader in place of UNETLoader."""
    prompt = "Change the background to a snowy mountain village at dusk, keep the subject exactly as it is"
    return [
        N(1, "KontextModelLoader", (0, 0), {"dit_name": DIT}),
        N(2, "DualCLIPLoader", (0, 150), {"clip_name1": CLIP_L, "clip_name2": T5, "type": "flux"}),
        N(3, "VAELoader", (0, 320), {"vae_name": VAE}),
        N(4, "LoadImage", (0, 420), {"image": "example.png"}, title="Image to edit"),
        N(5, "FluxKontextImageScale", (440, 420), {}, {"image": (4, 0)}),
        N(6, "VAEEncode", (440, 500), {}, {"pixels": (5, 0), "vae": (3, 0)}),
        N(7, "CLIPTextEncode", (440, 0), {"text": prompt}, {"clip": (2, 0)}, title="Instruction"),
        N(8, "ReferenceLatent", (880, 0), {}, {"conditioning": (7, 0), "latent": (6, 0)}),
        N(9, "FluxGuidance", (880, 100), {"guidance": 2.5}, {"conditioning": (8, 0)}),
        N(10, "ConditioningZeroOut", (880, 210), {}, {"conditioning": (7, 0)}),
        N(11, "KSampler", (1200, 0), {"seed": 42, "steps": 20, "cfg": 1.0, "sampler_name": "euler",
                                      "scheduler": "simple", "denoise": 1.0},
          {"model": (1, 0), "positive": (9, 0), "negative": (10, 0), "latent_image": (6, 0)}),
        N(12, "VAEDecode", (1200, 330), {}, {"samples": (11, 0), "vae": (3, 0)}),
        N(13, "SaveImage", (1560, 0), {"filename_prefix": "kontext/ksampler"}, {"images": (12, 0)}),
    ], note("**KSampler**: ComfyUI's own Kontext template with Load Kontext Model in place of Load Diffusion "
            "Model: ComfyUI's text encoders, VAE and KSampler run the pack's DiT, which is ComfyUI's MODEL (LoRA "
            "loaders and model patches go between the loader and KSampler). The latent is the reference's, so the "
            "output has the size FluxKontextImageScale picked; for another size feed KSampler an "
            "EmptySD3LatentImage.")


WORKFLOWS = {"kontext_basic_edit": basic_edit, "kontext_two_references": two_references,
             "kontext_iterative_edit": iterative_edit, "kontext_style_reference": style_reference,
             "kontext_text_to_image": text_to_image, "kontext_ksampler": ksampler}


def render() -> dict[Path, str]:
    files = {}
    for name, make in WORKFLOWS.items():
        nodes, about = make()
        files[HERE / f"{name}.json"] = json.dumps(ui_workflow(nodes, about), indent=2) + "\n"
        files[HERE / "api" / f"{name}.json"] = json.dumps(api_workflow(nodes), indent=2) + "\n"
    return files


# ---------------------------------------------------------------------------------------------- thumbnails

# The template browser shows workflows/NAME.jpg. The shipped ones are screenshots of ComfyUI's canvas; a workflow
# without one gets a drawing of its graph in the canvas' colours (written only when the file is missing, so a
# screenshot put in its place is kept).
THUMB_SIZE = (640, 395)
LINK_COLOURS = {"MODEL": "#b39ddb", "CLIP": "#ffd500", "VAE": "#ff6e6e", "CONDITIONING": "#ffa931",
                "LATENT": "#ff9cf9", "IMAGE": "#64b5f6", "MASK": "#81c784"}
TITLE_H, ROW_H = 30, 24


def thumbnail(ui: dict) -> bytes:
    """A JPEG drawing of a UI-format workflow: nodes with their titles, sockets and widget values, and the links."""
    import io

    from PIL import Image, ImageDraw, ImageFont

    nodes = [n for n in ui["nodes"] if n["type"] not in UI_ONLY]
    x0 = min(n["pos"][0] for n in nodes) - 40
    y0 = min(n["pos"][1] for n in nodes) - TITLE_H - 40
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes) + 40
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes) + 40
    ss = 3  # drawn at 3x, then scaled down: smooth lines and text
    scale = min(THUMB_SIZE[0] / (x1 - x0), THUMB_SIZE[1] / (y1 - y0)) * ss
    off = ((THUMB_SIZE[0] * ss - (x1 - x0) * scale) / 2, (THUMB_SIZE[1] * ss - (y1 - y0) * scale) / 2)

    def at(x, y):
        return off[0] + (x - x0) * scale, off[1] + (y - y0) * scale

    def font(px):
        try:
            return ImageFont.truetype("DejaVuSans.ttf", max(1, round(px * scale)))
        except OSError:
            return ImageFont.load_default()

    img = Image.new("RGB", (THUMB_SIZE[0] * ss, THUMB_SIZE[1] * ss), "#202020")
    d = ImageDraw.Draw(img)
    step = max(4, round(40 * scale))
    for gx in range(0, img.width, step):
        for gy in range(0, img.height, step):
            d.point((gx, gy), fill="#2c2c2c")
    small, big = font(14), font(16)
    sockets = {}  # (node, "in"/"out", slot) -> canvas point
    for n in nodes:
        x, y = n["pos"]
        for i, _ in enumerate(n["inputs"]):
            sockets[(n["id"], "in", i)] = at(x + 10, y + 14 + i * ROW_H)
        for i, _ in enumerate(n["outputs"]):
            sockets[(n["id"], "out", i)] = at(x + n["size"][0] - 10, y + 14 + i * ROW_H)
    for _, src, src_slot, dst, dst_slot, typ in ui["links"]:
        (ax, ay), (bx, by) = sockets[(src, "out", src_slot)], sockets[(dst, "in", dst_slot)]
        bend = max(abs(bx - ax) * 0.5, 40 * scale)
        pts = []
        for k in range(41):
            t = k / 40
            c = [(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3]
            pts.append((c[0] * ax + c[1] * (ax + bend) + c[2] * (bx - bend) + c[3] * bx,
                        c[0] * ay + c[1] * ay + c[2] * by + c[3] * by))
        d.line(pts, fill=LINK_COLOURS.get(typ, "#9e9e9e"), width=max(1, round(3 * scale)), joint="curve")
    for n in nodes:
        x, y = n["pos"]
        w, h = n["size"][0], n["size"][1]
        r = max(1, round(8 * scale))
        d.rounded_rectangle([*at(x, y - TITLE_H), *at(x + w, y + h)], r, fill="#353535", outline="#111111",
                            width=max(1, round(scale)))
        d.rounded_rectangle([*at(x, y - TITLE_H), *at(x + w, y)], r, fill="#222222")
        title = n.get("title") or NODE_DISPLAY_NAME_MAPPINGS.get(n["type"], n["type"])
        d.ellipse([*at(x + 10, y - 20), *at(x + 20, y - 10)], fill="#888888")
        d.text(at(x + 28, y - 23), title, fill="#dddddd", font=big)
        for (nid, side, slot), (px, py) in sockets.items():
            if nid != n["id"]:
                continue
            typ = (n["inputs"] if side == "in" else n["outputs"])[slot]["type"].split(",")[-1]
            rad = 5 * scale
            d.ellipse([px - rad, py - rad, px + rad, py + rad], fill=LINK_COLOURS.get(typ, "#9e9e9e"))
            name = (n["inputs"] if side == "in" else n["outputs"])[slot]["name"]
            tx, ty = px + (12 * scale if side == "in" else -12 * scale), py
            d.text((tx, ty), name, fill="#b0b0b0", font=small, anchor="lm" if side == "in" else "rm")
        wy = y + 8 + max(len(n["inputs"]), len(n["outputs"])) * ROW_H
        for name, value in _widgets(n):
            if wy + ROW_H > y + h:
                break
            d.rounded_rectangle([*at(x + 10, wy), *at(x + w - 10, wy + ROW_H - 4)], max(1, round(6 * scale)),
                                fill="#222222")
            mid = at(x, wy + (ROW_H - 4) / 2)[1]
            text = str(value).replace("\n", " ")
            if isinstance(value, str) and len(text) > 34:
                text = text[:33] + "..."
            d.text((at(x + 20, 0)[0], mid), name, fill="#999999", font=small, anchor="lm")
            d.text((at(x + w - 20, 0)[0], mid), text, fill="#dddddd", font=small, anchor="rm")
            wy += ROW_H
    out = io.BytesIO()
    img.resize(THUMB_SIZE, Image.LANCZOS).save(out, "JPEG", quality=90)
    return out.getvalue()


def _widgets(node: dict) -> list[tuple[str, object]]:
    """(name, value) of a UI node's widgets, without the seeds' "control after generate" values."""
    values, pairs = list(node["widgets_values"]), []
    for name, kind, _, options in spec(node["type"])[0]:
        if kind == "WIDGET" and values:
            pairs.append((name, values.pop(0)))
            if values and (options.get("control_after_generate") or name in ("seed", "noise_seed")):
                values.pop(0)
    return pairs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report files that differ")
    args = ap.parse_args()
    stale = []
    for path, text in render().items():
        if not path.exists() or path.read_text() != text:
            stale.append(path)
            if not args.check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    for name in WORKFLOWS:  # thumbnails: drawn only where missing (a screenshot of the canvas is kept)
        path = HERE / f"{name}.jpg"
        if not path.exists():
            stale.append(path)
            if not args.check:
                path.write_bytes(thumbnail(json.loads((HERE / f"{name}.json").read_text())))
    for p in stale:
        print(("out of date: " if args.check else "wrote ") + str(p.relative_to(HERE.parent)))
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
