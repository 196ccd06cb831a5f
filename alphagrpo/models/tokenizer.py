"""A word-level tokenizer for closed-vocabulary worlds (the shapes world): one token per word, specials first.

Texts are split by a world's own canonical splitter (lowercase words, punctuation as separate tokens); an unknown
word is an error that names it, never a silent ``<unk>``, since every text in the world is known. The one exception
is opt-in: ``unknown="unk"`` (or a vocabulary word) maps every unknown word to one token, so that a closed-vocabulary
model can still be run on open prompts (benchmark prompt files in tests); it never changes the vocabulary.
"""
from __future__ import annotations

import json
import re
from typing import Callable, Iterable, Optional, Sequence

SPECIALS = ("<pad>", "<bos>", "<eos>", "<think>", "<eot>", "<img>", "</img>")

_SPLIT = re.compile(r"[a-z0-9_]+|[^\sa-z0-9_]")


def split_words(text: str) -> list[str]:
    """Default splitter: lowercase, words of ``[a-z0-9_]`` and single punctuation characters."""
    return _SPLIT.findall(text.lower())


class WordTokenizer:
    """Maps words to ids. ``pad_id == 0``; special ids are ``bos_id``, ``eos_id``, ``think_id``, ``eot_id``..."""

    def __init__(self, words: Iterable[str], splitter: Optional[Callable[[str], list[str]]] = None,
                 unknown: Optional[str] = None):
        vocab = list(SPECIALS)
        seen = set(vocab)
        for w in words:
            if w not in seen:
                vocab.append(w)
                seen.add(w)
        self.itos = vocab
        self.stoi = {w: i for i, w in enumerate(vocab)}
        self.split = splitter or split_words
        (self.pad_id, self.bos_id, self.eos_id, self.think_id, self.eot_id, self.img_id,
         self.img_end_id) = (self.stoi[name] for name in SPECIALS)
        self.unknown = unknown
        self.unk_id = self._unknown_id(unknown)

    def _unknown_id(self, unknown: Optional[str]) -> Optional[int]:
        """``None``: unknown words raise. ``"unk"``: the ``<unk>`` token when the vocabulary has one, else ``<pad>``
        (vocabularies built before ``<unk>`` existed; pad is the neutral token image slots already use). Any other
        value: that vocabulary word."""
        if unknown is None:
            return None
        if unknown == "unk":
            return self.stoi.get("<unk>", self.pad_id)
        if unknown not in self.stoi:
            raise ValueError(f"unknown={unknown!r}: not in the tokenizer's vocabulary; use 'unk' or a vocabulary word")
        return self.stoi[unknown]

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        ids = []
        for w in self.split(text):
            if w not in self.stoi:
                if self.unk_id is not None:
                    ids.append(self.unk_id)
                    continue
                raise ValueError(f"word {w!r} is not in the tokenizer's vocabulary ({len(self)} words); "
                                 "rebuild the tokenizer from the world's vocabulary()")
            ids.append(self.stoi[w])
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        out = []
        for i in ids:
            w = self.itos[int(i)]
            if skip_special and w in SPECIALS:
                continue
            out.append(w)
        text = " ".join(out)
        return re.sub(r" ([;,.?:])", r" \1", text)

    def to_json(self) -> str:
        return json.dumps({"type": "word", "vocab": self.itos})

    @classmethod
    def from_json(cls, text: str, splitter=None, unknown: Optional[str] = None) -> "WordTokenizer":
        data = json.loads(text)
        if data.get("type") != "word" or list(data["vocab"][: len(SPECIALS)]) != list(SPECIALS):
            raise ValueError("not a WordTokenizer file: expected type 'word' and the special tokens first")
        return cls(data["vocab"][len(SPECIALS):], splitter, unknown)
