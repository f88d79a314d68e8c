"""Tiny CLIP and T5 tokenizers for `make-tiny`: trained here, deterministically, on a built-in English corpus.

They are written in the real files' formats (loadable by kontext and by transformers) with ids that fit the real
embedding tables, so the tiny text encoders keep the real vocabulary sizes: CLIP ids below 49406 plus the two markers
at their real ids 49406/49407; T5 ids `<pad>`=0, `</s>`=1, `<unk>`=2 and everything below 32128.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, pre_tokenizers, trainers
from tokenizers.models import BPE, Unigram

from ..text.tokenizers import CLIP_DEFAULTS, T5_DEFAULTS, clip_pipeline, t5_pipeline

CLIP_BOS_ID, CLIP_EOS_ID = 49406, 49407  # the real file's ids: the tiny CLIP model pools at id 49407
CLIP_MERGES = 1500  # merges to learn; the corpus runs out of frequent pairs well before this
T5_PIECES = 800  # an upper bound: the small corpus yields a few hundred pieces
T5_SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5

_ADJECTIVES = ["red", "blue", "green", "small", "large", "old", "shiny", "wooden", "quiet", "bright", "dark",
               "golden", "tiny", "fluffy", "rusty", "modern", "ancient", "happy", "sleepy", "colourful"]
_NOUNS = ["cat", "dog", "car", "house", "tree", "lighthouse", "mountain", "river", "city", "robot", "flower",
          "bicycle", "castle", "bird", "boat", "painting", "window", "garden", "forest", "street", "woman", "man",
          "child", "horse", "cup", "book", "lamp", "chair", "beach", "sky"]
_VERBS = ["sits on", "stands near", "runs across", "looks at", "flies over", "rests under", "walks through",
          "jumps over", "waits beside", "shines above"]
_EDITS = ["make the {n} {a}", "change the {n} to a {a} {n2}", "remove the {n}", "add a {a} {n} next to the {n2}",
          "turn the {n} into a {n2}", "same {n}, now in the {n2}", "in the style of this image, draw a {a} {n}",
          "don't change the {n}, only the {n2}", "it's a {a} {n} and it's {a2}", "replace the text with \"{n}\"",
          "keep the {n}'s face; make it {a}", "zoom out: show the whole {n}!", "{k} {n}s and {k2} {n2}s",
          "a photo of a {a} {n} {v} the {n2}.", "A {A} {N} {v} the {n2}, at {k}:{k2}0 PM?"]


def tiny_corpus(seed: int = 0, size: int = 400) -> list[str]:
    """`size` short English sentences in the style of image prompts and edit instructions, the same for a seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(size):
        a, a2 = rng.sample(_ADJECTIVES, 2)
        n, n2 = rng.sample(_NOUNS, 2)
        k, k2 = rng.sample(range(1, 13), 2)
        out.append(rng.choice(_EDITS).format(a=a, a2=a2, n=n, n2=n2, v=rng.choice(_VERBS), k=k, k2=k2,
                                             A=a.capitalize(), N=n.upper()))
    return out


