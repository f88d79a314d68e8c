"""The command line: `python -m kontext edit|make-tiny|download` and its answers to bad input.

A few runs go through a real subprocess (exit codes, stdout/stderr, no traceback, SIGTERM); the rest call
kontext.cli.main in-process, which is the same code minus ~3 s of interpreter and torch start-up each. Mistakes must
be reported before any model is made or loaded: the `no_model_loading` fixture fails a test that gets that far, and
`fake_engine` stands in for the models where only the command line's own work is under test. Nothing touches the
network: `download` is tested with kontext.hub.download replaced.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import kontext
import kontext.hub
import kontext.tiny
from kontext.cli import build_parser, main
from kontext.cli.edit import output_format
from kontext.errors import Cancelled, InputError, KontextError
from kontext.params import MAX_SEED, SamplingParams
from kontext.references import load_image
from kontext.text.tokenizers import PACKAGED

REPO = Path(__file__).resolve().parents[1]
TINY_LAYOUT = {  # DESIGN.md's make-tiny layout, relative to the models folder
    "dit": "diffusion_models/kontext-tiny.safetensors",
    "dit_fp8": "diffusion_models/kontext-tiny-fp8_scaled.safetensors",
    "dit_diffusers": "diffusion_models/kontext-tiny-diffusers",
    "vae": "vae/ae-tiny.safetensors",
    "clip_l": "text_encoders/clip_l-tiny.safetensors",
    "t5xxl": "text_encoders/t5xxl-tiny.safetensors",
    "tokenizers": "tokenizers",
}


def run_cli(*args: object, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "kontext", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def write_picture(path: Path, w: int = 64, h: int = 64) -> Path:
    y, x = np.mgrid[0:h, 0:w]
    Image.fromarray(np.stack([x * 4 % 256, y * 4 % 256, (x + y) % 256], -1).astype(np.uint8)).save(path)
    return path


@pytest.fixture
def picture(tmp_path) -> Path:
    return write_picture(tmp_path / "in.png")


@pytest.fixture(scope="module")
def models_dir(tiny_models) -> Path:
    return tiny_models["dit"].parents[1]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Makes any attempt to build or load models fail the test: for errors that must come before that work."""
    def refuse(*_a, **_k):
        raise AssertionError("models were loaded before the bad input was reported")

    monkeypatch.setattr(kontext.tiny, "make_tiny", refuse)
    monkeypatch.setattr("kontext.pipeline.KontextPipeline.from_files", refuse)
    monkeypatch.setattr("kontext.pipeline.KontextPipeline.from_models_dir", refuse)


class FakePipe:
    def __init__(self, calls: list):
        self.calls = calls

    def edit(self, prompt, references, **kwargs):
        self.calls.append(("edit", (prompt, references), kwargs))
        return [Image.new("RGB", (64, 48), (200, 30, 30))]


@pytest.fixture
def fake_engine(monkeypatch) -> list[tuple[str, tuple, dict]]:
    """Stands in for make-tiny and the loaders; returns the calls, in order, as (name, args, kwargs)."""
    calls: list[tuple[str, tuple, dict]] = []

    def recorder(name: str, result):
        def record(*args, **kwargs):
            calls.append((name, args, kwargs))
            return result
        return record

    monkeypatch.setattr(kontext.tiny, "make_tiny", recorder("make_tiny", {}))
    monkeypatch.setattr("kontext.pipeline.KontextPipeline.from_files", recorder("from_files", FakePipe(calls)))
    monkeypatch.setattr("kontext.pipeline.KontextPipeline.from_models_dir",
                        recorder("from_models_dir", FakePipe(calls)))
    return calls


def called(calls: list, name: str) -> tuple[tuple, dict]:
    hits = [(a, k) for n, a, k in calls if n == name]
    assert len(hits) == 1, calls
    return hits[0]


def warnings_logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def edit_args(image: Path, out: Path, *extra: object) -> list[str]:
    return ["edit", "--image", str(image), "--prompt", "make it blue", "--out", str(out), "--steps", "1",
            "--no-resize", "--device", "cpu", *map(str, extra)]


# ---------------------------------------------------------------------------------------------- subprocess runs

