"""CLIP-L and T5-XXL text encoders: parity with transformers on tiny random weights in every release layout,
fp16 safety of T5, full-size structure against the real tensor tables, and clear errors on bad files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kontext.errors import CheckpointError, InputError
from kontext.text import clip, t5
from kontext.tiny.text import (tiny_clip_state, tiny_t5_state, write_tiny_clip_l, write_tiny_clip_l_diffusers,
                                write_tiny_t5xxl, write_tiny_t5xxl_diffusers, write_tiny_t5xxl_fp8_scaled)
from kontext.weights.checkpoint import Checkpoint, TensorInfo
from kontext.weights.loading import check_plan

transformers = pytest.importorskip("transformers")

DATA = Path(__file__).resolve().parent / "data"
# fp32 on CPU, same weights, same math up to summation order: differences are float rounding (~1e-7).
PARITY_TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def rewrite(src: Path, dst: Path, fn) -> Path:
    """Copy a safetensors file through `fn(state_dict) -> state_dict`, keeping its metadata."""
    meta = Checkpoint(src).metadata
    save_file({k: v.contiguous() for k, v in fn(load_file(src)).items()}, str(dst), metadata=meta)
    return dst


# ---------------------------------------------------------------- CLIP

def clip_ids(length: int = 77) -> torch.Tensor:
    """Two prompts of different lengths, BOS ... EOS then EOS padding, as the real tokenizer pads clip_l."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 49406, (2, length), generator=g)
    ids[:, 0] = 49406
    ids[0, 9:] = 49407
    ids[1, 40:] = 49407
    return ids


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("clip")
    f = write_tiny_clip_l(d / "clip_l.safetensors")
    rewrite(f, d / "bare.safetensors", lambda sd: {k.removeprefix("text_model."): v for k, v in sd.items()})

    def extras(sd):
        return {**sd, "text_projection.weight": torch.randn(768, 64).half(), "logit_scale": torch.tensor(4.6),
                "text_model.embeddings.position_ids": torch.arange(77)[None]}
    rewrite(f, d / "extras.safetensors", extras)
    write_tiny_clip_l_diffusers(d / "repo" / "text_encoder")
    write_tiny_clip_l(d / "repo" / "decoy.safetensors", seed=5)  # a repo root also holds other files
    return d


def hf_clip(eos_token_id: int):
    cfg = clip.CLIPConfig.tiny().hf_config()
    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")} | {"eos_token_id": eos_token_id}
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg)).eval()
    # transformers 5 names CLIPTextModel's parameters without 'text_model.' (it maps the prefix away on load).
    sd = {k.removeprefix("text_model."): v.half().float() for k, v in tiny_clip_state(0).items()}
    ref.load_state_dict(sd, strict=True)
    return ref


@pytest.mark.parametrize("layout", ["clip_l.safetensors", "bare.safetensors", "extras.safetensors",
                                    "repo/text_encoder", "repo"])
def test_clip_parity(clip_dir, layout):
    model = clip.load_clip_l(clip_dir / layout)
    ids = clip_ids()
    with torch.no_grad():
        hidden, pooled = model(ids)
        # eos 49407 pools at the first end token, legacy eos 2 at argmax(ids): both must match ours.
        for eos in (49407, 2):
            ref = hf_clip(eos)(ids)
            assert rel_err(hidden, ref.last_hidden_state) <= PARITY_TOL
            assert rel_err(pooled, ref.pooler_output) <= PARITY_TOL
    assert hidden.shape == (2, 77, 64) and pooled.shape == (2, 64)
    assert list(model.buffers()) == []


def test_clip_hidden_layers_and_pooling(clip_dir):
    model = clip.load_clip_l(clip_dir / "clip_l.safetensors")
    ids = clip_ids()
    ids[1, 40:] = 500  # no end token in row 1: pool at the last position
    with torch.no_grad():
        ref = hf_clip(49407)(ids, output_hidden_states=True)
        last, pooled = model(ids)
        for layer in (-2, 0):
            hidden, _ = model(ids, hidden_layer=layer)
            assert rel_err(hidden, ref.hidden_states[layer % 2 + 1]) <= PARITY_TOL
    assert torch.equal(pooled[0], last[0, 9])  # first of the 68 end tokens
    assert torch.equal(pooled[1], last[1, -1])
    assert not torch.allclose(last[0, 9], last[0, -1])  # the pooling position matters (causal attention)
    with pytest.raises(InputError):
        model(ids, hidden_layer=2)