def _train_clip(corpus: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE with CLIP's text pipeline and "</w>" word ends.

    Laid out as OpenAI's CLIP vocabulary is: the 256 byte symbols, the same with "</w>" (so any text can be spelled
    out), one token per learned merge in merge order, then the two markers at their real ids.
    """
    tok = Tokenizer(BPE(end_of_word_suffix="</w>"))
    clip_pipeline(tok)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(vocab_size=2 * len(alphabet) + CLIP_MERGES, initial_alphabet=alphabet,
                                  end_of_word_suffix="</w>", show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(tok.to_str())["model"]["merges"]]
    vocab: dict[str, int] = {}
    for token in alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]:
        vocab.setdefault(token, len(vocab))
    if len(vocab) > CLIP_BOS_ID:  # cannot happen at this corpus size; guards a future bigger one
        raise RuntimeError(f"tiny CLIP vocabulary of {len(vocab)} would collide with the marker ids")
    vocab[CLIP_DEFAULTS["bos_token"]], vocab[CLIP_DEFAULTS["eos_token"]] = CLIP_BOS_ID, CLIP_EOS_ID
    return vocab, merges


def _train_t5(corpus: list[str]) -> dict:
    """A tokenizer.json dict: SentencePiece-style unigram over "▁"-marked words, specials at ids 0-2.

    No normalisation table: the real one is SentencePiece's compiled NFKC map, which only sentencepiece can build;
    transformers reads the tiny file the same way (it keeps a table only when the file has one).
    """
    tok = Tokenizer(Unigram())
    t5_pipeline(tok, T5_DEFAULTS["eos_token"], 1)
    trainer = trainers.UnigramTrainer(vocab_size=T5_PIECES, special_tokens=T5_SPECIALS, unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    spec = json.loads(tok.to_str())
    pieces = spec["model"]["vocab"]
    if [p for p, _ in pieces[:3]] != T5_SPECIALS:
        raise RuntimeError(f"unigram trainer placed the special tokens at {pieces[:3]}")
    spec["model"]["vocab"] = [[p, 0.0] for p in T5_SPECIALS] + [list(ps) for ps in _canonical_pieces(pieces[3:])]
    spec["model"]["unk_id"] = 2
    spec["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for i, t in enumerate(T5_SPECIALS)]
    return spec


def _canonical_pieces(pieces: list[list]) -> list[tuple[str, float]]:
    """The trainer's pieces in an order and with scores that do not depend on Rust's per-process hash seed.

    Characters the pruning dropped are put back with scores min, min + 1e-4, min + 2e-4, ... handed out in hash
    order, and equal scores are listed in hash order: deal that lowest band's scores out in text order, then sort by
    score (ties by text). Rounding hides any last-bit difference in the trainer's parallel sums.
    """
    pieces = [(p, round(s, 6)) for p, s in pieces]
    low = min(s for _, s in pieces)
    top = low + 1e-4 * sum(len(p) == 1 for p, _ in pieces) + 1e-6  # wide enough for every put-back character
    band = [ps for ps in pieces if ps[1] <= top]
    band = list(zip(sorted(p for p, _ in band), sorted((s for _, s in band), reverse=True)))
    return sorted([ps for ps in pieces if ps[1] > top] + band, key=lambda ps: (-ps[1], ps[0]))


def _clip_special_map() -> dict:
    """The real CLIP files' shape: markers as entries matched after lower-casing, the pad role as a plain string."""
    entry = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    roles = {role: {"content": token, **entry} for role, token in CLIP_DEFAULTS.items() if role != "pad_token"}
    return {**roles, "pad_token": CLIP_DEFAULTS["pad_token"]}


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tiny_tokenizers(out_dir: Path, seed: int = 0) -> Path:
    """Write out_dir/clip_l/{vocab.json, merges.txt, ...} and out_dir/t5xxl/{tokenizer.json, ...}; returns out_dir."""
    out_dir = Path(out_dir)
    corpus = tiny_corpus(seed)
    clip_dir, t5_dir = out_dir / "clip_l", out_dir / "t5xxl"
    clip_dir.mkdir(parents=True, exist_ok=True)
    t5_dir.mkdir(parents=True, exist_ok=True)

    vocab, merges = _train_clip(corpus)
    _write_json(clip_dir / "vocab.json", vocab)
    (clip_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                         encoding="utf-8")
    _write_json(clip_dir / "special_tokens_map.json", _clip_special_map())
    _write_json(clip_dir / "tokenizer_config.json", {
        **_clip_special_map(), "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "add_prefix_space": False, "errors": "replace"})

    _write_json(t5_dir / "tokenizer.json", _train_t5(corpus))
    _write_json(t5_dir / "special_tokens_map.json", T5_DEFAULTS)
    _write_json(t5_dir / "tokenizer_config.json", {
        **T5_DEFAULTS, "tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 0, "legacy": False,
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for i, t in enumerate(T5_SPECIALS)}})
    return out_dir
