"""Numerical parity with ComfyUI's own Flux model (comfy/ldm/flux/model.py) on the same tiny weights.

ComfyUI's loader hard-codes the full model size, so the test builds its Flux class directly with the tiny config, in
ComfyUI's own Python environment (a subprocess), loads make-tiny's BFL file into it, and runs its forward with
reference latents, including odd-sized ones (as ComfyUI's VAEEncode produces) and both id methods. Our DiT must give
the same velocity, through our packing, ids, padding and slicing. fp32 on CPU: tolerance 1e-5 relative.

    tests/comfyui_env.sh /tmp/comfyui          # a CPU ComfyUI v0.8.0 with its own .venv
    COMFYUI_DIR=/tmp/comfyui pytest -m comfyui tests/test_comfyui_parity.py
"""
from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import rel_err
from safetensors.torch import load_file, save_file

import kontext
from kontext.denoiser import Denoiser
from kontext.latents import to_raw

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(
    not COMFYUI_DIR, reason="needs a real ComfyUI: set COMFYUI_DIR (`tests/comfyui_env.sh DEST` builds one)")]

SCRIPT = textwrap.dedent('''
    import sys
    sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI reads its flags at import
    sys.path.insert(0, COMFY)
    import comfy.options
    comfy.options.enable_args_parsing()  # as ComfyUI's main.py does, so that --cpu is honoured
    import torch
    from safetensors.torch import load_file, save_file
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    cfg = dict(in_channels=16, out_channels=16, vec_in_dim=64, context_in_dim=64, hidden_size=128, mlp_ratio=4.0,
               num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 28, 28], theta=10000, patch_size=2,
               qkv_bias=True, guidance_embed=True, txt_ids_dims=[])
    model = Flux(dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init, **cfg)
    model.load_state_dict({k: v.float() for k, v in load_file(WEIGHTS).items()}, strict=True)
    io = load_file(IO)
    refs = [io[k] for k in sorted(k for k in io if k.startswith("ref"))]
    out = {}
    for method in ("offset", "index"):
        with torch.no_grad():
            out[method] = model(io["x"], io["t"], io["txt"], y=io["y"], guidance=io["g"], ref_latents=refs,
                                ref_latents_method=method)
    save_file(out, OUT)
''')


def test_dit_velocity_matches_comfyui(tiny_models, tmp_path):
    python = os.environ.get("COMFYUI_PYTHON") or str(Path(COMFYUI_DIR) / ".venv" / "bin" / "python")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 12, generator=g)  # model-space target latent (64x96 px)
    refs = {"ref0": torch.randn(1, 16, 9, 7, generator=g), "ref1": torch.randn(1, 16, 8, 10, generator=g),
            "ref2": torch.randn(1, 16, 5, 5, generator=g)}  # odd sides: padded to whole patches
    io = {"x": x, "t": torch.tensor([0.63]), "g": torch.tensor([2.5]), "txt": torch.randn(1, 9, 64, generator=g),
          "y": torch.randn(1, 64, generator=g), **refs}
    save_file(io, tmp_path / "io.safetensors")
    script = f"COMFY = {COMFYUI_DIR!r}\nWEIGHTS = {str(tiny_models['dit'])!r}\nIO = {str(tmp_path / 'io.safetensors')!r}\n" \
             f"OUT = {str(tmp_path / 'out.safetensors')!r}\n" + SCRIPT
    run = subprocess.run([python, "-c", script], cwd=COMFYUI_DIR, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = load_file(tmp_path / "out.safetensors")

    dit = kontext.load_dit(tiny_models["dit"])
    ref_list = [refs[k] for k in sorted(refs)]
    for method in ("offset", "index"):
        # Our references travel as raw VAE latents; map these model-space ones back, the denoiser maps them in.
        denoiser = Denoiser(dit, tuple(x.shape[2:]), [to_raw(r) for r in ref_list], method)
        with torch.no_grad():
            ours = denoiser(x, io["t"], io["txt"], io["y"], io["g"])
        # The raw<->model-space round trip costs float32 rounding on the reference latents: ~1e-7 relative.
        assert rel_err(ours, theirs[method]) <= 1e-5, method
