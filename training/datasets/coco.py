"""COCO captions: `annotations/captions_{train,val}2017.json` and `{train,val}2017/` images.

One item per image (so an epoch sees each image once and val bits/dim weighs images
equally). Each image has about five captions; item i uses the one picked by
`random.Random(epoch * 1_000_003 + i)`: deterministic, and a trainer that calls
`set_epoch(e)` each epoch rotates through them. When the caption file is missing, every
image found in the image folder gets the generic caption "a photo", with a warning, as
the original guide says.

Most people fetch one split only (val2017 is 1 GB, train2017 18 GB). When only one of
`train2017/` and `val2017/` exists, both splits come from it: val is a fixed 1-in-20
holdout (`val_fraction`) of its images, train the rest, and the log says so.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch

from training.datasets.base import (
    DatasetError,
    FileDataset,
    Item,
    holdout,
    list_images,
    load_image,
    require_dir,
    safe_join,
)

log = logging.getLogger(__name__)

GENERIC_CAPTION = "a photo"
_EXPECTED = ('{"images": [{"id": int, "file_name": str}, ...], '
             '"annotations": [{"image_id": int, "caption": str}, ...]}')


def read_captions(path: Path) -> tuple[dict[int, str], dict[int, list[str]]]:
    """Image id -> file name, and image id -> captions, from a COCO caption file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON ({e}); expected {_EXPECTED}") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise DatasetError(f"{path}: expected an object with 'images' and 'annotations' "
                           f"lists: {_EXPECTED}")
    files: dict[int, str] = {}
    for n, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not isinstance(img.get("id"), int) \
                or not isinstance(img.get("file_name"), str):
            raise DatasetError(f"{path}: images[{n}] = {str(img)[:80]}; expected "
                               f'{{"id": int, "file_name": str}}')
        files[img["id"]] = img["file_name"]
    captions: dict[int, list[str]] = {}
    for n, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("image_id"), int) \
                or not isinstance(ann.get("caption"), str):
            raise DatasetError(f"{path}: annotations[{n}] = {str(ann)[:80]}; expected "
                               f'{{"image_id": int, "caption": str}}')
        text = " ".join(ann["caption"].split())  # COCO captions carry stray newlines
        if text:
            captions.setdefault(ann["image_id"], []).append(text)
    return files, captions


def _source_split(root: Path, split: str, val_fraction: float) -> tuple[str, str | None]:
    """Which image folder `split` reads, and the holdout part to take of it (None: all).

    A split's images exist when its `{split}2017/` folder does (the caption files of both
    splits come in one archive, so captions alone say nothing).
    """
    have = [s for s in ("train", "val") if (root / f"{s}2017").is_dir()]
    if len(have) == 2:
        return split, None
    if not have:
        raise DatasetError(f"{root} has neither train2017/ nor val2017/; expected COCO images "
                           f"in at least one of them (captions in annotations/"
                           f"captions_{{train,val}}2017.json)")
    only = have[0]
    if split == "val":  # said once per run: the trainer builds train, then val
        log.info("coco: only %s2017/ under %s: val is a fixed 1-in-%d holdout of its images, "
                 "train the rest (--val_fraction %g)", only, root,
                 max(2, round(1.0 / val_fraction)), val_fraction)
    return only, split


class CocoCaptionsDataset(FileDataset):
    """COCO 2017 images with their human captions (or "a photo" without a caption file)."""

    def __init__(self, data_root: str | Path, image_size: int, split: str = "train",
                 check_images: bool = True, val_fraction: float = 0.05) -> None:
        super().__init__(image_size, split)
        root = require_dir(Path(data_root), "a COCO folder with annotations/ and "
                                            "train2017/ / val2017/")
        source, part = _source_split(root, split, val_fraction)
        image_dir = root / f"{source}2017"
        ann_path = root / "annotations" / f"captions_{source}2017.json"
        self.epoch = 0
        if not ann_path.is_file():
            log.warning("%s not found: every image in %s gets the generic caption %r",
                        ann_path, image_dir, GENERIC_CAPTION)
            require_dir(image_dir, f"COCO images (and captions in {ann_path})")
            items = [Item(p, GENERIC_CAPTION) for p in list_images(image_dir)]
            caption_lists = [[GENERIC_CAPTION]] * len(items)
        else:
            files, captions = read_captions(ann_path)
            require_dir(image_dir, f"the images named in {ann_path}")
            items, caption_lists = [], []
            for image_id in sorted(files):
                if image_id not in captions:
                    continue
                path = safe_join(image_dir, files[image_id], f"{ann_path} image {image_id}")
                items.append(Item(path, captions[image_id][0]))
                caption_lists.append(captions[image_id])
            uncaptioned = len(files) - len(items)
            if uncaptioned:
                log.info("%s: %d image(s) without captions left out", ann_path, uncaptioned)
        if part is not None:
            chosen = holdout(len(items), part, val_fraction)
            items = [items[i] for i in chosen]
            caption_lists = [caption_lists[i] for i in chosen]
        keep = self._set_items(items, f"coco {split} ({image_dir})", check_images)
        self.caption_lists = [caption_lists[i] for i in keep]

    def set_epoch(self, epoch: int) -> None:
        """Choose which of each image's captions the next epoch uses."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int]:
        options = self.caption_lists[index]
        caption = options[random.Random(self.epoch * 1_000_003 + index).randrange(len(options))]
        return load_image(self.items[index].path, self.image_size), caption, -1

    def captions(self) -> list[str]:
        """Every caption of every kept image (for building a tokenizer)."""
        return [c for options in self.caption_lists for c in options]
