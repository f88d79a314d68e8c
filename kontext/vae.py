"""The Flux autoencoder (BFL's `ae.safetensors`): pixels in [-1, 1] <-> 16-channel latents at 1/8 of the resolution.

Parameter names are BFL's, so the release file loads without renaming; the diffusers `vae/` layout is renamed onto
them at load time. `encode` returns the raw posterior mean and `decode` takes a raw latent: kontext.latents' SCALE and
SHIFT are applied around the DiT by the caller, `(z - SHIFT) * SCALE`, as ComfyUI does, so our latents and ComfyUI's
are equal.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, InputError
from .latents import SCALE, SHIFT
from .weights import Checkpoint, Plan, Source, count_indexed, load_plan
from .weights.checkpoint import resolve_model_path
from .weights.identify import describe

log = logging.getLogger(__name__)

EXPECTED = "a 16-channel Flux VAE (ae.safetensors, BFL or diffusers vae/ layout)"


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = SCALE
    shift_factor: float = SHIFT

    @staticmethod
    def full() -> "VAEConfig":
        return VAEConfig()

    @staticmethod
    def tiny() -> "VAEConfig":
        # Four levels keep the /8 downscale; the 32 -> 64 step gives both encoder and decoder a nin_shortcut.
        return VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1, self.conv1 = norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In-place activations and residual add: fresh intermediates, and encode/decode run under no_grad.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1 convolutions as projections."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = norm(ch)
        self.q, self.k, self.v = nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # [B, C, H, W] -> [B, 1, H*W, C]: one head whose tokens are pixels (contiguous: 3x faster SDPA on CPU)
        q, k, v = (p(hn).flatten(2).transpose(1, 2).unsqueeze(1).contiguous() for p in (self.q, self.k, self.v))
        del hn
        out = F.scaled_dot_product_attention(q, k, v)  # [B, 1, H*W, C]
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return self.proj_out(out).add_(x)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric: one extra row/column at the right/bottom only


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(ch, ch), AttnBlock(ch), ResnetBlock(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution of the encoder (`down.i`) or decoder (`up.i`): res blocks, then an optional resampler."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, resample: type[nn.Module] | None, attr: str):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch) for i in range(n_blocks))
        self.attr = attr
        if resample is not None:
            setattr(self, attr, resample(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        return getattr(self, self.attr)(x) if hasattr(self, self.attr) else x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        last = len(chans) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList(
            Level(cfg.ch if i == 0 else chans[i - 1], c, cfg.num_res_blocks, Downsample if i < last else None,
                  "downsample") for i, c in enumerate(chans))
        self.mid = Mid(chans[-1])
        self.norm_out = norm(chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], 2 * cfg.z_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h)), inplace=True))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, chans[-1], 3, padding=1)
        self.mid = Mid(chans[-1])
        # BFL indexes `up` by resolution like `down` (up.0 is the finest) but runs it from the coarsest.
        self.up = nn.ModuleList(
            Level(chans[min(i + 1, len(chans) - 1)], c, cfg.num_res_blocks + 1, Upsample if i > 0 else None,
                  "upsample") for i, c in enumerate(chans))
        self.norm_out = norm(chans[0])
        self.conv_out = nn.Conv2d(chans[0], cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class AutoEncoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_out.weight.device

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> raw posterior mean [B, 16, H/8, W/8] (no sampling, no scale or shift)."""
        cfg, f = self.config, self.config.downscale
        if pixels.dim() != 4 or pixels.shape[1] != cfg.in_channels:
            raise InputError(f"VAE encode expects pixels [B, {cfg.in_channels}, H, W], got {list(pixels.shape)}")
        if pixels.shape[2] % f or pixels.shape[3] % f:
            raise InputError(f"VAE encode needs height and width that are multiples of {f}, got "
                             f"{pixels.shape[3]}x{pixels.shape[2]} (width x height); resize or crop the image first")
        moments = self.encoder(pixels.to(self.device, self.dtype))
        return moments[:, : cfg.z_channels].contiguous()  # the mean; the second half is the log-variance

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent [B, 16, h, w] -> pixels [B, 3, 8h, 8w], roughly in [-1, 1] and not clamped."""
        if z.dim() != 4 or z.shape[1] != self.config.z_channels:
            raise InputError(f"VAE decode expects a latent [B, {self.config.z_channels}, h, w], got {list(z.shape)}")
        return self.decoder(z.to(self.device, self.dtype))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(pixels))


# ---------------------------------------------------------------- checkpoint layouts
_DIFFUSERS_ATTN = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def diffusers_name(name: str, levels: int) -> str:
    """Our (BFL) parameter name -> its name in diffusers' AutoencoderKL (`levels` = len(ch_mult))."""
    rules = [  # diffusers numbers decoder blocks in execution order, i.e. BFL's `up` reversed
        (r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}."),
        (r"^encoder\.down\.(\d+)\.", r"encoder.down_blocks.\1."),
        (r"\.block\.(\d+)\.", r".resnets.\1."),
        (r"\.(down|up)sample\.", r".\1samplers.0."),
        (r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}."),
        (r"\.mid\.attn_1\.norm\.", ".mid_block.attentions.0.group_norm."),
        (r"\.mid\.attn_1\.(q|k|v|proj_out)\.", lambda m: f".mid_block.attentions.0.{_DIFFUSERS_ATTN[m[1]]}."),
        (r"\.nin_shortcut\.", ".conv_shortcut."),
        (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    ]
    for pattern, repl in rules:
        name = re.sub(pattern, repl, name)
    return name


def _not_a_vae(ckpt: Checkpoint) -> CheckpointError:
    return CheckpointError(ckpt.path, f"holds no VAE encoder/decoder tensors (it looks like "
                                      f"{describe(ckpt.weight_keys())})", EXPECTED)


def _find_prefix(ckpt: Checkpoint) -> str:
    """The prefix of the VAE tensors: '' for ae.safetensors, e.g. 'vae.' or 'first_stage_model.' in bundles."""
    stem = "encoder.conv_in.weight"
    found = [k[: -len(stem)] for k in ckpt.weight_keys() if k.endswith(stem)]
    found = [p for p in found if (p == "" or p.endswith(".")) and p + "decoder.conv_in.weight" in ckpt]
    if not found:
        raise _not_a_vae(ckpt)
    return min(found, key=len)


def _layout(ckpt: Checkpoint, p: str) -> tuple[str, int, int]:
    """('bfl' | 'diffusers', number of levels, res blocks per encoder level), from the key names."""
    keys, q = ckpt.weight_keys(), re.escape(p)
    for layout, level, block in (("bfl", "down", "block"), ("diffusers", "down_blocks", "resnets")):
        levels = count_indexed(keys, rf"{q}encoder\.{level}\.(\d+)\.")
        if levels:
            return layout, levels, count_indexed(keys, rf"{q}encoder\.{level}\.0\.{block}\.(\d+)\.")
    raise _not_a_vae(ckpt)


def _config(ckpt: Checkpoint, key: Callable[[str], str], levels: int, blocks: int) -> VAEConfig:
    def shape(name: str) -> tuple[int, ...]:
        if key(name) not in ckpt:
            raise CheckpointError(ckpt.path, f"VAE tensor '{key(name)}' is missing", EXPECTED)
        return ckpt.dims(key(name), 4)  # every tensor read here is a conv kernel

    conv_in, dec_in = shape("encoder.conv_in.weight"), shape("decoder.conv_in.weight")
    ch, z = conv_in[0], dec_in[1]
    quant = key("quant_conv.weight") in ckpt or key("post_quant_conv.weight") in ckpt
    if z != 16:
        kind = " and quant_conv layers, like an SD 1.x/SDXL VAE" if quant else ""
        raise CheckpointError(ckpt.path, f"holds a VAE with {z} latent channels{kind}", EXPECTED)
    if quant:  # weights we would silently skip: the result would be wrong, not just different
        raise CheckpointError(ckpt.path, "holds a 16-channel VAE with quant_conv/post_quant_conv layers, which the"
                                         " Flux VAE does not have", EXPECTED)
    if ckpt.config.get("scaling_factor", SCALE) != SCALE:  # e.g. SD3's VAE: same shapes, other latent statistics
        log.warning("%s: config.json says scaling_factor %s, not Flux's %s; is this the Flux VAE?", ckpt.path,
                    ckpt.config["scaling_factor"], SCALE)
    mult = tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in range(levels))
    return VAEConfig(in_channels=conv_in[1], ch=ch, out_ch=shape("decoder.conv_out.weight")[0], ch_mult=mult,
                     num_res_blocks=blocks, z_channels=z)


