"""Checkpoint format: one `.pth` of tensors and plain containers, loaded `weights_only`.

    {"format_version": int, "config": dict, "tokenizer": JSON str | None,
     "state_dict": {name: tensor}, "meta": dict, "train_state": dict (latest.pth only),
     "text_encoder": dict (minilm only: package, version, weights_sha256)}

A frozen pretrained encoder's weights are not in "state_dict": they are read from the
installed package at load time, after checking its weights' SHA-256 against the recorded
one; every other weight still loads strictly. A fine-tuned encoder's weights are stored.

A hostile file cannot run code (`torch.load(weights_only=True)`); a corrupt, truncated or
mismatched file raises one `CheckpointError` that names the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .config import ModelConfig
from .errors import CheckpointError, PromptPixError
from .network import PromptPix
from .tokenizers import tokenizer_from_json

# 2: the per-pixel decoder (model v2). Version 1 files hold the sub-pixel layout (one
# decoder step per sub-pixel): their weights mean something else, so they are refused.
FORMAT_VERSION = 2
SUBPIXEL_LAYOUT_VERSION = 1
REQUIRED_KEYS = ("format_version", "config", "tokenizer", "state_dict", "meta")
META_DEFAULTS: dict[str, Any] = {
    "dataset": None,
    "steps": 0,
    "val_bpd": None,
    "default_guidance_scale": 1.0,
    "example_prompts": [],
}


def unwrap(model: nn.Module) -> PromptPix:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module  # type: ignore[assignment]
        else:
            break
    if not isinstance(model, PromptPix):
        raise PromptPixError(f"expected a PromptPix model, got {type(model).__name__}")
    return model


def model_id(state_dict: dict[str, torch.Tensor], encoder_sha256: str = "") -> str:
    """Content hash of the weights (names, shapes, dtypes, bytes): 16 hex digits.

    `encoder_sha256` names the frozen pretrained weights a checkpoint leaves out, so two
    decoders trained on different encoders never share an id.
    """
    h = hashlib.sha256()
    if encoder_sha256:
        h.update(f"text_encoder:{encoder_sha256};".encode())
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def checkpoint_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights a checkpoint stores: all but a frozen pretrained encoder's (CPU copies)."""
    m = unwrap(model)
    skip = m.package_state_keys()
    return {k: v.detach().cpu().clone() for k, v in m.state_dict().items() if k not in skip}


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load `state` strictly, except for the frozen encoder's keys, which must be absent.

    Raises CheckpointError naming missing or unexpected keys, or a shape mismatch.
    """
    m = unwrap(model)
    external = m.package_state_keys()
    want = set(m.state_dict()) - external
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
    if missing or unexpected:
        raise CheckpointError(
            f"weights do not match the config: missing {missing[:8]}, unexpected "
            f"{unexpected[:8]}" + (" (a frozen pretrained encoder's weights are never stored)"
                                   if set(unexpected) & external else ""))
    try:
        m.load_state_dict(state, strict=not external)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"weights do not match the config: {e}") from e


def _encoder_record(m: PromptPix) -> dict[str, Any] | None:
    if not (m.config.use_text and m.config.text_encoder == "minilm"):
        return None
    from .pretrained import encoder_record

    return encoder_record()


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    meta: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then rename over `path`."""
    m = unwrap(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "config": m.config.to_dict(),
        "tokenizer": m.tokenizer.to_json() if m.tokenizer is not None else None,
        "state_dict": checkpoint_state(m),
        "meta": dict(meta or {}),
    }
    record = _encoder_record(m)
    if record is not None:
        payload["text_encoder"] = record
    if train_state is not None:
        payload["train_state"] = train_state
    _write_atomic(path, payload)


def _write_atomic(path: Path, payload: dict[str, Any]) -> None:
    """A temporary file in the same folder, fsync, rename over `path`, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)  # the rename itself survives a power cut
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        tmp.unlink(missing_ok=True)


def update_checkpoint_meta(path: str | os.PathLike[str], updates: dict[str, Any]) -> None:
    """Merge plain `updates` into a checkpoint's meta, rewriting the file atomically."""
    path = Path(path)
    payload = _read(path, "cpu")
    payload["meta"] = {**payload["meta"], **updates}
    _write_atomic(path, payload)


def _read(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses any global that is not a tensor or plain container.
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain "
            f"containers (a hostile or foreign file?): {str(e).splitlines()[0]}"
        ) from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (corrupt or truncated?): {e}"
        ) from e
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} is not a promptpix checkpoint (top level is not a dict)")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{path} is not a promptpix checkpoint: missing keys {missing}")
    if payload["format_version"] == SUBPIXEL_LAYOUT_VERSION:
        raise CheckpointError(
            f"{path} has format_version 1: the old sub-pixel layout (one decoder step per "
            f"sub-pixel), which this code (format_version {FORMAT_VERSION}, one step per pixel) "
            "cannot load; retrain it with this version (see docs/models.md)"
        )
    if payload["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {payload['format_version']!r}; "
            f"this code reads version {FORMAT_VERSION}"
        )
    return payload


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[PromptPix, dict[str, Any]]:
    """Rebuild the model (eval mode) and its meta from a checkpoint written by save_checkpoint."""
    path = Path(path)
    payload = _read(path, map_location)
    if not isinstance(payload["config"], dict):
        raise CheckpointError(f"{path}: config must be a dict")
    config = ModelConfig.from_dict(payload["config"])
    tok_json = payload["tokenizer"]
    tokenizer = tokenizer_from_json(tok_json) if tok_json is not None else None
    try:
        model = PromptPix(config, tokenizer)
    except PromptPixError as e:
        raise CheckpointError(f"{path}: {e}") from e
    state = payload["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: state_dict must be a dict")
    encoder_sha = _check_encoder(path, model, payload.get("text_encoder"))
    try:
        load_model_state(model, state)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    model.to(map_location).eval()
    meta = {**META_DEFAULTS, **payload["meta"]}
    meta.update(
        config=config.to_dict(),
        tokenizer=tokenizer.kind if tokenizer is not None else None,
        model_id=model_id(state, encoder_sha),
        format_version=payload["format_version"],
        parameters=model.num_parameters(),
    )
    if payload.get("text_encoder") is not None:
        meta["text_encoder"] = payload["text_encoder"]
    if "train_state" in payload:
        meta["train_state"] = payload["train_state"]
    model.default_guidance_scale = float(meta["default_guidance_scale"])
    return model, meta


def _check_encoder(path: Path, model: PromptPix, record: Any) -> str:
    """For a frozen pretrained encoder: the installed weights must be the recorded ones.

    Returns their SHA-256 (part of the model id), or "" when the file holds every weight.
    """
    if not model.package_state_keys():
        return ""
    from .pretrained import weights_sha256

    if not isinstance(record, dict) or not record.get("weights_sha256"):
        raise CheckpointError(f"{path}: a minilm checkpoint must record its text_encoder")
    have = weights_sha256()
    if record["weights_sha256"] != have:
        raise CheckpointError(
            f"{path} was trained on {record.get('package')} {record.get('version')} whose "
            f"weights have sha256 {record['weights_sha256'][:12]}…, but the installed "
            f"package's weights have sha256 {have[:12]}…; install the recorded version")
    return have
