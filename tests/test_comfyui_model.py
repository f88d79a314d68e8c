"""The pack's MODEL inside a real ComfyUI: its KSampler, LoRA loader and memory manager on our DiT give ComfyUI's own
numbers (comfy.sd.load_diffusion_model, i.e. UNETLoader, on the same file).

ComfyUI's model detection fixes 24 heads of 128, so the test model is 3072 wide with one double and one single
block (0.56 B parameters). fp32 on the CPU; tolerance 1e-5 relative on the sampled latent (the two models run the
same float32 operations in slightly different orders).

    COMFYUI_DIR=/tmp/comfyui pytest -m comfyui tests/test_comfyui_model.py
"""
from __future__ import annotations

from pathlib import Path

import pytest
from comfyui_script import COMFYUI_DIR, run_in_comfyui
from safetensors.torch import load_file

from kontext.config import FluxConfig

pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(
    not COMFYUI_DIR, reason="needs a real ComfyUI: set COMFYUI_DIR (tests/comfyui_env.sh builds one)")]

SCRIPT = '''
    from kontext import load_dit
    from kontext.ops import dense_state_dict

    def ours(precision="fp32"):
        return model_for(load_dit(WEIGHTS, precision=precision, dtype=torch.float32), "cpu")

    theirs = comfy.sd.load_diffusion_model(WEIGHTS, model_options={"dtype": torch.float32})
    mine = ours()
    io = load_file(IO)
    out = {}

    def cond(refs, method, batch=1):
        opts = {"pooled_output": io["y"].repeat(batch, 1), "guidance": 2.5}
        if refs:
            opts.update(reference_latents=refs, reference_latents_method=method)
        neg = [[torch.zeros_like(io["ctx"]).repeat(batch, 1, 1),
                {"pooled_output": torch.zeros_like(io["y"]).repeat(batch, 1), "guidance": 2.5}]]
        return [[io["ctx"].repeat(batch, 1, 1), opts]], neg

    def sample(model, name, refs, method, shape, cfg):
        pos, neg = cond(refs, method)
        lat = {"samples": torch.zeros(shape)}
        out[name] = common_ksampler(model, 7, 3, cfg, "euler", "simple", pos, neg, lat)[0]["samples"]

    cases = {"one_offset": ([io["r1"]], "offset", (1, 16, 8, 10), 1.0),
             "two_offset_odd": ([io["r1"], io["r2"]], "offset", (1, 16, 7, 9), 1.0),
             "two_index_odd": ([io["r1"], io["r2"]], "index", (1, 16, 9, 7), 1.0),
             "batch2_cfg": ([io["r2"]], "offset", (2, 16, 8, 8), 2.0)}
    for case, (refs, method, shape, cfg) in cases.items():
        for who, model in (("ours", mine), ("theirs", theirs)):
            sample(model, f"{case}.{who}", refs, method, shape, cfg)

    lora = load_file(LORA)
    case = cases["two_offset_odd"]
    for who, model in (("ours", mine), ("theirs", theirs)):
        patched = comfy.sd.load_lora_for_models(model, None, lora, 0.8, 0)[0]
        sample(patched, f"lora.{who}", *case)
    # The same LoRA in diffusers/PEFT names (q, k, v split), through the Kontext LoRA node's patches.
    from kontext_pack.nodes.lora import comfy_patches
    from kontext.lora.formats import read_lora

    split = read_lora(LORA_DIFFUSERS, mine.model.diffusion_model.config)
    patched = mine.clone()
    patched.add_patches(comfy_patches(split), 0.8)
    sample(patched, "lora.node_diffusers", *case)

    # A LoRA on fp8 weights: applied to the dequantised weight at run time, so it must equal the same LoRA on a
    # dense model holding exactly those dequantised weights.
    q = ours("fp8")
    dense_dit = load_dit(WEIGHTS, precision="fp32")
    dense_dit.load_state_dict({k: v.float() for k, v in dense_state_dict(q.model.diffusion_model.kontext_dit,
                                                                          torch.float32).items()})
    for who, model in (("fp8", q), ("fp8_dense", model_for(dense_dit, "cpu"))):
        sample(comfy.sd.load_lora_for_models(model, None, lora, 0.8, 0)[0], f"lora.{who}", *case)

    # Low VRAM: every layer left where it is, weights cast at use and the LoRA applied as a run-time function.
    dit = mine.model.diffusion_model.kontext_dit
    patched = comfy.sd.load_lora_for_models(mine, None, lora, 0.8, 0)[0]
    mm.unload_all_models()  # every LoRA merged into our weights by the runs above is taken out again
    patched.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1, load_weights=True)
    lowvram = sum(1 for m in patched.model.modules() if getattr(m, "comfy_cast_weights", False))
    refs = [patched.model.process_latent_in(r) for r in case[0]]
    x = torch.randn(case[2], generator=torch.Generator().manual_seed(3))
    kw = dict(c_crossattn=io["ctx"], y=io["y"], guidance=torch.tensor([2.5]), ref_latents=refs)
    with torch.no_grad():
        out["lowvram.partial"] = patched.model.apply_model(x, torch.tensor([0.6]), **kw)
    patched.unpatch_model(torch.device("cpu"))
    patched.patch_model(device_to=torch.device("cpu"))
    with torch.no_grad():
        out["lowvram.full"] = patched.model.apply_model(x, torch.tensor([0.6]), **kw)
    patched.unpatch_model(torch.device("cpu"))
    mm.unload_all_models()
    fresh = load_dit(WEIGHTS, precision="fp32").state_dict()
    restored = all(torch.equal(fresh[k], v) for k, v in dit.state_dict().items())
    save_file({k: v.float().contiguous() for k, v in out.items()}, OUT,
              metadata={"lowvram_layers": str(lowvram), "restored": str(restored)})
'''