def load_vae(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> AutoEncoder:
    """Load a Flux VAE from BFL's ae.safetensors (optionally prefixed, as in bundles) or diffusers' vae/ layout."""
    ckpt = Checkpoint(resolve_model_path(path, "vae"))
    prefix = _find_prefix(ckpt)
    layout, levels, blocks = _layout(ckpt, prefix)

    def key(name: str) -> str:
        return prefix + (name if layout == "bfl" else diffusers_name(name, levels))

    cfg = _config(ckpt, key, levels, blocks)
    try:
        with torch.device("meta"):
            model = AutoEncoder(cfg)
    except ValueError as exc:  # e.g. channel counts that GroupNorm(32) cannot split
        raise CheckpointError(path, f"holds a VAE of unsupported shape {cfg}: {exc}", EXPECTED) from None
    plan: Plan = {}
    for name, _ in model.named_parameters():
        conv1x1 = layout == "diffusers" and ".attn_1." in name and name.endswith(".weight") and ".norm." not in name
        plan[name] = Source((key(name),), "as_conv1x1" if conv1x1 else "copy")
    log.info("loading Flux VAE from %s (%s layout%s)", path, layout, f", prefix '{prefix}'" if prefix else "")
    return load_plan(model, plan, ckpt, what="Flux VAE", device=device, dtype=dtype)
