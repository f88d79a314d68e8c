"""ComfyUI workflows: reading a file (API or simple UI format), converting the UI format with the server's
/object_info (no bypassed nodes; reroutes are followed), and patching the image, prompt and seed inputs."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from .server import QueueError, Server

WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
UI_ONLY = ("Note", "MarkdownNote", "PrimitiveNode", "Reroute")


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
