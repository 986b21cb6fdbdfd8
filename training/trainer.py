"""The training loop: AdamW + warmup/cosine, grad clipping, bf16 autocast on CUDA,
classifier-free condition dropout, EMA, DDP, validation bits/dim, sample grids, atomic
checkpoints and exact resume (weights, optimizer, scheduler, scaler, RNG, sampler position).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from . import distributed as D
from .config import TrainConfig
from .data import ResumableSampler, make_datasets, make_loader
from .metrics_log import MetricsLog
from .model_setup import build_fresh_model, load_for_resume
from .progress import progress
from .state import EMA, WarmupCosine, capture_rng, restore_rng
from .stopping import StopSignals, TrainingStopped
from .summary import RunSummary
from .trainer_eval import EvalMixin

log = logging.getLogger(__name__)


def drop_conditions(captions: list[str], labels: torch.Tensor, p: float, q: float,
                    gen: torch.Generator) -> tuple[list[str], torch.Tensor]:
    """Classifier-free guidance training: with probability `p` an example's condition is
    dropped (caption "" and class -1, the unconditional input); with probability `q` a
    kept one also loses its class label (the caption stays), so that a class model follows
    a caption alone. Draws nothing from `gen` for a probability of 0."""
    if p > 0:
        drop = torch.rand(len(captions), generator=gen) < p  # [B]
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        labels = labels.masked_fill(drop, -1)
    if q > 0:
        labels = labels.masked_fill(torch.rand(len(captions), generator=gen) < q, -1)
    return captions, labels


class Trainer(EvalMixin):
    def __init__(self, cfg: TrainConfig, dist_info: D.DistInfo) -> None:
        self.cfg, self.d = cfg, dist_info
        self.dir = Path(cfg.checkpoint_dir)
        self.device = dist_info.device
        resume = self._resume_path()
        if resume is None:
            self._refuse_overwrite()
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
        self.stop = StopSignals(announce=self.d.master)

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
        self.best_step: int | None = None
        self.eval_pending = False  # a stop interrupted an evaluation: --resume redoes it
        self.last_save_step = self.last_eval_step = -1
        self.bar = progress(0, "", "", enabled=False)  # fit() makes the real one
        # This log interval's per-step losses (nats/dim), still on the device: read once
        # per interval, so the device is waited on there and not at every step.
        self._losses: list[torch.Tensor] = []
        self._interval_t0 = time.perf_counter()
        self._stop_agreed = False
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

    def _refuse_overwrite(self) -> None:
        """A fresh run's first evaluation would replace a stored run's latest.pth and
        best_model.pth (the served model), and append to its log: refuse instead."""
        from model import CheckpointError

        stored = [n for n in ("latest.pth", "best_model.pth") if (self.dir / n).is_file()]
        if stored:
            how = ("continue that run with --resume, " if "latest.pth" in stored
                   else "move it away, ")
            raise CheckpointError(
                f"{self.dir} already holds {' and '.join(stored)} of an earlier run, which a "
                f"fresh run would overwrite; {how}or pass another --checkpoint_dir")

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
        best_step = ts.get("best_step")
        self.best_step = None if best_step is None else int(best_step)
        self.eval_pending = bool(ts.get("eval_pending", False))
        self.last_save_step = self.step
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

        self._flush_metrics()  # never save weights a non-finite loss has reached
        self.last_save_step = self.step
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
            "best_val_bpd": self.best_val, "best_step": self.best_step,
            "eval_pending": self.eval_pending, "rng": rngs,
        }
        meta = self._meta(val_bpd)
        save_checkpoint(self.dir / "latest.pth", served, meta=meta, train_state=train_state)
        if best:
            save_checkpoint(self.dir / "best_model.pth", served, meta=meta)
            log.info("step %d: new best val %.4f bits/dim -> best_model.pth", self.step, val_bpd)

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
        return drop_conditions(captions, labels, self.cfg.cond_drop_prob,
                               self.cfg.label_drop_prob, self.cond_gen)

    def train_step(self, images: torch.Tensor, captions: list[str], labels: torch.Tensor
                   ) -> None:
        """One optimiser step. Its loss stays on the device until the log interval: reading
        it (or checking it is finite) here would wait for the device at every step."""
        captions, labels = self._drop_conditions(captions, labels)
        logits = self._forward(self.ddp_model, images, captions, labels)  # [B, H*W*C, 256]
        targets = images.to(self.device).permute(0, 2, 3, 1).reshape(len(images), -1).long()
        loss = F.cross_entropy(logits.float().reshape(-1, 256), targets.reshape(-1))  # nats/dim
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
        self._losses.append(loss.detach())

    def _flush_metrics(self) -> None:
        """End the log interval: the one wait on the device (and, under DDP, the one
        all-reduce) of the interval. Checks the losses are finite, agrees on a stop between
        ranks, writes one record (mean loss of the interval) and the progress numbers."""
        if not self._losses:
            return
        n = len(self._losses)
        losses = torch.stack(self._losses).float()  # [n] nats/dim, this rank
        self._losses = []
        packed = torch.stack([losses.sum(), losses.new_tensor(float(self.stop.requested))])
        if self.d.ddp:
            torch.distributed.all_reduce(packed)
        total, stops = packed.tolist()  # the sync
        first = self.step - n + 1
        if not math.isfinite(total):
            bad = [(first + i, v) for i, v in enumerate(losses.tolist()) if not math.isfinite(v)]
            where = (f"loss is {bad[0][1]} at step {bad[0][0]}" if bad
                     else f"another rank's loss is not finite in steps {first}-{self.step}")
            raise FloatingPointError(f"{where}; nothing was saved after it (try a lower --lr "
                                     f"or --grad_clip)")
        self._stop_agreed = stops > 0
        now = time.perf_counter()
        dt, self._interval_t0 = now - self._interval_t0, now
        loss = total / (n * self.d.world_size)
        lr = self.scheduler.get_last_lr()[0]
        if self.logger is not None:
            tokens = n * self.cfg.batch_size * self.mcfg.seq_len * self.d.world_size
            self.logger.write("train", self.step, loss=loss, bpd=loss / math.log(2), lr=lr,
                              tokens_per_s=tokens / max(dt, 1e-9), steps=n, epoch=self.epoch)
            self.bar.set_postfix(bpd=f"{loss / math.log(2):.3f}", lr=f"{lr:.2e}")

    def _stop_now(self) -> bool:
        """Single process: every step (a Python flag, free). DDP: at the log interval, where
        the ranks agree in `_flush_metrics`, so they all stop after the same step."""
        return self._stop_agreed if self.d.ddp else self.stop.requested

    def fit(self) -> int:
        cfg = self.cfg
        t_start, start_step = time.perf_counter(), self.step
        self.bar = progress(self.total_steps, "training", "step", initial=self.step,
                            enabled=self.d.master, every_steps=cfg.log_every, every_s=None)
        stopped = False
        # The handlers stay in place while a stop saves: a second Ctrl-C then quits at once,
        # and a second SIGTERM does not kill the save.
        with self.stop:
            try:
                if self.eval_pending:  # the last run was stopped inside this evaluation
                    self.evaluate_and_save()
                    self.last_eval_step = self.step
                self._train_loop()
                if self.last_eval_step != self.step:
                    self.evaluate_and_save()
            except TrainingStopped:
                stopped = True
                if self.last_save_step != self.step or self.eval_pending:
                    self.save(None)
                if self.d.master:
                    log.warning("%s: saved %s at step %d; continue with --resume",
                                self.stop.reason or "stop", self.dir / "latest.pth", self.step)
            finally:
                self.bar.close()
                if self.logger is not None:
                    self.logger.close()
        if self.d.master:
            summary = RunSummary(self.dir, self.step, self.total_steps, start_step,
                                 time.perf_counter() - t_start, self.best_val, self.best_step,
                                 stopped_by=self.stop.reason if stopped else "")
            for line in summary.lines():
                log.info("%s", line)
        return 0

    def _train_loop(self) -> None:
        cfg = self.cfg
        self._interval_t0 = time.perf_counter()
        while self.step < self.total_steps:
            self.sampler.set_epoch(self.epoch)
            if hasattr(self.train_ds, "set_epoch"):  # coco: this epoch's pick of captions
                self.train_ds.set_epoch(self.epoch)
            self.sampler.skip = self.batch_in_epoch * cfg.batch_size
            for images, captions, labels in self.loader:
                self.train_step(images, captions, labels)
                self.step += 1
                self.batch_in_epoch += 1
                if self.step % cfg.log_every == 0:
                    self._flush_metrics()
                self.bar.update(1)
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    self.evaluate_and_save()
                    self.last_eval_step = self.step
                    self._interval_t0 = time.perf_counter()  # tokens/s counts training only
                elif cfg.save_freq and self.step % cfg.save_freq == 0:
                    self.save(None)
                    self._interval_t0 = time.perf_counter()
                if self._stop_now():
                    raise TrainingStopped
                if self.step >= self.total_steps:
                    break
            else:  # the epoch ran out (not a max_steps break)
                self.epoch += 1
                self.batch_in_epoch = 0
                if not cfg.eval_every:
                    self.evaluate_and_save()
                    self.last_eval_step = self.step
                    self._interval_t0 = time.perf_counter()
