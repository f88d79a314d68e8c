"""Every wrong file given to load_dit fails with a CheckpointError/InputError naming the file and the problem."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import kontext
from kontext.ops import dense_state_dict
from kontext.errors import CheckpointError, InputError


def check(path, *words):
    with pytest.raises(CheckpointError) as info:
        kontext.load_dit(path)
    msg = str(info.value)
    assert str(path) in msg or os.path.basename(str(path)) in msg
    for w in words:
        assert w.lower() in msg.lower(), msg
    return msg


def test_vae_given_as_dit(tmp_path):
    p = tmp_path / "ae.safetensors"
    save_file({"encoder.down.0.block.0.conv1.weight": torch.zeros(4, 4, 3, 3), "decoder.conv_in.weight": torch.zeros(1)}, p)
    check(p, "not a Flux DiT", "VAE")


def test_sdxl_given_as_dit(tmp_path):
    p = tmp_path / "sd_xl_base_1.0.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
               "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(8, 4),
               "first_stage_model.encoder.down.0.block.0.conv1.weight": torch.zeros(1)}, p)
    check(p, "not a Flux DiT", "SD")


def test_truncated_file(tmp_path, tiny_models):
    data = open(tiny_models["dit"], "rb").read()
    p = tmp_path / "flux1-kontext-dev.safetensors"
    p.write_bytes(data[: len(data) // 2])
    check(p, "truncated")


def test_random_bytes(tmp_path):
    p = tmp_path / "random.safetensors"
    p.write_bytes(os.urandom(4096))
    check(p, "not a safetensors file")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    check(p, "not a safetensors file")


def test_json_header_but_garbage(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    p = tmp_path / "bad.safetensors"
    p.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    check(p, "damaged header")


def test_missing_path(tmp_path):
    check(tmp_path / "nope.safetensors", "no such file")


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    check(tmp_path, "no .safetensors")


def test_pickle_file_is_never_opened(tmp_path):
    p = tmp_path / "model.ckpt"
    p.write_bytes(b"\x80\x04not really a pickle")
    check(p, "pickle")


def test_missing_tensor_gives_no_partial_model(tmp_path, tiny_models):
    sd = load_file(tiny_models["dit"])
    sd.pop("single_blocks.1.linear2.weight")
    p = tmp_path / "incomplete.safetensors"
    save_file(sd, p)
    check(p, "single_blocks.1.linear2.weight")


def test_extra_tensors_are_refused(tmp_path, tiny_models):
    sd = load_file(tiny_models["dit"])
    sd["double_blocks.0.img_attn.qkv.lora_A.weight"] = torch.zeros(4, 128)
    p = tmp_path / "with_lora.safetensors"
    save_file(sd, p)
    check(p, "lora_A")


def test_wrong_shape(tmp_path, tiny_models):
    sd = load_file(tiny_models["dit"])
    sd["txt_in.weight"] = torch.zeros(128, 32, dtype=torch.bfloat16)
    sd["double_blocks.0.img_mlp.0.weight"] = torch.zeros(100, 128, dtype=torch.bfloat16)
    p = tmp_path / "odd.safetensors"
    save_file(sd, p)
    check(p, "shape")


def test_unsupported_tensor_dtype_in_file(tmp_path):
    header = json.dumps({"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}).encode()
    p = tmp_path / "fp4.safetensors"
    p.write_bytes(len(header).to_bytes(8, "little") + header + b"\0")
    check(p, "unsupported dtype")


@pytest.mark.parametrize("kw", [{"dtype": torch.int8}, {"dtype": torch.float8_e4m3fn}, {"precision": "int3"}])
def test_unsupported_compute_dtype(tiny_models, kw):
    with pytest.raises(InputError, match="expected"):
        kontext.load_dit(tiny_models["dit"], **kw)


def test_prefixed_bfl_file_loads(tmp_path, tiny_models):
    sd = {"model.diffusion_model." + k: v for k, v in load_file(tiny_models["dit"]).items()}
    p = tmp_path / "comfy-prefixed.safetensors"
    save_file(sd, p)
    a, b = kontext.load_dit(p), kontext.load_dit(tiny_models["dit"])
    assert all(torch.equal(x, y) for x, y in zip(dense_state_dict(a).values(), dense_state_dict(b).values()))


def test_diffusers_single_file_and_newer_fp8_names(tmp_path, tiny_models):
    """A diffusers-keyed single file, and an fp8 file using the newer `weight_scale` name, load to the same weights."""
    ref = dense_state_dict(kontext.load_dit(tiny_models["dit"]))
    folder = tiny_models["dit_diffusers"]
    sd = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(f))
    single = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(sd, single)
    fp8 = {k.replace(".scale_weight", ".weight_scale").replace(".scale_input", ".input_scale"): v
           for k, v in load_file(tiny_models["dit_fp8"]).items() if not k.endswith("scaled_fp8")}
    newer = tmp_path / "fp8-new.safetensors"
    save_file(fp8, newer, metadata={"kontext_config": kontext.FluxConfig.tiny().to_json()})
    for path in (single, newer):
        got = dense_state_dict(kontext.load_dit(path))
        assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_e5m2_fp8_file_dequantises_with_its_scale(tmp_path, tiny_models):
    sd = load_file(tiny_models["dit_fp8"])
    expected = {}
    for k in list(sd):
        if sd[k].dtype == torch.float8_e4m3fn and sd[k].dim() == 2:
            w = sd[k].to(torch.float8_e5m2)  # fewer mantissa bits: a different, lossy set of weights
            sd[k] = w
            expected[k.removeprefix("model.diffusion_model.")] = w.float() * sd[k.replace(".weight", ".scale_weight")]
    p = tmp_path / "e5m2.safetensors"
    save_file(sd, p, metadata={"kontext_config": kontext.FluxConfig.tiny().to_json()})
    got = dense_state_dict(kontext.load_dit(p))
    assert expected and all(torch.equal(got[k], v) for k, v in expected.items())


def test_model_without_guidance_embedding(tmp_path, tiny_models):
    sd = {k: v for k, v in load_file(tiny_models["dit"]).items() if not k.startswith("guidance_in.")}
    p = tmp_path / "no-guidance.safetensors"
    save_file(sd, p)
    model = kontext.load_dit(p)
    assert model.config.guidance_embed is False and model.guidance_in is None
    img, txt = torch.randn(1, 4, 64), torch.randn(1, 3, 64)
    out = model(img, torch.zeros(1, 4, 3), txt, torch.zeros(1, 3, 3), torch.tensor([0.5]), torch.randn(1, 64))
    assert out.shape == img.shape and torch.isfinite(out).all()


def test_all_in_one_checkpoint_loads_its_dit_part(tmp_path, tiny_models):
    sd = {"model.diffusion_model." + k: v for k, v in load_file(tiny_models["dit"]).items()}
    sd.update({"first_stage_model.decoder.conv_in.weight": torch.zeros(4, 16, 3, 3),
               "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(8)})
    p = tmp_path / "all-in-one.safetensors"
    save_file(sd, p)
    assert kontext.load_dit(p).config.depth == 2
