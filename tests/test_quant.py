"""FP8 and FP4 weights: formats kept as stored, quantised on load, written by `quantize`, refused when broken.

The independent reference is the dequantised model: on the CPU an fp8 or fp4 layer computes weight-only, so its
output must equal a dense model holding the dequantised weights, up to float32 rounding (1e-6 relative; the
products are formed in another order). Against fp32 the tolerances are the formats' own: e4m3 keeps 3 mantissa bits
(a relative step of 1/8 per weight, errors averaging down over K), e2m1 1 bit.
"""
from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import rel_err
from safetensors.torch import load_file, save_file

import kontext
from kontext.cli import main as cli_main
from kontext.config import FluxConfig
from kontext.denoiser import Denoiser
from kontext.errors import CheckpointError
from kontext.flux_loader import QUANTIZABLE, resident_bytes
from kontext.ops import Fp4Linear, Fp8Linear, dense_state_dict, linear_formats
from kontext.quant import fp8
from kontext.quant.writer import quantize_file
from kontext.latents import to_raw

P = "model.diffusion_model."


def velocity(dit, seed: int = 0) -> torch.Tensor:
    """One denoiser call with a reference, on fixed random inputs."""
    g = torch.Generator().manual_seed(seed)
    z, ref = torch.randn(1, 16, 8, 12, generator=g), torch.randn(1, 16, 6, 8, generator=g)
    txt, y = torch.randn(1, 7, 64, generator=g), torch.randn(1, 64, generator=g)
    with torch.no_grad():
        return Denoiser(dit, (8, 12), [ref])(z, 0.7, txt, y, 2.5)


def dense_twin(dit) -> kontext.FluxDiT:
    """A dense fp32 DiT holding `dit`'s dequantised weights: the reference for the weight-only paths."""
    twin = kontext.FluxDiT(dit.config)
    twin.load_state_dict({k: v.float() for k, v in dense_state_dict(dit, torch.float32).items()})
    return twin.eval()


