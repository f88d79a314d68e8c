"""CLIP-L and T5-XXL tokenizers on the `tokenizers` library: prompt strings -> padded id tensors.

The ids are those of transformers' `CLIPTokenizer` and `T5TokenizerFast` called the way diffusers' Flux pipelines
call them (`padding="max_length", truncation=True`): CLIP gives `<|startoftext|> tokens <|endoftext|>` padded with the
configured pad token (FLUX's files: `<|endoftext|>` = 49407) to 77; T5 gives `tokens </s>` padded with `<pad>` = 0 to
512. Truncation keeps the end token. The tests prove the match token for token against transformers 5.
transformers 4 differs on a few inputs (checked with 4.57): its slow CLIPTokenizer, which diffusers used there, puts
text through ftfy + html.unescape when ftfy is installed (curly quotes, mojibake, "&amp;" change), or else through
BERT's BasicTokenizer (each CJK character its own word, control and zero-width characters dropped); its T5TokenizerFast
adds no "▁" to a word glued to a spelled-out special token ("a</s>b"). Plain prompts give the same ids everywhere.

The package ships the real files (CLIP-L's vocab and merges, MIT, OpenAI; T5 v1.1's tokenizer.json, Apache-2.0,
Google) under `tokenizer_data/`, so nothing needs to be found. A folder given explicitly, or $KONTEXT_TOKENIZERS, wins;
it may hold the two tokenizer folders in any of these layouts:
  ours            clip_l/{vocab.json, merges.txt}       t5xxl/tokenizer.json
  Hugging Face    tokenizer/{vocab.json, merges.txt}    tokenizer_2/tokenizer.json
  ComfyUI tree    comfy/sd1_tokenizer/...               comfy/text_encoders/t5_tokenizer/tokenizer.json
"""
from __future__ import annotations

import base64
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, Unigram

from kontext.errors import CheckpointError, InputError

log = logging.getLogger(__name__)

