"""Run a script inside the real ComfyUI of $COMFYUI_DIR (its own venv), with the pack imported the way ComfyUI
imports a custom node folder. For the tests marked `comfyui`."""
from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
REPO = Path(__file__).resolve().parents[1]

PREAMBLE = textwrap.dedent('''
    import importlib.util, json, sys
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, COMFY)
    import comfy.options
    comfy.options.enable_args_parsing()
    import torch
    from safetensors.torch import load_file, save_file
    import comfy.model_management as mm
    import comfy.sd
    from nodes import common_ksampler  # ComfyUI's own KSampler

    # The pack, imported the way ComfyUI imports a custom node folder (its name must not shadow ComfyUI's nodes).
    spec = importlib.util.spec_from_file_location("kontext_pack", REPO + "/__init__.py",
                                                  submodule_search_locations=[REPO])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["kontext_pack"] = pack
    spec.loader.exec_module(pack)
    from kontext_pack.nodes.placement import model_for
''')


def run_in_comfyui(body: str, timeout: int = 1500, **paths: str) -> None:
    """Run PREAMBLE + `body` in ComfyUI's interpreter, with COMFY, REPO and each of `paths` as string globals."""
    python = os.environ.get("COMFYUI_PYTHON") or str(Path(COMFYUI_DIR) / ".venv" / "bin" / "python")
    names = {"COMFY": COMFYUI_DIR, "REPO": str(REPO), **paths}
    script = "".join(f"{k} = {json.dumps(v)}\n" for k, v in names.items()) + PREAMBLE + textwrap.dedent(body)
    run = subprocess.run([python, "-c", script], cwd=COMFYUI_DIR, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-4000:]
