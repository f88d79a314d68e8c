"""The Flux VAE: parity with diffusers' AutoencoderKL on tiny random weights, both checkpoint layouts, the real
release's tensor table, and clear errors for wrong files and bad inputs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kontext.errors import CheckpointError, InputError
from kontext.tiny.vae import tiny_state_dict, write_tiny_vae, write_tiny_vae_diffusers
from kontext.vae import SCALE, SHIFT, AutoEncoder, VAEConfig, load_vae

# fp32 on CPU, same weights, same op order up to conv/SDPA kernel choice: differences are rounding only (~1e-7).
RTOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def to_bfl(key: str, levels: int) -> str:
    """diffusers AutoencoderKL key -> BFL ae key, written independently of kontext.vae (which maps the other way)."""
    key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    key = key.replace("mid_block.attentions.0.group_norm.", "mid.attn_1.norm.")
    for theirs, ours in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
        key = key.replace(f"mid_block.attentions.0.{theirs}.", f"mid.attn_1.{ours}.")
    key = key.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
    p = key.split(".")
    if p[1] in ("down_blocks", "up_blocks"):
        if p[1] == "up_blocks":
            p[2] = str(levels - 1 - int(p[2]))  # diffusers counts decoder blocks from the coarsest
        p[1] = p[1][: -len("_blocks")]
        if p[3] == "resnets":
            p[3] = "block"
        else:  # downsamplers.0 / upsamplers.0
            p[3:5] = [p[3][: -len("rs")]]
    return ".".join(p)


def diffusers_ref(bfl_file: Path):
    diffusers = pytest.importorskip("diffusers")
    cfg = VAEConfig.tiny()
    n = len(cfg.ch_mult)
    ref = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks, latent_channels=16, norm_num_groups=32,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=SCALE, shift_factor=SHIFT)
    bfl = load_file(str(bfl_file))
    theirs = ref.state_dict()
    names = {k: to_bfl(k, n) for k in theirs}
    assert sorted(names.values()) == sorted(bfl), "the test's key map must cover the BFL file one to one"
    ref.load_state_dict({k: bfl[names[k]].reshape(theirs[k].shape) for k in theirs}, strict=True)
    return ref.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vae")
    return {"bfl": write_tiny_vae(root / "ae-tiny.safetensors"), "diffusers": write_tiny_vae_diffusers(root / "vae")}


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(2, 3, 48, 32, generator=g) * 2 - 1  # non-square, so a swapped H/W would show
    latent = torch.randn(2, 16, 6, 4, generator=g)
    return pixels, latent


def test_parity_with_diffusers(files, inputs):
    pixels, latent = inputs
    ref = diffusers_ref(files["bfl"])
    ours = load_vae(files["bfl"])
    with torch.no_grad():
        ref_mean = ref.encode(pixels).latent_dist.mean
        ref_pixels = ref.decode(latent).sample
    mean = ours.encode(pixels)
    assert mean.shape == (2, 16, 6, 4)
    assert rel_err(mean, ref_mean) <= RTOL
    out = ours.decode(latent)
    assert out.shape == (2, 3, 48, 32)
    assert rel_err(out, ref_pixels) <= RTOL


def test_diffusers_folder_loads_same_weights(files, inputs):
    a, b = load_vae(files["bfl"]), load_vae(files["diffusers"])
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert b.config == VAEConfig.tiny()
    # and diffusers reads our folder as the same model that the test's own key map builds
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.AutoencoderKL.from_pretrained(files["diffusers"], low_cpu_mem_usage=False).eval()
    with torch.no_grad():
        ref_mean = ref.encode(inputs[0]).latent_dist.mean
    assert rel_err(b.encode(inputs[0]), ref_mean) <= RTOL


def test_diffusers_single_file_and_repo_root(files, tmp_path):
    single = shutil.copy(files["diffusers"] / "diffusion_pytorch_model.safetensors", tmp_path / "vae.safetensors")
    shutil.copytree(files["diffusers"], tmp_path / "repo" / "vae")
    base = load_vae(files["bfl"]).state_dict()
    for path in (single, tmp_path / "repo"):
        sd = load_vae(path).state_dict()
        assert all(torch.equal(sd[k], base[k]) for k in base)


@pytest.mark.parametrize("prefix", ["vae.", "first_stage_model."])
def test_prefixed_bundle(files, tmp_path, prefix):
    sd = {prefix + k: v for k, v in load_file(str(files["bfl"])).items()}
    sd["model.diffusion_model.img_in.weight"] = torch.zeros(8, 4)  # other models in the same file are ignored
    path = tmp_path / "bundle.safetensors"
    save_file(sd, str(path))
    base = load_vae(files["bfl"]).state_dict()
    loaded = load_vae(path).state_dict()
    assert all(torch.equal(loaded[k], base[k]) for k in base)


def test_bf16_load(files, inputs):
    ref = load_vae(files["bfl"]).encode(inputs[0])
    half = load_vae(files["bfl"], dtype=torch.bfloat16)
    assert half.decoder.conv_out.weight.dtype == torch.bfloat16
    mean = half.encode(inputs[0])  # fp32 pixels are cast to the model's dtype
    assert mean.dtype == torch.bfloat16
    assert rel_err(mean, ref) < 5e-2  # bf16 keeps ~3 significant digits; a few layers compound it


def test_full_size_matches_release_table(checkpoint_tables):
    expected = {name: tuple(shape) for name, shape in checkpoint_tables["vae_bfl"]}
    with torch.device("meta"):
        model = AutoEncoder(VAEConfig.full())
    ours = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert ours == expected
    assert (SCALE, SHIFT) == (0.3611, 0.1159)  # scaling_factor, shift_factor of the release vae/config.json


def test_tiny_writer_deterministic_and_sane(files, inputs):
    a, b, c = tiny_state_dict(0), tiny_state_dict(0), tiny_state_dict(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["encoder.conv_in.weight"], c["encoder.conv_in.weight"])
    ckpt_meta = json.loads(files["bfl"].read_bytes()[8:8 + int.from_bytes(files["bfl"].read_bytes()[:8], "little")])
    assert ckpt_meta["__metadata__"]["kontext_tiny"] == "vae"
    assert all(v["dtype"] == "F32" for k, v in ckpt_meta.items() if k != "__metadata__")
    vae = load_vae(files["bfl"])
    z = vae.encode(inputs[0])
    x = vae.decode(z)
    for t in (z, x):  # activations neither vanish nor explode through the random network
        assert torch.isfinite(t).all() and 0.05 < t.std().item() < 20


@pytest.mark.parametrize("shape", [(1, 3, 36, 32), (1, 3, 32, 20), (1, 4, 32, 32), (3, 32, 32)])
def test_encode_rejects_bad_pixels(files, shape):
    vae = load_vae(files["bfl"])
    with pytest.raises(InputError):
        vae.encode(torch.zeros(shape))


def test_decode_rejects_bad_latent(files):
    with pytest.raises(InputError, match="16"):
        load_vae(files["bfl"]).decode(torch.zeros(1, 4, 4, 4))


def _write(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    save_file(sd, str(path))
    return path


def bad_files(tmp: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, a phrase the error must contain)."""
    sdxl = tiny_state_dict(0, VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=4))
    sdxl |= {"quant_conv.weight": torch.zeros(8, 8, 1, 1), "post_quant_conv.weight": torch.zeros(4, 4, 1, 1)}
    quant16 = tiny_state_dict(0) | {"quant_conv.weight": torch.zeros(32, 32, 1, 1)}
    partial = tiny_state_dict(0)
    del partial["decoder.up.1.block.0.nin_shortcut.weight"]
    dit = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2), "img_in.weight": torch.zeros(2, 4)}
    clip = {"text_model.embeddings.token_embedding.weight": torch.zeros(4, 2)}
    data = good.read_bytes()
    (tmp / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp / "noise.safetensors").write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                                          dtype=torch.uint8).numpy().tobytes())
    (tmp / "empty_folder").mkdir()
    return {
        "sdxl": (_write(tmp / "sdxl_vae.safetensors", sdxl), "4 latent channels"),
        "quant16": (_write(tmp / "quant16.safetensors", quant16), "quant_conv"),
        "partial": (_write(tmp / "partial.safetensors", partial), "nin_shortcut"),
        "dit": (_write(tmp / "flux1-dit.safetensors", dit), "diffusion transformer"),
        "clip": (_write(tmp / "clip_l.safetensors", clip), "CLIP"),
        "truncated": (tmp / "truncated.safetensors", "truncated"),
        "noise": (tmp / "noise.safetensors", "not a safetensors"),
        "missing": (tmp / "nowhere" / "ae.safetensors", "no such file"),
        "empty": (tmp / "empty_folder", "no .safetensors"),
    }


