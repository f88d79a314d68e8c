"""LoRAs on a loaded DiT: merged or as a low-rank branch, on dense and quantised weights, never changing the base.

The reference is ComfyUI's formula written out here: W' = W + strength * (alpha / rank) * up @ down, per row slice of
a fused projection, in float32. fp32 merges agree to float rounding (1e-6 relative); a branch computes the same
product in another order (1e-5).
"""
from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from safetensors.torch import save_file

import kontext
from kontext.cli import main as cli_main
from kontext.denoiser import Denoiser
from kontext.errors import CheckpointError, InputError
from kontext.lora.apply import with_loras
from kontext.ops import dense_state_dict

H = 128  # the tiny DiT's hidden size


def write_lora(path, seed: int, layers=("double_blocks.0.img_attn.qkv", "single_blocks.1.linear2"), rank: int = 4,
               alpha: float = 2.0):
    """A ComfyUI-named LoRA on `layers` of the tiny DiT; returns {layer: (up, down, alpha)}."""
    shapes = {"double_blocks.0.img_attn.qkv": (3 * H, H), "single_blocks.1.linear2": (H, H + 4 * H),
              "double_blocks.1.txt_mlp.0": (4 * H, H), "single_blocks.0.modulation.lin": (3 * H, H)}
    g = torch.Generator().manual_seed(seed)
    sd, parts = {}, {}
    for name in layers:
        out_f, in_f = shapes[name]
        up, down = torch.randn(out_f, rank, generator=g) * 0.1, torch.randn(rank, in_f, generator=g) * 0.1
        sd.update({f"diffusion_model.{name}.lora_up.weight": up, f"diffusion_model.{name}.lora_down.weight": down,
                   f"diffusion_model.{name}.alpha": torch.tensor(alpha)})
        parts[name] = (up, down, alpha)
    save_file(sd, path)
    return parts


def merged_by_formula(base: dict, loras: list[tuple[dict, float]]) -> dict:
    out = dict(base)
    for parts, strength in loras:
        for name, (up, down, alpha) in parts.items():
            key = f"{name}.weight"
            out[key] = out[key].float() + strength * (alpha / down.shape[0]) * (up @ down)
    return out


def velocity(dit, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z, ref = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
    with torch.no_grad():
        return Denoiser(dit, (8, 8), [ref])(z, 0.6, torch.randn(1, 5, 64, generator=g), torch.randn(1, 64, generator=g),
                                            2.5)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    a = write_lora(d / "a.safetensors", 1)
    b = write_lora(d / "b.safetensors", 2, layers=("double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.0"))
    return {"a": (d / "a.safetensors", a), "b": (d / "b.safetensors", b)}


def test_merged_weights_follow_comfyuis_formula_and_stack(tiny_models, files):
    dit = kontext.load_dit(tiny_models["dit"])
    base = {k: v.clone() for k, v in dit.state_dict().items()}
    (pa, a), (pb, b) = files["a"], files["b"]
    out = with_loras(dit, [(pa, 0.8), (pb, -0.5)])
    want = merged_by_formula(base, [(a, 0.8), (b, -0.5)])
    got = out.state_dict()
    for key in want:
        assert rel_err(got[key], want[key]) <= 1e-6, key
    assert out.double_blocks[1].img_attn.qkv.weight is dit.double_blocks[1].img_attn.qkv.weight  # untouched: shared
    assert all(torch.equal(v, base[k]) for k, v in dit.state_dict().items())  # the base never changes


def test_strength_change_and_removal_are_exact(tiny_models, files):
    pipe = kontext.KontextPipeline.from_models_dir(tiny_models["dit"].parents[1])
    plain = velocity(pipe.dit)
    pipe.set_loras([(files["a"][0], 1.0)])
    strong = velocity(pipe.dit)
    pipe.set_loras([(files["a"][0], 0.25)])
    weak = velocity(pipe.dit)
    pipe.set_loras(())
    assert torch.equal(velocity(pipe.dit), plain) and pipe.dit is pipe.base_dit
    assert rel_err(strong, plain) > 1e-3 and rel_err(weak, plain) < rel_err(strong, plain)
    fresh = kontext.load_dit(tiny_models["dit"], loras=[(files["a"][0], 0.25)])
    assert torch.equal(velocity(fresh), weak)


def test_branch_equals_merge_on_dense_weights(tiny_models, files):
    dit = kontext.load_dit(tiny_models["dit"])
    loras = [(files["a"][0], 0.8), (files["b"][0], 0.6)]
    merged, branch = with_loras(dit, loras, mode="merge"), with_loras(dit, loras, mode="branch")
    assert branch.double_blocks[0].img_attn.qkv.lora_branch is not None
    assert rel_err(velocity(branch), velocity(merged)) <= 1e-5


@pytest.mark.parametrize("precision", ["fp8", "fp4"])
def test_quantised_weights_get_a_branch_not_a_requantisation(tiny_models, files, precision):
    """The branch beside a quantised matmul equals the LoRA merged into the dequantised weights (float rounding);
    merging and quantising again would add the format's rounding error on top, so the branch is kept."""
    q = kontext.load_dit(tiny_models["dit"], precision=precision)
    loras = [(files["a"][0], 0.8), (files["b"][0], 0.6)]
    with_branch = with_loras(q, loras)
    layer = with_branch.double_blocks[0].img_attn.qkv
    assert layer.fmt == precision and layer.lora_branch is not None
    assert layer.weight is q.double_blocks[0].img_attn.qkv.weight  # the quantised base, shared as it was
    dense = kontext.FluxDiT(q.config)
    dense.load_state_dict({k: v.float() for k, v in dense_state_dict(q, torch.float32).items()})
    exact = velocity(with_loras(dense.eval(), loras))
    err_branch = rel_err(velocity(with_branch), exact)
    requantised = kontext.FluxDiT(q.config)
    requantised.load_state_dict(dense_state_dict(with_loras(dense, loras), torch.float32))
    from kontext.flux_loader import QUANTIZABLE

    err_requant = rel_err(velocity(_quantised(requantised, precision, QUANTIZABLE)), exact)
    assert err_branch <= 1e-5 and err_requant > 10 * err_branch


def _quantised(dense: kontext.FluxDiT, fmt: str, prefixes) -> kontext.FluxDiT:
    """`dense` with every block linear quantised again (the merge-and-re-quantise alternative)."""
    from kontext.quant import fp8, nvfp4

    with torch.no_grad():
        for name, m in dense.named_modules():
            if isinstance(m, torch.nn.Linear) and name.startswith(prefixes):
                w = m.weight.float()
                back = fp8.dequantize(*fp8.quantize(w), torch.float32) if fmt == "fp8" else \
                    nvfp4.quantize(w).dequantize(torch.float32)
                m.weight.copy_(back)
    return dense.eval()


def test_bad_lora_arguments_fail_before_the_dit_loads(tiny_models, files, tmp_path, monkeypatch):
    import kontext.flux_loader as fl

    monkeypatch.setattr(fl, "load_plan", lambda *a, **k: pytest.fail("weights loaded before the LoRA was checked"))
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)}, sdxl)
    with pytest.raises(CheckpointError):
        kontext.load_dit(tiny_models["dit"], loras=[(sdxl, 1.0)])
    with pytest.raises(InputError, match="strength"):
        kontext.load_dit(tiny_models["dit"], loras=[(files["a"][0], float("nan"))])
    with pytest.raises(InputError, match="pairs"):
        kontext.load_dit(tiny_models["dit"], loras=str(files["a"][0]))


