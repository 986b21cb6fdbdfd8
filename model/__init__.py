"""promptpix's model: an exactly causal, text-conditioned autoregressive pixel transformer.

Public API (the worker, benchmarks and outside checks use only this)::

    model, meta = load_checkpoint(path, map_location="cpu")
    logits = model.forward_logits(images_uint8_BCHW, prompts)   # [B, H*W*C, 256]
    bpd = model.nll(images_uint8_BCHW, prompts)                 # [B] bits per dimension
    imgs = model.generate(prompts, num_images=1, seed=0)        # uint8 [N, C, H, W]
    save_checkpoint(path, model, meta=None)
"""

from .checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from .config import ModelConfig
from .errors import CheckpointError, GenerationStopped, PromptPixError
from .network import PromptPix, bits_per_dim

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "GenerationStopped",
    "ModelConfig",
    "PromptPix",
    "PromptPixError",
    "bits_per_dim",
    "load_checkpoint",
    "save_checkpoint",
]