def test_edit_tiny_end_to_end(tmp_path, picture):
    out = tmp_path / "out.png"
    r = run_cli("edit", "--tiny", "--image", picture, "--prompt", "make the sky red", "--out", out, "--steps", 2,
                "--width", 64, "--height", 64, "--no-resize", "-v", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (64, 64) and img.mode == "RGB"
    assert f"wrote {out} (64x64)" in r.stdout
    assert "models loaded in" in r.stderr and "2/2" in r.stderr  # -v logging and the progress bar
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "out.png"]  # no partial or probe file left


def test_make_tiny_lists_its_files(tmp_path):
    r = run_cli("make-tiny", tmp_path / "models", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    listed = dict(line.split(None, 1) for line in r.stdout.strip().splitlines())
    assert set(listed) == set(TINY_LAYOUT)
    for role, rel in TINY_LAYOUT.items():
        path = Path(listed[role].strip())
        assert path == tmp_path / "models" / rel and path.exists(), role


def test_missing_image_exits_2_without_traceback(tmp_path):
    missing = tmp_path / "no such.png"
    r = run_cli("edit", "--tiny", "--image", missing, "--prompt", "x", "--out", tmp_path / "o.png", cwd=tmp_path)
    assert r.returncode == 2
    assert str(missing) in r.stderr and r.stderr.startswith("error:")
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o.png").exists()


def test_zero_steps_exits_2_before_loading(tmp_path, picture):
    r = run_cli("edit", "--tiny", "--image", picture, "--prompt", "x", "--out", tmp_path / "o.png", "--steps", 0, "-v",
                cwd=tmp_path)
    assert r.returncode == 2
    assert "--steps must be between 1 and 1000, got 0" in r.stderr and "Traceback" not in r.stderr
    assert "wrote tiny models" not in r.stderr  # refused before any model work


def test_warnings_are_visible_without_verbose(tmp_path):
    # Two ignored options, then an output type PIL lists but cannot write: two warnings, one error, no traceback.
    r = run_cli("edit", "--tiny", "--tokenizers", tmp_path, "--negative-prompt", "blurry", "--prompt", "x",
                "--out", tmp_path / "o.h5", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert any(line.startswith("WARNING --tokenizers is ignored with --tiny") for line in lines), r.stderr
    assert any(line.startswith("WARNING --negative-prompt is ignored without --true-cfg") for line in lines)
    assert lines[-1].startswith(f"error: --out {tmp_path / 'o.h5'}: cannot write .h5 images")
    assert "Traceback" not in r.stderr


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
@pytest.mark.parametrize("when", ["making the models", "denoising"])
def test_sigterm_removes_the_temporary_models(tmp_path, when):
    """SIGTERM (docker stop, systemd, kill) during `edit --tiny` ends the run with 143 and no folder left behind."""
    tmpdir = tmp_path / "tmp"  # TMPDIR: where tempfile, hence the --tiny run, puts its models
    tmpdir.mkdir()
    err_file = tmp_path / "stderr.txt"
    args = ["edit", "--tiny", "--prompt", "x", "--out", tmp_path / "o.png", "--steps", 1000, "--width", 256,
            "--height", 256]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmpdir)}
    with open(err_file, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "kontext", *map(str, args)], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 240
        while not (any(tmpdir.glob("kontext-tiny-*")) if when == "making the models"
                   else "denoising" in err_file.read_text()):
            assert proc.poll() is None, f"the run ended early: {err_file.read_text()}"
            assert time.monotonic() < deadline, "the run did not get going"
            time.sleep(0.02)
        assert len(list(tmpdir.glob("kontext-tiny-*"))) == 1  # (torch may keep caches of its own there)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = err_file.read_text()
    assert rc == 143, stderr
    assert list(tmpdir.glob("kontext-tiny-*")) == []
    assert "terminated" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stderr.txt", "tmp"]  # no output, no partial file


def test_the_parser_does_not_import_torch():
    # --help, --version, queue and download should not pay torch's seconds of import time.
    code = "import sys; from kontext.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


# ---------------------------------------------------------------------------------------------- --help, --version

