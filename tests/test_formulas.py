"""Formulas checked against rules written out here from their source (ComfyUI) or from what they must satisfy, so
that a changed comparison, padding mode or blend weight fails a test: reference placement on the shared canvas,
padding of odd latents, and the blending of tiled VAE decodes."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kontext.ids import image_ids, reference_ids
from kontext.sampling import pad_to_patches
from kontext.vae_tiling import decode_tiled

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")


# ---------------------------------------------------------------- reference placement ("offset")

def comfyui_offset_ids(sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """ComfyUI's Flux._forward (ref_latents_method "offset") and Flux.process_img, patch size 2, written out.

    h, w track the canvas in latent pixels; a reference goes right (w_offset = w) when ref_h + h > ref_w + w, else
    below (h_offset = h). Lengths and offsets are rounded to patches as (n + 1) // 2; ids are index 1, then rows and
    columns from linspace(offset, offset + len - 1).
    """
    h = w = 0
    out = []
    for ref_h, ref_w in sizes:
        h_offset = w_offset = 0
        if ref_h + h > ref_w + w:
            w_offset = w
        else:
            h_offset = h
        h, w = max(h, ref_h + h_offset), max(w, ref_w + w_offset)
        h_len, w_len = (ref_h + 1) // 2, (ref_w + 1) // 2
        h_off, w_off = (h_offset + 1) // 2, (w_offset + 1) // 2
        ids = torch.zeros(h_len, w_len, 3)
        ids[:, :, 0] = 1
        ids[:, :, 1] += torch.linspace(h_off, h_len - 1 + h_off, steps=h_len)[:, None]
        ids[:, :, 2] += torch.linspace(w_off, w_len - 1 + w_off, steps=w_len)[None, :]
        out.append(ids.reshape(h_len * w_len, 3))
    return out


SIZE_LISTS = [
    [(8, 8), (8, 8)],  # equal squares: a tie, ComfyUI puts the second below
    [(8, 8), (8, 8), (8, 8), (8, 8)],
    [(125, 125), (125, 125), (63, 101)],  # odd sides, as ComfyUI's VAEEncode of 1000x1000 gives
    [(12, 8), (12, 8)], [(8, 12), (8, 12), (4, 4)], [(9, 7), (8, 10), (5, 5)], [(16, 8), (8, 16), (8, 8)],
]


def test_offset_ids_match_comfyui_placement_including_ties():
    """Every reference's ids equal ComfyUI's offset rule, on hand-picked lists and on all triples of small sizes
    (many of which tie: canvas + reference equally tall and wide). Ids are small integers: compared exactly."""
    small = [(4, 4), (8, 8), (4, 8), (8, 4), (5, 7), (7, 5), (6, 6)]
    cases = SIZE_LISTS + [list(t) for t in itertools.product(small, repeat=3)]
    for sizes in cases:
        got, expected = reference_ids(sizes, "offset"), comfyui_offset_ids(sizes)
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert torch.equal(a, b), sizes


def test_image_ids_put_target_then_comfyui_references():
    """The full id list: the target grid at index 0 from the origin, then the references as ComfyUI places them."""
    target, refs = (9, 12), [(8, 8), (8, 8), (5, 7)]
    ids = image_ids(target, refs, "offset", batch=2)
    n_target = 5 * 6
    assert torch.equal(ids[0, n_target:], torch.cat(comfyui_offset_ids(refs)))
    rows, cols = torch.meshgrid(torch.arange(5.0), torch.arange(6.0), indexing="ij")
    assert torch.equal(ids[1, :n_target], torch.stack([torch.zeros(30), rows.flatten(), cols.flatten()], 1))


COMFY_IDS_SCRIPT = textwrap.dedent('''
    import json, sys
    sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI reads its flags at import
    sys.path.insert(0, COMFY)
    import comfy.options
    comfy.options.enable_args_parsing()
    import torch
    from types import SimpleNamespace
    from comfy.ldm.flux.model import Flux

    model = Flux.__new__(Flux)
    torch.nn.Module.__init__(model)
    model.patch_size = 2
    model.params = SimpleNamespace(axes_dim=[8, 28, 28], default_ref_method="offset", ref_index_scale=1.0,
                                   txt_ids_dims=[])
    seen = []

    def forward_orig(img, img_ids, *args, **kwargs):  # record the ids, skip the network
        seen.append(img_ids)
        return torch.zeros_like(img)

    model.forward_orig = forward_orig
    out = []
    for sizes in SIZES:
        seen.clear()
        refs = [torch.zeros(1, 16, h, w) for h, w in sizes]
        model._forward(torch.zeros(1, 16, 4, 4), torch.zeros(1), torch.zeros(1, 3, 8), ref_latents=refs,
                       ref_latents_method="offset")
        out.append(seen[0][0, 4:].tolist())  # after the 2x2 target tokens
    print(json.dumps(out))
''')


@pytest.mark.comfyui
@pytest.mark.skipif(not COMFYUI_DIR, reason="needs a real ComfyUI checkout: set COMFYUI_DIR")
def test_offset_ids_match_comfyui_itself():
    """ComfyUI's own Flux._forward, in its environment, gives the same reference ids (compared exactly)."""
    python = os.environ.get("COMFYUI_PYTHON") or str(Path(COMFYUI_DIR) / ".venv" / "bin" / "python")
    script = f"COMFY = {COMFYUI_DIR!r}\nSIZES = {SIZE_LISTS!r}\n" + COMFY_IDS_SCRIPT
    run = subprocess.run([python, "-c", script], cwd=COMFYUI_DIR, capture_output=True, text=True,
                         timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    for sizes, comfy_ids in zip(SIZE_LISTS, json.loads(run.stdout.strip().splitlines()[-1])):
        assert torch.cat(reference_ids(sizes, "offset")).tolist() == comfy_ids, sizes


# ---------------------------------------------------------------- padding of odd latents

def comfyui_pad(z: torch.Tensor) -> torch.Tensor:
    """comfy.ldm.common_dit.pad_to_patch_size (circular, patch 2) written out: an odd side gets a copy of its
    first row (or column) appended, so the corner gets z[0, 0]."""
    if z.shape[2] % 2:
        z = torch.cat([z, z[:, :, :1]], dim=2)
    if z.shape[3] % 2:
        z = torch.cat([z, z[:, :, :, :1]], dim=3)
    return z


@pytest.mark.parametrize("shape", [(1, 16, 9, 8), (1, 16, 8, 7), (2, 16, 9, 7), (1, 16, 8, 8)])
def test_odd_latents_padded_like_comfyui(shape):
    """pad_to_patches wraps around like ComfyUI's padding; even latents stay as they are. Copies: exact."""
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pad_to_patches(z), comfyui_pad(z))


