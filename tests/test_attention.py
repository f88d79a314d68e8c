"""Attention backends: the registry, the choice and its fallbacks, sdpa against the formula, the kernels' layouts."""
from __future__ import annotations

import dataclasses
import logging
import sys
import types

import pytest
import torch

from kontext import attention as A
from kontext.rope import Positions


@pytest.fixture(autouse=True)
def fresh_choice(monkeypatch):
    """Every test starts from no request and no environment variable, and leaves none behind."""
    monkeypatch.delenv(A.ENV, raising=False)
    A.set_backend(None)
    yield
    A.set_backend(None)


def qkv(B: int = 2, H: int = 3, N: int = 5, D: int = 8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, N, D, generator=g, dtype=dtype) for _ in range(3)]


def no_rope(q: torch.Tensor) -> Positions:
    shape = (1, 1, q.shape[2], q.shape[3] // 2)
    return Positions(torch.ones(shape), torch.zeros(shape))  # rotation by 0: RoPE is the identity


def formula(q, k, v):
    """softmax(q k^T / sqrt(D)) v, as [B, N, H*D]."""
    w = torch.softmax(q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return (w @ v.double()).transpose(1, 2).flatten(2)


def test_registry_and_choices():
    assert set(A.REGISTRY) == {"sdpa", "flash3", "sage"}
    assert A.CHOICES[0] == "auto" and set(A.CHOICES[1:]) == set(A.REGISTRY)
    with pytest.raises(ValueError, match="auto, sdpa, flash3, sage"):
        A.set_backend("flash2")


def test_request_from_environment_and_set_backend_wins(monkeypatch):
    assert A.requested() == "auto"
    monkeypatch.setenv(A.ENV, "Sage")
    assert A.requested() == "sage"
    A.set_backend("sdpa")
    assert A.requested() == "sdpa"


def test_sdpa_on_cpu_equals_the_formula():
    A.set_backend("sdpa")
    q, k, v = qkv()
    out = A.attention(q, k, v, no_rope(q))
    assert out.shape == (2, 5, 3 * 8)
    assert (out.double() - formula(q, k, v)).abs().max() < 1e-5
    assert A.backend_for(q) == "sdpa"


def test_auto_on_cpu_is_sdpa(caplog):
    q, _, _ = qkv()
    with caplog.at_level(logging.INFO, logger=A.log.name):
        assert A.backend_for(q) == "sdpa"
    assert "attention: sdpa (auto" in caplog.text


@pytest.mark.parametrize("name,module", [("flash3", "flash_attn_interface"), ("sage", "sageattention")])
def test_missing_package_falls_back_with_one_warning(monkeypatch, caplog, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail, installed or not
    A.set_backend(name)
    q, k, v = qkv()
    with caplog.at_level(logging.WARNING, logger=A.log.name):
        for _ in range(3):
            out = A.attention(q, k, v, no_rope(q))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not importable" in warnings[0].getMessage()
    assert "falling back to sdpa" in warnings[0].getMessage()
    assert (out.double() - formula(q, k, v)).abs().max() < 1e-5


def test_installed_kernel_off_cuda_falls_back_with_a_reason(monkeypatch, caplog):
    fake = types.ModuleType("flash_attn_interface")
    fake.flash_attn_func = lambda *a: pytest.fail("a CUDA-only kernel was called on the CPU")
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fake)
    A.set_backend("flash3")
    q, _, _ = qkv()
    with caplog.at_level(logging.WARNING, logger=A.log.name):
        assert A.backend_for(q) == "sdpa"
    assert "CUDA only" in caplog.text


def test_unknown_environment_value_warns_and_runs_sdpa(monkeypatch, caplog):
    monkeypatch.setenv(A.ENV, "fastest")
    q, _, _ = qkv()
    with caplog.at_level(logging.WARNING, logger=A.log.name):
        assert A.backend_for(q) == "sdpa"
    assert "fastest" in caplog.text


def fake_backend(monkeypatch, name: str, kernel) -> None:
    """Register `kernel` as `name`'s, usable on this CPU (the adapter, `run`, stays the real one)."""
    real = A.REGISTRY[name]
    monkeypatch.setitem(A.REGISTRY, name, dataclasses.replace(real, load=lambda: kernel, unsupported=lambda q: None))


@pytest.mark.parametrize("returns_lse", [False, True])
def test_flash3_gets_bnhd_and_its_output_is_laid_out_back(monkeypatch, returns_lse):
    seen = []

    def flash_attn_func(q, k, v):
        seen.append((q.shape, k.shape, v.shape))
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                               v.transpose(1, 2)).transpose(1, 2)
        return (out, None) if returns_lse else out

    fake_backend(monkeypatch, "flash3", flash_attn_func)
    A.set_backend("flash3")
    q, k, v = qkv(B=2, H=3, N=5, D=8)
    out = A.attention(q, k, v, no_rope(q))
    assert seen == [((2, 5, 3, 8),) * 3]
    assert A.backend_for(q) == "flash3"
    assert (out.double() - formula(q, k, v)).abs().max() < 1e-5


def test_auto_picks_flash3_on_hopper(monkeypatch):
    fake_backend(monkeypatch, "flash3", lambda q, k, v: q)
    monkeypatch.setattr(A, "_is_hopper", lambda q: True)
    assert A.backend_for(qkv()[0]) == "flash3"
    monkeypatch.setattr(A, "_is_hopper", lambda q: False)
    A.set_backend(None)  # forget the choice made for the "Hopper"
    assert A.backend_for(qkv()[0]) == "sdpa"


def test_sage_gets_hnd_layout(monkeypatch):
    seen = []

    def sageattn(q, k, v, tensor_layout, is_causal):
        seen.append((q.shape, tensor_layout, is_causal))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    fake_backend(monkeypatch, "sage", sageattn)
    A.set_backend("sage")
    q, k, v = qkv()
    out = A.attention(q, k, v, no_rope(q))
    assert seen == [((2, 3, 5, 8), "HND", False)]
    assert (out.double() - formula(q, k, v)).abs().max() < 1e-5


def test_cuda_kernel_order_prefers_cudnn():
    order, kw = A._sdpa_backends()
    from torch.nn.attention import SDPBackend

    assert order[0] == getattr(SDPBackend, "CUDNN_ATTENTION", order[0]) and order[-1] == SDPBackend.MATH
    assert kw in ({}, {"set_priority": True})


def test_cuda_half_checks():
    q = torch.zeros(1, 1, 1, 2)
    assert "CUDA only" in A._cuda_half(q)
    assert A._cuda_half(q.to(torch.bfloat16)) is not None
