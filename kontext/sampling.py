"""Rectified-flow sampling for Kontext: the shifted schedule, the Euler loop, seeded noise, 2x2 token packing.

Conventions: sigma (= t) runs from 1 (pure noise) to 0 (image); the model predicts the velocity v = noise - image,
so one Euler step is x <- x + (sigma_next - sigma) * v. Latents here are "model space" latents (the VAE's raw
latent already scaled and shifted), [B, 16, H/8, W/8] for an H x W image.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from .errors import InputError
from .params import MAX_SEED, MAX_STEPS, integer

LATENT_CHANNELS = 16
VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor], None]


def time_shift_mu(image_seq_len: int, base_len: int = 256, max_len: int = 4096,
                  base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """The schedule shift mu, linear in the number of *target* image tokens (references don't count).

    Written as slope * L + intercept, the same float expression BFL and diffusers evaluate; it extrapolates
    linearly beyond max_len (2048x2048 has 16384 tokens, mu ~ 3.2), as they do.
    """
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + (base_shift - slope * base_len)


def flux_schedule(steps: int, image_seq_len: int, shift: bool = True) -> torch.Tensor:
    """steps + 1 float32 sigmas from 1 to 0: linspace(1, 0, steps + 1), each t mapped to e^mu / (e^mu + 1/t - 1).

    Evaluated in float64 and rounded once to float32, so it agrees with diffusers' FlowMatchEulerDiscreteScheduler
    (which evaluates in float32 from linspace(1, 1/steps, steps) and appends 0) to within a float32 ulp. t = 0 stays 0.
    """
    steps = integer(steps, "steps", 1, MAX_STEPS)
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if shift:
        e = math.exp(time_shift_mu(integer(image_seq_len, "image_seq_len", 1, 1 << 30)))
        t = torch.cat([e / (e + (1.0 / t[:-1] - 1.0)), t[-1:]])  # the last t is 0: keep it, avoid 1/0
    return t.to(torch.float32)


def euler_sample(velocity_fn: VelocityFn, x: torch.Tensor, sigmas: Sequence[float] | torch.Tensor,
                 callback: Optional[StepCallback] = None) -> torch.Tensor:
    """Integrate from sigmas[0] to sigmas[-1] with Euler steps on velocity_fn(x, sigma) -> v.

    Each update is done the way diffusers' FlowMatchEulerDiscreteScheduler.step does it, so bf16 runs match bit for
    bit: x is upcast to float32, dt is a float32 0-dim tensor (so dt * v is evaluated in v's dtype), and the sum is
    cast back, here to x's own dtype (diffusers casts to v's dtype; the two are the same in its pipeline).
    `sigma` is handed over as a Python float; how to round it for the model's timestep embedding is the caller's
    choice (diffusers rounds sigma * 1000 to the latent dtype, BFL rounds sigma to it, ComfyUI keeps float32).
    callback(step_index, total_steps, x) runs after every step; anything it raises (kontext.errors.Cancelled to
    stop) propagates unchanged, leaving clean-up to the caller.
    """
    sig = torch.as_tensor(sigmas, dtype=torch.float32).flatten().cpu()
    if sig.numel() < 2:
        raise InputError(f"a schedule needs at least 2 sigmas (one step), got {sig.numel()}")
    total = sig.numel() - 1
    dts = (sig[1:] - sig[:-1]).to(x.device)  # moved once: no host-to-device copy inside the loop
    out_dtype = x.dtype
    for i in range(total):
        v = velocity_fn(x, float(sig[i]))
        x = (x.to(torch.float32) + dts[i] * v).to(out_dtype)
        if callback is not None:
            callback(i, total, x)
    return x


def noise_latent(seed: int, batch: int, height: int, width: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Seeded Gaussian noise [B, 16, H/8, W/8] for an H x W image, drawn on the CPU so any machine agrees.

    Same draw as diffusers' FluxKontextPipeline with a CPU generator (randn_tensor of shape
    [B, 16, 2 * (H // 16), 2 * (W // 16)], in the pipeline's dtype: pass dtype=torch.bfloat16 to match a bf16
    diffusers run) and as ComfyUI's noise for an empty latent (float32, one draw for the whole batch).
    """
    seed = integer(seed, "seed", 0, MAX_SEED)
    batch = integer(batch, "batch", 1, 1 << 20)
    if height % 8 or width % 8 or height < 16 or width < 16:
        raise InputError(f"image size {width}x{height}: both sides must be multiples of 8, at least 16")
    gen = torch.Generator("cpu").manual_seed(seed)
    shape = (batch, LATENT_CHANNELS, height // 8, width // 8)  # = diffusers' 2 * (H // 16) for multiples of 16
    return torch.randn(shape, generator=gen, dtype=dtype).to(device)


def pack(latent: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] latent -> [B, (h/2)(w/2), 4C] tokens: each 2x2 patch, channel-major then row, col (BFL order)."""
    if latent.dim() != 4 or latent.shape[2] % 2 or latent.shape[3] % 2:
        raise InputError(f"cannot pack a latent of shape {list(latent.shape)}: expected [B, C, h, w], h and w even")
    return rearrange(latent, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def pad_to_patches(z: torch.Tensor) -> torch.Tensor:
    """A latent [B, C, h, w] padded to whole 2x2 patches, circularly (as ComfyUI pads odd latents)."""
    pad = (0, z.shape[3] % 2, 0, z.shape[2] % 2)
    return F.pad(z, pad, mode="circular") if any(pad) else z


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of pack: [B, (h/2)(w/2), 4C] -> [B, C, h, w], with h, w the *latent* height and width."""
    if tokens.dim() != 3 or h % 2 or w % 2 or tokens.shape[1] != (h // 2) * (w // 2) or tokens.shape[2] % 4:
        raise InputError(f"cannot unpack tokens of shape {list(tokens.shape)} to a {h}x{w} latent")
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h // 2, w=w // 2, ph=2, pw=2)


def schedule_for_denoise(sigmas: torch.Tensor, denoise: float) -> torch.Tensor:
    """The tail of a schedule for img2img: the last ceil(steps * denoise) steps (at least one).

    This is diffusers' strength rule (it skips int(steps - steps * strength) steps, i.e. runs the ceiling), minus
    its float noise: a 1e-6 tolerance keeps e.g. 0.7 * 10 = 7.000000000000001 at 7 steps. ComfyUI's KSampler means
    something else by denoise: it always runs `steps` steps, the tail of a longer int(steps / denoise) schedule.
    """
    denoise = float(denoise)
    if not 0.0 < denoise <= 1.0:
        raise InputError(f"denoise must be in (0, 1], got {denoise}")
    steps = len(sigmas) - 1
    if steps < 1:
        raise InputError("an empty schedule cannot be shortened")
    run = min(steps, max(1, math.ceil(steps * denoise - 1e-6)))
    return sigmas[steps - run:]


def noise_for_denoise(init_latent: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """The flow-matching point at `sigma` between an image latent and noise: sigma * noise + (1 - sigma) * init.

    Pass the first sigma of `schedule_for_denoise`'s result. Evaluated in float32, returned in init's dtype.
    """
    if init_latent.shape != noise.shape:
        raise InputError(f"noise of shape {list(noise.shape)} does not match the latent {list(init_latent.shape)}")
    sigma = float(sigma)
    mixed = sigma * noise.to(torch.float32) + (1.0 - sigma) * init_latent.to(torch.float32)
    return mixed.to(init_latent.dtype)
