"""The weight formats (kontext.formats): one object per format, the same numbers as the codecs, and the only place
that knows a format's name."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from kontext.config import FluxConfig
from kontext.dit_file import open_dit
from kontext.flux_loader import dit_config, load_dit, resident_bytes
from kontext.formats import COMFY_NAMES, DENSE, FORMATS, FP8, NVFP4, QUANTIZED, get_format, layer_format, narrowest
from kontext.ops import make_linear
from kontext.precision import resolve
from kontext.quant import fp8, nvfp4

ROOT = Path(__file__).resolve().parents[1]
NAMES = {"dense", "fp8", "fp4", "nvfp4", "float8_e4m3fn", "float8_e5m2"}


def weight(n: int = 256, k: int = 128) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.05


def test_registry():
    assert list(FORMATS) == ["dense", "fp8", "fp4"] and list(QUANTIZED) == ["fp8", "fp4"]
    assert get_format("fp8") is FP8 and get_format("fp4") is NVFP4 and get_format("dense") is DENSE
    assert COMFY_NAMES == {"float8_e4m3fn": FP8, "float8_e5m2": FP8, "nvfp4": NVFP4}
    assert FP8.comfy_name == "float8_e4m3fn" and NVFP4.comfy_name == "nvfp4" and DENSE.comfy_name is None
    assert narrowest([FP8, NVFP4]) is NVFP4 and narrowest([FP8]) is FP8 and narrowest([]) is None
    assert resolve("fp8", None, torch.device("cpu")).format is FP8
    assert resolve("bf16", None, torch.device("cpu")).format is DENSE
    assert resolve(None, None, torch.device("cpu")).format is None
    with pytest.raises(KeyError):
        get_format("int8")


def test_fp8_is_the_codec_bit_for_bit():
    w = weight()
    w8, scale = fp8.quantize(w, per_row=True)
    got = FP8.quantize(w)
    assert torch.equal(got["weight"].view(torch.uint8), w8.view(torch.uint8))
    assert torch.equal(got["weight_scale"], scale) and got["weight_scale"].shape == (256,)
    w8, scale = fp8.quantize(w, per_row=False)  # ComfyUI's mixed files: one scale per tensor
    got = FP8.for_file().quantize(w)
    assert torch.equal(got["weight"].view(torch.uint8), w8.view(torch.uint8)) and got["weight_scale"].shape == ()
    assert torch.equal(FP8.dequantize(got, (256, 128), torch.bfloat16), fp8.dequantize(w8, scale, torch.bfloat16))


def test_nvfp4_is_the_codec_bit_for_bit():
    w = weight()
    q = nvfp4.quantize(w)
    got = NVFP4.quantize(w)
    assert torch.equal(got["weight"], q.packed) and torch.equal(got["weight_scale_2"], q.tensor_scale)
    assert torch.equal(got["weight_scale"].view(torch.uint8), q.block_scales.view(torch.uint8))
    assert NVFP4.for_file() is NVFP4
    assert torch.equal(NVFP4.dequantize(got, (256, 128), torch.float32), q.dequantize(torch.float32))


@pytest.mark.parametrize("fmt", [DENSE, FP8, FP8.for_file(), NVFP4], ids=repr)
def test_params_are_the_layer_and_the_quantised_tensors(fmt):
    n, k = 256, 128
    layer = make_linear(k, n, True, fmt, device="meta", **fmt.layer_options(n))
    assert isinstance(layer, fmt.linear) and layer_format(layer) is FORMATS[fmt.name]
    params = fmt.params(n, k)
    for name, (shape, dtype) in params.items():
        p = getattr(layer, name)
        assert tuple(p.shape) == shape and (dtype is None or p.dtype == dtype), name
    if fmt.quantized:
        made = fmt.quantize(weight(n, k))
        assert {name: (tuple(t.shape), t.dtype) for name, t in made.items()} == params


def test_resident_bytes_unchanged():
    """The numbers the loader's accounting gave before the formats were objects."""
    tiny = {"bf16": 3728000, "fp16": 3728000, "fp32": 7456000, "fp8": 2098816, "fp4": 1325800, None: 3728000}
    full = {"bf16": 23802816640, "fp16": 23802816640, "fp32": 47605633280, "fp8": 11980728448,
            "fp4": 6791114048, None: 23802816640}
    for config, numbers in ((FluxConfig.tiny(), tiny), (FluxConfig.kontext_dev(), full)):
        assert {p: resident_bytes(config, p) for p in numbers} == numbers
    assert resident_bytes(FluxConfig.tiny(), "fp8", torch.float32) == 2484480


def test_open_dit_reads_the_header_once(tiny_models, monkeypatch):
    from kontext.weights import checkpoint

    opened = []
    original = checkpoint.read_header
    monkeypatch.setattr(checkpoint, "read_header", lambda path: opened.append(path) or original(path))
    dit = open_dit(tiny_models["dit_fp8"])
    assert dit.layout == "bfl" and dit.config == dit_config(tiny_models["dit_fp8"]) and dit.precision == "fp8"
    stored = dit.stored("double_blocks.0.img_attn.qkv")
    assert stored is not None and stored.format is FP8
    opened.clear()
    load_dit(tiny_models["dit_fp8"])
    assert len(opened) == 1  # one file, its header parsed once per load
    opened.clear()
    load_dit(dit, precision="fp4")  # an opened file is not opened again
    assert opened == []


def _format_name_compares(path: Path) -> list[str]:
    """`x == "fp8"`, `fmt in ("fp8", "fp4")`, `.fmt != ...` and the like in one module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Compare):
            continue
        for operand in (node.left, *node.comparators):
            values = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
            named = any(isinstance(v, ast.Constant) and v.value in NAMES for v in values)
            if named or (isinstance(operand, ast.Attribute) and operand.attr == "fmt"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_format_names_are_compared_in_the_format_modules_only():
    files = [p for d in ("kontext", "nodes") for p in (ROOT / d).rglob("*.py")
             if (ROOT / "kontext" / "formats") not in p.parents]
    found = [hit for p in files for hit in _format_name_compares(p)]
    assert found == [], "format names compared outside kontext.formats: " + ", ".join(found)
