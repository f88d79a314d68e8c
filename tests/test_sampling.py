"""Schedule, Euler loop, noise and packing: against hand computations and diffusers (the numerical reference)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kontext.errors import Cancelled, InputError
from kontext.sampling import (euler_sample, flux_schedule, noise_for_denoise, noise_latent, pack,
                              schedule_for_denoise, time_shift_mu, unpack)

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux_kontext import FluxKontextPipeline, calculate_shift  # noqa: E402

STEPS = (1, 2, 4, 20, 28, 50)
SEQ_LENS = (16, 256, 1024, 3600, 4096, 16384)  # below, at and beyond the ends of the linear mu map


def kontext_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # As in black-forest-labs/FLUX.1-Kontext-dev's scheduler/scheduler_config.json.
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")


def diffusers_sigmas(steps: int, seq_len: int) -> torch.Tensor:
    """What FluxKontextPipeline.__call__ hands the scheduler, and the sigmas it ends up with."""
    sched = kontext_scheduler()
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(seq_len, 256, 4096, 0.5, 1.15))
    return sched.sigmas


# ---------------------------------------------------------------------------------------------- schedule

def test_mu_is_linear_in_target_tokens_and_equals_diffusers():
    assert time_shift_mu(256) == pytest.approx(0.5, abs=1e-12)
    assert time_shift_mu(4096) == pytest.approx(1.15, abs=1e-12)
    for n in SEQ_LENS:
        assert time_shift_mu(n) == calculate_shift(n, 256, 4096, 0.5, 1.15)  # same float expression: exact


@pytest.mark.parametrize("steps", STEPS)
def test_schedule_matches_formula(steps):
    for n in SEQ_LENS:
        mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (n - 256)
        expected = [1.0] + [math.exp(mu) / (math.exp(mu) + (1 / t - 1)) for t in np.linspace(1, 0, steps + 1)[1:-1]]
        got = flux_schedule(steps, n)
        assert got.dtype == torch.float32 and got.shape == (steps + 1,)
        assert got[0] == 1.0 and got[-1] == 0.0
        assert torch.all(got[1:] < got[:-1])
        assert torch.allclose(got[:-1].double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-7)


@pytest.mark.parametrize("steps", STEPS)
def test_schedule_matches_diffusers_scheduler(steps):
    for n in SEQ_LENS:
        ours, ref = flux_schedule(steps, n), diffusers_sigmas(steps, n)
        assert ours.shape == ref.shape
        # Tolerance 1e-6: diffusers evaluates in float32, we in float64 rounded once (<= 1 float32 ulp apart).
        assert (ours - ref).abs().max().item() <= 1e-6, (steps, n)


def test_unshifted_schedule_is_linspace():
    assert torch.allclose(flux_schedule(4, 4096, shift=False), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10", None])
def test_bad_step_counts_are_input_errors(bad):
    with pytest.raises(InputError, match="steps"):
        flux_schedule(bad, 4096)


def test_numpy_integer_steps_are_accepted():
    assert flux_schedule(np.int64(3), np.int32(1024)).shape == (4,)


# ---------------------------------------------------------------------------------------------- Euler

def test_euler_against_hand_computation():
    seen = []

    def velocity(x, sigma):
        seen.append(sigma)
        return x * sigma + 1.0

    # x=2: v=3 -> x=2-0.5*3=0.5; v=1.25 -> x=0.5-0.25*1.25=0.1875; v=1.046875 -> x=0.1875-0.25*1.046875
    x = euler_sample(velocity, torch.tensor([2.0]), [1.0, 0.5, 0.25, 0.0])
    assert x.item() == -0.07421875  # every quantity is an exact binary fraction
    assert seen == [1.0, 0.5, 0.25] and all(type(s) is float for s in seen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_euler_matches_diffusers_step_bit_for_bit(dtype):
    steps, seq_len = 6, 64
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 64, generator=gen) / 8
    x0 = torch.randn(1, seq_len, 64, generator=gen).to(dtype)

    def velocity(x, sigma):  # a stand-in model that returns the latent dtype, as the DiT does
        return (torch.tanh(x.float() @ weight) * (1 + sigma)).to(dtype)

    sched = kontext_scheduler()
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(seq_len))
    sched.set_begin_index(0)
    ref = x0
    for t, sigma in zip(sched.timesteps, sched.sigmas):
        ref = sched.step(velocity(ref, float(sigma)), t, ref, return_dict=False)[0]

    ours = euler_sample(velocity, x0, sched.sigmas)
    assert ours.dtype == dtype
    assert torch.equal(ours, ref)
    # and with our own schedule the result is as close as the schedules are (<= 1 float32 ulp per sigma)
    ours2 = euler_sample(velocity, x0, flux_schedule(steps, seq_len)).float()
    assert (ours2 - ref.float()).abs().max() <= (0.05 if dtype == torch.bfloat16 else 1e-5)


def test_callback_sees_every_step_and_cancel_propagates():
    calls = []
    euler_sample(lambda x, s: torch.ones_like(x), torch.zeros(2), flux_schedule(4, 256),
                 callback=lambda i, n, x: calls.append((i, n, x.clone())))
    assert [(i, n) for i, n, _ in calls] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert torch.allclose(calls[-1][2], torch.full((2,), -1.0))  # integrated v=1 from sigma 1 to 0

    evaluations = []

    def stop_at_two(i, n, x):
        if i == 1:
            raise Cancelled("stopped by the user")

    def velocity(x, s):
        evaluations.append(s)
        return torch.zeros_like(x)

    with pytest.raises(Cancelled, match="stopped by the user"):
        euler_sample(velocity, torch.zeros(2), flux_schedule(10, 256), callback=stop_at_two)
    assert len(evaluations) == 2  # no model call after the cancel


def test_euler_rejects_an_empty_schedule():
    with pytest.raises(InputError, match="at least 2"):
        euler_sample(lambda x, s: x, torch.zeros(1), [1.0])


# ---------------------------------------------------------------------------------------------- noise

def diffusers_noise(seed: int, batch: int, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """FluxKontextPipeline.prepare_latents' own draw (text-to-image branch), packed as the pipeline packs it."""
    fake = SimpleNamespace(vae_scale_factor=8, _pack_latents=FluxKontextPipeline._pack_latents,
                           _prepare_latent_image_ids=FluxKontextPipeline._prepare_latent_image_ids)
    gen = torch.Generator("cpu").manual_seed(seed)
    latents, _, _, _ = FluxKontextPipeline.prepare_latents(fake, None, batch, 16, height, width, dtype, "cpu", gen)
    return latents


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noise_equals_diffusers_cpu_generator(dtype):
    for seed, batch, h, w in [(0, 1, 64, 96), (123456789, 2, 48, 32), (2**64 - 1, 1, 16, 16)]:
        ours = noise_latent(seed, batch, h, w, dtype=dtype)
        assert ours.shape == (batch, 16, h // 8, w // 8) and ours.dtype == dtype
        assert torch.equal(pack(ours), diffusers_noise(seed, batch, h, w, dtype))
    assert not torch.equal(noise_latent(1, 1, 32, 32), noise_latent(2, 1, 32, 32))


@pytest.mark.parametrize("args", [(-1, 1, 64, 64), (2**64, 1, 64, 64), (1.5, 1, 64, 64), (0, 0, 64, 64),
                                  (0, 1, 60, 64), (0, 1, 64, 8)])
def test_noise_rejects_bad_arguments(args):
    with pytest.raises(InputError):
        noise_latent(*args)


# ---------------------------------------------------------------------------------------------- packing

def test_pack_unpack_roundtrip_and_diffusers_order():
    lat = torch.randn(2, 16, 6, 10)
    tokens = pack(lat)
    assert tokens.shape == (2, 15, 64)
    assert torch.equal(unpack(tokens, 6, 10), lat)
    assert torch.equal(tokens, FluxKontextPipeline._pack_latents(lat, 2, 16, 6, 10))
    # diffusers' unpack takes the *pixel* size
    assert torch.equal(FluxKontextPipeline._unpack_latents(tokens, 6 * 8, 10 * 8, 8), lat)
    # element order: token 0 = top-left 2x2 patch, channel-major then row then column
    assert torch.equal(tokens[0, 0, :4], torch.stack([lat[0, 0, 0, 0], lat[0, 0, 0, 1], lat[0, 0, 1, 0],
                                                      lat[0, 0, 1, 1]]))


def test_pack_unpack_reject_bad_shapes():
    with pytest.raises(InputError):
        pack(torch.zeros(1, 16, 5, 4))
    with pytest.raises(InputError):
        unpack(torch.zeros(1, 6, 64), 4, 4)


# ---------------------------------------------------------------------------------------------- img2img

def test_denoise_takes_the_ceiling_of_the_tail():
    sigmas = flux_schedule(28, 4096)
    assert torch.equal(schedule_for_denoise(sigmas, 1.0), sigmas)
    assert torch.equal(schedule_for_denoise(sigmas, 0.5), sigmas[14:])  # 14 steps
    assert len(schedule_for_denoise(sigmas, 0.6)) - 1 == 17  # 16.8 -> 17, as diffusers
    assert len(schedule_for_denoise(sigmas, 0.001)) - 1 == 1  # at least one step


def test_denoise_step_count_follows_diffusers_strength_rule():
    for steps in range(1, 41):
        for k in range(1, 101):
            strength = k / 100
            # diffusers' FluxImg2ImgPipeline.get_timesteps, steps actually run:
            init = min(steps * strength, steps)
            ref_run = steps - int(max(steps - init, 0))
            run = len(schedule_for_denoise(flux_schedule(steps, 256), strength)) - 1
            if abs(steps * strength - round(steps * strength)) < 1e-6:
                assert run == max(1, round(steps * strength))  # our tolerance removes diffusers' float noise
            else:
                assert run == ref_run, (steps, strength)
    # the documented difference: 25 * 0.56 = 14.000000000000002 makes diffusers run 15 steps, we run 14
    assert len(schedule_for_denoise(flux_schedule(25, 256), 0.56)) - 1 == 14


@pytest.mark.parametrize("bad", [0.0, -0.2, 1.5])
def test_bad_denoise_is_an_input_error(bad):
    with pytest.raises(InputError, match="denoise"):
        schedule_for_denoise(flux_schedule(10, 256), bad)


def test_noise_for_denoise_matches_diffusers_scale_noise():
    steps, strength = 10, 0.6
    sched = kontext_scheduler()
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(1024))
    t_start = steps - 6
    sched.set_begin_index(t_start)
    init, noise = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8)
    ref = sched.scale_noise(init, sched.timesteps[t_start:t_start + 1], noise)
    tail = schedule_for_denoise(sched.sigmas, strength)
    assert len(tail) == 7
    got = noise_for_denoise(init, noise, tail[0])
    assert (got - ref).abs().max() <= 1e-6  # same formula; float32 evaluation order may differ by an ulp
    assert torch.allclose(noise_for_denoise(init, noise, 0.0), init)
    assert torch.allclose(noise_for_denoise(init, noise, 1.0), noise)
    with pytest.raises(InputError):
        noise_for_denoise(init, noise[:, :8], 0.5)
