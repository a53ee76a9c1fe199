"""Text lines → token ids for a BERT-style model: a WordPiece tokenizer read from ``vocab.txt`` (one
token per line) or from a Hugging Face ``tokenizer.json`` whose model is WordPiece (read as JSON)."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fitonnx.errors import DataError
from fitonnx.model.data import Dataset
from fitonnx.model.graph import InputSpec
from fitonnx.model.sources.common import Built, complete, pick_input

DEFAULT_MAX_LENGTH = 128
MAX_WORD_CHARS = 100


@dataclass(frozen=True)
class WordPiece:
    """BERT's tokenizer: whitespace and punctuation split (lowercased and accent-stripped when
    ``lowercase``), then greedy longest-match sub-words with the ``##`` continuation prefix."""

    vocab: Mapping[str, int]
    lowercase: bool = True
    unk: str = "[UNK]"
    prefix: str = "##"

    def words(self, text: str) -> list[str]:
        if self.lowercase:
            text = "".join(ch for ch in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(ch) != "Mn")
        out: list[str] = []
        for chunk in text.split():
            word = ""
            for ch in chunk:
                if unicodedata.category(ch).startswith("P") or (ch.isascii() and not ch.isalnum()):
                    out.extend([word, ch] if word else [ch])
                    word = ""
                else:
                    word += ch
            if word:
                out.append(word)
        return out

    def pieces(self, word: str) -> list[str]:
        if len(word) > MAX_WORD_CHARS:
            return [self.unk]
        out, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                if piece in self.vocab:
                    break
                end -= 1
            if end == start:
                return [self.unk]
            out.append(piece)
            start = end
        return out

    def encode(self, text: str) -> list[int]:
        unk = self.vocab.get(self.unk, 0)
        return [self.vocab.get(p, unk) for w in self.words(text) for p in self.pieces(w)]


def load_tokenizer(path: str | Path, lowercase: bool | None = None) -> WordPiece:
    """A ``vocab.txt`` or a WordPiece ``tokenizer.json``; ``lowercase`` None: the file's own setting
    (tokenizer.json) or whether the vocabulary has no upper-case token (vocab.txt)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"expected a tokenizer file (vocab.txt or tokenizer.json) at {str(path)!r}; no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        spec = json.loads(text)
        model = spec.get("model") or {}
        if model.get("type") != "WordPiece":
            raise DataError(
                f"expected a WordPiece tokenizer.json; {str(path)!r} holds a {model.get('type')!r} model",
                hint="write a data-loader script (--data-loader-script) that runs your tokenizer",
            )
        norm = spec.get("normalizer") or {}
        lower = norm.get("lowercase", True) if lowercase is None else lowercase
        return WordPiece(
            dict(model["vocab"]), lower, model.get("unk_token", "[UNK]"), model.get("continuing_subword_prefix", "##")
        )
    vocab = {tok: i for i, tok in enumerate(text.splitlines()) if tok}
    if lowercase is None:
        lowercase = not any(t.lower() != t for t in vocab if not t.startswith("["))
    return WordPiece(vocab, lowercase)


def _roles(specs: Mapping[str, InputSpec], input_name: str | None) -> tuple[InputSpec, dict[str, str]]:
    """The token-id input, and the other integer inputs as 'mask' or 'type' by their names."""
    ints = {n: s for n, s in specs.items() if np.issubdtype(s.dtype, np.integer)}

    def is_ids(s: InputSpec) -> bool:
        n = s.name.lower()
        return s.name in ints and ("ids" in n or n in ("input", "tokens")) and "type" not in n and "pos" not in n

    ids = pick_input(specs, input_name, "token ids", lambda s: is_ids(s) or (len(ints) == 1 and s.name in ints))
    roles = {}
    for name in ints:
        low = name.lower()
        if "mask" in low:
            roles[name] = "mask"
        elif "type" in low or "segment" in low:
            roles[name] = "type"
    return ids, roles


def build_text(
    specs: Mapping[str, InputSpec],
    lines_file: str | Path,
    tokenizer: WordPiece,
    *,
    max_length: int | None = None,
    input_name: str | None = None,
    limit: int | None = None,
    fill: Mapping[str, float] | None = None,
) -> Built:
    """One sample per non-empty line: [CLS] tokens [SEP], padded with [PAD] (mask 0) to one length."""
    path = Path(lines_file)
    if not path.is_file():
        raise DataError(f"expected a text file (one sample per line) at {str(path)!r}; no such file")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()][:limit]
    if not lines:
        raise DataError(f"expected non-empty lines in {str(path)!r}; found none")
    ids_spec, roles = _roles(specs, input_name)
    fixed = ids_spec.shape[-1] if ids_spec.rank >= 2 else None
    v = tokenizer.vocab
    cls, sep = [v[t] for t in ("[CLS]",) if t in v], [v[t] for t in ("[SEP]",) if t in v]
    seqs = [cls + tokenizer.encode(ln) + sep for ln in lines]
    longest = max(len(s) for s in seqs)
    length = fixed or max_length or min(longest, DEFAULT_MAX_LENGTH)
    cut = sum(len(s) > length for s in seqs)
    seqs = [s[: length - len(sep)] + sep if len(s) > length else s for s in seqs]
    pad = v.get("[PAD]", 0)
    ids = np.array([s + [pad] * (length - len(s)) for s in seqs], dtype=ids_spec.dtype)
    mask = np.array([[1] * len(s) + [0] * (length - len(s)) for s in seqs])
    arrays = {ids_spec.name: ids}
    for name, role in roles.items():
        if name != ids_spec.name and specs[name].rank == ids_spec.rank:
            arrays[name] = (mask if role == "mask" else np.zeros_like(mask)).astype(specs[name].dtype)
    arrays, filled = complete(arrays, specs, fill or {})
    unk = int(np.count_nonzero(ids == v.get(tokenizer.unk, -1)))
    notes = [
        f"{len(v)}-token WordPiece vocabulary, lowercase {tokenizer.lowercase}; sequences of {length} "
        f"tokens (longest line {longest}), {unk} unknown tokens",
        *[f"input {n!r}: {r}" for n, r in roles.items() if n in arrays],
        *filled,
    ]
    if cut:
        notes.append(f"{cut} lines cut to {length} tokens (--max-length to change)")
    return Built(Dataset(arrays=arrays, source=str(path)), "text", 1, (), tuple(notes))
