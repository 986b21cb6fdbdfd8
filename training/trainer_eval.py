"""The trainer's evaluations: validation bits/dim and the sample grid, with progress (an ETA)
and stoppable: a stop asked for during them (SIGTERM, Ctrl-C) ends them at once in a
single process, after the current batch / image row under DDP (the ranks must agree)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from . import distributed as D
from .data import make_loader, val_subset
from .images import make_grid, save_png
from .progress import progress
from .stopping import TrainingStopped

log = logging.getLogger(__name__)


class EvalMixin:
    """`validate`, `sample_grid` and `evaluate_and_save` of `training.trainer.Trainer`."""

    # Set by Trainer.__init__ (declared for readers and type checkers).
    cfg: Any
    d: D.DistInfo
    device: torch.device
    dir: Path
    model: Any
    ema: Any
    mcfg: Any
    val_ds: Any
    stop: Any
    logger: Any
    text_cache: Any
    example_prompts: list[str]
    step: int
    epoch: int
    best_val: float
    best_step: int | None
    eval_pending: bool

    @property
    def val_samples(self) -> int:
        """--val_samples, or its device default: a CPU validates on 100 images, not 1000."""
        return self.cfg.val_samples or (1000 if self.device.type == "cuda" else 100)

    @property
    def num_sample_images(self) -> int:
        """--num_sample_images, or its device default: 1 a prompt on a CPU, 4 on a GPU."""
        return self.cfg.num_sample_images or (4 if self.device.type == "cuda" else 1)

    def _served(self) -> Any:
        return self.ema.module if self.ema is not None else self.model

    @torch.no_grad()
    def validate(self) -> float:
        """Bits/dim of the served weights on a fixed validation subset, averaged over ranks.

        Raises TrainingStopped (on every rank together) when a stop is asked for during it.
        """
        from model import bits_per_dim

        module = self._served()
        was_training = module.training
        module.eval()
        idx = val_subset(self.val_ds, self.val_samples, self.d.rank, self.d.world_size)
        loader = make_loader(torch.utils.data.Subset(self.val_ds, idx), None,
                             self.cfg.batch_size, 0, pin=False)
        # [sum of bpd, images, ranks that stopped]
        total = torch.zeros(3, dtype=torch.float64, device=self.device)
        bar = progress(len(loader), "validation", "batch", enabled=self.d.master, leave=False)
        try:
            with self.stop.interruptible(not self.d.ddp):
                for images, captions, labels in loader:
                    if self.stop.requested:  # DDP: leave together at the all-reduce below
                        total[2] = 1
                        break
                    logits = self._forward(module, images, captions, labels)
                    bpd = bits_per_dim(logits.float(), images.to(self.device))
                    total[0] += bpd.double().sum()
                    total[1] += len(bpd)
                    bar.update(1)
        finally:
            bar.close()
            module.train(was_training)
        if self.d.ddp:
            torch.distributed.all_reduce(total)
        if total[2] > 0:
            raise TrainingStopped
        return float(total[0] / total[1].clamp(min=1))

    @torch.no_grad()
    def sample_grid(self) -> tuple[Path, torch.Tensor]:
        """Rank 0: a grid of samples, one row per prompt, saved under CHECKPOINT_DIR/samples.

        Raises TrainingStopped when a stop is asked for during it.
        """
        from model import GenerationStopped

        module = self._served()
        prompts = list(self.cfg.sample_prompts) or self.example_prompts[:4] or [""]
        labels = None
        if self.mcfg.num_classes and not self.mcfg.use_text:  # base model: one row per class
            n = len(self.cfg.sample_prompts) or min(4, self.mcfg.num_classes)
            labels = [i % self.mcfg.num_classes for i in range(n)]
            prompts = (prompts * n)[:n]
        n_images = len(prompts) * self.num_sample_images
        bar = progress(self.mcfg.image_size, f"sample grid ({n_images} images)", "row",
                       leave=False)
        shown = [0]

        def on_row(rows_done: int, rows_total: int, partial: torch.Tensor) -> None:
            bar.update(rows_done - shown[0])
            shown[0] = rows_done

        was_training = module.training
        module.eval()
        try:
            with self.stop.interruptible(not self.d.ddp):
                imgs = module.generate(prompts, num_images=self.num_sample_images,
                                       class_labels=labels, seed=self.cfg.seed,
                                       guidance_scale=self.cfg.default_guidance_scale,
                                       progress=on_row, should_stop=lambda: self.stop.requested)
        except GenerationStopped as e:
            raise TrainingStopped from e
        finally:
            bar.close()
            module.train(was_training)
        grid = make_grid(imgs, nrow=self.num_sample_images)
        # The file name holds only the step: prompts (dataset text) never reach a path.
        path = self.dir / "samples" / f"step_{self.step:07d}.png"
        return save_png(grid, path), grid

    def evaluate_and_save(self) -> float:
        """Validate, draw the sample grid (rank 0), log, and save latest.pth (+ best)."""
        from .model_setup import weights_fingerprint

        self._flush_metrics()  # the interval's losses first: never save non-finite weights
        self.eval_pending = True  # until saved: a stop now makes --resume evaluate first
        t0 = time.perf_counter()
        val = self.validate()
        val_s = time.perf_counter() - t0
        best = val < self.best_val
        if best:
            self.best_val, self.best_step = val, self.step
        stopped, sample_path, grid = False, None, None
        t1 = time.perf_counter()
        if self.d.master:
            try:
                sample_path, grid = self.sample_grid()
            except TrainingStopped:
                stopped = True  # validation finished: its result and best_model.pth count
        grid_s = time.perf_counter() - t1
        if self.d.ddp:
            stopped = D.any_rank(stopped or self.stop.requested, self.device)
        fingerprints = None
        if self.d.ddp:  # a desync between ranks is a silent bug; record every rank's weights
            fingerprints = D.gather_objects(weights_fingerprint(self.model))
        if self.logger is not None:
            extra: dict[str, Any] = {"rank_weights": fingerprints} if fingerprints else {}
            if self.text_cache is not None:
                extra.update(text_cache_hits=self.text_cache.cache_hits,
                             text_cache_misses=self.text_cache.cache_misses)
            self.logger.write("val", self.step, val_bpd=val, best_val_bpd=self.best_val,
                              epoch=self.epoch, samples=str(sample_path), val_seconds=val_s,
                              sample_seconds=grid_s, **extra)
            if grid is not None:
                self.logger.image("samples", self.step, grid)
            n_val = min(self.val_samples, len(self.val_ds))
            log.info("step %d epoch %d: val %.4f bits/dim (best %.4f); validation of %d images "
                     "took %.1f s, the sample grid %.1f s", self.step, self.epoch, val,
                     self.best_val, n_val, val_s, grid_s)
        self.eval_pending = False
        self.save(val, best=best)
        if stopped:
            raise TrainingStopped
        return val
