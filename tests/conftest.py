"""Shared fixtures: the tiny models (written once per session) and the reference tensor tables in tests/data."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kontext

DATA = Path(__file__).resolve().parent / "data"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative error measure every parity test uses."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    return kontext.make_tiny(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def checkpoint_tables() -> dict:
    """Tensor tables (name, shape) of the public release files, see the file's "about" entry."""
    return json.loads((DATA / "checkpoint_tables.json").read_text())