@pytest.fixture(scope="module")
def written(tiny_models, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("quantized")
    return {p: quantize_file(tiny_models["dit"], d / f"kontext-tiny-{p}.safetensors", p) for p in ("fp8", "fp4")}


# ---------------------------------------------------------------------------------------------- fp8 codec

def test_fp8_round_trip_is_exact_for_representable_weights():
    g = torch.Generator().manual_seed(0)
    codes = torch.randn(16, 32, generator=g).mul(60).clamp(-448, 448).to(torch.float8_e4m3fn)
    codes[:, 0] = 448.0  # each row's largest magnitude is the format's largest: the scale comes back exactly
    scale = torch.tensor([2.0 ** -e for e in range(16)])
    w = codes.float() * scale[:, None]
    w8, s = fp8.quantize(w, per_row=True)
    assert torch.equal(s, scale) and torch.equal(w8.view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(fp8.dequantize(w8, s, torch.float32), w)


def test_fp8_quantisation_error_is_within_half_a_step():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    for per_row in (True, False):
        w8, s = fp8.quantize(w, per_row=per_row)
        back = fp8.dequantize(w8, s, torch.float32)
        # e4m3 rounds to 3 mantissa bits: |error| <= 2^-4 |w| for normal values, <= half the subnormal step below.
        scale = s[:, None] if per_row else s
        bound = torch.maximum(w.abs() / 16, scale * 2.0 ** -10)
        assert ((back - w).abs() <= bound * (1 + 1e-6)).all()


# ---------------------------------------------------------------------------------------------- loading

def test_fp8_file_stays_fp8_bit_for_bit(tiny_models):
    dit = kontext.load_dit(tiny_models["dit_fp8"])
    stored = load_file(tiny_models["dit_fp8"])
    layer = dit.double_blocks[0].img_attn.qkv
    assert isinstance(layer, Fp8Linear) and layer.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(layer.weight.view(torch.uint8), stored[P + "double_blocks.0.img_attn.qkv.weight"].view(torch.uint8))
    assert linear_formats(dit) == {"fp8": 36}
    # Weight-only on the CPU: the dequantised model's numbers (make-tiny's weights are exact in both files).
    assert rel_err(velocity(dit), velocity(kontext.load_dit(tiny_models["dit"]))) <= 1e-6


def test_mixed_files_stay_as_written(written):
    for prec, cls in (("fp8", Fp8Linear), ("fp4", Fp4Linear)):
        stored = load_file(written[prec])
        dit = kontext.load_dit(written[prec])
        layer = dit.single_blocks[1].linear1
        assert isinstance(layer, cls)
        assert torch.equal(layer.weight.view(torch.uint8), stored["single_blocks.1.linear1.weight"].view(torch.uint8))
        assert torch.equal(layer.weight_scale.float().flatten(),  # e4m3 and float32 scales are exact as float32
                           stored["single_blocks.1.linear1.weight_scale"].float().flatten())
        assert isinstance(dit.img_in, torch.nn.Linear)  # embedders stay dense
        assert rel_err(velocity(dit), velocity(dense_twin(dit))) <= 1e-6


@pytest.mark.parametrize("precision, limit", [("fp8", 5e-2), ("fp4", 2e-1)])
def test_quantised_on_load_within_tolerance_of_fp32(tiny_models, precision, limit):
    ref = velocity(kontext.load_dit(tiny_models["dit"], precision="fp32"))
    dit = kontext.load_dit(tiny_models["dit"], precision=precision)
    quantised = {n for n, m in dit.named_modules() if getattr(m, "fmt", "dense") == precision}
    assert quantised and all(n.startswith(QUANTIZABLE) for n in quantised)
    assert len(quantised) == 2 * 10 + 2 * 3  # every linear of the 2 double and 2 single blocks
    err = rel_err(velocity(dit), ref)
    assert 0 < err <= limit  # measured: fp8 2.1e-2, fp4 9.8e-2
    assert rel_err(velocity(dit), velocity(dense_twin(dit))) <= 1e-6


def test_precision_requests(tiny_models):
    """auto keeps the file's format; a dense precision dequantises it; fp8 of an fp8 file keeps it as stored."""
    fp8_file = tiny_models["dit_fp8"]
    assert linear_formats(kontext.load_dit(fp8_file, precision="bf16")) == {"dense": 36}
    kept = kontext.load_dit(fp8_file, precision="fp8")
    assert linear_formats(kept) == {"fp8": 36} and kept.img_in.weight_scale.shape == ()  # per tensor, as stored
    assert kontext.load_dit(fp8_file, dtype=torch.bfloat16).compute_dtype == torch.bfloat16
    with pytest.raises(kontext.InputError, match="unknown precision 'int8'"):
        kontext.load_dit(fp8_file, precision="int8")


def test_resident_bytes(tiny_models):
    """Weight bytes in memory: measured on the tiny models, counted on the meta device at full size."""
    def held(m):
        return sum(p.numel() * p.element_size() for p in m.parameters())

    for prec in ("bf16", "fp8", "fp4"):
        dit = kontext.load_dit(tiny_models["dit"], precision=prec, dtype=torch.bfloat16)
        assert held(dit) == resident_bytes(FluxConfig.tiny(), prec), prec
    full = {p: resident_bytes(FluxConfig.kontext_dev(), p) for p in ("bf16", "fp8", "fp4")}
    assert full["bf16"] == 23_802_816_640  # 11.9 B parameters in bf16: the release file's size
    assert full["fp8"] <= 12.5e9 and full["fp4"] <= 7.5e9  # 11.98 GB and 6.79 GB


# ---------------------------------------------------------------------------------------------- the quantize verb

def test_quantize_command_writes_comfyuis_mixed_layout(tiny_models, tmp_path, capsys):
    out = tmp_path / "fp4.safetensors"
    assert cli_main(["quantize", "--dit", str(tiny_models["dit_diffusers"]), "--out", str(out),
                     "--precision", "fp4"]) == 0
    sd = load_file(out)
    conf = json.loads(bytes(sd["double_blocks.0.img_mlp.0.comfy_quant"].tolist()))
    assert conf == {"format": "nvfp4"} and sd["double_blocks.0.img_mlp.0.weight"].dtype == torch.uint8
    assert sd["double_blocks.0.img_mlp.0.weight_scale_2"].shape == () and "img_in.comfy_quant" not in sd
    # The same weights from the diffusers folder and from the BFL file give the same bytes.
    again = quantize_file(tiny_models["dit"], tmp_path / "again.safetensors", "fp4")
    assert all(torch.equal(v, load_file(again)[k]) for k, v in sd.items())
    before = out.read_bytes()
    assert cli_main(["quantize", "--dit", str(tiny_models["dit"]), "--out", str(out), "--precision", "fp8"]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert not list(tmp_path.glob(".*.partial"))


# ---------------------------------------------------------------------------------------------- bad files

def _mixed_variant(written, tmp_path, change) -> Path:
    sd = load_file(written["fp4"])
    change(sd)
    p = tmp_path / "bad.safetensors"
    save_file(sd, p, metadata={"kontext_config": FluxConfig.tiny().to_json()})
    return p


L = "double_blocks.0.txt_mlp.2"


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.pop(f"{L}.weight_scale_2"), "has no 'weight_scale_2'"),
    (lambda sd: sd.pop(f"{L}.weight_scale"), "has no 'weight_scale'"),
    (lambda sd: sd.update({f"{L}.weight_scale": sd[f"{L}.weight_scale"][:64]}), "block scales"),
    (lambda sd: sd.update({f"{L}.weight": sd[f"{L}.weight"][:, :-8].contiguous()}), L),
    (lambda sd: sd.update({f"{L}.comfy_quant": torch.tensor(list(b'{"format": "int4_awq"}'), dtype=torch.uint8)}),
     "format 'int4_awq'"),
    (lambda sd: sd.update({f"{L}.comfy_quant": torch.tensor(list(b'{"format'), dtype=torch.uint8)}),
     "not a readable quantisation description"),
    (lambda sd: sd.update({f"{L}.comfy_quant": torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)}),
     "says float8_e4m3fn but its weight is stored as torch.uint8"),
])
def test_broken_quantised_layers_are_refused_naming_the_layer(written, tmp_path, change, message):
    p = _mixed_variant(written, tmp_path, change)
    with pytest.raises(CheckpointError, match=message) as info:
        kontext.load_dit(p)
    assert str(p) in str(info.value)


