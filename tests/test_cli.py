"""The command line (issue 4): `python -m kontext edit|make-tiny|download` and its answers to bad input.

A few runs go through a real subprocess (exit codes, stdout/stderr, no traceback); the rest call kontext.cli.main
in-process, which is the same code minus ~3 s of interpreter and torch start-up each. Nothing touches the network:
`download` is tested through its argument parsing with kontext.hub.download replaced.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import kontext.hub
import kontext.tiny
from kontext.cli import build_parser, main
from kontext.errors import InputError

TINY_LAYOUT = {  # DESIGN.md's make-tiny layout, relative to the models folder
    "dit": "diffusion_models/kontext-tiny.safetensors",
    "dit_fp8": "diffusion_models/kontext-tiny-fp8_scaled.safetensors",
    "dit_diffusers": "diffusion_models/kontext-tiny-diffusers",
    "vae": "vae/ae-tiny.safetensors",
    "clip_l": "text_encoders/clip_l-tiny.safetensors",
    "t5xxl": "text_encoders/t5xxl-tiny.safetensors",
    "tokenizers": "tokenizers",
}


def run_cli(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "out.png"]  # no partial file left behind


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
    assert "--steps must be at least 1, got 0" in r.stderr and "Traceback" not in r.stderr
    assert "wrote tiny models" not in r.stderr  # refused before any model work


# ---------------------------------------------------------------------------------------------- in process: --out

def edit_args(image: Path, out: Path, *extra: object) -> list[str]:
    return ["edit", "--image", str(image), "--prompt", "make it blue", "--out", str(out), "--steps", "1",
            "--no-resize", "--device", "cpu", *map(str, extra)]


def test_existing_out_is_kept_without_overwrite(tmp_path, picture, capsys, no_model_loading):
    out = tmp_path / "out.png"
    out.write_bytes(b"precious")
    assert main(edit_args(picture, out, "--tiny")) != 0
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
    assert str(out.parent) in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- in process: inputs

def test_image_is_a_folder(tmp_path, capsys, no_model_loading):
    folder = tmp_path / "photo.png"
    folder.mkdir()
    assert main(edit_args(folder, tmp_path / "o.png", "--tiny")) == 2
    assert f"{folder} is not a file" in capsys.readouterr().err


def test_image_that_is_not_a_picture(tmp_path, models_dir, capsys):
    fake = tmp_path / "cat.png"
    fake.write_text("not a picture")
    assert main(edit_args(fake, tmp_path / "o.png", "--models", models_dir)) == 2
    err = capsys.readouterr().err
    assert str(fake) in err and "not an image" in err
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("extra, message", [
    (["--steps", "-1"], "--steps must be at least 1, got -1"),
    (["--width", "8192"], "--width 8192 is outside the supported 64..4096"),
    (["--height", "32"], "--height 32 is outside the supported 64..4096"),
    (["--width", "63"], "--width 63 is outside the supported 64..4096 (sizes are floored to multiples of 16)"),
])
def test_bad_numbers_before_loading(tmp_path, picture, capsys, no_model_loading, extra, message):
    assert main(edit_args(picture, tmp_path / "o.png", "--tiny", *extra)) == 2
    assert message in capsys.readouterr().err


def test_size_that_floors_into_range_passes_the_early_check(tmp_path, picture, no_model_loading):
    # 4111 floors to 4096: allowed, so the run gets as far as making the models (refused here by the fixture).
    with pytest.raises(AssertionError, match="models were loaded"):
        main(edit_args(picture, tmp_path / "o.png", "--tiny", "--width", 4111, "--height", 64))


def test_sizes_not_multiples_of_16_are_floored(tmp_path, picture, models_dir):
    out = tmp_path / "o.png"
    assert main(edit_args(picture, out, "--models", models_dir, "--width", 100, "--height", 70)) == 0
    assert Image.open(out).size == (96, 64)


@pytest.mark.parametrize("argv", [["edit", "--out", "o.png", "--tiny"],  # no --prompt
                                  ["edit", "--prompt", "x", "--out", "o.png", "--steps", "two"],
                                  ["download"],  # no --to
                                  ["frobnicate"]])
def test_argument_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- --models

def test_no_models_given(tmp_path, picture, capsys):
    assert main(["edit", "--image", str(picture), "--prompt", "x", "--out", str(tmp_path / "o.png"),
                 "--dit", str(tmp_path / "dit.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "--models" in err and "--tiny" in err and "missing: --vae, --clip-l, --t5xxl" in err


def test_models_dir_does_not_exist(tmp_path, picture, capsys):
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
def test_incomplete_models_dir(tmp_path, picture, models_dir, capsys, role, expected):
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


def test_download_error_is_reported(tmp_path, monkeypatch, capsys):
    def refused(*_a, **_k):
        raise InputError("black-forest-labs/FLUX.1-Kontext-dev is gated: accept the license and pass --token")

    monkeypatch.setattr(kontext.hub, "download", refused)
    assert main(["download", "--to", str(tmp_path)]) == 2
    assert "error: black-forest-labs/FLUX.1-Kontext-dev is gated" in capsys.readouterr().err


def test_out_suffix_chooses_the_format_and_unknown_suffixes_are_refused(tmp_path, capsys):
    from kontext.cli import output_format
    from kontext.errors import InputError

    assert output_format(tmp_path / "a.jpg") == "JPEG" and output_format(tmp_path / "a.PNG") == "PNG"
    for bad in ("a.txt", "noext"):
        with pytest.raises(InputError, match="unknown image type"):
            output_format(tmp_path / bad)


def test_models_folder_without_tokenizers_uses_the_packaged_ones(tmp_path):
    """A ComfyUI models/ folder has no tokenizer files: the copies shipped inside the package are used."""
    import shutil

    from kontext.files import find_model_files
    from kontext.text.tokenizers import PACKAGED, find_tokenizer_dirs

    models = tmp_path / "models"
    kontext.tiny.make_tiny(models)
    shutil.rmtree(models / "tokenizers")
    assert "tokenizers" not in find_model_files(models)
    assert find_tokenizer_dirs(None) == (PACKAGED / "clip_l", PACKAGED / "t5xxl")


def test_out_of_memory_is_a_message_not_a_traceback(monkeypatch, capsys, tmp_path):
    import torch

    import kontext.cli as cli
    from kontext.pipeline import KontextPipeline

    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(KontextPipeline, "from_models_dir", boom)
    assert cli.main(["edit", "--tiny", "--prompt", "x", "--out", str(tmp_path / "o.png")]) == 3
    assert "out of GPU memory" in capsys.readouterr().err and not (tmp_path / "o.png").exists()
