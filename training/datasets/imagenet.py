"""ImageNet-style class folders (`imagenet`, `imagenet10k`).

Layout: `data_root/{train,val}/<class>/**/<image>`. Without a `val` folder, val is a fixed
1-in-20 holdout of the training images (`val_fraction`), and without a `train` folder the
class folders may sit in `data_root` itself. A class's caption name is its folder name
(underscores as spaces), or, when `LOC_synset_mapping.txt` ("n01440764 tench, Tinca
tinca") or `words.txt` ("n01440764<TAB>tench, Tinca tinca") is in `data_root` or the split
folder, the first name the mapping gives its synset id.
"""

from __future__ import annotations

import logging
from pathlib import Path

from training.datasets.base import (
    DatasetError,
    FileDataset,
    Item,
    holdout,
    list_images,
    require_dir,
)

log = logging.getLogger(__name__)

MAPPING_FILES = ("LOC_synset_mapping.txt", "words.txt")


def read_synset_mapping(path: Path) -> dict[str, str]:
    """Synset id -> first name, from a LOC_synset_mapping.txt or words.txt file."""
    mapping: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read synset mapping {path}: {e}") from e
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(None, 1)
        if len(parts) != 2:
            raise DatasetError(f"{path}:{lineno}: expected '<synset id> <name>[, <name>...]', "
                               f"got {line!r}")
        mapping[parts[0]] = parts[1].split(",")[0].strip()
    return mapping


def _class_dirs(folder: Path, exclude: tuple[str, ...] = ()) -> list[str]:
    return sorted(p.name for p in folder.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and p.name not in exclude)


class ImageFolderDataset(FileDataset):
    """Images in one folder per class; captions "a photo of a {class name}"."""

    def __init__(self, data_root: str | Path, image_size: int, split: str = "train",
                 check_images: bool = True, val_fraction: float = 0.05,
                 name: str = "imagenet") -> None:
        super().__init__(image_size, split)
        root = require_dir(Path(data_root), "class folders under {train,val}/ (or directly)")
        train_dir, val_dir = root / "train", root / "val"
        part: str | None = None  # the holdout part to take, when there is no val folder
        if val_dir.is_dir():
            source = val_dir if split == "val" else require_dir(train_dir, "train/ beside val/")
        else:
            source, part = (train_dir if train_dir.is_dir() else root), split
            log.info("%s: no %s folder; val is a fixed 1-in-%d holdout of %s", name, val_dir,
                     max(2, round(1 / val_fraction)), source)

        # Class ids come from the training folder so that train and val agree.
        class_source = train_dir if train_dir.is_dir() else source
        classes = _class_dirs(class_source, exclude=("train", "val"))
        if not classes:
            raise DatasetError(f"{class_source}: no class folders found; expected "
                               f"<class>/<image> sub-folders")
        if source == val_dir:
            unknown = sorted(set(_class_dirs(val_dir)) - set(classes))
            if unknown:
                raise DatasetError(f"{val_dir}: class folders {unknown[:5]} are not in "
                                   f"{class_source}; expected the same classes as train")

        mapping: dict[str, str] = {}
        for folder in (root, source):
            for fname in MAPPING_FILES:
                if not mapping and (folder / fname).is_file():
                    mapping = read_synset_mapping(folder / fname)
                    log.info("%s: class names from %s", name, folder / fname)
        self.class_names = [mapping.get(c, c.replace("_", " ")) for c in classes]
        self.num_classes = len(classes)

        items = []
        for class_id, cls in enumerate(classes):
            if not (source / cls).is_dir():
                continue  # a class with no validation images
            caption = f"a photo of a {self.class_names[class_id]}"
            items.extend(Item(p, caption, class_id) for p in list_images(source / cls))
        if part is not None:
            items = [items[i] for i in holdout(len(items), part, val_fraction)]
        self._set_items(items, f"{name} {split} ({source})", check_images)
