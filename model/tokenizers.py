"""Text tokenizers that serialise into the checkpoint as JSON text.

`word` is the seed's SimpleTokenizer (a vocabulary built from the training captions);
`bpe` is a byte-level BPE trained on the captions with the `tokenizers` library; `file` is
a local tokenizer folder (`--tokenizer_path`: a GPT-2-style `tokenizer.json`, or
`vocab.json` + `merges.txt`), its ids shifted up by 4. All reserve ids 0..3 for
`<pad> <unk> <bos> <eos>`, so an empty prompt encodes to `<bos> <eos>`: the unconditional
input of classifier-free guidance. (`minilm`, the pretrained encoder's WordPiece, lives in
`model/pretrained.py`.)
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch

from .errors import CheckpointError, PromptPixError

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
PAD, UNK, BOS, EOS = range(4)
TOKENIZER_KINDS = ("word", "bpe")  # built from captions; "file" and "minilm" are loaded
_WORD_RE = re.compile(r"\w+|[^\w\s]")


class Tokenizer:
    """Base: subclasses turn one text into ids; this class pads and masks batches."""

    kind: str = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without specials."""
        raise NotImplementedError

    def to_json(self) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`<bos> ids <eos>` per text, truncated to `max_length`, padded to the longest.

        Returns ids LongTensor [B, L] and mask BoolTensor [B, L] (True = a real token).
        """
        rows = []
        for text in texts:
            body = self.encode(text)[: max(0, max_length - 2)]
            rows.append([BOS, *body, EOS])
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), PAD, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = True
        return ids, mask


class WordTokenizer(Tokenizer):
    """Lower-cased words and punctuation; unknown words map to `<unk>`."""

    kind = "word"

    def __init__(self, words: list[str]) -> None:
        self.itos = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int) -> WordTokenizer:
        counts = Counter(w for c in captions for w in _WORD_RE.findall(c.lower()))
        # Most frequent first; ties broken alphabetically so the vocabulary is deterministic.
        ranked = sorted(counts, key=lambda w: (-counts[w], w))
        return cls(ranked[: max(0, vocab_size - len(SPECIALS))])

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(w, UNK) for w in _WORD_RE.findall(text.lower())]

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "vocab": self.itos[len(SPECIALS) :]})


class BPETokenizer(Tokenizer):
    """Byte-level BPE (`tokenizers`): every string encodes, no `<unk>` needed."""

    kind = "bpe"

    def __init__(self, tok: object) -> None:
        self.tok = tok

    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=max(vocab_size, 256 + len(SPECIALS)),
            special_tokens=list(SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator((c.lower() for c in captions), trainer=trainer)
        return cls(tok)

    def __len__(self) -> int:
        return self.tok.get_vocab_size()  # type: ignore[attr-defined]

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text.lower(), add_special_tokens=False).ids)  # type: ignore[attr-defined]

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "tokenizer": self.tok.to_str()})  # type: ignore[attr-defined]


class FileTokenizer(Tokenizer):
    """A tokenizer read from a local folder, used as it is (no lower-casing, no training).

    Its ids are shifted up by len(SPECIALS): a GPT-2 vocabulary has no `<pad> <bos> <eos>`
    of ours and its id 0..3 are ordinary symbols ("!", '"', ...), so sharing them would make
    every prompt's `<bos>` read as "#". Serialised whole into the checkpoint, like `bpe`.
    """

    kind = "file"

    def __init__(self, tok: object, source: str = "") -> None:
        tok.no_padding()  # type: ignore[attr-defined]  # a saved tokenizer may pad/truncate
        tok.no_truncation()  # type: ignore[attr-defined]
        self.tok = tok
        self.source = source

    def __len__(self) -> int:
        return len(SPECIALS) + self.tok.get_vocab_size()  # type: ignore[attr-defined]

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids  # type: ignore[attr-defined]
        return [i + len(SPECIALS) for i in ids]

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "source": self.source,
                           "tokenizer": self.tok.to_str()})  # type: ignore[attr-defined]


def load_tokenizer_dir(path: str | os.PathLike[str]) -> FileTokenizer:
    """A GPT-2-style tokenizer folder: `tokenizer.json`, or `vocab.json` + `merges.txt`."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    folder = Path(path)
    if not folder.is_dir():
        raise PromptPixError(f"tokenizer_path {str(folder)!r} is not a folder")
    tok_json, vocab, merges = (folder / n for n in ("tokenizer.json", "vocab.json", "merges.txt"))
    try:
        if tok_json.is_file():
            tok = HFTokenizer.from_file(str(tok_json))
        elif vocab.is_file() and merges.is_file():
            # What GPT-2's vocab.json + merges.txt mean: byte-level BPE, no prefix space.
            tok = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
        else:
            raise PromptPixError(
                f"tokenizer_path {str(folder)!r} holds neither tokenizer.json nor "
                f"vocab.json + merges.txt")
    except PromptPixError:
        raise
    except Exception as e:  # tokenizers raises its own exception types for malformed files
        raise PromptPixError(f"cannot read the tokenizer in {str(folder)!r}: {e}") from e
    return FileTokenizer(tok, source=folder.name)


def build_tokenizer(kind: str, captions: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a `kind` tokenizer on `captions`: at most `vocab_size` entries, specials included."""
    if kind == "word":
        return WordTokenizer.train(captions, vocab_size)
    if kind == "bpe":
        return BPETokenizer.train(captions, vocab_size)
    raise PromptPixError(f"unknown tokenizer {kind!r}; expected one of {TOKENIZER_KINDS}")


def tokenizer_from_json(text: str) -> Tokenizer:
    """Rebuild a tokenizer saved by `Tokenizer.to_json` (raises CheckpointError if malformed)."""
    try:
        data = json.loads(text)
        kind = data["kind"]
        if kind == "word":
            vocab = data["vocab"]
            if not isinstance(vocab, list) or not all(isinstance(w, str) for w in vocab):
                raise ValueError("'vocab' must be a list of strings")
            return WordTokenizer(vocab)
        if kind == "bpe":
            from tokenizers import Tokenizer as HFTokenizer

            return BPETokenizer(HFTokenizer.from_str(data["tokenizer"]))
        if kind == "file":
            from tokenizers import Tokenizer as HFTokenizer

            return FileTokenizer(HFTokenizer.from_str(data["tokenizer"]), data.get("source", ""))
        if kind == "minilm":
            # A reference to the pretrained encoder's package, whose vocabulary it checks.
            from .pretrained import tokenizer_from_record

            return tokenizer_from_record(data)
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    except PromptPixError as e:  # e.g. the minilm package is missing: say that, not "malformed"
        raise CheckpointError(f"checkpoint tokenizer cannot be rebuilt: {e}") from e
    except (ValueError, KeyError, TypeError, Exception) as e:  # tokenizers raises its own types
        raise CheckpointError(f"checkpoint tokenizer is malformed: {e}") from e