def test_command_line_lora(files, tmp_path, capsys):
    out = tmp_path / "o.png"
    base = ["edit", "--tiny", "--prompt", "x", "--steps", "1", "--width", "64", "--height", "64"]
    assert cli_main(base + ["--out", str(out), "--lora", f"{files['a'][0]}:0.7", "--lora", str(files["b"][0])]) == 0
    assert out.exists()
    assert cli_main(base + ["--out", str(tmp_path / "p.png"), "--lora", str(tmp_path / "missing.safetensors")]) == 2
    assert "--lora" in capsys.readouterr().err


def test_kontext_lora_node_outside_comfyui(tiny_models, files, monkeypatch, tmp_path):
    import shutil

    from nodes import NODE_CLASS_MAPPINGS as M
    from nodes.model import StandaloneModel, kontext_dit

    monkeypatch.setenv("KONTEXT_MODELS_DIR", str(tmp_path))
    (tmp_path / "loras").mkdir()
    shutil.copy(files["a"][0], tmp_path / "loras" / "a.safetensors")
    dit = kontext.load_dit(tiny_models["dit"])
    model = StandaloneModel(dit, torch.device("cpu"))
    assert "a.safetensors" in M["KontextLoraLoader"].INPUT_TYPES()["required"]["lora_name"][0]
    (patched,) = M["KontextLoraLoader"]().apply(model, "a.safetensors", 0.8)
    want = merged_by_formula(dit.state_dict(), [(files["a"][1], 0.8)])["double_blocks.0.img_attn.qkv.weight"]
    assert rel_err(kontext_dit(patched).double_blocks[0].img_attn.qkv.weight, want) <= 1e-6
    assert M["KontextLoraLoader"]().apply(model, "a.safetensors", 0.0)[0] is model
    with pytest.raises(InputError, match="not found"):
        M["KontextLoraLoader"]().apply(model, "nope.safetensors", 1.0)


def test_full_deltas_and_bias_deltas_on_quantised_weights(tiny_models, tmp_path):
    """`.diff` on an fp8 weight runs at each call on the dequantised weight; `.diff_b` merges into the dense bias:
    together they equal the same file merged into the dequantised model."""
    g = torch.Generator().manual_seed(5)
    name = "double_blocks.1.img_mlp.0"
    path = tmp_path / "diff.safetensors"
    save_file({f"diffusion_model.{name}.diff": torch.randn(4 * H, H, generator=g) * 0.01,
               f"diffusion_model.{name}.diff_b": torch.randn(4 * H, generator=g) * 0.01}, path)
    q = kontext.load_dit(tiny_models["dit"], precision="fp8")
    patched = with_loras(q, [(path, 0.9)])
    layer = patched.double_blocks[1].img_mlp[0]
    assert layer.weight_function and layer.lora_branch is None and layer.bias is not q.double_blocks[1].img_mlp[0].bias
    dense = kontext.FluxDiT(q.config)
    dense.load_state_dict({k: v.float() for k, v in dense_state_dict(q, torch.float32).items()})
    assert rel_err(velocity(patched), velocity(with_loras(dense.eval(), [(path, 0.9)]))) <= 1e-5
