"""`python -m kontext bench`: the tiny size on the CPU in every mode that runs there, its table, its JSON, and its
answers to bad input.

Runs go through kontext.cli.main in-process, at the smallest edit (64 px, one step, one timed call), so that the
whole file stays a few seconds (the compiled mode's test, marked slow, compiles for about 10-40 s). Peers that are
missing or fail, and rows that run out of memory, must cost one line, never the run.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys

import pytest
import torch

import kontext.bench.modes as modes
from kontext.bench import SIZES, Row, Setup, bench, make_inputs
from kontext.cli import main

TINY = ["bench", "--size", "tiny", "--device", "cpu", "--res", "64", "--steps", "1", "--repeat", "1", "--warmup", "0"]
ROW_KEYS = {"mode", "path", "ms_step", "s_edit", "warmup_s", "peak_bytes", "weight_bytes", "dv", "ratios", "error",
            "note"}
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


def rows_of(out: str) -> dict[tuple[str, str], list[str]]:
    """The table's rows by (mode, path)."""
    return {(line.split()[0], line.split()[1]): line.split() for line in out.splitlines()
            if line.split() and line.split()[0] in modes.MODES}


def test_tiny_run_prints_a_row_per_path_and_mode(tiny_run):
    rc, out, _ = tiny_run
    assert rc == 0, out
    rows = rows_of(out)
    # On the CPU fp32 is the dense path in bf16's place; compiled is not a default there (it compiles for long).
    assert set(rows) == {(m, p) for m in ("resident", "stream") for p in ("fp32", "fp8", "fp4")}
    for cells in rows.values():
        assert float(cells[2]) > 0 and float(cells[3]) > 0  # ms/step, s/edit
        assert "FAILED" not in cells and "OOM" not in cells
    assert "stream: CPU stand-in" in out  # the stream rows are not passed off as a measure of PCIe streaming


def test_json_holds_every_number(tiny_run):
    _, _, data = tiny_run
    assert data["meta"]["modes"] == ["resident", "stream"]
    assert data["meta"]["size"] == "tiny" and data["meta"]["res"] == 64 and data["meta"]["device"] == "cpu"
    assert data["meta"]["tokens"] == {"target": 16, "reference": 16, "text": 512}
    assert data["meta"]["memory_limit_gb"] is None and data["meta"]["cuda_graphs"] is False
    assert [(r["mode"], r["path"]) for r in data["rows"]] == \
        [(m, p) for m in ("resident", "stream") for p in ("fp32", "fp8", "fp4")]
    for r in data["rows"]:
        assert set(r) == ROW_KEYS and r["error"] is None
        assert r["ms_step"] > 0 and r["s_edit"] > 0 and r["peak_bytes"] is None  # no GPU memory on the CPU
        assert r["warmup_s"] is not None
    by = {(r["mode"], r["path"]): r["weight_bytes"] for r in data["rows"]}
    assert by["resident", "fp4"] < by["resident", "fp8"] < by["resident", "fp32"]  # quantised: fewer bytes
    # Streamed, the device keeps only the layers outside the blocks: the same for every path, a fraction of any.
    assert by["stream", "fp32"] == by["stream", "fp8"] == by["stream", "fp4"] < by["resident", "fp4"] / 2
    assert {p["name"] for p in data["peers"]} == {"diffusers"}  # ComfyUI only with --comfyui


def test_stream_velocity_is_the_resident_one(tiny_run):
    """Tolerance 0: the streamed blocks compute on exact copies of the same weights with the same kernels (on the
    CPU the stand-in's copies are CPU tensors), so any difference is a bug in the runner, not rounding."""
    _, _, data = tiny_run
    dv = {r["path"]: r["dv"] for r in data["rows"] if r["mode"] == "stream"}
    assert dv == {"fp32": 0.0, "fp8": 0.0, "fp4": 0.0}
    assert all(r["dv"] is None for r in data["rows"] if r["mode"] == "resident")  # the reference itself


def tiny_setup(**kw) -> Setup:
    make_config, _, _ = SIZES["tiny"]
    return Setup(make_config(), torch.device("cpu"), 64, 1, 0, 1, **kw)


def test_stream_rows_run_every_block_through_the_streaming_runner(monkeypatch):
    from kontext import offload

    fetched = []
    real = offload.StreamingBlocks._fetch
    monkeypatch.setattr(offload.StreamingBlocks, "_fetch", lambda self, n: (fetched.append(n), real(self, n)))
    s = tiny_setup()
    x = make_inputs(s)
    resident, v_resident = modes.run_row(s, x, "resident", "fp8")
    assert not fetched
    stream, v_stream = modes.run_row(s, x, "stream", "fp8")
    n = s.config.depth + s.config.depth_single_blocks
    # Three forwards (the first call, one timed, the one-step edit), each fetching every block once, in order.
    assert fetched == list(range(n)) * 3
    assert torch.equal(v_stream, v_resident)  # tolerance 0, as above
    assert stream.error is None and stream.weight_bytes < resident.weight_bytes