@pytest.mark.parametrize("ids", [torch.zeros(1, 78, dtype=torch.long), torch.full((1, 77), 49408),
                                 torch.zeros(1, 77), torch.zeros(77, dtype=torch.long)])
def test_clip_bad_ids(clip_dir, ids):
    model = clip.load_clip_l(clip_dir / "clip_l.safetensors")
    with pytest.raises(InputError):
        model(ids)


# ---------------------------------------------------------------- T5

def t5_ids(length: int = 200) -> torch.Tensor:
    """Longer than max_distance 128 so that the log-spaced and the clamped buckets are all used."""
    return torch.randint(0, 32128, (2, length), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("t5")
    f = write_tiny_t5xxl(d / "t5xxl.safetensors")

    def embed_tokens_only(sd):
        sd["encoder.embed_tokens.weight"] = sd.pop("shared.weight")
        return sd
    rewrite(f, d / "embed_tokens.safetensors", embed_tokens_only)
    rewrite(f, d / "both.safetensors", lambda sd: {**sd, "encoder.embed_tokens.weight": sd["shared.weight"].clone()})
    write_tiny_t5xxl_fp8_scaled(d / "t5xxl_fp8_e4m3fn_scaled.safetensors")
    write_tiny_t5xxl_diffusers(d / "repo" / "text_encoder_2")
    write_tiny_t5xxl(d / "repo" / "decoy.safetensors", seed=5)
    return d


def hf_t5(sd: dict[str, torch.Tensor]):
    cfg = {k: v for k, v in t5.T5Config.tiny().hf_config().items() if k not in ("architectures", "torch_dtype")}
    ref = transformers.T5EncoderModel(transformers.T5Config(**cfg)).eval()
    missing, unexpected = ref.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight"}
    assert ref.encoder.embed_tokens.weight.data_ptr() == ref.shared.weight.data_ptr()  # tied
    return ref


def dequantised(path: Path) -> dict[str, torch.Tensor]:
    """The fp8_scaled file's weights as ComfyUI computes them (w.float() * scale_weight), independently of Checkpoint."""
    raw = load_file(path)
    out = {}
    for k, v in raw.items():
        if k == "scaled_fp8" or k.endswith(".scale_weight"):
            continue
        scale = raw.get(k.removesuffix("weight") + "scale_weight")
        out[k] = v.float() * scale if scale is not None else v.float()
    return out


@pytest.mark.parametrize("layout,length", [("t5xxl.safetensors", 512), ("embed_tokens.safetensors", 200),
                                           ("both.safetensors", 200), ("repo/text_encoder_2", 200), ("repo", 200),
                                           ("t5xxl_fp8_e4m3fn_scaled.safetensors", 200)])
def test_t5_parity(t5_dir, layout, length):
    model = t5.load_t5xxl(t5_dir / layout)
    fp8 = "fp8" in layout
    sd = dequantised(t5_dir / layout) if fp8 else {k: v.half().float() for k, v in tiny_t5_state(0).items()}
    ids = t5_ids(length)
    with torch.no_grad():
        out = model(ids)
        ref = hf_t5(sd)(ids).last_hidden_state
    assert out.shape == (2, length, 64) and out.dtype == torch.float32
    assert rel_err(out, ref) <= PARITY_TOL
    assert list(model.buffers()) == []
    if fp8:  # really the quantised weights, scaled back: close to but not equal to the fp16 ones
        q = model.encoder.block[1].layer[1].DenseReluDense.wo.weight
        assert torch.equal(q, sd["encoder.block.1.layer.1.DenseReluDense.wo.weight"])
        w16 = tiny_t5_state(0)["encoder.block.1.layer.1.DenseReluDense.wo.weight"].half().float()
        assert 0 < rel_err(q, w16) < 0.1
        assert model.shared.weight.dtype == torch.float32


def test_t5_fp16_stays_finite_where_fp16_overflows(t5_dir, tmp_path):
    # Grow the FF weights until both the gated product and the residual stream pass fp16's 65504, as real
    # T5 v1.1 XXL activations do on ordinary prompts.
    def grow(sd):
        return {k: v * (100 if ".wi_" in k else 3 if ".wo." in k else 1) for k, v in sd.items()}
    big = rewrite(t5_dir / "t5xxl.safetensors", tmp_path / "big.safetensors", grow)
    m32, m16 = t5.load_t5xxl(big), t5.load_t5xxl(big, dtype=torch.float16)
    products: list[float] = []
    residuals: list[float] = []
    for block in m32.encoder.block:
        ff = block.layer[1].DenseReluDense
        ff.register_forward_pre_hook(lambda mod, args: products.append(
            (torch.nn.functional.gelu(mod.wi_0(args[0]), approximate="tanh") * mod.wi_1(args[0])).abs().max().item()))
        block.register_forward_hook(lambda mod, args, out: residuals.append(out.abs().max().item()))
    ids = t5_ids(64)
    with torch.no_grad():
        a, b = m32(ids), m16(ids)
    fp16_max = torch.finfo(torch.float16).max
    assert max(products) > fp16_max and max(residuals) > fp16_max  # plain fp16 would hold inf at both places
    assert b.dtype == torch.float16 and torch.isfinite(b).all()
    # fp16 weights and matmul inputs: about 1e-3 relative error (measured 7e-4).
    assert rel_err(b, a) <= 5e-3


def test_t5_bf16_close_to_fp32(t5_dir):
    ids = t5_ids(64)
    with torch.no_grad():
        a = t5.load_t5xxl(t5_dir / "t5xxl.safetensors")(ids)
        b = t5.load_t5xxl(t5_dir / "t5xxl.safetensors", dtype=torch.bfloat16)(ids)
    assert b.dtype == torch.bfloat16
    assert rel_err(b, a) <= 5e-2  # bf16 keeps 8 bits of mantissa


def test_t5_bad_ids(t5_dir):
    model = t5.load_t5xxl(t5_dir / "t5xxl.safetensors")
    for ids in (torch.full((1, 4), 32128), torch.full((1, 4), -1), torch.zeros(1, 4)):
        with pytest.raises(InputError):
            model(ids)


def test_tiny_writers_layouts(clip_dir, t5_dir):
    c = Checkpoint(clip_dir / "clip_l.safetensors")
    assert c.shape("text_model.embeddings.token_embedding.weight") == (49408, 64)
    assert {c.dtype(k) for k in c.keys()} == {torch.float16}
    t = Checkpoint(t5_dir / "t5xxl.safetensors")
    assert "shared.weight" in t and "encoder.embed_tokens.weight" not in t
    assert t.shape("shared.weight") == (32128, 64) and {t.dtype(k) for k in t.keys()} == {torch.float16}
    f = Checkpoint(t5_dir / "t5xxl_fp8_e4m3fn_scaled.safetensors")
    assert f.is_quantized and f.dtype("scaled_fp8") == torch.float8_e4m3fn
    assert f.dtype("encoder.block.0.layer.0.SelfAttention.q.weight") == torch.float8_e4m3fn
    assert f.dtype("encoder.block.0.layer.0.SelfAttention.q.scale_weight") == torch.float32
    assert f.dtype("shared.weight") == torch.float16 and f.dtype("encoder.final_layer_norm.weight") == torch.float16
    assert set(f.weight_keys()) == set(t.keys())
    d = Checkpoint(t5_dir / "repo" / "text_encoder_2")
    assert len(d.files) == 2 and set(d.keys()) == set(t.keys())


def test_diffusers_folders_load_in_transformers(clip_dir, t5_dir):
    """Our diffusers-layout writers produce folders that transformers itself reads, with the same results."""
    ids, t_ids = clip_ids(), t5_ids(100)
    with torch.no_grad():
        ref = transformers.CLIPTextModel.from_pretrained(clip_dir / "repo" / "text_encoder", dtype=torch.float32)
        _, pooled = clip.load_clip_l(clip_dir / "repo")(ids)
        assert rel_err(pooled, ref.eval()(ids).pooler_output) <= PARITY_TOL
        ref = transformers.T5EncoderModel.from_pretrained(t5_dir / "repo" / "text_encoder_2", dtype=torch.float32)
        assert rel_err(t5.load_t5xxl(t5_dir / "repo")(t_ids), ref.eval()(t_ids).last_hidden_state) <= PARITY_TOL


# ---------------------------------------------------------------- full size vs the real tensor tables

def table(name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(s) for k, s in json.loads((DATA / "checkpoint_tables.json").read_text())[name]}


def header_only(name: str, shapes: dict[str, tuple[int, ...]]) -> Checkpoint:
    """A Checkpoint whose header is the real file's table and which holds no data: enough to plan a load."""
    ckpt = Checkpoint.__new__(Checkpoint)
    ckpt.path = Path(name)
    ckpt.files, ckpt.metadata, ckpt.config, ckpt.quantized = [ckpt.path], {}, {}, {}
    ckpt.infos = {k: TensorInfo("F16", s, ckpt.path, 0, 0) for k, s in shapes.items()}
    return ckpt


def test_clip_full_size_matches_release_table():
    real = table("clip_l")
    with torch.device("meta"):
        model = clip.CLIPText(clip.CLIPConfig.full())
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == real
    assert list(model.buffers()) == []
    ckpt = header_only("clip_l.safetensors", real)
    cfg, plan = clip.clip_config_and_plan(ckpt)
    assert cfg == clip.CLIPConfig.full()
    check_plan(model, plan, ckpt, "CLIP-L text encoder")


def test_t5_full_size_matches_release_table():
    real = table("t5xxl")  # stores the tied embedding once, as shared.weight
    with torch.device("meta"):
        model = t5.T5Encoder(t5.T5Config.full())
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == real
    assert list(model.buffers()) == []
    ckpt = header_only("t5xxl_fp16.safetensors", real)
    cfg, plan = t5.t5_config_and_plan(ckpt)
    assert cfg == t5.T5Config.full()
    check_plan(model, plan, ckpt, "T5-XXL encoder")


# ---------------------------------------------------------------- bad files

def fake(path: Path, keys: dict[str, tuple[int, ...]]) -> Path:
    save_file({k: torch.zeros(s, dtype=torch.float16) for k, s in keys.items()}, str(path))
    return path


BAD = {
    "dit": lambda d: fake(d / "flux1-kontext-dev.safetensors", {"double_blocks.0.img_attn.qkv.weight": (12, 4),
                                                                "img_in.weight": (4, 4)}),
    "vae": lambda d: fake(d / "ae.safetensors", {"decoder.conv_in.weight": (4, 4, 3, 3),
                                                 "encoder.conv_in.weight": (4, 3, 3, 3)}),
    "truncated": lambda d: (d / "trunc.safetensors").write_bytes(
        write_tiny_t5xxl(d / "full.safetensors").read_bytes()[:5000]) and d / "trunc.safetensors",
    "random": lambda d: (d / "random.safetensors").write_bytes(torch.randint(0, 256, (4096,),
                         generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes())
    and d / "random.safetensors",
    "missing": lambda d: d / "nope.safetensors",
    "empty_folder": lambda d: (d / "empty").mkdir() or d / "empty",
    "pickle": lambda d: (d / "model.pt").write_bytes(b"\x80\x04K\x01.") and d / "model.pt",
}


@pytest.mark.parametrize("loader", [clip.load_clip_l, t5.load_t5xxl], ids=["clip", "t5"])
@pytest.mark.parametrize("kind", list(BAD))
def test_bad_files(tmp_path, loader, kind):
    path = BAD[kind](tmp_path)
    with pytest.raises(CheckpointError) as e:
        loader(path)
    assert path.name in str(e.value)
    if kind == "dit":
        assert "DiT" in str(e.value)


def test_wrong_text_encoder_kind(clip_dir, t5_dir):
    with pytest.raises(CheckpointError, match="looks like a CLIP text encoder"):
        t5.load_t5xxl(clip_dir / "clip_l.safetensors")
    with pytest.raises(CheckpointError, match="looks like a T5 text encoder"):
        clip.load_clip_l(t5_dir / "t5xxl.safetensors")


def test_incomplete_or_inconsistent_files(t5_dir, clip_dir, tmp_path):
    no_wo = rewrite(t5_dir / "t5xxl.safetensors", tmp_path / "no_wo.safetensors",
                    lambda sd: {k: v for k, v in sd.items() if k != "encoder.block.1.layer.1.DenseReluDense.wo.weight"})
    with pytest.raises(CheckpointError, match="no_wo.safetensors.*missing.*block.1.layer.1.DenseReluDense.wo"):
        t5.load_t5xxl(no_wo)
    key = "text_model.encoder.layers.1.mlp.fc1.weight"
    bad = rewrite(clip_dir / "clip_l.safetensors", tmp_path / "bad_shape.safetensors",
                  lambda sd: {**sd, key: sd[key][:100]})
    with pytest.raises(CheckpointError, match="bad_shape.safetensors.*shape"):
        clip.load_clip_l(bad)
    umt5 = rewrite(t5_dir / "t5xxl.safetensors", tmp_path / "umt5.safetensors", lambda sd: {
        **sd, "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight": torch.zeros(32, 4).half()})
    with pytest.raises(CheckpointError, match="UMT5"):
        t5.load_t5xxl(umt5)
