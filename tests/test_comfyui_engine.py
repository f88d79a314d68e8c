"""An engine MODEL inside a real ComfyUI: ComfyUI's KSampler on the pack's MODEL whose DiT is an exported graph
(onnxruntime standing in for TensorRT, which no machine of this project has) gives ComfyUI's own numbers, and
ComfyUI's LoraLoader is refused on it instead of silently doing nothing.

3072 wide, one double and one single block (ComfyUI's model detection fixes 24 heads of 128), fp32 on the CPU, T5
context of 256 tokens (ComfyUI's length). Tolerance 1e-4 relative on the sampled latent (the graph computes RoPE
angles in float32; see tests/test_tensorrt.py).

    COMFYUI_DIR=/tmp/comfyui pytest -m comfyui tests/test_comfyui_engine.py
"""
from __future__ import annotations

import json

import pytest
from comfyui_script import COMFYUI_DIR, run_in_comfyui

from kontext.config import FluxConfig

pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(
    not COMFYUI_DIR, reason="needs a real ComfyUI: set COMFYUI_DIR (tests/comfyui_env.sh builds one)")]
pytest.importorskip("onnxscript", reason="the export needs onnxscript (pip install -e '.[test]')")

SCRIPT = '''
    from kontext.tensorrt.runtime import onnx_engine

    theirs = comfy.sd.load_diffusion_model(WEIGHTS, model_options={"dtype": torch.float32})
    engine = model_for(onnx_engine(ONNX), "cpu")
    io = load_file(IO)
    out, said = {}, {}

    def sample(model, name, refs, method, shape, cfg):
        opts = {"pooled_output": io["y"], "guidance": 2.5, "reference_latents": refs,
                "reference_latents_method": method}
        neg = [[torch.zeros_like(io["ctx"]), {"pooled_output": torch.zeros_like(io["y"]), "guidance": 2.5}]]
        lat = {"samples": torch.zeros(shape)}
        out[name] = common_ksampler(model, 7, 3, cfg, "euler", "simple", [[io["ctx"], opts]], neg, lat)[0]["samples"]

    cases = {"one_offset": ([io["r1"]], "offset", (1, 16, 8, 10), 1.0),
             "two_index_odd": ([io["r1"], io["r2"]], "index", (1, 16, 9, 7), 1.0),
             "cfg2": ([io["r2"]], "offset", (1, 16, 8, 8), 2.0)}
    for case, (refs, method, shape, cfg) in cases.items():
        for who, model in (("engine", engine), ("theirs", theirs)):
            sample(model, f"{case}.{who}", refs, method, shape, cfg)
    try:
        comfy.sd.load_lora_for_models(engine, None, load_file(LORA), 0.8, 0)
        said["lora"] = "accepted"
    except Exception as exc:
        said["lora"] = f"{type(exc).__name__}: {exc}"
    save_file({k: v.float().contiguous() for k, v in out.items()}, OUT, metadata={"said": json.dumps(said)})
'''


def test_ksampler_on_an_engine_model_matches_comfyuis_model(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from kontext import load_dit
    from kontext.tensorrt.export import export_onnx
    from kontext.tensorrt.profiles import Profile
    from kontext.tiny import write_tiny_dit

    cfg = FluxConfig(hidden_size=3072, num_heads=24, depth=1, depth_single_blocks=1, axes_dim=(16, 56, 56))
    weights = write_tiny_dit(tmp_path / "models", config=cfg)["dit"]
    onnx_path = tmp_path / "engine.onnx"
    export_onnx(load_dit(weights, precision="fp32"), onnx_path, profiles=[Profile("test", (12, 64, 120), (1, 1, 2))],
                source=weights)
    g = torch.Generator().manual_seed(0)
    save_file({"ctx": torch.randn(1, 256, 4096, generator=g), "y": torch.randn(1, 768, generator=g),
               "r1": torch.randn(1, 16, 8, 10, generator=g), "r2": torch.randn(1, 16, 7, 5, generator=g)},
              tmp_path / "io.safetensors")
    h = cfg.hidden_size
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight": torch.randn(3 * h, 4, generator=g),
               "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": torch.randn(4, h, generator=g)},
              tmp_path / "lora.safetensors")
    paths = dict(WEIGHTS=str(weights), ONNX=str(onnx_path), IO=str(tmp_path / "io.safetensors"),
                 LORA=str(tmp_path / "lora.safetensors"), OUT=str(tmp_path / "out.safetensors"))
    run_in_comfyui(SCRIPT, **paths)
    from safetensors import safe_open

    with safe_open(paths["OUT"], "pt") as f:
        said = json.loads(f.metadata()["said"])
    out = load_file(paths["OUT"])
    for case in ("one_offset", "two_index_odd", "cfg2"):
        a, b = out[f"{case}.engine"], out[f"{case}.theirs"]
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-4, case
    assert "InputError" in said["lora"] and "weights are fixed" in said["lora"]
