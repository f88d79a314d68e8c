"""The TensorRT path on the CPU: the ONNX export against the PyTorch model (onnxruntime, and ONNX's reference
evaluator where onnxruntime lacks an op), the quantised weights as DequantizeLinear nodes, the profiles, the
sidecar and engine-cache logic, and the runtime behind the denoiser (run by onnxruntime in place of an engine).

Tolerance: 1e-4 relative in fp32 (the issue's bound). What differs from the PyTorch model is the RoPE angle (ids x
frequency in float32 in the graph, float64 in PyTorch: ~1e-5 rad at the largest ids) and the kernels' summation
order; measured 5e-6 to 2e-5. Engine build and run tests need tensorrt and a GPU (marked `tensorrt`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rel_err

import kontext
from kontext.denoiser import Denoiser
from kontext.dit import BlockRunner
from kontext.errors import InputError
from kontext.references import PREFERRED_RESOLUTIONS
from kontext.tensorrt import engine_info
from kontext.tensorrt.engine_info import EngineInfo
from kontext.tensorrt.profiles import Profile, choose, image_tokens, input_shapes, kontext_profiles

onnx = pytest.importorskip("onnx", reason="the export tests need onnx (pip install -e '.[test]')")
ort = pytest.importorskip("onnxruntime", reason="the export tests need onnxruntime (pip install -e '.[test]')")
pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs onnxscript (pip install -e '.[test]')")

from kontext.tensorrt import export  # noqa: E402
from kontext.tensorrt.export import INPUTS, OUTPUT, example_inputs, export_onnx, read_metadata  # noqa: E402
from kontext.tensorrt.runtime import onnx_engine  # noqa: E402

SMALL = [Profile("test", (40, 64, 200), (1, 1, 2))]  # tiny token counts keep onnxruntime fast
TOL = 1e-4


def inputs(dit, tokens: int, batch: int, seed: int = 0, text: int = 512) -> tuple[torch.Tensor, ...]:
    """Random BFL inputs with real-looking ids (index 0/1, rows and columns up to 24)."""
    g = torch.Generator().manual_seed(seed)
    x = list(example_inputs(dit, tokens, batch, text))
    x[0] = torch.randn(x[0].shape, generator=g)
    x[1] = torch.randint(0, 25, (batch, tokens, 3), generator=g).float()
    x[1][..., 0] = (x[1][..., 0] > 12).float()
    x[4] = torch.rand(batch, generator=g)
    return tuple(x)


def run_onnx(session, x) -> torch.Tensor:
    return torch.from_numpy(session.run([OUTPUT], {k: v.numpy() for k, v in zip(INPUTS, x)})[0])


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory):
    """The tiny DiT exported in fp32, fp8 (its fp8_scaled file, as stored) and fp4 (quantised on load)."""
    out = tmp_path_factory.mktemp("onnx")
    dits = {"fp32": kontext.load_dit(tiny_models["dit"], precision="fp32"),
            "fp8": kontext.load_dit(tiny_models["dit_fp8"], dtype=torch.float32),
            "fp4": kontext.load_dit(tiny_models["dit"], precision="fp4", dtype=torch.float32)}
    sources = {"fp32": tiny_models["dit"], "fp8": tiny_models["dit_fp8"], "fp4": tiny_models["dit"]}
    paths = {}
    with pytest.MonkeyPatch.context() as mp:
        for k, d in dits.items():
            # The fp8 graph takes the path of a model over 2 GB: its weights in a .data file beside it.
            mp.setattr(export, "EXTERNAL_DATA_BYTES", 0 if k == "fp8" else 2**31)
            done = export_onnx(d, out / f"{k}.onnx", profiles=SMALL, source=sources[k])
            assert (done.data_path is not None) == (k == "fp8") and done.bytes > 0
            paths[k] = done.path
    return dits, paths


@pytest.mark.parametrize("precision", ["fp32", "fp8"])
def test_onnx_graph_matches_pytorch_at_several_token_counts(exported, precision):
    dits, paths = exported
    dit, session = dits[precision], ort.InferenceSession(str(paths[precision]))
    for tokens, batch, text in ((40, 1, 512), (77, 2, 256), (200, 2, 512)):  # 256: ComfyUI's T5 length
        x = inputs(dit, tokens, batch, seed=tokens, text=text)
        with torch.no_grad():
            ref = dit(*x)
        got = run_onnx(session, x)
        assert got.shape == (batch, tokens, 64)
        assert rel_err(got, ref) <= TOL, (tokens, batch)


def test_fp4_graph_matches_pytorch_in_the_onnx_reference_evaluator(exported):
    # onnxruntime has no FLOAT4E2M1 DequantizeLinear kernel yet: ONNX's own reference evaluator runs the graph.
    from onnx.reference import ReferenceEvaluator

    dits, paths = exported
    evaluator = ReferenceEvaluator(onnx.load(str(paths["fp4"])))
    for tokens in (40, 130):
        x = inputs(dits["fp4"], tokens, 2, seed=tokens)
        with torch.no_grad():
            ref = dits["fp4"](*x)
        got = torch.from_numpy(evaluator.run([OUTPUT], {k: v.numpy() for k, v in zip(INPUTS, x)})[0])
        assert rel_err(got, ref) <= TOL, tokens


def test_graph_interface_and_no_float64(exported):
    _, paths = exported
    model = onnx.shape_inference.infer_shapes(onnx.load(str(paths["fp32"])))
    g = model.graph
    assert [i.name for i in g.input] == list(INPUTS) and [o.name for o in g.output] == [OUTPUT]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input}
    assert dims["img"][1] == dims["img_ids"][1] and isinstance(dims["img"][1], str)  # one dynamic token axis
    assert dims["txt"][2] == 64 and dims["txt"][1] == dims["txt_ids"][1] and isinstance(dims["txt"][1], str)
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in g.input)
    double = onnx.TensorProto.DOUBLE
    assert all(t.data_type != double for t in g.initializer)
    assert all(v.type.tensor_type.elem_type != double for v in [*g.value_info, *g.output])
    for node in g.node:
        assert not (node.op_type == "Cast" and any(a.name == "to" and a.i == double for a in node.attribute))
    assert not {"If", "Loop", "Scan"} & {n.op_type for n in g.node}  # no Python control flow left in the graph


def test_metadata_records_source_precision_and_profiles(exported, tiny_models):
    _, paths = exported
    meta = read_metadata(paths["fp8"])
    assert meta["precision"] == "fp8" and meta["opset"] == "21"
    assert meta["source_sha256"] == engine_info.file_sha256(tiny_models["dit_fp8"])
    assert int(meta["source_size"]) == os.path.getsize(tiny_models["dit_fp8"])
    assert [Profile.from_json(p) for p in json.loads(meta["profiles"])] == SMALL
    assert json.loads(meta["config"])["hidden_size"] == 128
    assert read_metadata(paths["fp4"])["opset"] == "23"  # FLOAT4E2M1 exists from opset 23


def _dq_inputs(graph) -> dict[str, list[str]]:
    return {n.output[0]: list(n.input) for n in graph.node if n.op_type == "DequantizeLinear"}


def test_fp8_weights_reach_the_graph_as_stored(exported):
    from onnx import numpy_helper

    dits, paths = exported
    g = onnx.load(str(paths["fp8"])).graph
    init = {t.name: t for t in g.initializer}
    layers = {n: m for n, m in dits["fp8"].named_modules() if getattr(m, "fmt", "") == "fp8"}
    dq = {ins[0]: ins[1] for ins in _dq_inputs(g).values()}  # weight -> its scale (equal scales may be shared)
    assert len(dq) == len(layers) > 0
    for name, layer in layers.items():
        w = init[f"dit.{name}.weight"]
        assert w.data_type == onnx.TensorProto.FLOAT8E4M3FN
        stored = np.frombuffer(w.raw_data, dtype=np.uint8).reshape(tuple(w.dims))
        assert np.array_equal(stored, layer.weight.view(torch.uint8).numpy()), name
        scale = numpy_helper.to_array(init[dq[w.name]])
        assert np.array_equal(scale.reshape(-1), layer.weight_scale.float().reshape(-1).numpy()), name


def test_fp4_dequantize_nodes_give_the_stored_weights(exported):
    # The two-level DequantizeLinear pair of every NVFP4 layer, evaluated alone, gives our dequantisation: the
    # nibbles (reordered for ONNX) and the unswizzled block scales carry the file's values. Not bit for bit: ONNX
    # multiplies block scale x tensor scale first (one rounding) and then the E2M1 value (a second for 1.5, 3, 6),
    # as comfy_kitchen does; we round once, after the exact E2M1 x block scale product. So within 1 ulp (2^-23
    # relative; a wrong nibble or scale is off by 30% or more).
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    dits, paths = exported
    model = onnx.load(str(paths["fp4"]))
    g = model.graph
    layers = {n: m for n, m in dits["fp4"].named_modules() if getattr(m, "fmt", "") == "fp4"}
    weights = {f"dit.{n}.weight": n for n in layers}
    dq = [n for n in g.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 2 * len(layers) > 0
    outs = {n.output[0]: n for n in dq}
    checked = 0
    for node in dq:
        if node.input[0] not in weights:
            continue
        assert any(a.name == "block_size" and a.i == 16 for a in node.attribute)
        scale_node = outs[node.input[1]]
        used = {node.input[0], *scale_node.input}
        sub = helper.make_graph([scale_node, node], "dq", [], [helper.make_tensor_value_info(
            node.output[0], onnx.TensorProto.FLOAT, None)], [t for t in g.initializer if t.name in used])
        sub_model = helper.make_model(sub, opset_imports=model.opset_import)
        got = ReferenceEvaluator(sub_model).run(None, {})[0]
        want = layers[weights[node.input[0]]].dequantized(torch.float32).numpy()
        np.testing.assert_allclose(got, want, rtol=2**-23, atol=0, err_msg=node.input[0])
        checked += 1
    assert checked == len(layers)


def test_e5m2_weights_are_refused_before_the_export(tiny_models, tmp_path):
    from torch import nn

    dit = kontext.load_dit(tiny_models["dit_fp8"], dtype=torch.float32)
    layer = dit.get_submodule("single_blocks.0.linear2")
    layer.weight = nn.Parameter(layer.weight.float().to(torch.float8_e5m2), requires_grad=False)
    with pytest.raises(InputError, match="single_blocks.0.linear2: float8_e5m2.*e4m3 only"):
        export_onnx(dit, tmp_path / "e5m2.onnx", profiles=SMALL)
    assert not list(tmp_path.iterdir())


def test_a_model_without_guidance_embedding(tmp_path):
    config = kontext.FluxConfig.tiny()
    config.guidance_embed = False
    g = torch.Generator().manual_seed(4)
    dit = kontext.FluxDiT(config)
    for p in dit.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.05
    engine = onnx_engine(export_onnx(dit.eval(), tmp_path / "ng.onnx", profiles=SMALL).path)
    refs = [torch.randn(1, 16, 12, 12, generator=g)]
    z, txt, y = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 512, 64, generator=g), torch.randn(1, 64)
    with torch.no_grad():
        want = Denoiser(dit, (8, 8), refs)(z, 0.4, txt, y, None)
    assert rel_err(Denoiser(engine, (8, 8), refs)(z, 0.4, txt, y, None), want) <= TOL


def test_export_refuses_to_overwrite(exported, tiny_models):
    _, paths = exported
    before = paths["fp32"].read_bytes()
    dit = kontext.load_dit(tiny_models["dit"], precision="fp32")
    with pytest.raises(InputError, match="exists"):
        export_onnx(dit, paths["fp32"], profiles=SMALL)
    assert paths["fp32"].read_bytes() == before


# --------------------------------------------------------------------------------------------- profiles


def test_kontext_profiles_cover_every_preferred_resolution_with_up_to_two_references():
    profiles = kontext_profiles()
    sizes = [image_tokens(w, h) for w, h in PREFERRED_RESOLUTIONS]
    assert image_tokens(1024, 1024) == 4096
    for t in sizes:
        assert profiles[choose(profiles, 2, t, 256)].name == "no reference"  # text to image, ComfyUI's negative
        for r1 in sizes:
            assert profiles[choose(profiles, 1, t + r1, 512)].name == "1 reference"
            for r2 in sizes:
                assert profiles[choose(profiles, 2, t + r1 + r2, 512)].name == "2 references"
    assert [p.tokens[1] for p in profiles] == [4096, 2 * 4096, 3 * 4096]


def test_shapes_outside_the_profiles_are_refused_with_the_bounds():
    profiles = kontext_profiles()
    with pytest.raises(InputError, match=r"4042\.\.4150 image tokens.*8084\.\.8300 image tokens.*12126\.\.12450"):
        choose(profiles, 1, 1024, 512)  # a 512x512 output
    with pytest.raises(InputError, match="batch 1..2"):
        choose(profiles, 3, 8192, 512)
    with pytest.raises(InputError, match="77 text tokens.*256..512 text tokens"):
        choose(profiles, 1, 8192, 77)
    assert choose(profiles, 1, 8192, 256) == 1  # ComfyUI's T5 conditioning


def test_input_shapes_follow_the_profile():
    config = kontext.FluxConfig.kontext_dev()
    shapes = input_shapes(kontext_profiles()[1], config)
    assert set(shapes) == set(INPUTS)
    assert shapes["img"] == ((1, 8084, 64), (1, 8192, 64), (2, 8300, 64))
    assert shapes["txt"] == ((1, 256, 4096), (1, 512, 4096), (2, 512, 4096))
    assert shapes["y"][0] == (1, 768) and shapes["guidance"][1] == (1,)


# --------------------------------------------------------------------------------------------- sidecar, cache


def info(**change) -> EngineInfo:
    base = dict(source_sha256="ab" * 32, precision="bf16", config=json.loads(kontext.FluxConfig.tiny().to_json()),
                profiles=SMALL, tensorrt_version="10.9.0", gpu="NVIDIA H100 80GB HBM3")
    return EngineInfo(**{**base, **change})


def test_sidecar_round_trip_and_cache_key():
    a = info()
    assert EngineInfo.from_json(a.to_json()) == a
    assert a.flux_config() == kontext.FluxConfig.tiny()
    changes = [dict(source_sha256="cd" * 32), dict(precision="fp8"), dict(tensorrt_version="10.10.0"),
               dict(gpu="NVIDIA H200"), dict(profiles=kontext_profiles()),
               dict(extra={"loras": [{"name": "style.safetensors", "sha256": "ee" * 32, "strength": 0.8}]}),
               dict(refittable=True)]
    keys = {a.key(), *(info(**c).key() for c in changes)}
    assert len(keys) == 1 + len(changes)  # every field an engine must match is in the key


def test_engine_cache_selects_what_runs_here_and_says_why_not(tmp_path):
    for i in (info(), info(gpu="NVIDIA L40S"), info(tensorrt_version="10.3.0")):
        engine_info.save(i, b"plan", tmp_path)
    here = dict(tensorrt_version="10.9.0", gpu="NVIDIA H100 80GB HBM3")
    plan, chosen = engine_info.select(tmp_path, **here)
    assert chosen == info() and plan.read_bytes() == b"plan"
    with pytest.raises(InputError) as e:
        engine_info.select(tmp_path, tensorrt_version="10.9.0", gpu="NVIDIA B200")
    assert "built for NVIDIA L40S" in str(e.value) and "TensorRT 10.3.0" in str(e.value)
    with pytest.raises(InputError, match="fp8 was asked for"):
        engine_info.select(tmp_path, precision="fp8", **here)
    assert engine_info.select(plan, **here)[1] == info()  # the .plan itself


def test_the_files_own_precision_is_preferred(tmp_path, tiny_models):
    from kontext.dit_file import stored_precision
    from kontext.weights import Checkpoint

    for p in ("fp4", "fp8", "bf16"):
        engine_info.save(info(precision=p), p.encode(), tmp_path)
    here = dict(tensorrt_version="10.9.0", gpu="NVIDIA H100 80GB HBM3")
    for p in ("fp4", "fp8", "bf16"):
        assert engine_info.select(tmp_path, preferred=p, **here)[1].precision == p
    assert stored_precision(Checkpoint(tiny_models["dit_fp8"])) == "fp8"
    assert stored_precision(Checkpoint(tiny_models["dit"])) in ("bf16", "fp32")


def test_timing_caches_and_versions():
    from kontext.tensorrt.build import check_version, timing_cache_name

    a, b = timing_cache_name("10.9.0", "NVIDIA H100 80GB HBM3"), timing_cache_name("10.9.0", "NVIDIA H200")
    assert a != b and a == "timing-10-9-0-NVIDIA-H100-80GB-HBM3.cache" and "/" not in timing_cache_name("1", "a/b")
    check_version("10.15.1", "fp4")
    check_version("10.3.0", "fp8")
    with pytest.raises(InputError, match="TensorRT 10.15 or newer"):
        check_version("10.14.0", "fp4")


def test_an_engine_without_baked_loras_is_preferred(tmp_path):
    baked = info(extra={"loras": [{"name": "style.safetensors", "sha256": "ee" * 32, "strength": 0.8}]})
    engine_info.save(baked, b"baked", tmp_path)
    here = dict(tensorrt_version="10.9.0", gpu="NVIDIA H100 80GB HBM3")
    assert engine_info.select(tmp_path, **here)[1] == baked  # the only one
    engine_info.save(info(), b"plain", tmp_path)
    assert engine_info.select(tmp_path, **here)[1] == info()


def test_per_row_fp8_and_a_lora_on_quantised_weights_are_exported(tiny_models, tmp_path):
    # fp8 layers keep a LoRA as a low-rank branch beside the quantised matmul (nothing re-quantised); the graph
    # carries the branch too, so an engine with a LoRA baked in computes what the PyTorch model does.
    from safetensors.torch import save_file

    h, g = 128, torch.Generator().manual_seed(3)
    lora = tmp_path / "lora.safetensors"
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight": torch.randn(3 * h, 4, generator=g),
               "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": torch.randn(4, h, generator=g) * .1},
              lora)
    # Quantised on load: a scale per output row, DequantizeLinear on axis 0 (the fp8_scaled fixture has one scale).
    dit = kontext.load_dit(tiny_models["dit"], precision="fp8", dtype=torch.float32, loras=[(lora, 0.7)])
    plain = kontext.load_dit(tiny_models["dit"], precision="fp8", dtype=torch.float32)
    assert dit.get_submodule("double_blocks.0.img_mod.lin").weight_scale.numel() > 1
    path = export_onnx(dit, tmp_path / "lora.onnx", profiles=SMALL, loras=[(lora, 0.7)]).path
    x = inputs(dit, 60, 2, seed=9)
    with torch.no_grad():
        want, without = dit(*x), plain(*x)
    got = run_onnx(ort.InferenceSession(str(path)), x)
    assert rel_err(got, want) <= TOL and rel_err(want, without) > 1e-3  # the LoRA is there, and it matters


def test_export_records_merged_loras(tiny_models):
    from kontext.tensorrt.export import metadata

    dit = kontext.load_dit(tiny_models["dit"], precision="fp32")
    meta = metadata(dit, "fp32", SMALL, tiny_models["dit"], 21, [(tiny_models["dit"], 0.5)])
    (lora,) = json.loads(meta["kontext.loras"])
    assert lora == {"name": tiny_models["dit"].name, "sha256": engine_info.file_sha256(tiny_models["dit"]),
                    "strength": 0.5}
    assert "kontext.loras" not in metadata(dit, "fp32", SMALL, None, 21)


def test_stale_engine_is_refused(tmp_path):
    source = tmp_path / "dit.safetensors"
    source.write_bytes(b"model v1")
    built = info(source_sha256=engine_info.file_sha256(source))
    engine_info.save(built, b"plan", tmp_path / "engines")
    here = dict(tensorrt_version="10.9.0", gpu="NVIDIA H100 80GB HBM3")
    assert engine_info.select(tmp_path / "engines", source=source, **here)[1] == built
    source.write_bytes(b"model v2")
    with pytest.raises(InputError, match="another model file.*stale"):
        engine_info.select(tmp_path / "engines", source=source, **here)


def test_a_diffusers_folder_is_hashed_as_a_whole(tiny_models, tmp_path):
    import shutil

    folder = tmp_path / "transformer"
    shutil.copytree(tiny_models["dit_diffusers"], folder)
    before = engine_info.file_sha256(folder)
    assert engine_info.source_identity(folder)["source_size"] == sum(f.stat().st_size for f in folder.iterdir())
    shard = sorted(folder.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # one weight byte changed
    assert engine_info.file_sha256(folder) != before


def test_the_source_file_is_not_hashed_again_when_unchanged(tmp_path, monkeypatch):
    source = tmp_path / "dit.safetensors"
    source.write_bytes(b"weights")
    ident = engine_info.source_identity(source)
    recorded = info(source_sha256=engine_info.file_sha256(source),
                    extra={k: ident[k] for k in ("source_size", "source_mtime_ns")})
    calls = []
    monkeypatch.setattr(engine_info, "file_sha256", lambda p: calls.append(p) or "ff" * 32)
    assert engine_info.source_sha256(source, recorded) == recorded.source_sha256 and not calls
    os.utime(source, ns=(ident["source_mtime_ns"] + 10**9,) * 2)  # touched: hashed again
    assert engine_info.source_sha256(source, recorded) == "ff" * 32 and calls


@pytest.mark.parametrize("damage", ["no sidecar", "bad json", "old version", "empty folder", "missing"])
def test_broken_engine_folders_are_explained(tmp_path, damage):
    folder = tmp_path / "engines"
    plan = engine_info.save(info(), b"plan", folder)
    sidecar = plan.with_suffix(".json")
    target: Path = folder
    if damage == "no sidecar":
        sidecar.unlink()
        target = plan
    elif damage == "bad json":
        sidecar.write_text("{not json")
    elif damage == "old version":
        sidecar.write_text(sidecar.read_text().replace('"sidecar_version": 1', '"sidecar_version": 0'))
    elif damage == "empty folder":
        plan.unlink()
        sidecar.unlink()
    else:
        target = tmp_path / "nowhere"
    with pytest.raises(InputError, match="sidecar|holds no engine|no such engine"):
        engine_info.select(target, tensorrt_version="10.9.0", gpu="NVIDIA H100 80GB HBM3")


# --------------------------------------------------------------------------------------------- runtime


def test_engine_behind_the_denoiser_matches_the_pytorch_denoiser(exported):
    dits, paths = exported
    engine = onnx_engine(paths["fp32"])
    g = torch.Generator().manual_seed(1)
    refs = [torch.randn(1, 16, 12, 12, generator=g)]
    z, txt, pooled = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 512, 64, generator=g), \
        torch.randn(2, 64, generator=g)
    with torch.no_grad():
        want = Denoiser(dits["fp32"], (8, 8), refs)(z, 0.6, txt, pooled, 2.5)
    got = Denoiser(engine, (8, 8), refs)(z, 0.6, txt, pooled, 2.5)
    assert rel_err(got, want) <= TOL
    with pytest.raises(InputError, match="outside this engine's profiles"):
        Denoiser(engine, (30, 30), refs)(torch.randn(1, 16, 30, 30), 0.6, txt[:1], pooled[:1], 2.5)

    class Patched(BlockRunner):
        def is_plain(self) -> bool:
            return False

    with pytest.raises(InputError, match="block patches"):
        Denoiser(engine, (8, 8), refs)(z, 0.6, txt, pooled, 2.5, Patched())


def test_whole_sampling_loop_on_the_engine(exported):
    from kontext.pipeline import sample_latent

    dits, paths = exported
    g = torch.Generator().manual_seed(2)
    ref = torch.randn(1, 16, 12, 8, generator=g)
    txt, pooled = torch.randn(1, 512, 64, generator=g), torch.randn(1, 64, generator=g)
    kw = dict(ref_latents=[ref], width=64, height=64, seed=3, steps=4)
    with torch.no_grad():
        want = sample_latent(dits["fp32"], txt, pooled, **kw)
    got = sample_latent(onnx_engine(paths["fp32"]), txt, pooled, **kw)
    assert rel_err(got, want) <= TOL


def test_pipeline_edit_on_the_engine(exported, tiny_models):
    from PIL import Image

    from kontext.pipeline import KontextPipeline

    dits, paths = exported
    pipe = KontextPipeline.from_models_dir(tiny_models["dit"].parents[1], device="cpu", precision="fp32")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 96, 3), dtype=np.uint8))
    kw = dict(seed=5, steps=3, resize_references=False)  # 96x80: 30 target + 30 reference tokens
    want = np.asarray(pipe.edit("make it night", [image], **kw)[0], dtype=np.int16)
    pipe.dit = pipe.base_dit = onnx_engine(paths["fp32"])
    got = np.asarray(pipe.edit("make it night", [image], **kw)[0], dtype=np.int16)
    assert np.abs(got - want).max() <= 1  # one rounding step of the 8-bit output either way
    with pytest.raises(InputError, match="LoRAs cannot"):
        pipe.set_loras([(tiny_models["dit"], 1.0)])


def test_load_dit_tensorrt_requests_are_checked(tiny_models, tmp_path):
    with pytest.raises(InputError, match="unknown backend"):
        kontext.load_dit(tiny_models["dit"], backend="onnx")
    with pytest.raises(InputError, match="takes none"):
        kontext.load_dit(tiny_models["dit"], engine=tmp_path)
    with pytest.raises(InputError, match="LoRAs cannot"):
        kontext.load_dit(tiny_models["dit"], backend="tensorrt", engine=tmp_path, loras=[(tiny_models["dit"], 1)])
    with pytest.raises(InputError, match="needs the engine"):
        kontext.load_dit(tiny_models["dit"], backend="tensorrt")


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_has_tensorrt(), reason="checks the message shown where tensorrt is not installed")
def test_without_tensorrt_the_backend_explains_how_to_install(tiny_models, tmp_path):
    with pytest.raises(InputError, match="pip install tensorrt"):
        kontext.load_dit(tiny_models["dit"], backend="tensorrt", engine=tmp_path)


@pytest.mark.tensorrt
@pytest.mark.skipif(not (_has_tensorrt() and torch.cuda.is_available()), reason="needs tensorrt and a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "fp8"])
def test_engine_build_and_run_on_the_gpu(exported, tiny_models, tmp_path, precision):
    from kontext.tensorrt.build import build_engine
    from kontext.tensorrt.runtime import load_engine

    dits, _ = exported
    source = tiny_models["dit"] if precision == "fp32" else tiny_models["dit_fp8"]
    two = [Profile("small", (40, 64, 120), (1, 1, 2)), Profile("large", (121, 160, 200), (1, 1, 2))]
    onnx_path = export_onnx(dits[precision], tmp_path / "g.onnx", profiles=two, source=source).path
    plan = build_engine(onnx_path, tmp_path / "engines")
    assert build_engine(onnx_path, tmp_path / "engines") == plan  # cached
    assert list((tmp_path / "engines").glob("timing-*.cache"))
    engine = load_engine(tmp_path / "engines", source=source)
    for tokens in (77, 150, 60):  # profile 0, 1, then 0 again
        x = inputs(dits[precision], tokens, 2, seed=tokens)
        with torch.no_grad():
            ref = dits[precision](*x)
        got = engine(*[t.cuda() for t in x]).cpu()
        assert rel_err(got, ref) <= 1e-3, tokens  # TensorRT may pick TF32 kernels for fp32
    with pytest.raises(InputError, match="outside this engine's profiles"):
        engine(*[t.cuda() for t in inputs(dits[precision], 300, 1)])


# --------------------------------------------------------------------------------------------- the node pack


@pytest.fixture()
def pack(tiny_models, monkeypatch):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import nodes
    from nodes import host

    models = tiny_models["vae"].parents[1]
    monkeypatch.setenv(host.MODELS_ENV, str(models))
    monkeypatch.setenv("KONTEXT_TOKENIZERS", str(models / "tokenizers"))
    return nodes, host, models


def test_engine_model_in_the_kontext_nodes_matches_the_pytorch_model(pack, exported):
    nodes, _, _ = pack
    from nodes.model import StandaloneModel

    M = nodes.NODE_CLASS_MAPPINGS
    dits, paths = exported
    te, = M["KontextTextEncoderLoader"]().load("clip_l-tiny.safetensors", "t5xxl-tiny.safetensors", "cpu")
    vae, = M["KontextVAELoader"]().load("ae-tiny.safetensors", "cpu")
    image = torch.rand(1, 96, 80, 3, generator=torch.Generator().manual_seed(0))
    cond, = M["KontextTextEncode"]().encode(te, "make it night", 2.5)
    cond, _ = M["KontextReferenceImage"]().add(cond, vae, image, "keep", "offset")  # 30 + 30 image tokens
    args = dict(seed=4, steps=3, guidance=0.0, true_cfg=1.0, width=0, height=0, denoise=1.0)
    out = {}
    for who, dit in (("torch", dits["fp32"]), ("engine", onnx_engine(paths["fp32"]))):
        out[who], = M["KontextSampler"]().sample(StandaloneModel(dit, torch.device("cpu")), cond, **args)
    assert rel_err(out["engine"]["samples"], out["torch"]["samples"]) <= TOL
    with pytest.raises(InputError, match="LoRAs cannot"):
        M["KontextLoraLoader"]().apply(StandaloneModel(onnx_engine(paths["fp32"]), torch.device("cpu")),
                                       "whatever.safetensors", 1.0)


def test_loader_node_lists_engines_and_checks_the_request(pack):
    import shutil

    nodes, host, models = pack
    loader = nodes.NODE_CLASS_MAPPINGS["KontextModelLoader"]
    engine_info.save(info(), b"plan", models / "tensorrt")
    try:
        _check_loader(loader, models)
    finally:  # the tiny models folder is shared by the session's other tests
        shutil.rmtree(models / "tensorrt")


def _check_loader(loader, models) -> None:
    (models / "tensorrt" / "orphan.plan").write_bytes(b"no sidecar")  # not an engine of ours: not listed
    choices = loader.INPUT_TYPES()["optional"]["engine"][0]
    assert choices == ["none", "auto", f"{info().key()}.plan"]
    with pytest.raises(InputError, match="runs on an NVIDIA GPU"):
        loader().load("kontext-tiny.safetensors", "auto", "cpu", engine="auto")
    with pytest.raises(InputError, match="not a path"):
        loader().load("kontext-tiny.safetensors", "auto", "auto", engine="../x.plan")
    if not _has_tensorrt():
        with pytest.raises(InputError, match="pip install tensorrt"):
            loader().load("kontext-tiny.safetensors", "auto", "auto", engine="auto")


# --------------------------------------------------------------------------------------------- command line


def test_command_line_checks_before_loading(tiny_models, tmp_path, capsys):
    from kontext.cli import main

    taken = tmp_path / "taken.onnx"
    taken.write_bytes(b"keep me")
    dit = str(tiny_models["dit"])
    image = str(Path(__file__).resolve().parents[1] / "docs" / "example.png")
    cases = [(["export-onnx", "--dit", dit, "--out", str(taken)], "exists"),
             (["export-onnx", "--dit", dit, "--out", str(tmp_path / "x.txt")], "must be a .onnx"),
             (["export-onnx", "--dit", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "y.onnx")],
              "no such file"),
             (["build-engine", "--onnx", str(tmp_path / "none.onnx"), "--out", str(tmp_path)], "no such ONNX"),
             (["build-engine", "--onnx", str(taken), "--comfyui", str(tmp_path)], "not a ComfyUI folder"),
             (["edit", "--tiny", "--image", image, "--prompt", "p", "--out", str(tmp_path / "o.png"),
               "--engine", str(tmp_path)], "--engine runs with --backend tensorrt"),
             (["edit", "--tiny", "--image", image, "--prompt", "p", "--out", str(tmp_path / "o.png"),
               "--backend", "tensorrt"], "needs --engine"),
             (["edit", "--models", str(tiny_models["vae"].parents[1]), "--image", image, "--prompt", "p", "--out",
               str(tmp_path / "o.png"), "--backend", "tensorrt", "--engine", str(tmp_path), "--device", "cpu"],
              "runs on an NVIDIA GPU")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert taken.read_bytes() == b"keep me"
