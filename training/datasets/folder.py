"""A folder of images with `metadata.jsonl` (the Hugging Face imagefolder convention).

Each line is an object with `file_name` (relative to the folder holding metadata.jsonl)
and `text` (the caption; another column with `caption_column`). Splits: `train/` and
`val/` (or `validation/`) sub-folders, each with its metadata.jsonl; with no val folder,
val is a fixed 1-in-20 holdout (`val_fraction`) of the training lines.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from training.datasets.base import (
    DatasetError,
    FileDataset,
    Item,
    holdout,
    require_dir,
    safe_join,
)

log = logging.getLogger(__name__)

METADATA = "metadata.jsonl"


def read_metadata(path: Path, caption_column: str = "text") -> list[Item]:
    """The (image path, caption) pairs a metadata.jsonl lists, in file order."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    expected = f'one JSON object per line with "file_name" and "{caption_column}"'
    items = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: not valid JSON ({e}); expected {expected}") from e
        if not isinstance(row, dict) or "file_name" not in row \
                or not isinstance(row.get(caption_column), str):
            raise DatasetError(f"{where}: got {line[:80]!r}; expected {expected}")
        caption = " ".join(row[caption_column].split())
        items.append(Item(safe_join(path.parent, row["file_name"], where), caption))
    return items


class CaptionFolderDataset(FileDataset):
    """Your own captioned images: `metadata.jsonl` + image files."""

    def __init__(self, data_root: str | Path, image_size: int, split: str = "train",
                 check_images: bool = True, val_fraction: float = 0.05,
                 caption_column: str = "text") -> None:
        super().__init__(image_size, split)
        root = require_dir(Path(data_root), f"a folder of images with {METADATA}")
        val_dirs = [d for d in (root / "val", root / "validation") if (d / METADATA).is_file()]
        train_dir = root / "train" if (root / "train" / METADATA).is_file() else root
        if val_dirs:
            source, part = (val_dirs[0] if split == "val" else train_dir), None
        else:
            source, part = train_dir, split
            log.info("folder: no val/%s under %s; val is a fixed 1-in-%d holdout", METADATA,
                     root, max(2, round(1 / val_fraction)))
        meta = source / METADATA
        if not meta.is_file():
            raise DatasetError(f"{meta} not found; expected {METADATA} with one "
                               f'{{"file_name": ..., "{caption_column}": ...}} object per line '
                               f"(the Hugging Face imagefolder convention)")
        items = read_metadata(meta, caption_column)
        if part is not None:
            items = [items[i] for i in holdout(len(items), part, val_fraction)]
        self._set_items(items, f"folder {split} ({meta})", check_images)
