"""CLIP / T5 tokenizers: ids identical to transformers' CLIPTokenizer and T5TokenizerFast (what diffusers' Flux
pipelines call) on the real FLUX tokenizer files and on the tiny trained ones; folder layouts; errors; warnings."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

import kontext
from kontext.errors import CheckpointError, InputError
from kontext.text.tokenizers import ENV_VAR, PACKAGED, load_tokenizers
from kontext.tiny.tokenizers import CLIP_BOS_ID, CLIP_EOS_ID, write_tiny_tokenizers

transformers = pytest.importorskip("transformers")

REAL = PACKAGED  # the real CLIP-L and T5 files, shipped inside the package
LONG = " ".join(f"word{i % 7} and" for i in range(1000))  # 2000 words: far past both limits
PROMPTS = [
    "a photo of a cat",
    "Make the car RED, keep everything else!",
    "same character, now at the beach; 3 dogs & 12 cats... (maybe 4?)",
    "don't change it's face, they're we've I'm you'll he'd",
    "don’t “curly quotes”",
    "",
    "   ",
    "\n\t \n",
    "multiple   spaces\n\nand\r\nnewlines\ttabs",
    "😀🎉 emoji party 👩‍👩‍👧",
    "日本語のテキスト 你好世界",
    "مرحبا بالعالم",
    "Привет, мир!",
    "Café naïve résumé ÀÉÎ e\u0301",
    "ﬁ ligature Ｆｕｌｌｗｉｄｔｈ \u3000 ideographic space, zero\u200bwidth",
    "##hash #:tag @user 1,234.56 USD 2024-01-01",
    "<|startoftext|> <|ENDOFTEXT|> spelled out",
    "hello <extra_id_0>world a</s>b <pad>",
    "make the lighthouse golden, same house, now in the forest",
    LONG,
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_tiny_tokenizers(tmp_path_factory.mktemp("tokenizers"))


@pytest.fixture(scope="module", params=["real", "tiny"])
def folder(request, tiny_dir) -> Path:
    if request.param == "tiny":
        return tiny_dir
    return REAL


def _reference(folder: Path, prompts, which: str, length: int) -> torch.Tensor:
    """transformers, called exactly as diffusers' FluxKontextPipeline calls it."""
    if which == "clip":
        tok = transformers.CLIPTokenizer.from_pretrained(folder / "clip_l")
    else:
        tok = transformers.T5TokenizerFast.from_pretrained(folder / "t5xxl")
    return tok(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def _assert_same_rows(ours: torch.Tensor, ref: torch.Tensor, prompts: list[str]) -> None:
    assert ours.dtype == torch.long and ours.shape == ref.shape
    for row, prompt in enumerate(prompts):
        assert ours[row].tolist() == ref[row].tolist(), f"ids differ for prompt {prompt[:60]!r}"


def test_clip_ids_match_transformers(folder):
    ours = load_tokenizers(folder).clip_ids(PROMPTS)
    assert ours.shape == (len(PROMPTS), 77)
    _assert_same_rows(ours, _reference(folder, PROMPTS, "clip", 77), PROMPTS)


@pytest.mark.parametrize("length", [512, 20])
def test_t5_ids_match_transformers(folder, length):
    ours = load_tokenizers(folder).t5_ids(PROMPTS, max_length=length)
    assert ours.shape == (len(PROMPTS), length)
    _assert_same_rows(ours, _reference(folder, PROMPTS, "t5", length), PROMPTS)


def test_padding_and_end_tokens(folder):
    tk = load_tokenizers(folder)
    clip = tk.clip_ids(["", "a cat", LONG])
    assert clip[0].tolist() == [49406] + [49407] * 76  # FLUX's files pad CLIP with <|endoftext|>
    assert clip[2, 0].item() == 49406 and clip[2, -1].item() == 49407  # truncation keeps both markers
    t5 = tk.t5_ids(["", "a cat", LONG])
    assert t5[0].tolist() == [1] + [0] * 511  # </s> then <pad>
    assert t5[2, -1].item() == 1 and (t5[2] != 0).all()
    assert t5[1].tolist().index(1) == (t5[1] != 0).sum().item() - 1  # </s> is the last non-pad id


def test_single_string_is_a_batch_of_one(tiny_dir):
    tk = load_tokenizers(tiny_dir)
    assert torch.equal(tk.clip_ids("a cat"), tk.clip_ids(["a cat"]))
    assert tk.t5_ids("a cat", max_length=64).shape == (1, 64)


def test_truncation_warns_with_dropped_count(tiny_dir, caplog):
    tk = load_tokenizers(tiny_dir)
    full_clip = len(tk.clip.tokenizer.encode(LONG).ids)
    full_t5 = len(tk.t5.tokenizer.encode(LONG).ids)
    with caplog.at_level(logging.WARNING, logger="kontext.text.tokenizers"):
        tk.clip_ids(["short", LONG])
        tk.t5_ids(["short", LONG])
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages  # one per truncated prompt, none for "short"
    assert f"last {full_clip - 77} tokens were dropped" in messages[0] and "CLIP prompt 2 of 2" in messages[0]
    assert f"last {full_t5 - 512} tokens were dropped" in messages[1] and "T5 prompt 2 of 2" in messages[1]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kontext.text.tokenizers"):
        tk.t5_ids(["a photo of a cat"] * 3)
    assert not caplog.records


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_folder_layouts_give_the_same_ids(tiny_dir, tmp_path, monkeypatch):
    expected = load_tokenizers(tiny_dir)
    prompts = PROMPTS[:4]
    hf = tmp_path / "FLUX.1-Kontext-dev"  # the Hugging Face repo: tokenizer/ and tokenizer_2/
    _copy(tiny_dir / "clip_l", hf / "tokenizer")
    _copy(tiny_dir / "t5xxl", hf / "tokenizer_2")
    comfy = tmp_path / "ComfyUI"  # ComfyUI ships the files inside its own code tree
    _copy(tiny_dir / "clip_l", comfy / "comfy" / "sd1_tokenizer")
    _copy(tiny_dir / "t5xxl", comfy / "comfy" / "text_encoders" / "t5_tokenizer")

    found = {"hf": load_tokenizers(hf), "comfy root": load_tokenizers(str(comfy)),
             "comfy package": load_tokenizers(comfy / "comfy")}
    monkeypatch.setenv(ENV_VAR, str(hf))  # an explicit setting wins over the packaged copies
    found["env"] = load_tokenizers()
    assert found["env"].t5.folder == hf / "tokenizer_2"
    for name, tk in found.items():
        assert torch.equal(tk.clip_ids(prompts), expected.clip_ids(prompts)), name
        assert torch.equal(tk.t5_ids(prompts), expected.t5_ids(prompts)), name


def test_top_level_export(tiny_dir):
    assert kontext.load_tokenizers is load_tokenizers


@pytest.mark.parametrize("remove, folder_name, fragment", [
    ("clip_l/merges.txt", "clip_l", "missing merges.txt"),
    ("clip_l/vocab.json", "clip_l", "missing vocab.json"),
    ("t5xxl/tokenizer.json", "t5xxl", "missing tokenizer.json"),
    ("t5xxl", "t5xxl", "folder is missing"),
])
def test_missing_file_names_folder_and_file(tiny_dir, tmp_path, remove, folder_name, fragment):
    broken = _copy(tiny_dir, tmp_path / "tok")
    target = broken / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(CheckpointError) as err:
        load_tokenizers(broken)
    assert fragment in str(err.value) and str(broken / folder_name) in str(err.value)


def test_spiece_model_only_is_refused_with_reason(tiny_dir, tmp_path):
    hf = tmp_path / "repo"
    _copy(tiny_dir / "clip_l", hf / "tokenizer")
    (hf / "tokenizer_2").mkdir()
    (hf / "tokenizer_2" / "spiece.model").write_bytes(b"\x00")
    with pytest.raises(CheckpointError, match="sentencepiece"):
        load_tokenizers(hf)


def test_no_folder_given_uses_the_packaged_files_and_a_bad_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    packaged = load_tokenizers()
    assert packaged.clip.folder == PACKAGED / "clip_l" and packaged.t5.folder == PACKAGED / "t5xxl"
    assert packaged.clip.tokenizer.get_vocab_size() == 49408 and packaged.t5.tokenizer.get_vocab_size() == 32100
    with pytest.raises(CheckpointError, match="holds no tokenizer folders"):
        load_tokenizers(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tokenizers(tmp_path / "nope")


def test_corrupt_files_raise_checkpoint_error(tiny_dir, tmp_path):
    broken = _copy(tiny_dir, tmp_path / "tok")
    (broken / "t5xxl" / "tokenizer.json").write_text("{not json")
    (broken / "clip_l" / "merges.txt").write_text("#version: 0.2\nnot-a-pair-line\n")
    with pytest.raises(CheckpointError, match="merges.txt"):
        load_tokenizers(broken)
    shutil.copy(tiny_dir / "clip_l" / "merges.txt", broken / "clip_l" / "merges.txt")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_tokenizers(broken)


@pytest.mark.parametrize("bad", [[], [1, 2], None, ("ok", b"bytes")])
def test_bad_prompts_are_input_errors(tiny_dir, bad):
    with pytest.raises(InputError):
        load_tokenizers(tiny_dir).clip_ids(bad)


def test_bad_max_length_is_input_error(tiny_dir):
    with pytest.raises(InputError):
        load_tokenizers(tiny_dir).t5_ids("a cat", max_length=1)


def test_tiny_ids_fit_the_real_embedding_tables(tiny_dir):
    vocab = json.loads((tiny_dir / "clip_l" / "vocab.json").read_text(encoding="utf-8"))
    assert vocab["<|startoftext|>"] == CLIP_BOS_ID == 49406 and vocab["<|endoftext|>"] == CLIP_EOS_ID == 49407
    assert max(i for t, i in vocab.items() if not t.startswith("<|")) < 49406
    assert len(set(vocab.values())) == len(vocab)
    tk = load_tokenizers(tiny_dir)
    assert 300 < len(vocab) and tk.clip.tokenizer.encode("lighthouse").ids[1:-1] == [vocab["lighthouse</w>"]]
    t5 = tk.t5.tokenizer
    assert [t5.token_to_id(t) for t in ("<pad>", "</s>", "<unk>")] == [0, 1, 2]
    assert 100 < t5.get_vocab_size() <= 32128
    assert tk.t5_ids(PROMPTS).max().item() < 32128 and tk.clip_ids(PROMPTS).max().item() < 49408


def test_tiny_tokenizers_are_reproducible(tiny_dir, tmp_path):
    # A second training in this process gets fresh Rust hash seeds, so hash-order leaks would show up here.
    again = write_tiny_tokenizers(tmp_path / "again")
    files = sorted(p.relative_to(tiny_dir) for p in tiny_dir.rglob("*") if p.is_file())
    assert len(files) == 7
    for rel in files:
        assert (again / rel).read_bytes() == (tiny_dir / rel).read_bytes(), rel


@pytest.mark.parametrize("normalizer", [{"type": "Precompiled", "precompiled_charsmap": "!!notb64"},
                                        {"type": "Precompiled", "precompiled_charsmap": "AAAA"},
                                        {"type": "Sequence", "normalizers": [None]}, "NFKC"])
def test_damaged_t5_normalizer_is_a_clear_error(tmp_path, normalizer):
    import json as _json

    from kontext.errors import KontextError
    from kontext.text.tokenizers import load_t5_tokenizer
    from kontext.tiny.tokenizers import write_tiny_tokenizers

    folder = write_tiny_tokenizers(tmp_path) / "t5xxl"
    spec = _json.loads((folder / "tokenizer.json").read_text())
    spec["normalizer"] = normalizer
    (folder / "tokenizer.json").write_text(_json.dumps(spec))
    try:
        load_t5_tokenizer(folder)  # a normalizer we cannot read is either ignored or refused, never a crash
    except KontextError as exc:
        assert "tokenizer.json" in str(exc)