ENV_VAR = "KONTEXT_TOKENIZERS"
PACKAGED = Path(__file__).resolve().parent / "tokenizer_data"  # clip_l/ and t5xxl/, shipped with the package
CLIP_LENGTH = 77
T5_LENGTH = 512
CLIP_FILES = ("vocab.json", "merges.txt")
T5_FILES = ("tokenizer.json",)
# (CLIP folder, T5 folder) relative to the folder given, in the order they are tried.
LAYOUTS = (
    ("clip_l", "t5xxl"),
    ("tokenizer", "tokenizer_2"),
    ("sd1_tokenizer", "text_encoders/t5_tokenizer"),  # ComfyUI's comfy/ package folder
    ("comfy/sd1_tokenizer", "comfy/text_encoders/t5_tokenizer"),  # a ComfyUI checkout's root
)
CLIP_DEFAULTS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                 "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
T5_DEFAULTS = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
# OpenAI's CLIP word pattern: the two markers, English contractions, letter runs, single digits, symbol runs.
CLIP_WORDS = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@dataclass
class TextTokenizer:
    """One tokenizer plus the facts needed to pad and truncate like transformers: `.ids(prompts, length)`."""

    name: str
    folder: Path
    tokenizer: Tokenizer
    eos_id: int
    pad_id: int

    def ids(self, prompts: list[str] | str, length: int) -> torch.Tensor:
        prompts = _as_prompt_list(prompts)
        specials = self.tokenizer.num_special_tokens_to_add(False)
        if not isinstance(length, int) or length <= specials:
            raise InputError(f"{self.name} max_length must be an int above {specials}, got {length!r}")
        rows = []
        for i, enc in enumerate(self.tokenizer.encode_batch(prompts, add_special_tokens=True)):
            ids = enc.ids
            if len(ids) > length:
                log.warning("%s prompt %d of %d is %d tokens long; its last %d tokens were dropped to fit %d "
                            "(prompt starts %r)", self.name, i + 1, len(prompts), len(ids), len(ids) - length,
                            length, prompts[i][:60])
                # Both templates end in exactly one end token (`... </s>`, `... <|endoftext|>`): transformers cuts
                # the prompt's own tokens and keeps the template, which is the same as this positional cut.
                ids = ids[: length - 1] + [self.eos_id]
            rows.append(ids + [self.pad_id] * (length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)  # [B, length]


@dataclass
class Tokenizers:
    """The two Flux text tokenizers. `clip_ids(prompts) -> [B, 77]`, `t5_ids(prompts, max_length=512) -> [B, L]`."""

    clip: TextTokenizer
    t5: TextTokenizer

    def clip_ids(self, prompts: list[str] | str) -> torch.Tensor:
        return self.clip.ids(prompts, CLIP_LENGTH)

    def t5_ids(self, prompts: list[str] | str, max_length: int = T5_LENGTH) -> torch.Tensor:
        return self.t5.ids(prompts, max_length)


def load_tokenizers(dir: str | os.PathLike | None = None) -> Tokenizers:
    """Both tokenizers from `dir` (any layout above), else $KONTEXT_TOKENIZERS, else the packaged copies."""
    clip_dir, t5_dir = find_tokenizer_dirs(dir)
    return Tokenizers(clip=load_clip_tokenizer(clip_dir), t5=load_t5_tokenizer(t5_dir))


# ---------------------------------------------------------------------------------------------- finding the files

def find_tokenizer_dirs(dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(CLIP folder, T5 folder), each checked to hold its files; CheckpointError naming what is missing."""
    if dir is None:
        # An explicit setting beats the packaged default, so the variable also works inside ComfyUI.
        dir = os.environ.get(ENV_VAR) or PACKAGED
    root = Path(dir).expanduser()
    if not root.is_dir():
        raise CheckpointError(root, "tokenizer folder does not exist", "a folder holding clip_l/ and t5xxl/")
    for clip_rel, t5_rel in LAYOUTS:
        clip_dir, t5_dir = root / clip_rel, root / t5_rel
        if clip_dir.is_dir() or t5_dir.is_dir():
            _check_files(clip_dir, CLIP_FILES, "the CLIP-L BPE tokenizer")
            _check_t5_files(t5_dir)
            return clip_dir, t5_dir
    wanted = " or ".join(f"{c}/ + {t}/" for c, t in LAYOUTS[:2])
    raise CheckpointError(root, "holds no tokenizer folders", wanted)



def _check_files(folder: Path, names: tuple[str, ...], what: str) -> None:
    if not folder.is_dir():
        raise CheckpointError(folder, "tokenizer folder is missing", f"a folder with {', '.join(names)} ({what})")
    for name in names:
        if not (folder / name).is_file():
            raise CheckpointError(folder, f"missing {name}", f"{', '.join(names)} ({what})")


def _check_t5_files(folder: Path) -> None:
    if folder.is_dir() and not (folder / "tokenizer.json").is_file() and (folder / "spiece.model").is_file():
        raise CheckpointError(folder, "has spiece.model but no tokenizer.json; reading spiece.model needs the "
                              "sentencepiece library, which kontext does not use",
                              "tokenizer.json (the Hugging Face repo ships it beside spiece.model)")
    _check_files(folder, T5_FILES, "the T5 SentencePiece-unigram tokenizer")


def _special_tokens(folder: Path, defaults: dict[str, str]) -> dict[str, dict]:
    """Role ("bos_token", ...) -> added-token entry {"content", "normalized", ...} read as transformers 5 reads them:
    tokenizer_config.json, then special_tokens_map.json over it; a plain string is matched on the raw text
    (normalized False), an entry keeps its own flags."""
    found = {role: {"content": token, "normalized": False} for role, token in defaults.items()}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(path, f"unreadable JSON ({e})") from None
        for role in defaults:
            value = config.get(role) if isinstance(config, dict) else None
            if isinstance(value, str):
                found[role] = {"content": value, "normalized": False}
            elif isinstance(value, dict) and isinstance(value.get("content"), str):
                found[role] = {"normalized": False, **value}
    return found


def _token_id(tok: Tokenizer, token: str, folder: Path, role: str) -> int:
    tid = tok.token_to_id(token)
    if tid is None:
        raise CheckpointError(folder, f"the {role} token {token!r} is not in the vocabulary")
    return tid


# ---------------------------------------------------------------------------------------------- CLIP-L

def clip_pipeline(tok: Tokenizer) -> None:
    """CLIP's text clean-up and word split, set on `tok` (shared with the tiny-tokenizer trainer).

    NFC, every whitespace run to one space, lower case; then words by CLIP's pattern, each mapped to the 256
    printable stand-ins of its UTF-8 bytes (ByteLevel, whose default GPT-2 split is kept: transformers keeps it too).
    """
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_WORDS), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()  # only for reading ids back while debugging


def load_clip_tokenizer(folder: str | os.PathLike) -> TextTokenizer:
    folder = Path(folder)
    _check_files(folder, CLIP_FILES, "the CLIP-L BPE tokenizer")
    special = _special_tokens(folder, CLIP_DEFAULTS)
    try:
        vocab, merges = BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
        # "</w>" marks a word's last piece, so "cat" at the end of a word and inside one are different tokens.
        model = BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="</w>",
                    fuse_unk=False, unk_token=special["unk_token"]["content"])
    except Exception as e:  # the Rust reader's errors carry no type worth keeping
        raise CheckpointError(folder, f"unreadable vocab.json / merges.txt ({e})", "CLIP BPE files") from None
    tok = Tokenizer(model)
    clip_pipeline(tok)
    # transformers registers the four roles as special "added" tokens, so a prompt that spells one out gets its id;
    # when two roles share a string (pad = eos in FLUX's files) the later role's flags win, as in transformers 5.
    added = {entry["content"]: entry for entry in special.values()}
    for token in added:
        _token_id(tok, token, folder, "special")
    tok.add_special_tokens([_added_token({**entry, "special": True}) for entry in added.values()])
    bos, eos = special["bos_token"]["content"], special["eos_token"]["content"]
    bos_id, eos_id = _token_id(tok, bos, folder, "start"), _token_id(tok, eos, folder, "end")
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A {eos}", special_tokens=[(bos, bos_id),
                                                                                                  (eos, eos_id)])
    pad_id = _token_id(tok, special["pad_token"]["content"], folder, "pad")
    return TextTokenizer("CLIP", folder, tok, eos_id=eos_id, pad_id=pad_id)


# ---------------------------------------------------------------------------------------------- T5-XXL

def t5_pipeline(tok: Tokenizer, eos_token: str, eos_id: int) -> None:
    """SentencePiece's word handling as transformers 5 rebuilds it: split on whitespace (which also drops repeated,
    leading and trailing spaces), mark each word start with "▁", append the end token."""
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    tok.post_processor = processors.TemplateProcessing(single=f"$A {eos_token}", special_tokens=[(eos_token, eos_id)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)


def _precompiled_charsmap(normalizer: dict | None) -> str | None:
    """The base64 SentencePiece normalisation table of a tokenizer.json normalizer entry, if it has one."""
    if not isinstance(normalizer, dict):
        return None
    parts = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    for part in parts if isinstance(parts, list) else []:
        if isinstance(part, dict) and part.get("type") == "Precompiled" and part.get("precompiled_charsmap"):
            return part["precompiled_charsmap"]
    return None


def load_t5_tokenizer(folder: str | os.PathLike) -> TextTokenizer:
    folder = Path(folder)
    _check_t5_files(folder)
    path = folder / "tokenizer.json"
    special = _special_tokens(folder, T5_DEFAULTS)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        model = spec.get("model", {})
        if model.get("type") != "Unigram":
            raise CheckpointError(path, f"model type {model.get('type')!r}", "a SentencePiece Unigram model (T5)")
        # Built from Python floats as transformers 5 does: the Rust JSON reader rounds some scores 1 ulp differently,
        # which could flip a tie between two segmentations.
        tok = Tokenizer(Unigram([(p, float(s)) for p, s in model["vocab"]], unk_id=model.get("unk_id"),
                                byte_fallback=bool(model.get("byte_fallback", False))))
        tok.add_special_tokens([_added_token(t) for t in spec.get("added_tokens", []) if t.get("special")])
        tok.add_tokens([_added_token(t) for t in spec.get("added_tokens", []) if not t.get("special")])
        # transformers 5 keeps only the file's SentencePiece normalisation table (an NFKC-like mapping) and
        # rebuilds the word split; the file's own Metaspace("first") differs from it after a spelled-out special.
        charsmap = _precompiled_charsmap(spec.get("normalizer"))
        if charsmap is not None:
            tok.normalizer = normalizers.Precompiled(base64.b64decode(charsmap, validate=True))
    except CheckpointError:
        raise
    except Exception as e:  # bad JSON or base64, or a vocabulary or table the Rust side refuses
        raise CheckpointError(path, f"unreadable tokenizer.json ({e})", "a T5 tokenizer.json") from None
    eos = special["eos_token"]["content"]
    eos_id = _token_id(tok, eos, path, "end")
    t5_pipeline(tok, eos, eos_id)
    pad_id = _token_id(tok, special["pad_token"]["content"], path, "pad")
    return TextTokenizer("T5", folder, tok, eos_id=eos_id, pad_id=pad_id)


def _added_token(entry: dict) -> AddedToken:
    flags = ("single_word", "lstrip", "rstrip", "normalized", "special")
    return AddedToken(entry["content"], **{k: bool(entry[k]) for k in flags if k in entry})


def _as_prompt_list(prompts: list[str] | str) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise InputError(f"prompts must be a string or a non-empty list of strings, got {type(prompts).__name__}")
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise InputError(f"every prompt must be a string, got {', '.join(sorted(set(bad)))}")
    # A lone surrogate (a broken emoji escape in JSON, e.g. from ComfyUI's API) cannot be encoded: make it U+FFFD.
    return [p.encode("utf-8", "replace").decode("utf-8") for p in prompts]