def test_fp8_layer_without_scale_and_foreign_quantisations(written, tiny_models, tmp_path):
    sd = load_file(written["fp8"])
    sd.pop(f"{L}.weight_scale")
    p = tmp_path / "noscale.safetensors"
    save_file(sd, p)
    with pytest.raises(CheckpointError, match=f"'{L}' .*has no 'weight_scale'"):
        kontext.load_dit(p)
    base = load_file(tiny_models["dit"])
    int8 = dict(base, **{"img_in.weight": torch.zeros(base["img_in.weight"].shape, dtype=torch.int8)})
    save_file(int8, tmp_path / "int8.safetensors")
    with pytest.raises(CheckpointError, match="int8 quantised weight"):
        kontext.load_dit(tmp_path / "int8.safetensors")
    svd = dict(base, **{"double_blocks.0.img_attn.qkv.qweight": torch.zeros(4, 4, dtype=torch.int8),
                        "double_blocks.0.img_attn.qkv.wscales": torch.ones(4)})
    save_file(svd, tmp_path / "svdq.safetensors")
    with pytest.raises(CheckpointError, match="SVDQuant"):
        kontext.load_dit(tmp_path / "svdq.safetensors")
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(CheckpointError, match="GGUF"):
        kontext.load_dit(tmp_path / "model.gguf")


def test_quantization_metadata_in_the_header(written, tmp_path):
    """The per-layer descriptions may sit in the metadata entry `_quantization_metadata` instead of tensors."""
    sd = load_file(written["fp8"])
    layers = {k[: -len(".comfy_quant")]: json.loads(bytes(sd.pop(k).tolist())) for k in list(sd)
              if k.endswith(".comfy_quant")}
    p = tmp_path / "meta.safetensors"
    save_file(sd, p, metadata={"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers}),
                               "kontext_config": FluxConfig.tiny().to_json()})
    a, b = kontext.load_dit(p), kontext.load_dit(written["fp8"])
    assert linear_formats(a) == linear_formats(b) == {"dense": 10, "fp8": 26}
    assert torch.equal(velocity(a), velocity(b))


