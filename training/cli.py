"""Command-line entry points: `train_llm_prompt.py`, `train.py`, `generate_llm_prompt.py`
and `promptpix train|generate`. Each takes argv and returns an exit status."""

from __future__ import annotations

import argparse
import logging
import math
import os
import secrets
import sys
from typing import Any

from .config import TrainConfig, parse_train_args

log = logging.getLogger(__name__)

# train.py: the base model of the guide's workflow: no text, class labels when present.
BASE_DEFAULTS: dict[str, Any] = {
    "checkpoint_dir": "./checkpoints",
    "use_text": False,
    "class_cond": True,
}


def _setup_logging(master: bool = True) -> None:
    logging.basicConfig(
        level=logging.INFO if master else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def _check_model_config(cfg: TrainConfig, prog: str) -> None:
    """Let ModelConfig judge the shapes now, as a usage error, not a traceback later."""
    from model import ModelConfig, PromptPixError

    from .model_setup import model_config_kwargs

    try:
        ModelConfig(**model_config_kwargs(cfg))
    except PromptPixError as e:
        print(f"usage error: {prog}: {e}", file=sys.stderr)
        raise SystemExit(2) from e


def run_training(cfg: TrainConfig) -> int:
    """One process of a run (torchrun/spawned rank, or the only process)."""
    from . import distributed as D
    from .trainer import Trainer

    d = D.setup(cfg.device)
    _setup_logging(d.master)
    try:
        return Trainer(cfg, d).fit()
    finally:
        D.cleanup()


def _train(argv: list[str] | None, prog: str, description: str,
           defaults: dict[str, Any] | None) -> int:
    cfg = parse_train_args(argv, prog=prog, description=description, defaults=defaults)
    _check_model_config(cfg, prog)
    _setup_logging()
    from model import PromptPixError

    from . import distributed as D

    try:
        if cfg.world_size > 1 and "RANK" not in os.environ:
            log.info("spawning %d processes", cfg.world_size)
            D.spawn(run_training, cfg, cfg.world_size)
            return 0
        launched = int(os.environ.get("WORLD_SIZE", 1))
        if "RANK" in os.environ and cfg.world_size > 1 and launched != cfg.world_size:
            log.warning("--world_size %d ignored: torchrun set WORLD_SIZE=%s", cfg.world_size,
                        os.environ.get("WORLD_SIZE"))
        rc = run_training(cfg)
        if "RANK" in os.environ:  # a torchrun rank
            D.exit_rank(rc)
        return rc
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (PromptPixError, FileNotFoundError, ValueError, FloatingPointError) as e:
        # expected: report, no trace
        print(f"error: {e}", file=sys.stderr)
        return 1


def train_main(argv: list[str] | None = None) -> int:
    """`train_llm_prompt.py` / `promptpix train`: the text-conditioned model."""
    return _train(argv, "train_llm_prompt.py",
                  "Train a text-conditioned autoregressive pixel model (promptpix).", None)


def train_base_main(argv: list[str] | None = None) -> int:
    """`train.py`: the base model (no text; class labels when the dataset has them)."""
    return _train(argv, "train.py",
                  "Train the base (unconditional / class-conditional) pixel model.",
                  BASE_DEFAULTS)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _guidance(text: str) -> float:
    value = float(text)
    if not (value >= 1 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be >= 1 (1: no guidance), got {text}")
    return value


def _top_p(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def generate_parser(prog: str = "generate_llm_prompt.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Sample PNGs from a promptpix checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="./checkpoints_llm/best_model.pth",
                   help="checkpoint file (.pth)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompt_file", help="text file, one prompt a line (blank lines skipped)")
    p.add_argument("--output_dir", default="./generated_llm", help="where PNGs are written")
    p.add_argument("--num_images", type=_positive_int, default=1, help="images per prompt")
    p.add_argument("--temperature", type=_positive_float, default=1.0,
                   help="sampling temperature (> 0; lower is more conservative)")
    p.add_argument("--top_k", type=int, default=0, help="keep the k likeliest values (0: off)")
    p.add_argument("--top_p", type=_top_p, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--guidance_scale", type=_guidance, default=None,
                   help="classifier-free guidance (default: the checkpoint's; 1: none)")
    p.add_argument("--seed", type=int, default=None,
                   help="image i of each prompt uses seed+i (default: random, printed)")
    p.add_argument("--class_label", type=int, default=-1,
                   help="class id for class-conditioned checkpoints (-1: none)")
    p.add_argument("--batch_size", type=_positive_int, default=8, help="images per forward")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return p


def generate_main(argv: list[str] | None = None) -> int:
    """`generate_llm_prompt.py` / `promptpix generate`."""
    parser = generate_parser()
    args = parser.parse_args(argv)
    if args.top_k < 0:
        parser.error(f"argument --top_k: must be >= 0, got {args.top_k}")
    _setup_logging()
    from model import PromptPixError, load_checkpoint

    from .distributed import resolve_device
    from .generate import SampleOptions, generate_to_dir, read_prompt_file

    try:
        if args.prompt_file:
            try:
                prompts = read_prompt_file(args.prompt_file)
            except UnicodeDecodeError as e:
                parser.error(f"argument --prompt_file: {args.prompt_file} is not UTF-8 text "
                             f"({e})")
            if not prompts:
                parser.error(f"argument --prompt_file: {args.prompt_file} holds no prompts")
        elif args.prompt is not None:
            prompts = [args.prompt]
        else:
            prompts = []
        device = resolve_device(args.device)
        model, meta = load_checkpoint(args.checkpoint, map_location="cpu")
        if not prompts:
            if model.config.use_text:
                parser.error("one of --prompt or --prompt_file is required")
            prompts = [""]
        if args.class_label >= model.config.num_classes > 0 or (
                args.class_label >= 0 and not model.config.num_classes):
            parser.error(f"argument --class_label: {args.class_label} is not a class of this "
                         f"checkpoint ({model.config.num_classes} classes)")
        model.to(device)
        seed = args.seed if args.seed is not None else secrets.randbits(31)
        opts = SampleOptions(num_images=args.num_images, batch_size=args.batch_size,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             guidance_scale=args.guidance_scale, seed=seed,
                             class_label=args.class_label)
        paths = generate_to_dir(model, prompts, args.output_dir, opts)
    except (PromptPixError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    gs = args.guidance_scale if args.guidance_scale is not None else meta.get(
        "default_guidance_scale", 1.0)
    print(f"wrote {len(paths)} PNGs to {args.output_dir} (seed {seed}, guidance {gs})")
    return 0