@pytest.mark.parametrize("case", ["sdxl", "quant16", "partial", "dit", "clip", "truncated", "noise", "missing",
                                  "empty"])
def test_bad_files_raise_checkpoint_error(files, tmp_path, case):
    path, phrase = bad_files(tmp_path, files["bfl"])[case]
    with pytest.raises(CheckpointError) as info:
        load_vae(path)
    msg = str(info.value)
    assert path.name in msg and phrase in msg, msg
    if case in ("sdxl", "quant16", "dit", "clip"):  # wrong model kind: the message says what was expected
        assert "16-channel Flux VAE" in msg, msg


def test_tiled_decode_equals_whole_decode_when_one_tile_covers_it_and_blends_otherwise():
    from kontext.tiny.vae import tiny_state_dict
    from kontext.vae import AutoEncoder, VAEConfig
    from kontext.vae_tiling import decode_tiled

    vae = AutoEncoder(VAEConfig.tiny())
    vae.load_state_dict(tiny_state_dict(0))
    z = torch.randn(1, 16, 12, 20, generator=torch.Generator().manual_seed(0))
    whole = vae.decode(z)
    assert torch.allclose(decode_tiled(vae, z, tile=32), whole, atol=1e-6)
    tiled = decode_tiled(vae, z, tile=8, overlap=4)  # 6 overlapping tiles
    assert tiled.shape == whole.shape and torch.isfinite(tiled).all()
    # Away from the mid-block's global attention the decoders agree closely: tiles change the picture only a little.
    assert (tiled - whole).abs().mean() < 0.5 * whole.abs().mean()


def test_out_of_memory_falls_back_to_tiles(monkeypatch, caplog):
    from kontext.tiny.vae import tiny_state_dict
    from kontext.vae import AutoEncoder, VAEConfig
    from kontext.vae_tiling import decode_or_tiled

    vae = AutoEncoder(VAEConfig.tiny())
    vae.load_state_dict(tiny_state_dict(0))
    z = torch.randn(1, 16, 72, 72, generator=torch.Generator().manual_seed(1))
    real = vae.decode
    sizes = []

    def decode(latent):  # a GPU that fits a 64x64 latent tile (512 px) but not the whole 72x72
        sizes.append(tuple(latent.shape[2:]))
        if max(latent.shape[2:]) > 64:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(latent)

    monkeypatch.setattr(vae, "decode", decode)
    with caplog.at_level("WARNING"):
        out = decode_or_tiled(vae, z)
    assert out.shape == (1, 3, 576, 576) and torch.isfinite(out).all()
    assert "out of GPU memory" in caplog.text and sizes[0] == (72, 72) and set(sizes[1:]) == {(64, 64)}
    assert len(sizes) == 5  # the whole attempt, then 2 x 2 overlapping tiles
