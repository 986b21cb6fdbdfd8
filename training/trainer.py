"""The training loop: AdamW + warmup/cosine, grad clipping, bf16 autocast on CUDA,
classifier-free condition dropout, EMA, DDP, validation bits/dim, sample grids, atomic
checkpoints and exact resume (weights, optimizer, scheduler, scaler, RNG, sampler position).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import distributed as D
from .config import TrainConfig
from .data import ResumableSampler, make_datasets, make_loader, val_subset
from .images import make_grid, save_png
from .metrics_log import MetricsLog
from .model_setup import build_fresh_model, load_for_resume, weights_fingerprint
from .state import EMA, WarmupCosine, capture_rng, restore_rng

log = logging.getLogger(__name__)


class TrainingStopped(Exception):
    """Raised inside the loop when SIGTERM arrived; latest.pth has been written."""


class Trainer:
    def __init__(self, cfg: TrainConfig, dist_info: D.DistInfo) -> None:
        self.cfg, self.d = cfg, dist_info
        self.dir = Path(cfg.checkpoint_dir)
        self.device = dist_info.device
        if self.d.master:
            self.dir.mkdir(parents=True, exist_ok=True)
            # A save killed mid-write leaves its temp file (save_checkpoint writes
            # .NAME.tmp-PID, then renames); latest.pth itself is intact. Tidy up.
            for stale in self.dir.glob(".*.pth.tmp-*"):
                stale.unlink(missing_ok=True)
                log.info("removed %s left by an interrupted save", stale.name)
        # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
        torch.manual_seed(cfg.seed)
        self.train_ds, self.val_ds = make_datasets(cfg)
        self.stop_requested = False

        resume = self._resume_path()
        train_state: dict[str, Any] | None = None
        if resume is not None:
            if cfg.init_from and self.d.master:
                log.warning("--init_from %s ignored: resuming %s", cfg.init_from, resume)
            self.model, meta, train_state = load_for_resume(resume, cfg, self.d.master)
            self.example_prompts: list[str] = list(meta.get("example_prompts") or [])
        else:
            self.model, self.example_prompts = build_fresh_model(cfg, self.train_ds, self.d)
            if cfg.init_from:
                self._init_from(cfg.init_from)
        self.model.to(self.device)
        self.mcfg = self.model.config
        self.text_cache = self._enable_text_cache()  # before the EMA copies the model

        groups = self.model.optim_groups(cfg.weight_decay)
        self.group_names = [g["name"] for g in groups]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
        self.steps_per_epoch = len(self.train_ds) // (cfg.batch_size * self.d.world_size)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the training split has {len(self.train_ds)} images, fewer than one batch "
                f"({cfg.batch_size} x {self.d.world_size} processes)")
        self.total_steps = cfg.max_steps or cfg.num_epochs * self.steps_per_epoch
        self._schedule_from(0)
        cuda = self.device.type == "cuda"
        self.amp_dtype = None
        if cfg.amp and cuda:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # A scaler only matters for fp16 (pre-Ampere GPUs); bf16 has fp32's exponent range.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype is torch.float16)
        self.ema = EMA(self.model, cfg.ema) if cfg.ema > 0 else None
        self.cond_gen = torch.Generator().manual_seed(cfg.seed + 1_000_003 * (self.d.rank + 1))

        self.step = self.epoch = self.batch_in_epoch = 0
        self.best_val = math.inf
        if train_state is not None:
            self._restore(train_state)

        self.sampler = ResumableSampler(self.train_ds, self.d.world_size, self.d.rank, cfg.seed)
        # Its own generator: the loader's per-epoch seed draw must not consume the global
        # RNG, or a resumed run would drift from an uninterrupted one.
        self.loader = make_loader(self.train_ds, self.sampler, cfg.batch_size, cfg.num_workers,
                                  pin=cuda, generator=torch.Generator().manual_seed(cfg.seed))
        self.ddp_model: torch.nn.Module = self.model
        if self.d.ddp:
            self.ddp_model = DistributedDataParallel(
                self.model, device_ids=[self.device] if cuda else None)
        self.logger = MetricsLog(self.dir, cfg.tensorboard) if self.d.master else None

    def _init_from(self, path: str) -> None:
        from .init_from import init_from_checkpoint

        report = init_from_checkpoint(self.model, path)  # every rank: same file, same weights
        if self.d.master:
            for line in report.lines():
                log.info("%s", line)

    def _enable_text_cache(self) -> Any:
        """A frozen pretrained encoder maps a caption to the same states every time, and
        captions repeat (1,620 distinct in shapes, 100 in CIFAR-100): encode each once."""
        c = self.mcfg
        if not (c.use_text and c.text_encoder == "minilm") or c.finetune_text_encoder:
            return None
        if self.cfg.text_cache_size:
            self.model.text.set_cache_size(self.cfg.text_cache_size)
        return self.model.text

    # ----------------------------------------------------------------- resume / save
    def _resume_path(self) -> Path | None:
        r = self.cfg.resume
        if not r or r.lower() in ("false", "0", "no"):
            return None
        if r.lower() in ("latest", "true", "1", "yes"):
            path = self.dir / "latest.pth"
            if not path.exists():
                if self.d.master:
                    log.warning("--resume: %s does not exist yet; starting fresh", path)
                return None
            return path
        path = Path(r)
        if not path.is_file():
            raise FileNotFoundError(f"--resume: checkpoint {path} does not exist")
        return path

    def _restore(self, ts: dict[str, Any]) -> None:
        if ts.get("model") is not None:  # EMA was on: the file's weights are the EMA ones
            from model.checkpoint import load_model_state

            load_model_state(self.model, ts["model"])  # strict, bar a frozen encoder's
        saved = ts["optimizer"]
        have = len(saved["param_groups"])
        if have < len(self.group_names) and set(self.group_names[have:]) == {"pretrained"}:
            # A frozen encoder unfrozen on resume (load_for_resume): its groups come after
            # the decoder's and start with fresh AdamW moments.
            fresh = self.optimizer.state_dict()["param_groups"][have:]
            saved = {**saved, "param_groups": [*saved["param_groups"], *fresh]}
        self.optimizer.load_state_dict(saved)
        self.scaler.load_state_dict(ts["scaler"])
        if self.ema is not None:
            # The EMA was copied from the file's weights (the EMA ones when EMA was on)
            # before the raw weights above were loaded; only its counter is restored here.
            if ts.get("ema") is not None:
                self.ema.load_state_dict(ts["ema"])
            else:
                log.warning("checkpoint has no EMA state; the EMA starts from the weights")
        self.step, self.epoch = int(ts["step"]), int(ts["epoch"])
        self.batch_in_epoch = int(ts["batch_in_epoch"])
        self._schedule_from(self.step)
        self.best_val = float(ts.get("best_val_bpd", math.inf))
        rngs = ts["rng"]
        if len(rngs) == self.d.world_size:
            restore_rng(rngs[self.d.rank], self.cond_gen)
        elif self.d.master:
            log.warning("checkpoint was written by %d processes, this run has %d: data order "
                        "continues, random draws do not", len(rngs), self.d.world_size)
        if self.d.master:
            log.info("resumed at step %d (epoch %d, batch %d)", self.step, self.epoch,
                     self.batch_in_epoch)

    def _schedule_from(self, step: int) -> None:
        """Put the LR schedule at `step` with *this* run's flags (--lr, --warmup_steps,
        --lr_decay_steps, --max_steps): the schedule is a function of the step, so only the
        position comes from the file and a resume may extend the run's schedule. (Restoring
        the scheduler's saved state brought back the old run's decay length: a run resumed
        to train longer stayed at the old floor.)"""
        cfg = self.cfg
        # A fine-tuned MiniLM's groups have their own peak. Names come from the model, not
        # the groups: loading an optimizer state replaces each group's dict with the file's.
        for group, name in zip(self.optimizer.param_groups, self.group_names, strict=True):
            group["initial_lr"] = cfg.text_encoder_lr if name == "pretrained" else cfg.lr
        decay = cfg.lr_decay_steps or self.total_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupCosine(cfg.warmup_steps, decay, cfg.min_lr_ratio),
            last_epoch=step - 1)  # built at `step`: its constructor steps once

    def _meta(self, val_bpd: float | None) -> dict[str, Any]:
        return {
            "dataset": self.cfg.dataset,
            "steps": self.step,
            "epoch": self.epoch,
            "val_bpd": val_bpd,
            "best_val_bpd": None if math.isinf(self.best_val) else self.best_val,
            "default_guidance_scale": self.cfg.default_guidance_scale,
            "example_prompts": self.example_prompts,
            "train_args": self.cfg.to_dict(),
            "ema": self.ema is not None,
            "ema_decay": self.cfg.ema,
            "world_size": self.d.world_size,
            "class_names": list(getattr(self.train_ds, "class_names", None) or []),
        }

    def save(self, val_bpd: float | None, best: bool = False) -> None:
        """latest.pth (with train_state) and, when `best`, best_model.pth; rank 0 writes.

        All ranks must call it: the RNG states of every rank are gathered into the file.
        """
        from model import save_checkpoint
        from model.checkpoint import checkpoint_state

        rngs = [capture_rng(self.cond_gen)]
        if self.d.ddp:
            rngs = D.gather_objects(rngs[0])
        if not self.d.master:
            return
        served = self.ema.module if self.ema is not None else self.model
        train_state = {
            "model": checkpoint_state(self.model) if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "best_val_bpd": self.best_val, "rng": rngs,
        }
        meta = self._meta(val_bpd)
        save_checkpoint(self.dir / "latest.pth", served, meta=meta, train_state=train_state)
        if best:
            save_checkpoint(self.dir / "best_model.pth", served, meta=meta)
            log.info("step %d: new best val %.4f bits/dim -> best_model.pth", self.step, val_bpd)

    # ----------------------------------------------------------------- evaluation
    @torch.no_grad()
    def validate(self) -> float:
        """Bits/dim of the served weights on a fixed validation subset, averaged over ranks."""
        from model import bits_per_dim

        module = self.ema.module if self.ema is not None else self.model
        was_training = module.training
        module.eval()
        idx = val_subset(self.val_ds, self.cfg.val_samples, self.d.rank, self.d.world_size)
        loader = make_loader(torch.utils.data.Subset(self.val_ds, idx), None,
                             self.cfg.batch_size, 0, pin=False)
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # [sum bpd, count]
        for images, captions, labels in loader:
            logits = self._forward(module, images, captions, labels)
            bpd = bits_per_dim(logits.float(), images.to(self.device))
            total += torch.stack([bpd.double().sum(), torch.tensor(float(len(bpd)),
                                  dtype=torch.float64, device=self.device)])
        if self.d.ddp:
            torch.distributed.all_reduce(total)
        module.train(was_training)
        return float(total[0] / total[1].clamp(min=1))

    @torch.no_grad()
    def sample_grid(self) -> Path | None:
        """Rank 0: a grid of samples, one row per prompt, saved under CHECKPOINT_DIR/samples."""
        module = self.ema.module if self.ema is not None else self.model
        prompts = list(self.cfg.sample_prompts) or self.example_prompts[:4] or [""]
        labels = None
        if self.mcfg.num_classes and not self.mcfg.use_text:  # base model: one row per class
            n = len(self.cfg.sample_prompts) or min(4, self.mcfg.num_classes)
            labels = [i % self.mcfg.num_classes for i in range(n)]
            prompts = (prompts * n)[:n]
        was_training = module.training
        module.eval()
        try:
            imgs = module.generate(prompts, num_images=self.cfg.num_sample_images,
                                   class_labels=labels, seed=self.cfg.seed,
                                   guidance_scale=self.cfg.default_guidance_scale)
        finally:
            module.train(was_training)
        # The file name holds only the step: prompts (dataset text) never reach a path.
        path = self.dir / "samples" / f"step_{self.step:07d}.png"
        return save_png(make_grid(imgs, nrow=self.cfg.num_sample_images), path)

    def evaluate_and_save(self) -> float:
        val = self.validate()
        best = val < self.best_val
        if best:
            self.best_val = val
        sample_path = self.sample_grid() if self.d.master else None
        fingerprints = None
        if self.d.ddp:  # a desync between ranks is a silent bug; record every rank's weights
            fingerprints = D.gather_objects(weights_fingerprint(self.model))
        if self.logger is not None:
            extra: dict[str, Any] = {"rank_weights": fingerprints} if fingerprints else {}
            if self.text_cache is not None:
                extra.update(text_cache_hits=self.text_cache.cache_hits,
                             text_cache_misses=self.text_cache.cache_misses)
            self.logger.write("val", self.step, val_bpd=val, best_val_bpd=self.best_val,
                              epoch=self.epoch, samples=str(sample_path), **extra)
            log.info("step %d epoch %d: val %.4f bits/dim (best %.4f)", self.step, self.epoch,
                     val, self.best_val)
        self.save(val, best=best)
        return val

    # ----------------------------------------------------------------- training
    def _forward(self, module: torch.nn.Module, images: torch.Tensor, captions: list[str],
                 labels: torch.Tensor) -> torch.Tensor:
        # [B, L] each; a text-free model gets a 1-token placeholder it ignores.
        ids, mask = self.model.tokenize(captions)
        ids, mask = ids.to(self.device), mask.to(self.device)
        cls = labels.to(self.device) if self.mcfg.num_classes else None
        ctx = (torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        with ctx:
            return module(images.to(self.device, non_blocking=True), ids, mask, cls)

    def _drop_conditions(self, captions: list[str], labels: torch.Tensor
                         ) -> tuple[list[str], torch.Tensor]:
        """Classifier-free guidance training: the unconditional input is "" and class -1."""
        p = self.cfg.cond_drop_prob
        if p <= 0:
            return captions, labels
        drop = torch.rand(len(captions), generator=self.cond_gen) < p  # [B]
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        return captions, labels.masked_fill(drop, -1)

    def train_step(self, images: torch.Tensor, captions: list[str], labels: torch.Tensor
                   ) -> float:
        """One optimiser step; returns the batch's mean bits/dim."""
        captions, labels = self._drop_conditions(captions, labels)
        logits = self._forward(self.ddp_model, images, captions, labels)  # [B, H*W*C, 256]
        targets = images.to(self.device).permute(0, 2, 3, 1).reshape(len(images), -1).long()
        loss = F.cross_entropy(logits.float().reshape(-1, 256), targets.reshape(-1))  # nats/dim
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.step}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return loss.item() / math.log(2)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.stop_requested = True

    def fit(self) -> int:
        cfg = self.cfg
        old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        tokens_per_step = cfg.batch_size * self.mcfg.seq_len * self.d.world_size
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.d.master,
                   desc="training", unit="step", dynamic_ncols=True)
        last_eval_step = -1
        try:
            while self.step < self.total_steps:
                self.sampler.set_epoch(self.epoch)
                self.sampler.skip = self.batch_in_epoch * cfg.batch_size
                t0 = time.perf_counter()
                for images, captions, labels in self.loader:
                    bpd = self.train_step(images, captions, labels)
                    self.step += 1
                    self.batch_in_epoch += 1
                    dt, t0 = time.perf_counter() - t0, time.perf_counter()
                    bar.update(1)
                    if self.logger is not None:
                        lr = self.scheduler.get_last_lr()[0]
                        self.logger.write("train", self.step, loss=bpd * math.log(2), bpd=bpd,
                                          lr=lr, tokens_per_s=tokens_per_step / max(dt, 1e-9),
                                          epoch=self.epoch)
                        if self.step % cfg.log_every == 0:
                            bar.set_postfix(bpd=f"{bpd:.3f}", lr=f"{lr:.2e}")
                    if cfg.eval_every and self.step % cfg.eval_every == 0:
                        self.evaluate_and_save()
                        last_eval_step = self.step
                    elif cfg.save_freq and self.step % cfg.save_freq == 0:
                        self.save(None)
                    if D.any_rank(self.stop_requested, self.device):
                        raise TrainingStopped
                    if self.step >= self.total_steps:
                        break
                else:  # the epoch ran out (not a max_steps break)
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    if not cfg.eval_every:
                        self.evaluate_and_save()
                        last_eval_step = self.step
            if last_eval_step != self.step:
                self.evaluate_and_save()
        except TrainingStopped:
            self.save(None)
            if self.d.master:
                log.warning("SIGTERM: saved %s at step %d; continue with --resume",
                            self.dir / "latest.pth", self.step)
            return 0
        finally:
            bar.close()
            signal.signal(signal.SIGTERM, old_handler)
            if self.logger is not None:
                self.logger.close()
        if self.d.master:
            log.info("done: %d steps, best val %.4f bits/dim, checkpoints in %s", self.step,
                     self.best_val, self.dir)
        return 0