# ---------------------------------------------------------------- tiled VAE decoding

class TileStub:
    """A "VAE" whose decode of a tile is one constant, the tile's top-left latent value, over all its pixels: so
    neighbouring tiles disagree everywhere they overlap and the blend weights show in the result."""

    config = SimpleNamespace(downscale=8)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        b, _, h, w = z.shape
        return z[:, :1, :1, :1].expand(b, 3, h * 8, w * 8).clone()


def ramp_mix(starts: list[int], values: list[float], tile: int, overlap: int, size: int) -> torch.Tensor:
    """Along one axis (pixels): each tile's value where it is alone; in the overlap of tiles k and k+1, the linear
    ramp from k to k+1, i.e. at the i-th of `overlap` pixels v_k + (v_{k+1} - v_k) * (i + 1) / (overlap + 1)."""
    out = torch.empty(size, dtype=torch.float64)
    for k, (s, v) in enumerate(zip(starts, values)):
        out[s:s + tile] = v
        if k:
            i = torch.arange(overlap, dtype=torch.float64)
            out[s:s + overlap] = values[k - 1] + (v - values[k - 1]) * (i + 1) / (overlap + 1)
    return out


def test_tiled_decode_blends_overlaps_with_linear_ramps():
    """decode_tiled on a 40x52 latent in 16-tiles overlapping by 4 (starts 0, 12, 24 down and 0, 12, 24, 36
    across): with tile value 100 * row + col, the blend separates into a ramp mix down plus one across.
    Tolerance 1e-6 of the largest value: float32 weighted sums and a division, a few ulps."""
    h, w, tile, overlap = 40, 52, 16, 4
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
    z = (100 * rows + cols).expand(1, 16, h, w)
    got = decode_tiled(TileStub(), z, tile=tile, overlap=overlap)
    f, ys, xs = 8, [0, 12, 24], [0, 12, 24, 36]
    down = ramp_mix([y * f for y in ys], [100.0 * y for y in ys], tile * f, overlap * f, h * f)
    across = ramp_mix([x * f for x in xs], [float(x) for x in xs], tile * f, overlap * f, w * f)
    expected = (down[:, None] + across[None, :]).expand(1, 3, h * f, w * f)
    assert got.shape == expected.shape
    assert (got.double() - expected).abs().max() <= 1e-6 * expected.abs().max()
