"""The size of a sampling run (kontext.run_size): explicit sides, an initial latent, the first reference, the default;
the latent checks; the token count behind the memory estimate."""
from __future__ import annotations

import pytest
import torch

from kontext.errors import InputError
from kontext.run_size import RunSize, activation_bytes, check_latent, run_size, token_count


def lat(b: int, h: int, w: int) -> torch.Tensor:
    return torch.zeros(b, 16, h, w)


def test_explicit_sides_win_over_a_reference_and_are_floored_to_16():
    assert run_size(512, 256, ref_latents=[lat(1, 100, 80)]) == RunSize(512, 256, 1)
    assert run_size(1000, 1030) == RunSize(992, 1024, 1)


def test_without_sides_the_first_reference_then_the_default_sets_the_size():
    assert run_size(None, None, ref_latents=[lat(1, 104, 156), lat(1, 8, 8)]) == RunSize(1248, 832, 1)
    assert run_size(0, 0) == RunSize(1024, 1024, 1)  # 0 is unset, as the node's widgets say
    assert run_size(1024, None, ref_latents=[lat(1, 104, 156)]) == RunSize(1024, 672, 1)  # the reference's aspect


def test_an_initial_latent_is_followed_exactly_and_sets_the_batch():
    # ComfyUI's VAEEncode crops to multiples of 8: a 1000x1000 image gives a 125x125 latent, followed as it is.
    size = run_size(None, None, lat(3, 125, 125), [lat(1, 64, 64)], denoise=0.6)
    assert size == RunSize(1000, 1000, 3) and size.latent == (125, 125)
    assert run_size(512, 256, lat(2, 32, 64)) == RunSize(512, 256, 2)  # sides that match it are accepted


def test_sides_that_contradict_the_latent_and_a_missing_latent_are_refused():
    with pytest.raises(InputError, match="latent input is 256x256 but width/height ask for 512x512.*set both to 0"):
        run_size(512, 0, lat(1, 32, 32))  # the unset height follows the latent's aspect
    with pytest.raises(InputError, match="denoise below 1 needs the latent input"):
        run_size(None, None, denoise=0.5)
    with pytest.raises(InputError, match="outside the supported"):
        run_size(None, None, lat(1, 6, 6))  # 48x48 pixels: below the smallest side
    with pytest.raises(InputError, match="outside the supported"):
        run_size(40, 0)


@pytest.mark.parametrize("bad", [None, "x", torch.zeros(1, 4, 8, 8), torch.zeros(16, 8, 8)])
def test_check_latent_wants_flux_latents(bad):
    with pytest.raises(InputError, match=r"latent: expected a Flux LATENT with samples \[batch, 16, h, w\]"):
        check_latent(bad)
    ok = lat(2, 7, 9)
    assert check_latent(ok) is ok


def test_token_count_and_the_memory_bound():
    size = RunSize(64, 48)  # latent 6x8: 3x4 = 12 target tokens
    refs = [lat(1, 7, 9)]  # odd sides padded: 4x5 = 20 tokens
    assert token_count(size, refs, 512) == 512 + 12 + 20
    assert activation_bytes(100, 8, 2, 2, torch.bfloat16) == 100 * 8 * 2 * 2 * 24 * 2
