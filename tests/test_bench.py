"""`python -m kontext bench`: the tiny size on the CPU, its table, its JSON, and its answers to bad input.

Runs go through kontext.cli.main in-process, at the smallest edit (64 px, one step, one timed call), so that the
whole file stays a few seconds. Peers that are missing or fail must cost one line, never the run.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys

import pytest

from kontext.cli import main

TINY = ["bench", "--size", "tiny", "--device", "cpu", "--res", "64", "--steps", "1", "--repeat", "1", "--warmup", "0"]
ROW_KEYS = {"mode", "path", "ms_step", "ms_edit", "peak_bytes", "weight_bytes", "ratios", "error"}
HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[int, str, dict]:
    """One full tiny run (every path, diffusers where importable), shared: building the peers costs seconds."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    rc, out, _ = run([*TINY, "--json", str(path)])
    return rc, out, json.loads(path.read_text()) if path.exists() else {}


def rows_of(out: str) -> dict[str, list[str]]:
    return {line.split()[1]: line.split() for line in out.splitlines() if line.startswith("resident ")}


def test_tiny_run_prints_a_row_per_path(tiny_run):
    rc, out, _ = tiny_run
    assert rc == 0, out
    rows = rows_of(out)
    assert set(rows) == {"fp32", "fp8", "fp4"}  # on the CPU fp32 is the dense path in bf16's place
    for cells in rows.values():
        assert float(cells[2]) > 0 and float(cells[3]) > 0  # ms/step, ms/edit


def test_json_holds_every_number(tiny_run):
    _, _, data = tiny_run
    assert data["meta"]["modes"] == ["resident"]
    assert data["meta"]["size"] == "tiny" and data["meta"]["res"] == 64 and data["meta"]["device"] == "cpu"
    assert data["meta"]["tokens"] == {"target": 16, "reference": 16, "text": 512}
    assert [r["path"] for r in data["rows"]] == ["fp32", "fp8", "fp4"]
    for r in data["rows"]:
        assert set(r) == ROW_KEYS and r["error"] is None
        assert r["ms_step"] > 0 and r["ms_edit"] > 0 and r["peak_bytes"] is None  # no GPU memory on the CPU
    by = {r["path"]: r["weight_bytes"] for r in data["rows"]}
    assert by["fp4"] < by["fp8"] < by["fp32"]  # the quantised paths hold fewer bytes
    assert {p["name"] for p in data["peers"]} == {"diffusers"}  # ComfyUI only with --comfyui


@pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers is not installed")
def test_diffusers_ratio_appears(tiny_run):
    _, out, data = tiny_run
    assert "diffusers/ours" in out.splitlines()[0]
    peer = data["peers"][0]
    assert peer["ms"] > 0 and peer["note"] is None
    for r in data["rows"]:
        assert r["ratios"]["diffusers"] == pytest.approx(peer["ms"] / r["ms_step"])


def test_missing_diffusers_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    rc, out, _ = run([*TINY, "--paths", "fp8"])
    assert rc == 0
    lines = [line for line in out.splitlines() if line.startswith("diffusers:")]
    assert len(lines) == 1 and lines[0].startswith("diffusers: not timed (") and "Error" in lines[0], out
    assert "diffusers/ours" not in out and "resident  fp8" in out  # ours still timed, no ratio column


def test_comfyui_elsewhere_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # not under test here: spare its model's build
    rc, out, _ = run([*TINY, "--paths", "fp8", "--comfyui", "/nonexistent", "--json", str(tmp_path / "b.json")])
    assert rc == 0
    lines = [line for line in out.splitlines() if line.startswith("comfyui:")]
    assert len(lines) == 1 and "not timed" in lines[0] and "/nonexistent" in lines[0]
    peer = next(p for p in json.loads((tmp_path / "b.json").read_text())["peers"] if p["name"] == "comfyui")
    assert peer["ms"] is None and "/nonexistent" in peer["note"]


@pytest.mark.parametrize("args, message", [
    (["--paths", "bf16,fp2"], "--paths 'bf16,fp2': unknown fp2"),
    (["--paths", ","], "--paths ',': unknown (none given)"),
    (["--res", "100"], "--res 100: the edit size must be a positive multiple of 16"),
    (["--res", "0"], "--res 0"),
    (["--repeat", "0"], "--repeat 0: must be at least 1"),
    (["--warmup", "-1"], "--warmup -1"),
    (["--device", "cuda:7"], "is not available"),
    (["--json", "/nonexistent/b.json"], "--json /nonexistent/b.json: the folder"),
])
def test_bad_input_exits_2(args, message, monkeypatch):
    import kontext.bench

    def no_models(*_a, **_k):
        raise AssertionError("a mistake must be reported before any model is built")

    monkeypatch.setattr(kontext.bench, "build", no_models)
    rc, out, err = run([*TINY, *args])
    assert rc == 2, out + err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
