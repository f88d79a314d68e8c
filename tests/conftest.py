"""Shared fixtures: the tiny models (written once per session) and the reference data folder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kontext

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative error measure every parity test uses."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    return kontext.make_tiny(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def checkpoint_tables() -> dict:
    path = SHARED_DATA / "checkpoint_tables.json"
    if not path.exists():
        pytest.skip(f"reference tensor tables not found at {path}")
    return json.loads(path.read_text())
