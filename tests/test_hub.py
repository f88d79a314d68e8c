"""Hub downloads without a network: hf_hub_download is replaced by fakes that write files or raise the Hub's errors."""
from __future__ import annotations

import io
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import errors as hf  # noqa: E402
from huggingface_hub.utils import are_progress_bars_disabled  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from kontext.errors import InputError, KontextError  # noqa: E402
from kontext.hub import STAGING, download, release_files  # noqa: E402
from kontext.weights.checkpoint import read_header  # noqa: E402

BF16_LAYOUT = {
    "dit": ("black-forest-labs/FLUX.1-Kontext-dev", "flux1-kontext-dev.safetensors",
            "diffusion_models/flux1-kontext-dev.safetensors"),
    "vae": ("black-forest-labs/FLUX.1-Kontext-dev", "ae.safetensors", "vae/ae.safetensors"),
    "clip_l": ("comfyanonymous/flux_text_encoders", "clip_l.safetensors", "text_encoders/clip_l.safetensors"),
    "t5xxl": ("comfyanonymous/flux_text_encoders", "t5xxl_fp16.safetensors", "text_encoders/t5xxl_fp16.safetensors"),
}
FP8_LAYOUT = dict(BF16_LAYOUT, **{
    "dit": ("Comfy-Org/flux1-kontext-dev_ComfyUI",
            "split_files/diffusion_models/flux1-dev-kontext_fp8_scaled.safetensors",
            "diffusion_models/flux1-dev-kontext_fp8_scaled.safetensors"),
    "t5xxl": ("comfyanonymous/flux_text_encoders", "t5xxl_fp8_e4m3fn_scaled.safetensors",
              "text_encoders/t5xxl_fp8_e4m3fn_scaled.safetensors"),
})


def write_weights(path: Path, value: float = 1.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.full((4, 4), value)}, str(path))
    return path


class FakeHub:
    """Stands in for hf_hub_download: records calls, writes a small real safetensors file, or raises."""

    def __init__(self, fail: dict[str, Exception] | None = None):
        self.calls: list[dict] = []
        self.fail = fail or {}
        self.bars_disabled_during_call: list[bool] = []

    def __call__(self, repo_id, filename, *, local_dir=None, token=None, **kwargs):
        self.calls.append({"repo_id": repo_id, "filename": filename, "local_dir": local_dir, "token": token})
        self.bars_disabled_during_call.append(are_progress_bars_disabled())
        if filename in self.fail:
            raise self.fail[filename]
        return str(write_weights(Path(local_dir) / filename))  # hf_hub_download keeps the repo's sub-path


def http_error(cls, status: int, message: str = "refused"):
    response = SimpleNamespace(status_code=status, headers={}, request=None)
    return cls(message, response=response)


@pytest.fixture
def fake(monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    return hub


@pytest.mark.parametrize("fp8, layout", [(False, BF16_LAYOUT), (True, FP8_LAYOUT)])
def test_files_land_under_comfyui_names(tmp_path, fake, fp8, layout):
    got = download(tmp_path, fp8=fp8, token="hf_test", progress=True)
    assert set(got) == set(layout) | {"tokenizers"}
    assert got["tokenizers"] == tmp_path / "tokenizers"
    tok = {(c["repo_id"], c["filename"]) for c in fake.calls if "tokenizer" in c["filename"]}
    assert ("black-forest-labs/FLUX.1-Kontext-dev", "tokenizer/vocab.json") in tok
    assert ("black-forest-labs/FLUX.1-Kontext-dev", "tokenizer_2/tokenizer.json") in tok
    assert (tmp_path / "tokenizers/clip_l/merges.txt").is_file() and (tmp_path / "tokenizers/t5xxl/tokenizer.json").is_file()
    fake.calls = [c for c in fake.calls if "tokenizer" not in c["filename"]]
    for key, (repo, filename, target) in layout.items():
        assert got[key] == tmp_path / target
        assert got[key].is_file() and not got[key].is_symlink()
        read_header(got[key])  # a complete safetensors file
    assert sorted((c["repo_id"], c["filename"]) for c in fake.calls) == sorted((r, f) for r, f, _ in layout.values())
    assert all(c["token"] == "hf_test" for c in fake.calls)
    assert all(Path(c["local_dir"]).is_relative_to(tmp_path / STAGING) for c in fake.calls)
    assert not (tmp_path / STAGING).exists()  # staging removed once everything is in place
    assert set(p.name for p in tmp_path.iterdir()) == {"diffusion_models", "vae", "text_encoders", "tokenizers"}


def test_release_files_match_the_layout():
    for fp8, layout in [(False, BF16_LAYOUT), (True, FP8_LAYOUT)]:
        files = release_files(fp8)
        assert {k: (f.repo_id, f.filename, f"{f.folder}/{f.name}") for k, f in files.items()} == layout


def test_complete_files_are_skipped_damaged_ones_fetched_again(tmp_path, fake):
    write_weights(tmp_path / "vae/ae.safetensors", value=7.0)  # complete: must be kept as is
    t5 = write_weights(tmp_path / "text_encoders/t5xxl_fp16.safetensors")
    t5.write_bytes(t5.read_bytes()[:-10])  # truncated, as by an interrupted copy
    got = download(tmp_path)
    fetched = {c["filename"] for c in fake.calls}
    assert "ae.safetensors" not in fetched and "t5xxl_fp16.safetensors" in fetched
    from safetensors.torch import load_file
    assert load_file(str(got["vae"]))["w"][0, 0].item() == 7.0
    read_header(got["t5xxl"])


def test_second_run_needs_no_network(tmp_path, fake, monkeypatch):
    download(tmp_path)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", FakeHub(fail={
        f: AssertionError("network used") for _, f, _ in BF16_LAYOUT.values()}))
    assert download(tmp_path)["dit"].is_file()


