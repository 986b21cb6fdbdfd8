"""Pieces of training state that must survive a resume: LR schedule, EMA, RNG states.

Everything returned here is tensors or plain containers, because `latest.pth` is read back
with `torch.load(weights_only=True)` (numpy arrays and Python objects would not pass).
"""

from __future__ import annotations

import copy
import math
import random
from typing import Any

import numpy as np
import torch
from torch import nn


def lr_factor(step: int, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine down to `min_ratio` at `decay_steps`, flat after."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (decay_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Callable for LambdaLR; a class (not a lambda) so the schedule is inspectable."""

    def __init__(self, warmup_steps: int, decay_steps: int, min_ratio: float) -> None:
        self.warmup_steps = warmup_steps
        self.decay_steps = decay_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.warmup_steps, self.decay_steps, self.min_ratio)


class EMA:
    """Exponential moving average of a module's parameters and buffers.

    Kept as a full copy of the module so it can be evaluated, sampled and saved with the
    same code as the raw model. The effective decay ramps up as min(decay, (1+n)/(10+n)) so
    early averages are not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        ema_state = self.module.state_dict()
        # Frozen weights (a pretrained text encoder) never move: averaging them is 22M
        # multiply-adds per step for nothing.
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        for name, value in model.state_dict().items():
            if name in frozen:
                continue
            target = ema_state[name]
            if value.dtype.is_floating_point:
                target.mul_(d).add_(value.detach(), alpha=1.0 - d)
            else:
                target.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        """Counters only: the EMA weights are the checkpoint's model weights (the served
        ones), so storing them again in train_state would double the file for nothing."""
        return {"decay": self.decay, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])


def capture_rng(cond_gen: torch.Generator) -> dict[str, Any]:
    """RNG states of python, numpy, torch (CPU + CUDA) and the condition-dropout generator."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos),
                  int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
        "cond": cond_gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], cond_gen: torch.Generator) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, np_gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    cond_gen.set_state(state["cond"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