def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"kontext {kontext.__version__}\n"


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["edit", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    for expected in ("noise seed (default: 0)", "sampling steps (default: 28)", "embedded guidance (default: 2.5)",
                     "(default: 1.0, off)", "noised to this level (default: 1.0)",
                     "bf16, fp16, fp32, fp8, fp4, auto (default: auto,", "offset, index (default: offset)",
                     "cuda if available, else cpu", "else the copies in the package"):
        assert expected in text, expected


def test_the_defaults_are_the_engines():
    args = build_parser().parse_args(["edit", "--prompt", "x", "--out", "o.png"])
    defaults = SamplingParams()
    for field in ("steps", "guidance", "true_cfg", "denoise", "seed", "reference_method", "width", "height"):
        assert getattr(args, field) == getattr(defaults, field), field


def test_unknown_precision_lists_the_engines_names(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["edit", "--tiny", "--prompt", "x", "--out", "o.png", "--precision", "int8"])
    assert exc.value.code == 2
    assert "invalid choice: 'int8' (choose from 'bf16', 'fp16', 'fp32', 'fp8', 'fp4', 'auto')" in \
        capsys.readouterr().err


@pytest.mark.parametrize("argv", [["edit", "--out", "o.png", "--tiny"],  # no --prompt
                                  ["edit", "--prompt", "x", "--out", "o.png", "--steps", "two"],
                                  ["edit", "--prompt", "x", "--out", "o.png", "--reference-method", "side"],
                                  ["download"],  # no --to
                                  ["frobnicate"]])
def test_argument_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- numbers

@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "--steps must be between 1 and 1000, got 0"),
    (["--steps", "-1"], "--steps must be between 1 and 1000, got -1"),
    (["--guidance", "nan"], "--guidance must be between 0 and 100, got nan"),
    (["--guidance", "inf"], "--guidance must be between 0 and 100, got inf"),
    (["--seed", "-1"], f"--seed must be between 0 and {MAX_SEED}, got -1"),
    (["--denoise", "1.5"], "--denoise must be above 0 and at most 1, got 1.5"),
    (["--denoise", "0"], "--denoise must be above 0 and at most 1, got 0.0"),
    (["--true-cfg", "nan"], "--true-cfg must be between 0 and 100, got nan"),
    (["--width", "8192"], "--width 8192 is outside the supported 64..4096"),
    (["--height", "32"], "--height 32 is outside the supported 64..4096"),
    (["--width", "63"], "--width 63 (floored to a multiple of 16: 48) is outside the supported 64..4096"),
])
def test_bad_numbers_before_loading(tmp_path, picture, capsys, no_model_loading, extra, message):
    assert main(edit_args(picture, tmp_path / "o.png", "--tiny", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error:")
    assert list(tmp_path.iterdir()) == [picture]


def test_denoise_below_1_needs_an_image(tmp_path, capsys, no_model_loading):
    assert main(["edit", "--tiny", "--prompt", "x", "--out", str(tmp_path / "o.png"), "--denoise", "0.5"]) == 2
    assert "--denoise 0.5 starts from the first --image" in capsys.readouterr().err


def test_size_that_floors_into_range_passes_the_early_check(tmp_path, picture, no_model_loading):
    # 4111 floors to 4096: allowed, so the run gets as far as making the models (refused here by the fixture).
    with pytest.raises(AssertionError, match="models were loaded"):
        main(edit_args(picture, tmp_path / "o.png", "--tiny", "--width", 4111, "--height", 64))


def test_sizes_not_multiples_of_16_are_floored(tmp_path, picture, models_dir):
    out = tmp_path / "o.png"
    assert main(edit_args(picture, out, "--models", models_dir, "--width", 100, "--height", 70)) == 0
    assert Image.open(out).size == (96, 64)


def test_unknown_device_before_loading(tmp_path, picture, capsys, no_model_loading):
    args = edit_args(picture, tmp_path / "o.png", "--tiny")
    args[args.index("--device") + 1] = "tpu"
    assert main(args) == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- options together

@pytest.mark.parametrize("extra, named", [
    (["--tiny", "--models", "M"], ["--tiny", "--models"]),
    (["--tiny", "--dit", "D"], ["--tiny", "--dit"]),
    (["--tiny", "--vae", "V", "--t5xxl", "T"], ["--tiny", "--vae", "--t5xxl"]),
    (["--models", "M", "--clip-l", "C"], ["--models", "--clip-l"]),
    (["--models", "M", "--dit", "D", "--vae", "V", "--clip-l", "C", "--t5xxl", "T"],
     ["--models", "--dit", "--vae", "--clip-l", "--t5xxl"]),
])
def test_conflicting_model_sources(tmp_path, picture, capsys, no_model_loading, extra, named):
    assert main(["edit", "--image", str(picture), "--prompt", "x", "--out", str(tmp_path / "o.png"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and all(flag in err for flag in named), err


def test_negative_prompt_without_true_cfg_warns(tmp_path, picture, caplog, fake_engine):
    assert main(edit_args(picture, tmp_path / "o.png", "--tiny", "--negative-prompt", "blurry")) == 0
    assert warnings_logged(caplog) == ["--negative-prompt is ignored without --true-cfg above 1 (e.g. --true-cfg 1.5)"]


def test_true_cfg_without_negative_prompt_warns_once(tmp_path, picture, caplog, fake_engine):
    assert main(edit_args(picture, tmp_path / "o.png", "--tiny", "--true-cfg", "3")) == 0
    [message] = warnings_logged(caplog)
    assert message.startswith("--true-cfg 3 is ignored without --negative-prompt")
    _, kwargs = called(fake_engine, "edit")
    assert kwargs["true_cfg"] == 1.0  # off, so that the engine does not warn a second time


def test_true_cfg_with_negative_prompt_is_quiet(tmp_path, picture, caplog, fake_engine):
    assert main(edit_args(picture, tmp_path / "o.png", "--tiny", "--true-cfg", "3", "--negative-prompt", "")) == 0
    assert warnings_logged(caplog) == []
    _, kwargs = called(fake_engine, "edit")
    assert (kwargs["true_cfg"], kwargs["negative_prompt"]) == (3.0, "")


def test_every_option_reaches_the_engine(tmp_path, picture, fake_engine, capsys):
    out = tmp_path / "o.webp"
    assert main(["edit", "--tiny", "--image", str(picture), "--image", str(picture), "--prompt", "p", "--out",
                 str(out), "--seed", "7", "--steps", "3", "--guidance", "4", "--width", "128", "--height", "96",
                 "--reference-method", "index", "--denoise", "0.5", "--precision", "fp32", "--device", "cpu"]) == 0
    (prompt, refs), kwargs = called(fake_engine, "edit")
    assert prompt == "p" and len(refs) == 2 and all(isinstance(r, Image.Image) for r in refs)
    assert kwargs == dict(seed=7, steps=3, guidance=4.0, width=128, height=96, resize_references=True,
                          reference_method="index", negative_prompt=None, true_cfg=1.0, denoise=0.5,
                          callback=kwargs["callback"])
    _, load_kwargs = called(fake_engine, "from_models_dir")
    assert load_kwargs == dict(device="cpu", precision="fp32", loras=[], dit_offload="none", compile=False)
    assert main(["edit", "--tiny", "--prompt", "p", "--out", str(tmp_path / "s.png"), "--dit-offload", "stream",
                 "--compile"]) == 0
    last = [k for n, _, k in fake_engine if n == "from_models_dir"][-1]
    assert last["dit_offload"] == "stream" and last["compile"] is True
    with Image.open(out) as img:
        assert img.format == "WEBP" and img.size == (64, 48)
    assert f"wrote {out} (64x48)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- --tokenizers

def test_tokenizers_with_models(tmp_path, picture, models_dir, fake_engine):
    assert main(edit_args(picture, tmp_path / "o.png", "--models", models_dir, "--tokenizers", PACKAGED)) == 0
    args, kwargs = called(fake_engine, "from_models_dir")
    assert args == (models_dir,) and kwargs["tokenizers"] == PACKAGED


def test_tokenizers_with_the_four_files(tmp_path, picture, models_dir, fake_engine):
    roles = ("dit", "vae", "clip_l", "t5xxl")
    files = [f"--{role.replace('_', '-')}={models_dir / TINY_LAYOUT[role]}" for role in roles]
    assert main(edit_args(picture, tmp_path / "o.png", *files, "--tokenizers", PACKAGED)) == 0
    args, kwargs = called(fake_engine, "from_files")
    assert args == tuple(models_dir / TINY_LAYOUT[r] for r in roles)
    assert kwargs["tokenizers"] == PACKAGED


def test_tokenizers_with_tiny_are_ignored_with_a_warning(tmp_path, picture, caplog, fake_engine):
    assert main(edit_args(picture, tmp_path / "o.png", "--tiny", "--tokenizers", PACKAGED)) == 0
    assert any(m.startswith("--tokenizers is ignored with --tiny") for m in warnings_logged(caplog))
    _, kwargs = called(fake_engine, "from_models_dir")
    assert kwargs.get("tokenizers") is None  # the tiny models' own


def test_a_wrong_tokenizer_folder_is_named_before_loading(tmp_path, picture, models_dir, capsys, no_model_loading):
    empty = tmp_path / "tok"
    empty.mkdir()
    assert main(edit_args(picture, tmp_path / "o.png", "--models", models_dir, "--tokenizers", empty)) == 2
    assert f"{empty}: holds no tokenizer folders" in capsys.readouterr().err


def test_tokenizers_really_load_from_the_folder_given(tmp_path, picture, models_dir):
    # A real run whose models folder has no tokenizers: only --tokenizers supplies the tiny ones its encoders need.
    bare = tmp_path / "models"
    shutil.copytree(models_dir, bare, ignore=shutil.ignore_patterns("tokenizers", "*diffusers*", "*fp8*"))
    out = tmp_path / "o.png"
    assert main(edit_args(picture, out, "--models", bare, "--tokenizers", models_dir / "tokenizers")) == 0
    assert Image.open(out).size == (64, 64)


# ---------------------------------------------------------------------------------------------- ~ in paths

def test_tilde_is_expanded_in_every_path(tmp_path, monkeypatch, models_dir, fake_engine):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    write_picture(home / "x.png")
    (home / "models").symlink_to(models_dir)
    assert main(["edit", "--image", "~/x.png", "--models", "~/models", "--prompt", "p", "--out", "~/o.png"]) == 0
    (_, refs), _ = called(fake_engine, "edit")
    assert refs[0].size == (64, 64)
    assert called(fake_engine, "from_models_dir")[0] == (home / "models",)
    assert (home / "o.png").is_file()


def test_tilde_in_image_reaches_a_real_run(tmp_path, monkeypatch, models_dir):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_picture(tmp_path / "x.png")
    assert main(edit_args(Path("~/x.png"), tmp_path / "o.png", "--models", models_dir)) == 0


# ---------------------------------------------------------------------------------------------- --out

def test_existing_out_is_kept_without_overwrite(tmp_path, picture, capsys, no_model_loading):
    out = tmp_path / "out.png"
    out.write_bytes(b"precious")
    assert main(edit_args(picture, out, "--tiny")) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err
    assert out.read_bytes() == b"precious"


def test_models_dir_and_overwrite(tmp_path, picture, models_dir, capsys):
    out = tmp_path / "out.png"
    out.write_bytes(b"old")
    assert main(edit_args(picture, out, "--models", models_dir, "--overwrite")) == 0
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (64, 64)
    captured = capsys.readouterr()
    assert f"wrote {out}" in captured.out
    assert "denoising" in captured.err and "1/1" in captured.err  # the progress bar follows sys.stderr


def test_out_is_a_folder(tmp_path, picture, capsys, no_model_loading):
    assert main(edit_args(picture, tmp_path, "--tiny", "--overwrite")) == 2
    assert "is a folder" in capsys.readouterr().err


def test_out_folder_missing(tmp_path, picture, capsys, no_model_loading):
    out = tmp_path / "missing" / "out.png"
    assert main(edit_args(picture, out, "--tiny")) == 2
    assert f"the folder {out.parent} does not exist" in capsys.readouterr().err


def refuse_writes_in(monkeypatch, folder: Path) -> None:
    """What the OS answers in a read-only folder. Tests run as root, whom chmod does not stop, so the refusal is
    simulated where the write probe (and only it) creates its file."""
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == folder.resolve():
            raise PermissionError(13, "Permission denied", str(folder))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_out_folder_not_writable(tmp_path, picture, capsys, monkeypatch, no_model_loading):
    refuse_writes_in(monkeypatch, tmp_path)
    assert main(edit_args(picture, tmp_path / "o.png", "--tiny")) == 2
    assert f"--out {tmp_path / 'o.png'}: cannot write in {tmp_path} (Permission denied)" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["o.h5", "o.xbm"])
def test_out_types_pil_lists_but_cannot_write(tmp_path, picture, capsys, no_model_loading, name):
    assert main(edit_args(picture, tmp_path / name, "--tiny")) == 2
    err = capsys.readouterr().err
    assert f"cannot write {Path(name).suffix} images" in err and "use .png, .jpg or .webp" in err


def test_out_suffix_chooses_the_format_and_unknown_suffixes_are_refused(tmp_path):
    assert output_format(tmp_path / "a.jpg") == "JPEG" and output_format(tmp_path / "a.PNG") == "PNG"
    assert output_format(tmp_path / "a.webp") == "WEBP" and output_format(tmp_path / "a.tif") == "TIFF"
    for bad in ("a.txt", "noext"):
        with pytest.raises(InputError, match="unknown image type"):
            output_format(tmp_path / bad)


def test_permission_error_when_saving_is_a_message(tmp_path, picture, capsys, monkeypatch, fake_engine):
    real = Image.Image.save

    def refuse(self, fp, *args, **kwargs):  # files only: the up-front check encodes into memory
        if isinstance(fp, (str, os.PathLike)):
            raise PermissionError(13, "Permission denied", str(fp))
        return real(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", refuse)
    out = tmp_path / "o.png"
    assert main(edit_args(picture, out, "--tiny")) == 2
    assert f"error: cannot write --out {out}: Permission denied" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [picture]  # nothing half-written


# ---------------------------------------------------------------------------------------------- inputs

def test_image_is_a_folder(tmp_path, capsys, no_model_loading):
    folder = tmp_path / "photo.png"
    folder.mkdir()
    assert main(edit_args(folder, tmp_path / "o.png", "--tiny")) == 2
    assert f"{folder} is not a file" in capsys.readouterr().err


def test_image_that_is_not_a_picture(tmp_path, models_dir, capsys, no_model_loading):
    fake = tmp_path / "cat.png"
    fake.write_text("not a picture")
    assert main(edit_args(fake, tmp_path / "o.png", "--models", models_dir)) == 2
    err = capsys.readouterr().err
    assert str(fake) in err and "not an image" in err
    assert not (tmp_path / "o.png").exists()


def test_a_huge_image_gets_one_line_of_ours(tmp_path, monkeypatch, caplog, fake_engine):
    # PIL's limit is lowered so that an 80x80 picture stands in for a 10000x10000 photo (100 > 89.5 megapixels).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)
    big = write_picture(tmp_path / "big.png", 80, 80)
    with warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        assert main(edit_args(big, tmp_path / "o.png", "--tiny")) == 0
    assert not [w for w in raised if issubclass(w.category, Image.DecompressionBombWarning)]
    [message] = warnings_logged(caplog)
    assert message.startswith(f"{big} is 80x80") and "limit" in message and "\n" not in message


def test_an_image_above_twice_the_limit_is_refused(tmp_path, monkeypatch, capsys, no_model_loading):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)
    bomb = write_picture(tmp_path / "bomb.png", 100, 100)
    assert main(edit_args(bomb, tmp_path / "o.png", "--tiny")) == 2
    assert f"{bomb}: refused as a possible decompression bomb" in capsys.readouterr().err


def test_pil_limit_switched_off_means_no_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert load_image(write_picture(tmp_path / "p.png")).size == (64, 64)
    assert warnings_logged(caplog) == []


# ---------------------------------------------------------------------------------------------- --models

def test_no_models_given(tmp_path, picture, capsys, no_model_loading):
    assert main(["edit", "--image", str(picture), "--prompt", "x", "--out", str(tmp_path / "o.png"),
                 "--dit", str(tmp_path / "dit.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "--models" in err and "--tiny" in err and "missing: --vae, --clip-l, --t5xxl" in err


def test_a_missing_model_file_is_named_before_loading(tmp_path, picture, models_dir, capsys, no_model_loading):
    files = [f"--{role.replace('_', '-')}={models_dir / TINY_LAYOUT[role]}" for role in ("dit", "vae", "clip_l")]
    assert main(edit_args(picture, tmp_path / "o.png", *files, "--t5xxl", tmp_path / "t5.safetensors")) == 2
    assert f"--t5xxl {tmp_path / 't5.safetensors'}: no such file or folder" in capsys.readouterr().err


def test_models_dir_does_not_exist(tmp_path, picture, capsys, no_model_loading):
    assert main(edit_args(picture, tmp_path / "o.png", "--models", tmp_path / "nope")) == 2
    assert f"models folder {tmp_path / 'nope'} does not exist" in capsys.readouterr().err


def link_models(src: Path, dst: Path, leave_out: str | None = None, rename: dict[str, str] | None = None) -> Path:
    """A models folder of symlinks to make-tiny's files, optionally without one role or with other folder names."""
    for role in ("dit", "vae", "clip_l", "t5xxl", "tokenizers"):
        if role == leave_out:
            continue
        rel = TINY_LAYOUT[role]
        for old, new in (rename or {}).items():
            rel = rel.replace(old + "/", new + "/", 1) if rel.startswith(old + "/") else rel
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).symlink_to(src / TINY_LAYOUT[role])
    return dst


@pytest.mark.parametrize("role, expected", [("dit", "diffusion_models/flux1-kontext-dev.safetensors"),
                                            ("vae", "vae/ae.safetensors"),
                                            ("clip_l", "text_encoders/clip_l.safetensors"),
                                            ("t5xxl", "text_encoders/t5xxl_fp16.safetensors")])
def test_incomplete_models_dir(tmp_path, picture, models_dir, capsys, no_model_loading, role, expected):
    partial = link_models(models_dir, tmp_path / "models", leave_out=role)
    assert main(edit_args(picture, tmp_path / "o.png", "--models", partial)) == 2
    err = capsys.readouterr().err
    assert f"no {role} model in {partial}" in err and expected in err


def test_models_dir_with_older_comfyui_folder_names(tmp_path, picture, models_dir):
    # ComfyUI's older names: unet/ for diffusion models, clip/ for text encoders.
    legacy = link_models(models_dir, tmp_path / "models",
                         rename={"diffusion_models": "unet", "text_encoders": "clip"})
    assert (legacy / "unet" / "kontext-tiny.safetensors").exists() and not (legacy / "diffusion_models").exists()
    assert main(edit_args(picture, tmp_path / "o.png", "--models", legacy)) == 0
    assert Image.open(tmp_path / "o.png").size == (64, 64)


def test_models_folder_without_tokenizers_uses_the_packaged_ones(tmp_path):
    """A ComfyUI models/ folder has no tokenizer files: the copies shipped inside the package are used."""
    from kontext.files import find_model_files
    from kontext.text.tokenizers import find_tokenizer_dirs

    models = tmp_path / "models"
    kontext.tiny.make_tiny(models)
    shutil.rmtree(models / "tokenizers")
    assert "tokenizers" not in find_model_files(models)
    assert find_tokenizer_dirs(None) == (PACKAGED / "clip_l", PACKAGED / "t5xxl")


# ---------------------------------------------------------------------------------------------- make-tiny

def test_make_tiny_into_an_existing_file(tmp_path, capsys, no_model_loading):
    target = tmp_path / "models"
    target.write_text("a file")
    assert main(["make-tiny", str(target)]) == 2
    assert f"make-tiny: {target} exists and is not a folder" in capsys.readouterr().err


def test_make_tiny_below_a_file(tmp_path, capsys, no_model_loading):
    (tmp_path / "f").write_text("a file")
    assert main(["make-tiny", str(tmp_path / "f" / "models")]) == 2
    assert f"cannot create it, {tmp_path / 'f'} is not a folder" in capsys.readouterr().err


def test_make_tiny_into_an_unwritable_folder(tmp_path, capsys, monkeypatch, no_model_loading):
    refuse_writes_in(monkeypatch, tmp_path)
    assert main(["make-tiny", str(tmp_path / "models")]) == 2
    assert f"cannot write in {tmp_path} (Permission denied)" in capsys.readouterr().err


def test_make_tiny_write_failure_is_a_message(tmp_path, capsys, monkeypatch):
    def full(out_dir, seed=0):
        raise OSError(28, "No space left on device", str(Path(out_dir) / "vae" / "ae-tiny.safetensors"))

    monkeypatch.setattr(kontext.tiny, "make_tiny", full)
    assert main(["make-tiny", str(tmp_path / "models")]) == 2
    assert "make-tiny: cannot write to" in capsys.readouterr().err


def test_make_tiny_bad_seed(tmp_path, capsys, no_model_loading):
    assert main(["make-tiny", str(tmp_path / "m"), "--seed", "-3"]) == 2
    assert "--seed must be between 0 and" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- download

def test_download_arguments():
    args = build_parser().parse_args(["download", "--to", "models", "--fp8", "--token", "hf_x"])
    assert (args.to, args.fp8, args.token) == (Path("models"), True, "hf_x")
    args = build_parser().parse_args(["download", "--to", "m"])
    assert (args.fp8, args.token) == (False, None)


def test_download_calls_the_hub_and_lists_files(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_download(to, fp8=False, token=None, progress=True):
        calls.append((Path(to), fp8, token))
        return {"dit": Path(to) / "diffusion_models" / "x.safetensors", "vae": Path(to) / "vae" / "ae.safetensors"}

    monkeypatch.setattr(kontext.hub, "download", fake_download)
    assert main(["download", "--to", str(tmp_path), "--fp8", "--token", "hf_x"]) == 0
    assert calls == [(tmp_path, True, "hf_x")]
    out = capsys.readouterr().out
    assert "dit " in out and str(tmp_path / "vae" / "ae.safetensors") in out


@pytest.mark.parametrize("error", [
    InputError("black-forest-labs/FLUX.1-Kontext-dev is gated: accept the license and pass --token"),
    KontextError("cannot download ae.safetensors: the Hugging Face Hub is unreachable"),
    PermissionError(13, "Permission denied", "/models/vae/ae.safetensors"),
    OSError(28, "No space left on device"),
])
def test_download_errors_exit_2(tmp_path, monkeypatch, capsys, error):
    def refused(*_a, **_k):
        raise error

    monkeypatch.setattr(kontext.hub, "download", refused)
    assert main(["download", "--to", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and (getattr(error, "strerror", None) or str(error)) in err


def test_download_target_checked_before_any_request(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(kontext.hub, "download", lambda *a, **k: pytest.fail("the hub was asked"))
    (tmp_path / "models").write_text("a file")
    assert main(["download", "--to", str(tmp_path / "models")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    refuse_writes_in(monkeypatch, tmp_path)
    assert main(["download", "--to", str(tmp_path / "new")]) == 2
    assert "cannot write in" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- exit statuses

def test_out_of_memory_is_a_message_not_a_traceback(monkeypatch, capsys, tmp_path):
    import torch

    from kontext.pipeline import KontextPipeline

    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(KontextPipeline, "from_models_dir", boom)
    assert main(["edit", "--tiny", "--prompt", "x", "--out", str(tmp_path / "o.png")]) == 3
    assert "out of GPU memory" in capsys.readouterr().err and not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("raised, status", [(KeyboardInterrupt(), 130), (Cancelled("stop"), 130),
                                            (MemoryError(), 3)])
def test_exit_statuses(tmp_path, monkeypatch, raised, status):
    def fail(*_a, **_k):
        raise raised

    monkeypatch.setattr(kontext.hub, "download", fail)
    assert main(["download", "--to", str(tmp_path)]) == status


def test_a_bug_is_not_reported_as_a_mistake(tmp_path, monkeypatch):
    # Python prints the traceback and exits 1: a bug must not pass for the user's error (2).
    monkeypatch.setattr(kontext.hub, "download", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["download", "--to", str(tmp_path)])


def test_sigterm_handler_is_only_installed_for_the_run(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(kontext.hub, "download", lambda *a, **k: seen.append(signal.getsignal(signal.SIGTERM)) or {})
    before = signal.getsignal(signal.SIGTERM)
    assert main(["download", "--to", str(tmp_path)]) == 0
    assert seen[0] is not before and signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------------------------------------- the README's check

def test_the_readme_check_command_uses_the_shipped_example(tmp_path):
    """The set-up check must run from a fresh clone as written: its image is in the repository, and is exactly
    what docs/make_example.py draws."""
    readme = (REPO / "README.md").read_text()
    command = re.search(r"^python -m kontext edit --tiny .*$", readme, re.MULTILINE).group(0)
    image = re.search(r"--image (\S+)", command).group(1)
    assert image == "docs/example.png" and (REPO / image).is_file()
    spec = importlib.util.spec_from_file_location("make_example", REPO / "docs" / "make_example.py")
    make_example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_example)
    with Image.open(REPO / image) as shipped:
        assert np.array_equal(np.asarray(shipped.convert("RGB")), np.asarray(make_example.scene()))
    assert (REPO / image).stat().st_size < 50_000
    args = build_parser().parse_args(shlex.split(command)[3:])  # the command parses as written
    assert args.tiny and args.image == [Path(image)]