@pytest.mark.parametrize("error", [
    hf.GatedRepoError("Access to model black-forest-labs/FLUX.1-Kontext-dev is restricted",
                      response=SimpleNamespace(status_code=401, headers={}, request=None)),
    "http401", "http403",
])
def test_gated_or_refused_is_an_input_error_that_says_what_to_do(tmp_path, monkeypatch, error):
    if error == "http401":
        error = http_error(hf.HfHubHTTPError, 401)
    elif error == "http403":
        error = http_error(hf.HfHubHTTPError, 403)
    hub = FakeHub(fail={"flux1-kontext-dev.safetensors": error})
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    with pytest.raises(InputError) as info:
        download(tmp_path)
    msg = str(info.value)
    for needle in ("black-forest-labs/FLUX.1-Kontext-dev",
                   "https://huggingface.co/black-forest-labs/FLUX.1-Kontext-dev",
                   "accept the licence", "--token", "HF_TOKEN"):
        assert needle in msg
    assert info.value.__cause__ is error


def test_repository_not_found_is_an_input_error(tmp_path, monkeypatch):
    err = http_error(hf.RepositoryNotFoundError, 404)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", FakeHub(fail={"ae.safetensors": err}))
    with pytest.raises(InputError, match="not found or not visible with this token"):
        download(tmp_path)


@pytest.mark.parametrize("error, match", [
    (http_error(hf.HfHubHTTPError, 500, "server error"), "failed: HfHubHTTPError.*Run again to resume"),
    (hf.LocalEntryNotFoundError("cannot connect"), "unreachable"),
    (ConnectionError("reset by peer"), "Run again to resume"),
])
def test_other_failures_are_kontext_errors_and_keep_finished_files(tmp_path, monkeypatch, error, match):
    hub = FakeHub(fail={"t5xxl_fp16.safetensors": error})
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    with pytest.raises(KontextError, match=match) as info:
        download(tmp_path)
    assert not isinstance(info.value, InputError)
    for key in ("dit", "vae", "clip_l"):  # fetched before the failure: in place, not lost
        assert (tmp_path / BF16_LAYOUT[key][2]).is_file()
    assert not (tmp_path / BF16_LAYOUT["t5xxl"][2]).exists()


def test_progress_false_silences_bars_only_during_the_download(tmp_path, fake):
    assert not are_progress_bars_disabled()
    download(tmp_path, progress=False)
    assert fake.bars_disabled_during_call and all(fake.bars_disabled_during_call)
    assert not are_progress_bars_disabled()


def test_hub_warnings_are_printed_once(tmp_path, monkeypatch):
    """huggingface_hub's logger has a handler of its own and propagates too; with the application's logging set up
    (python -m kontext calls logging.basicConfig) a retry warning must still reach stderr only once."""
    printed = io.StringIO()
    hub_logger = logging.getLogger("huggingface_hub")
    own = logging.StreamHandler(printed)
    monkeypatch.setattr(hub_logger, "handlers", [own])  # as huggingface_hub sets itself up on import
    monkeypatch.setattr(hub_logger, "propagate", True)
    app = logging.StreamHandler(printed)  # as logging.basicConfig adds
    logging.getLogger().addHandler(app)

    class RetryingHub(FakeHub):
        def __call__(self, *args, **kwargs):
            logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
            return super().__call__(*args, **kwargs)

    hub = RetryingHub()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    try:
        download(tmp_path)
    finally:
        logging.getLogger().removeHandler(app)
    assert printed.getvalue().count("Retrying in 1s") == len(hub.calls) > 0
    assert hub_logger.handlers == [own]  # its handler is back afterwards
