"""Odd and malformed files in every loader: each is refused with a KontextError naming the file, never a crash."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import kontext
from kontext.ops import dense_state_dict
from kontext.errors import CheckpointError, InputError, KontextError

LOADERS = {"dit": kontext.load_dit, "vae": kontext.load_vae, "clip_l": kontext.load_clip_l,
           "t5xxl": kontext.load_t5xxl}


def raw_file(path, header: dict, data: bytes = b"") -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def refused(loader, path, *words):
    with pytest.raises(KontextError) as info:
        loader(path)
    msg = str(info.value)
    assert path.name in msg, msg
    for w in words:
        assert w.lower() in msg.lower(), msg


HEADERS = {
    "metadata_not_mapping": {"__metadata__": "x", "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
    "negative_shape": {"w": {"dtype": "F32", "shape": [-1, -1], "data_offsets": [0, 4]}},
    "offsets_strings": {"w": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}},
    "offsets_dict": {"w": {"dtype": "F32", "shape": [1], "data_offsets": {"a": 0}}},
    "dtype_list": {"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}},
    "float_offsets": {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}},
    "bool_shape": {"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},
    "overlap": {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
    "entry_not_dict": {"w": 5},
}


@pytest.mark.parametrize("case", HEADERS)
def test_malformed_headers(tmp_path, case):
    p = tmp_path / f"{case}.safetensors"
    raw_file(p, HEADERS[case], b"\0" * 16)
    for loader in LOADERS.values():
        refused(loader, p, "header")


def test_deeply_nested_header(tmp_path):
    p = tmp_path / "nested.safetensors"
    blob = b"[" * 100_000
    p.write_bytes(struct.pack("<Q", len(blob)) + blob)
    refused(kontext.load_dit, p, "not a safetensors file")


def test_comfy_fp8_marker_under_prefix_loads(tiny_models):
    keys = load_file(tiny_models["dit_fp8"]).keys()
    assert "model.diffusion_model.scaled_fp8" in keys  # as in ComfyUI's own fp8_scaled files
    assert kontext.load_dit(tiny_models["dit_fp8"]).config.depth == 2


def _fp8_variant(tiny_models, tmp_path, name, edit):
    sd = load_file(tiny_models["dit_fp8"])
    edit(sd)
    p = tmp_path / name
    save_file(sd, p, metadata={"kontext_config": kontext.FluxConfig.tiny().to_json()})
    return p


def test_int8_quantised_weights_are_refused(tmp_path, tiny_models):
    def to_int8(sd):
        for k in [k for k, v in sd.items() if v.dtype == torch.float8_e4m3fn and v.dim() == 2]:
            sd[k] = torch.zeros(sd[k].shape, dtype=torch.int8)
    refused(kontext.load_dit, _fp8_variant(tiny_models, tmp_path, "int8.safetensors", to_int8), "not supported")


def test_unsupported_comfy_quant_format_is_refused(tmp_path, tiny_models):
    def mark(sd):
        desc = json.dumps({"format": "mxfp8"}).encode()
        sd["model.diffusion_model.txt_in.comfy_quant"] = torch.tensor(list(desc), dtype=torch.uint8)
    refused(kontext.load_dit, _fp8_variant(tiny_models, tmp_path, "mx.safetensors", mark), "mxfp8")


def test_scale_of_wrong_shape_is_refused(tmp_path, tiny_models):
    def bad(sd):
        sd["model.diffusion_model.txt_in.scale_weight"] = torch.ones(64)  # one per *input* column
    refused(kontext.load_dit, _fp8_variant(tiny_models, tmp_path, "badscale.safetensors", bad), "scale")


def test_per_row_scales_are_accepted(tmp_path, tiny_models):
    def per_row(sd):
        k = "model.diffusion_model.txt_in.scale_weight"
        sd[k] = sd[k].reshape(1).expand(128).clone().to(torch.bfloat16)
    p = _fp8_variant(tiny_models, tmp_path, "rows.safetensors", per_row)
    a, b = dense_state_dict(kontext.load_dit(p)), dense_state_dict(kontext.load_dit(tiny_models["dit"]))
    assert torch.equal(a["txt_in.weight"], b["txt_in.weight"])


def test_integer_weights_are_refused(tmp_path, tiny_models):
    sd = load_file(tiny_models["dit"])
    sd["img_in.weight"] = torch.zeros(sd["img_in.weight"].shape, dtype=torch.int32)
    p = tmp_path / "int.safetensors"
    save_file(sd, p)
    refused(kontext.load_dit, p, "floating-point")


def test_folder_with_two_models_is_refused(tmp_path, tiny_models):
    import shutil

    shutil.copy(tiny_models["dit"], tmp_path / "a.safetensors")
    shutil.copy(tiny_models["dit"], tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match="more than one model"):
        kontext.load_dit(tmp_path)


def test_index_naming_a_shard_outside_the_folder(tmp_path, tiny_models):
    folder = tmp_path / "transformer"
    shutil_copy = __import__("shutil").copytree
    shutil_copy(tiny_models["dit_diffusers"], folder)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = "../../elsewhere.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="outside"):
        kontext.load_dit(folder)


def test_diffusers_repo_root_loads_its_transformer(tmp_path, tiny_models):
    import shutil

    shutil.copytree(tiny_models["dit_diffusers"], tmp_path / "transformer")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxKontextPipeline"}))
    assert kontext.load_dit(tmp_path).config.hidden_size == 128


@pytest.mark.parametrize("role,key", [("dit", "img_in.weight"), ("dit", "vector_in.in_layer.weight"),
                                      ("vae", "encoder.conv_in.weight"), ("vae", "decoder.conv_in.weight"),
                                      ("clip_l", "text_model.embeddings.token_embedding.weight"),
                                      ("t5xxl", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")])
@pytest.mark.parametrize("shape", [(0, 64), (64,)])
def test_empty_or_flat_tensors_where_configs_are_read(tmp_path, tiny_models, role, key, shape):
    sd = load_file(tiny_models[role])
    sd[key] = torch.zeros(shape, dtype=sd[key].dtype)
    p = tmp_path / f"{role}-odd.safetensors"
    save_file(sd, p)
    refused(LOADERS[role], p)


@pytest.mark.parametrize("kw", [{"dtype": "bf16"}, {"device": "gpu"}, {"device": "cuda:9"}])
@pytest.mark.parametrize("role", LOADERS)
def test_bad_device_or_dtype_arguments(tiny_models, role, kw):
    with pytest.raises(InputError):
        LOADERS[role](tiny_models[role], **kw)


@pytest.mark.parametrize("role", LOADERS)
def test_non_path_and_overlong_path(role):
    with pytest.raises(CheckpointError):
        LOADERS[role](None)
    with pytest.raises(CheckpointError):
        LOADERS[role]("x" * 5000 + ".safetensors")
