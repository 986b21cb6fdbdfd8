"""Data plumbing for the trainer: datasets by name, resumable sharded sampling, batching,
and the bounded pass over the training split that yields the frequency prior and captions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .config import TrainConfig
from .progress import track
from .stopping import ignore_sigint_in_worker

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, list[str], torch.Tensor]  # uint8 [B,C,H,W], captions, labels [B]


def make_datasets(cfg: TrainConfig) -> tuple[Dataset, Dataset]:
    """Train and val splits; each dataset reads the options that concern it."""
    from training.datasets import build_dataset

    opts = {"shapes_train_size": cfg.shapes_train_size,
            "shapes_synonym_prob": cfg.shapes_synonym_prob, "download": cfg.download,
            "val_fraction": cfg.val_fraction}
    train = build_dataset(cfg.dataset, cfg.data_root, cfg.image_size, split="train", **opts)
    val = build_dataset(cfg.dataset, cfg.data_root, cfg.image_size, split="val", **opts)
    return train, val


def collate(items: list[tuple[torch.Tensor, str, int]]) -> Batch:
    images = torch.stack([torch.as_tensor(it[0], dtype=torch.uint8) for it in items])
    captions = [str(it[1]) for it in items]
    labels = torch.tensor([int(it[2]) for it in items], dtype=torch.long)
    return images, captions, labels


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way, after `skip` samples of this rank.

    The order of an epoch depends only on (seed, epoch), so skipping the samples already
    consumed reproduces exactly the batches an uninterrupted run would have seen next.
    Also used with one replica, so single-process and DDP runs share one code path.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True,
                         seed=seed, drop_last=True)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.skip:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)


def make_loader(ds: Dataset, sampler: Any, batch_size: int, num_workers: int,
                pin: bool, generator: torch.Generator | None = None) -> DataLoader:
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=sampler is not None,
        pin_memory=pin,
        persistent_workers=False,
        generator=generator,
        worker_init_fn=ignore_sigint_in_worker if num_workers else None,
    )


def val_subset(val: Dataset, n: int, rank: int, world_size: int) -> list[int]:
    """This rank's share of the first `n` validation indices (fixed, so figures compare)."""
    n = min(n, len(val))  # type: ignore[arg-type]
    return list(range(rank, n, world_size))


def scan_training_split(ds: Dataset, limit: int, seed: int, batch_size: int, num_workers: int,
                        count_prior: bool, show: bool) -> tuple[torch.Tensor | None, list[str]]:
    """One bounded pass over (at most `limit`) training images -> (prior log-probs, captions).

    A fixed random subset (not the first `limit`) so an ordered dataset such as class
    folders still gives a representative prior and vocabulary. The images stream into the
    counter batch by batch; only the captions are kept.
    """
    from model.prior import count_frequency_prior

    n = len(ds)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g)[: min(limit, n)].sort().values.tolist()
    loader = DataLoader(torch.utils.data.Subset(ds, idx), batch_size=max(batch_size, 64),
                        num_workers=num_workers, collate_fn=collate)
    captions: list[str] = []

    def batches() -> Iterator[torch.Tensor]:
        for imgs, caps, _ in track(loader, len(loader), "scanning training split", "batch",
                                   enabled=show):
            captions.extend(caps)
            yield imgs

    prior = None
    if count_prior:
        probe = torch.as_tensor(ds[idx[0]][0])  # [C, H, W]: the split's channels and size
        prior = count_frequency_prior(batches(), image_size=int(probe.shape[-1]),
                                      channels=int(probe.shape[0]))
    else:
        for _ in batches():
            pass
    log.info("scanned %d training images for the prior and the vocabulary", len(captions))
    return prior, captions
