"""`--init_from PATH`: start a fresh run from another checkpoint's weights.

The guide's workflow trains the base model (`train.py`: no text) first, then the text model.
Every weight of the new model whose name and shape match one in the file is copied; the
rest (the text encoder and its projections, a class table of another size...) keep their
fresh initialisation. The file is read by `model.load_checkpoint` (`weights_only=True`, and
its format check refuses checkpoints of another token layout or format version).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# The scratch text encoder's weights: token ids mean nothing under another vocabulary, so
# they are taken only from a file whose tokenizer is the same one.
TEXT_PREFIX = "text."


@dataclass
class InitReport:
    """What `init_from_checkpoint` copied, left fresh, and found only in the file."""

    path: Path
    loaded: list[str] = field(default_factory=list)
    loaded_params: int = 0
    total_params: int = 0
    fresh: dict[str, str] = field(default_factory=dict)  # name -> why
    unused: list[str] = field(default_factory=list)  # in the file, not in this model

    def lines(self) -> list[str]:
        """Human-readable summary, weights grouped by their top-level module."""
        def groups(names: list[str]) -> str:
            counts = Counter(n.split(".")[0] for n in names)
            return ", ".join(f"{k} ({v})" if v > 1 else k for k, v in counts.items()) or "none"

        out = [f"--init_from {self.path}: loaded {len(self.loaded)} of "
               f"{len(self.loaded) + len(self.fresh)} weights ({self.loaded_params / 1e6:.2f}M "
               f"of {self.total_params / 1e6:.2f}M parameters): {groups(self.loaded)}"]
        reasons: dict[str, list[str]] = {}
        for name, why in self.fresh.items():
            reasons.setdefault(why, []).append(name)
        for why, names in reasons.items():
            out.append(f"--init_from: freshly initialised, {why}: {groups(names)}")
        if self.unused:
            out.append(f"--init_from: in the file but not in this model: {groups(self.unused)}")
        return out


def _layout(config: dict) -> dict:
    """The config entries that fix what token position t means (image side, channels, and
    any layout field the model declares)."""
    return {k: v for k, v in config.items()
            if k in ("image_size", "channels") or "layout" in k}


def init_from_checkpoint(model: torch.nn.Module, path: str | Path) -> InitReport:
    """Copy into `model` every weight of checkpoint `path` with the same name and shape.

    Raises CheckpointError (from `load_checkpoint`) for an unreadable file or another
    format version, and when the file's token layout (image size, channels) differs.
    """
    from model import CheckpointError, load_checkpoint

    path = Path(path)
    source, _ = load_checkpoint(path, map_location="cpu")
    mine, theirs = _layout(model.config.to_dict()), _layout(source.config.to_dict())
    if mine != theirs:
        raise CheckpointError(
            f"--init_from {path}: its token layout {theirs} differs from this run's {mine}; "
            f"expected a checkpoint of the same image size and channels")
    same_tokenizer = (model.tokenizer is not None and source.tokenizer is not None
                      and model.tokenizer.to_json() == source.tokenizer.to_json())
    src = source.state_dict()
    dst = model.state_dict()
    params = dict(model.named_parameters())
    report = InitReport(path=path, total_params=sum(p.numel() for p in params.values()))
    frozen = model.package_state_keys()
    with torch.no_grad():
        for name, tensor in dst.items():
            if name in frozen:
                continue  # a frozen pretrained encoder: the package's weights, never copied
            if name not in params and name not in src:
                continue  # non-persistent bookkeeping buffers
            if name not in src:
                report.fresh[name] = "not in the file"
            elif src[name].shape != tensor.shape:
                report.fresh[name] = "other shape in the file"
            elif name.startswith(TEXT_PREFIX) and not same_tokenizer:
                report.fresh[name] = "the file's text encoder has another tokenizer"
            else:
                tensor.copy_(src[name])
                report.loaded.append(name)
                if name in params:
                    report.loaded_params += params[name].numel()
    report.unused = sorted(set(src) - set(dst))
    return report
