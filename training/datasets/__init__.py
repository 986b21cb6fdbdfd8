"""Datasets of (image uint8 [C, H, W], caption str, class id int or -1).

```python
ds = build_dataset("shapes", data_root=None, image_size=16, split="train")
image, caption, class_id = ds[0]
ds.channels, ds.num_classes, ds.class_names   # 3 | 1; 0 when unlabelled; list or None
ds.captions()                                 # every caption, without decoding images
```

File-backed datasets also keep `skipped`: the unreadable images left out at load time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from training.datasets.base import DatasetError

DATASETS = ("shapes", "cifar100", "imagenet", "imagenet10k", "coco", "folder", "digits")

# Options the trainer may pass for any dataset; each dataset reads the ones that concern it
# and ignores the rest, so one set of flags serves every --dataset.
OPTIONS = {
    "shapes_train_size": 50_000,  # shapes: training indices 0..N-1
    "shapes_synonym_prob": 0.0,   # shapes: share of training captions reworded
    "download": False,            # cifar100: fetch and verify the archive first
    "check_images": True,         # file datasets: verify headers at load, skip bad ones
    "val_fraction": 0.05,         # imagenet, folder, coco: holdout when a split is missing
    "caption_column": "text",     # folder: the metadata.jsonl key holding the caption
}

__all__ = ["DATASETS", "OPTIONS", "DatasetError", "build_dataset"]


def build_dataset(name: str, data_root: str | Path | None, image_size: int,
                  split: str = "train", **options: Any) -> Dataset:
    """Build dataset `name` ("shapes", "cifar100", ... see DATASETS) for one split.

    `data_root` is ignored by shapes and digits (built in). Unknown option names raise
    DatasetError; options that do not concern `name` are ignored (see OPTIONS).
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise DatasetError(f"unknown dataset option(s) {unknown}; expected some of "
                           f"{sorted(OPTIONS)}")
    opts = {**OPTIONS, **{k: v for k, v in options.items() if v is not None}}
    files = {"check_images": opts["check_images"]}
    if name not in ("shapes", "digits") and data_root is None:
        raise DatasetError(f"dataset {name!r} needs a data_root")

    if name == "shapes":
        from training.datasets.shapes import ShapesDataset

        return ShapesDataset(image_size, split, shapes_train_size=int(opts["shapes_train_size"]),
                             synonym_prob=float(opts["shapes_synonym_prob"]))
    if name == "digits":
        from training.datasets.digits import DigitsDataset

        return DigitsDataset(image_size, split)
    if name == "cifar100":
        from training.datasets.cifar import Cifar100Dataset

        return Cifar100Dataset(data_root, image_size, split, download=bool(opts["download"]))
    if name in ("imagenet", "imagenet10k"):
        from training.datasets.imagenet import ImageFolderDataset

        return ImageFolderDataset(data_root, image_size, split, name=name,
                                  val_fraction=float(opts["val_fraction"]), **files)
    if name == "coco":
        from training.datasets.coco import CocoCaptionsDataset

        return CocoCaptionsDataset(data_root, image_size, split,
                                   val_fraction=float(opts["val_fraction"]), **files)
    if name == "folder":
        from training.datasets.folder import CaptionFolderDataset

        return CaptionFolderDataset(data_root, image_size, split,
                                    val_fraction=float(opts["val_fraction"]),
                                    caption_column=str(opts["caption_column"]), **files)
    raise DatasetError(f"unknown dataset {name!r}; expected one of {DATASETS}")
