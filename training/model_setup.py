"""Building the model a run trains: tokenizer and frequency prior from the training split
(fresh run), or the checkpoint's model and train_state (resume)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from . import distributed as D
from .config import TrainConfig
from .data import scan_training_split

log = logging.getLogger(__name__)

# TrainConfig fields that are ModelConfig fields of the same name (ARCHITECTURE.md).
MODEL_FIELDS = ("image_size", "hidden_dim", "num_layers", "text_embed_dim", "num_text_layers",
                "text_nhead", "max_text_length", "use_frequency_prior", "use_text",
                "text_encoder", "finetune_text_encoder", "dropout")


def model_config_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    kw = {name: getattr(cfg, name) for name in MODEL_FIELDS}
    if cfg.use_text and cfg.text_encoder == "minilm":
        from model.config import MINILM_MAX_LENGTH, MINILM_WIDTH

        # MiniLM brings its width and position table: --text_embed_dim / --num_text_layers /
        # --text_nhead describe the scratch encoder only; text_to_ctx maps 384 -> hidden_dim.
        kw["text_embed_dim"] = MINILM_WIDTH
        kw["max_text_length"] = min(cfg.max_text_length, MINILM_MAX_LENGTH)
    return kw


def build_tokenizer_for(cfg: TrainConfig, captions: list[str]) -> Any:
    """The run's tokenizer: MiniLM's WordPiece, a --tokenizer_path folder, or one trained on
    the captions (--tokenizer word|bpe, capped by --vocab_size)."""
    from model.tokenizers import build_tokenizer, load_tokenizer_dir

    if cfg.text_encoder == "minilm":
        from model.pretrained import MiniLMTokenizer

        return MiniLMTokenizer.from_package()
    if cfg.tokenizer_path:
        return load_tokenizer_dir(cfg.tokenizer_path)
    return build_tokenizer(kind=cfg.tokenizer, captions=captions, vocab_size=cfg.vocab_size)


def _distinct(captions: list[str], n: int) -> list[str]:
    seen: list[str] = []
    for c in captions:
        if c and c not in seen:
            seen.append(c)
        if len(seen) == n:
            break
    return seen


def build_fresh_model(cfg: TrainConfig, train_ds: Dataset, d: D.DistInfo
                      ) -> tuple[torch.nn.Module, list[str]]:
    """Scan the training split (rank 0), build tokenizer + model, set the frequency prior.

    Rank 0 alone scans and builds the tokenizer; the others receive the prior and the
    tokenizer's JSON, so every rank holds exactly the same vocabulary and prior.
    """
    from model import ModelConfig, PromptPix
    from model.tokenizers import tokenizer_from_json

    payload: Any = None
    if d.master:
        prior, captions = scan_training_split(
            train_ds, cfg.prior_samples, cfg.seed, cfg.batch_size, cfg.num_workers,
            count_prior=cfg.use_frequency_prior, show=True)
        tok_json = None
        if cfg.use_text:
            tok_json = build_tokenizer_for(cfg, captions).to_json()
        payload = (prior, tok_json, _distinct(captions, 8))
    prior, tok_json, examples = D.broadcast_object(payload)
    tokenizer = tokenizer_from_json(tok_json) if tok_json is not None else None

    kwargs = model_config_kwargs(cfg)
    kwargs["channels"] = int(getattr(train_ds, "channels", 3))
    kwargs["num_classes"] = int(getattr(train_ds, "num_classes", 0)) if cfg.class_cond else 0
    if tokenizer is not None and tokenizer.kind in ("word", "bpe"):
        # --vocab_size caps the vocabulary built from captions; the embedding table is sized
        # to what was actually built (a 50257-row table for a 40-word grammar is dead weight).
        kwargs["vocab_size"] = min(cfg.vocab_size, len(tokenizer))
    elif tokenizer is not None:
        # A loaded vocabulary cannot be capped (its ids are fixed): size the table to it.
        kwargs["vocab_size"] = len(tokenizer)
        if d.master and tokenizer.kind == "file" and len(tokenizer) > cfg.vocab_size:
            log.info("--tokenizer_path: %d entries (over --vocab_size %d, which caps only "
                     "vocabularies built from captions)", len(tokenizer), cfg.vocab_size)
    config = ModelConfig(**kwargs)
    model = PromptPix(config, tokenizer=tokenizer)
    if cfg.use_frequency_prior and prior is not None:
        model.set_frequency_prior(prior)
    if d.master:
        n = sum(p.numel() for p in model.parameters())
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("model: %.2fM parameters (%.2fM trained), %d tokens per image, text=%s "
                 "(%s) classes=%d", n / 1e6, trained / 1e6, config.seq_len, config.use_text,
                 config.text_encoder, config.num_classes)
    return model, examples


def load_for_resume(path: Path, cfg: TrainConfig, master: bool
                    ) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """The checkpoint's model (architecture from the file, not the flags) and its train_state.

    One flag does change a resumed model: `--finetune_text_encoder true` on a checkpoint
    whose MiniLM was frozen unfreezes it (train frozen with the caption cache, then
    fine-tune); the trainer gives its weights fresh AdamW groups.
    """
    from model import CheckpointError, load_checkpoint

    model, meta = load_checkpoint(path, map_location="cpu")
    train_state = meta.get("train_state")
    if not train_state:
        raise CheckpointError(
            f"{path} has no train_state (best_model.pth files omit it); resume from latest.pth")
    unfreeze = bool(cfg.finetune_text_encoder and model.package_state_keys())
    if master:
        saved = model.config.to_dict()
        differ = [f"--{k}" for k, v in model_config_kwargs(cfg).items()
                  if k in saved and saved[k] != v and k != "dropout"
                  and not (unfreeze and k == "finetune_text_encoder")]
        if differ:
            log.warning("resuming %s: the checkpoint's architecture wins over %s",
                        path, ", ".join(differ))
        if meta.get("dataset") not in (None, cfg.dataset):
            log.warning("resuming a %s checkpoint on dataset %s", meta.get("dataset"),
                        cfg.dataset)
    if unfreeze:
        # The file's raw weights leave the frozen encoder out: it is the package's, which
        # load_checkpoint has checked against the recorded SHA-256 and loaded.
        keys = model.package_state_keys()
        encoder = {k: v for k, v in model.state_dict().items() if k in keys}
        model.unfreeze_text_encoder()
        if train_state.get("model") is not None:
            train_state = {**train_state, "model": {**encoder, **train_state["model"]}}
        if master:
            log.info("unfreezing the checkpoint's MiniLM at step %d: it trains at "
                     "--text_encoder_lr and is stored in checkpoints from now on",
                     int(train_state["step"]))
    return model, meta, train_state


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-1 of every parameter and buffer's bytes: equal across ranks iff DDP is in sync."""
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        h.update(raw.numpy().tobytes())
    return h.hexdigest()