def _lora(path: Path, cfg: FluxConfig) -> None:
    """A rank-4 LoRA in ComfyUI's BFL naming for a few layers of both block kinds."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(11)
    h, sd = cfg.hidden_size, {}
    for name, out_f, in_f in (("double_blocks.0.img_attn.qkv", 3 * h, h), ("double_blocks.0.txt_mlp.0", 4 * h, h),
                              ("single_blocks.0.linear2", h, 5 * h), ("double_blocks.0.img_mod.lin", 6 * h, h)):
        sd[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(out_f, 4, generator=g) * 0.02
        sd[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(4, in_f, generator=g) * 0.02
        sd[f"diffusion_model.{name}.alpha"] = torch.tensor(2.0)
    save_file(sd, path)
    # The same LoRA under diffusers/PEFT names: q, k, v split from the fused qkv, alpha folded into up (PEFT files
    # carry none, so their scale is 1).
    names = {"double_blocks.0.txt_mlp.0": "transformer_blocks.0.ff_context.net.0.proj",
             "single_blocks.0.linear2": "single_transformer_blocks.0.proj_out",
             "double_blocks.0.img_mod.lin": "transformer_blocks.0.norm1.linear"}
    peft = {}
    for name in ("double_blocks.0.img_attn.qkv", *names):
        up = sd[f"diffusion_model.{name}.lora_up.weight"] * (2.0 / 4)
        down = sd[f"diffusion_model.{name}.lora_down.weight"]
        parts = zip(("to_q", "to_k", "to_v"), up.split(h)) if name.endswith("qkv") else [(None, up)]
        for proj, part in parts:
            stem = f"transformer_blocks.0.attn.{proj}" if proj else names[name]
            peft[f"transformer.{stem}.lora_A.weight"] = down.clone()
            peft[f"transformer.{stem}.lora_B.weight"] = part.contiguous()
    save_file(peft, path.with_name("lora_diffusers.safetensors"))


def test_ksampler_lora_and_lowvram_on_our_model_match_comfyuis(tmp_path):
    import torch
    from safetensors.torch import save_file

    from kontext.tiny import write_tiny_dit

    cfg = FluxConfig(hidden_size=3072, num_heads=24, depth=1, depth_single_blocks=1, axes_dim=(16, 56, 56))
    weights = write_tiny_dit(tmp_path / "models", config=cfg)["dit"]
    _lora(tmp_path / "lora.safetensors", cfg)
    g = torch.Generator().manual_seed(0)
    save_file({"ctx": torch.randn(1, 6, 4096, generator=g), "y": torch.randn(1, 768, generator=g),
               "r1": torch.randn(1, 16, 8, 10, generator=g), "r2": torch.randn(1, 16, 7, 5, generator=g)},
              tmp_path / "io.safetensors")
    paths = dict(WEIGHTS=str(weights), IO=str(tmp_path / "io.safetensors"), LORA=str(tmp_path / "lora.safetensors"),
                 LORA_DIFFUSERS=str(tmp_path / "lora_diffusers.safetensors"), OUT=str(tmp_path / "out.safetensors"))
    run_in_comfyui(SCRIPT, **paths)
    from safetensors import safe_open

    with safe_open(paths["OUT"], "pt") as f:
        meta = f.metadata()
    out = load_file(paths["OUT"])

    def rel(a, b):
        return ((out[a] - out[b]).abs().max() / out[b].abs().max()).item()

    for case in ("one_offset", "two_offset_odd", "two_index_odd", "batch2_cfg", "lora"):
        assert rel(f"{case}.ours", f"{case}.theirs") <= 1e-5, case
    assert rel("lora.ours", "two_offset_odd.ours") > 1e-4  # the LoRA changed the result
    assert rel("lora.node_diffusers", "lora.theirs") <= 1e-5  # diffusers names, our reader, ComfyUI's patches
    assert rel("lora.fp8", "lora.fp8_dense") <= 1e-5  # on fp8 weights: no re-quantisation
    assert int(meta["lowvram_layers"]) > 10 and rel("lowvram.partial", "lowvram.full") <= 1e-6
    assert meta["restored"] == "True"  # unloading restored the base weights exactly


PATCH_SCRIPT = '''
    from kontext import load_dit

    theirs = comfy.sd.load_diffusion_model(WEIGHTS, model_options={"dtype": torch.float32})
    mine = model_for(load_dit(WEIGHTS, precision="fp32", dtype=torch.float32), "cpu")
    io = load_file(IO)
    out = {}

    def patched(model, who):
        def double(args, extra):
            out[f"double_pe.{who}"] = args["pe"].clone()
            res = extra["original_block"](args)  # the pe as received
            return {"img": res["img"] * 1.5, "txt": res["txt"]}

        def single(args, extra):
            out[f"single_pe.{who}"] = args["pe"].clone()
            return extra["original_block"]({**args, "pe": args["pe"].clone()})  # another tensor, the same rope

        m = model.clone()
        m.set_model_patch_replace(double, "dit", "double_block", 0)
        m.set_model_patch_replace(single, "dit", "single_block", 0)
        return m

    opts = {"pooled_output": io["y"].repeat(2, 1), "guidance": 2.5, "reference_latents": [io["r1"]],
            "reference_latents_method": "offset"}
    pos = [[io["ctx"].repeat(2, 1, 1), opts]]
    for who, model in (("ours", mine), ("theirs", theirs)):
        lat = {"samples": torch.zeros(2, 16, 8, 10)}
        out[f"sample.{who}"] = common_ksampler(patched(model, who), 7, 2, 1.0, "euler", "simple", pos, pos,
                                               lat)[0]["samples"]
        out[f"plain.{who}"] = common_ksampler(model, 7, 2, 1.0, "euler", "simple", pos, pos, lat)[0]["samples"]
    save_file({k: v.float().contiguous() for k, v in out.items()}, OUT)
'''


def test_block_patches_get_comfyuis_rope_tensor(tmp_path):
    """A patch in patches_replace["dit"] receives as `pe` what ComfyUI's own Flux gives it (its EmbedND tensor
    [B, 1, N, D/2, 2, 2]), and the original block it calls runs with that pe, passed on or replaced by a copy."""
    import torch
    from safetensors.torch import save_file

    from kontext.tiny import write_tiny_dit

    cfg = FluxConfig(hidden_size=3072, num_heads=24, depth=1, depth_single_blocks=1, axes_dim=(16, 56, 56))
    weights = write_tiny_dit(tmp_path / "models", config=cfg)["dit"]
    g = torch.Generator().manual_seed(0)
    save_file({"ctx": torch.randn(1, 6, 4096, generator=g), "y": torch.randn(1, 768, generator=g),
               "r1": torch.randn(1, 16, 7, 9, generator=g)}, tmp_path / "io.safetensors")
    paths = dict(WEIGHTS=str(weights), IO=str(tmp_path / "io.safetensors"), OUT=str(tmp_path / "out.safetensors"))
    run_in_comfyui(PATCH_SCRIPT, **paths)
    out = load_file(paths["OUT"])
    n = 6 + 4 * 5 + 4 * 5  # text, target and reference tokens
    for kind in ("double_pe", "single_pe"):
        ours, theirs = out[f"{kind}.ours"], out[f"{kind}.theirs"]
        assert ours.shape == theirs.shape == (2, 1, n, 64, 2, 2) and ours.dtype == theirs.dtype == torch.float32
        assert (ours - theirs).abs().max() <= 1e-6, kind  # the same rope tables, to float32 rounding

    def rel(a, b):
        return ((out[a] - out[b]).abs().max() / out[b].abs().max()).item()

    assert rel("sample.ours", "sample.theirs") <= 1e-5
    assert rel("sample.ours", "plain.ours") > 1e-3  # the patches changed the result