# ---------------------------------------------------------------------------------------------- ComfyUI's reader

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")

LOAD_IN_COMFYUI = textwrap.dedent('''
    import sys
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, COMFY)
    import comfy.options
    comfy.options.enable_args_parsing()
    import torch
    from safetensors.torch import load_file, save_file
    import comfy.sd
    patcher = comfy.sd.load_diffusion_model(WEIGHTS, model_options={"dtype": torch.float32})
    model = patcher.model.diffusion_model
    io = load_file(IO)
    with torch.no_grad():
        out = model(io["x"], io["t"], io["txt"], y=io["y"], guidance=io["g"], ref_latents=[io["ref"]])
    save_file({"out": out.float().contiguous()}, OUT)
''')


@pytest.mark.comfyui
@pytest.mark.skipif(not COMFYUI_DIR, reason="needs a real ComfyUI: set COMFYUI_DIR (tests/comfyui_env.sh builds one)")
@pytest.mark.parametrize("precision", ["fp8", "fp4"])
def test_comfyuis_unet_loader_reads_what_quantize_writes(tmp_path, precision):
    """ComfyUI's own loader (its model detection needs 24 heads of 128: a 3072-wide model, 1 double + 1 single
    block) reads the file and computes what our loader computes from it, to float rounding."""
    from kontext.tiny import write_tiny_dit

    cfg = FluxConfig(hidden_size=3072, num_heads=24, depth=1, depth_single_blocks=1, axes_dim=(16, 56, 56))
    dit_file = write_tiny_dit(tmp_path / "models", config=cfg)["dit"]
    q = quantize_file(dit_file, tmp_path / f"q-{precision}.safetensors", precision)
    g = torch.Generator().manual_seed(0)
    io = {"x": torch.randn(1, 16, 8, 8, generator=g), "ref": torch.randn(1, 16, 8, 8, generator=g),
          "t": torch.tensor([0.6]), "g": torch.tensor([2.5]), "txt": torch.randn(1, 5, 4096, generator=g),
          "y": torch.randn(1, 768, generator=g)}
    save_file(io, tmp_path / "io.safetensors")
    python = os.environ.get("COMFYUI_PYTHON") or str(Path(COMFYUI_DIR) / ".venv" / "bin" / "python")
    script = f"COMFY = {COMFYUI_DIR!r}\nWEIGHTS = {str(q)!r}\nIO = {str(tmp_path / 'io.safetensors')!r}\n" \
             f"OUT = {str(tmp_path / 'out.safetensors')!r}\n" + LOAD_IN_COMFYUI
    run = subprocess.run([python, "-c", script], cwd=COMFYUI_DIR, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = load_file(tmp_path / "out.safetensors")["out"]
    dit = kontext.load_dit(q)
    assert linear_formats(dit)[precision] == 10 + 3
    with torch.no_grad():
        ours = Denoiser(dit, (8, 8), [to_raw(io["ref"])])(io["x"], io["t"], io["txt"], io["y"], io["g"])
    assert rel_err(ours, theirs) <= 1e-4  # ComfyUI dequantises in another order (its own tolerance: ~1 ulp)


def test_two_element_marker_asks_for_full_precision_matmuls(tiny_models, tmp_path):
    """ComfyUI reads a 2-element `scaled_fp8` marker as full_precision_matrix_mult: the layers stay weight-only."""
    sd = load_file(tiny_models["dit_fp8"])
    assert not kontext.load_dit(tiny_models["dit_fp8"]).img_in.full_precision
    sd[P + "scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    p = tmp_path / "fullprec.safetensors"
    save_file(sd, p, metadata={"kontext_config": FluxConfig.tiny().to_json()})
    dit = kontext.load_dit(p)
    assert all(m.full_precision for m in dit.modules() if isinstance(m, Fp8Linear))