def test_an_oom_row_is_reported_and_the_run_goes_on(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # not under test here: spare its model's build
    real = modes.time_row

    def short_of_memory(s, x, mode, path):
        if (mode, path) == ("stream", "fp8"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(s, x, mode, path)

    monkeypatch.setattr(modes, "time_row", short_of_memory)
    rc, out, err = run([*TINY, "--paths", "fp8,fp4", "--modes", "stream"])
    assert rc == 0, out + err
    rows = rows_of(out)
    assert rows["stream", "fp8"][2:] == ["OOM", "(host", "memory)"]  # no limit, no GPU: the host's memory
    assert float(rows["stream", "fp4"][2]) > 0  # the next row ran


def test_oom_text_names_the_cap():
    capped, plain = tiny_setup(memory_limit_gb=8), tiny_setup()
    wrapped = RuntimeError("backend compiler failed")
    wrapped.__cause__ = torch.OutOfMemoryError("out of memory")
    assert modes.failure(torch.OutOfMemoryError("x"), capped) == "OOM at 8 GB"
    assert modes.failure(wrapped, tiny_setup(memory_limit_gb=16)) == "OOM at 16 GB"
    assert modes.failure(ValueError("bad shape"), capped) == "ValueError: bad shape"
    assert modes.failure(torch.OutOfMemoryError("x"), plain) == "OOM (host memory)"


def test_json_is_rewritten_after_each_row(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    monkeypatch.setattr(modes, "time_row", lambda s, x, mode, path: (Row(mode, path, ms_step=1.0), torch.ones(3)))
    seen = []
    bench(tiny_setup(), ["fp8", "fp4"], modes=["stream", "resident"],
          progress=lambda result: seen.append([(r["mode"], r["path"], r["dv"]) for r in result["rows"]]))
    assert [len(rows) for rows in seen] == [1, 2, 3, 4]
    # Resident first whatever the order asked: the stream rows' velocity is checked against it.
    assert seen[-1] == [("resident", "fp8", None), ("resident", "fp4", None), ("stream", "fp8", 0.0),
                        ("stream", "fp4", 0.0)]


def test_a_compile_that_falls_back_to_eager_is_not_reported_as_compiled(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)

    def unavailable(fn, **kwargs):
        raise RuntimeError("torch.compile is not supported on this Python")

    monkeypatch.setattr(torch, "compile", unavailable)
    rc, out, err = run([*TINY, "--paths", "fp8", "--modes", "compiled"])
    assert rc == 0, out + err
    line = " ".join(rows_of(out)["compiled", "fp8"])
    assert "FAILED: torch.compile failed and the blocks ran eagerly" in line


@pytest.mark.slow
def test_compiled_mode_compiles_once_and_gives_the_resident_velocity(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    torch._dynamo.reset()  # compile here, not reuse another test's graphs: the warm-up is this row's compile
    json_path = str(tmp_path / "b.json")
    # Three timed calls: on two shared cores a single call can take 40 times its usual few milliseconds.
    argv = [*TINY, "--paths", "bf16", "--modes", "resident,compiled", "--repeat", "3", "--json", json_path]
    rc, out, err = run(argv)  # bf16 is fp32 on the CPU
    assert rc == 0, out + err
    resident, compiled = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert resident["mode"] == "resident" and resident["error"] is None
    assert compiled["mode"] == "compiled" and compiled["error"] is None
    # The first call compiles both block classes (seconds, a cached compile too), a steady step takes milliseconds
    # (margins wide for a loaded machine).
    assert compiled["warmup_s"] > 0.5 and compiled["warmup_s"] > 2 * compiled["ms_step"] / 1000
    # The edit that follows has the step's shapes: it reuses the compile instead of paying it again.
    assert compiled["s_edit"] < compiled["warmup_s"]
    # fp32 on the CPU: inductor reorders and fuses, which changes rounding only (3e-7 measured).
    assert compiled["dv"] <= 1e-5


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
    (["--modes", "resident,disk"], "--modes 'resident,disk': unknown disk"),
    (["--memory-limit-gb", "8"], "--memory-limit-gb 8 emulates a smaller GPU"),  # refused on the CPU
    (["--memory-limit-gb", "0"], "--memory-limit-gb 0: must be a positive number"),
    (["--memory-limit-gb", "nan"], "--memory-limit-gb nan: must be a positive number"),
    (["--cuda-graphs"], "--cuda-graphs: CUDA graphs need a CUDA device"),
])
def test_bad_input_exits_2(args, message, monkeypatch):
    import kontext.bench.core

    def no_models(*_a, **_k):
        raise AssertionError("a mistake must be reported before any model is built")

    monkeypatch.setattr(kontext.bench.core, "build", no_models)
    rc, out, err = run([*TINY, *args])
    assert rc == 2, out + err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
