"""promptpix's model: an exactly causal, text-conditioned autoregressive pixel transformer.

Public API (the worker, benchmarks and outside checks use only this)::

    model, meta = load_checkpoint(path, map_location="cpu")
    logits = model.forward_logits(images_uint8_BCHW, prompts)   # [B, H*W*C, 256]
    bpd = model.nll(images_uint8_BCHW, prompts)                 # [B] bits per dimension
    imgs = model.generate(prompts, num_images=1, seed=0)        # uint8 [N, C, H, W]
    imgs, bpd = model.generate(prompts, seed=0, return_bits=True)
    out = generate_batch(model, [SampleRequest(...), ...], decoder=None)  # several requests
    decoder, why = compiled_decoder(model, enabled=True)        # StaticDecoder or None
    x = prepare_image(png_bytes, image_size, channels)          # uint8 [C, H, W], as training
    save_checkpoint(path, model, meta=None)
"""

from .checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from .compile import StaticDecoder, compiled_decoder
from .config import ModelConfig
from .errors import CheckpointError, GenerationStopped, PromptPixError
from .images import prepare_image
from .network import PromptPix, bits_per_dim
from .sampling import SampleRequest, generate_batch

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "GenerationStopped",
    "ModelConfig",
    "PromptPix",
    "PromptPixError",
    "SampleRequest",
    "StaticDecoder",
    "bits_per_dim",
    "compiled_decoder",
    "generate_batch",
    "load_checkpoint",
    "prepare_image",
    "save_checkpoint",
]
