"""What every dataset shares: the error type, image loading, resize + crop, header scans.

Every dataset yields `(image uint8 [C, H, W], caption str, class_id int)` with class id -1
when the dataset has no labels, and carries `channels`, `num_classes` (0 when none) and
`class_names` (a list, or None).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from model.errors import PromptPixError
from model.images import resize_center_crop, to_rgb
from training.progress import track

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
SPLITS = ("train", "val")
# Above this many files the header scan shows a progress bar: a big folder takes a while.
_PROGRESS_FROM = 1000


class DatasetError(PromptPixError):
    """A dataset is missing, malformed or unreadable; the message names the path and why."""


def check_split(split: str) -> str:
    """Return `split` if it is "train" or "val", else raise DatasetError."""
    if split not in SPLITS:
        raise DatasetError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def require_dir(path: Path, what: str) -> Path:
    """Return `path` if it is a directory, else raise DatasetError saying what was expected."""
    if not path.is_dir():
        raise DatasetError(f"{path} does not exist or is not a directory; expected {what}")
    return path


def is_image_file(path: Path) -> bool:
    """True for a file name with a known image extension (case-insensitive), not hidden."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(root: Path) -> list[Path]:
    """All image files under `root`, recursively, in a stable (sorted) order."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if is_image_file(Path(f)))
    return found


def safe_join(folder: Path, name: object, where: str) -> Path:
    """`folder / name` for a relative file name taken from a dataset file.

    A dataset file must not make us read outside its folder: absolute paths, drive
    letters and `..` parts are refused with a DatasetError naming `where` (file:line).
    Symlinks placed inside the folder by its owner are followed as usual.
    """
    if not isinstance(name, str) or not name.strip():
        raise DatasetError(f"{where}: file_name must be a non-empty string, got {name!r}")
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(name).drive or ".." in posix.parts:
        raise DatasetError(
            f"{where}: file_name {name!r} points outside {folder}; expected a relative path "
            f"inside the dataset folder")
    return folder.joinpath(*posix.parts)


def image_is_readable(path: Path) -> bool:
    """Cheap validity check: the header parses and `verify()` passes.

    `verify()` checks chunk CRCs for PNG but does not decode JPEG data, so this costs
    about a header read per file. A JPEG truncated mid-data passes here and raises a
    DatasetError naming it when loaded.
    """
    try:
        with Image.open(path) as img:
            img.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False
    return True


def scan_readable(
    paths: Sequence[Path], what: str, check: bool = True
) -> tuple[list[int], list[Path]]:
    """Split `paths` into the indices of readable images and the unreadable paths.

    Missing and unreadable files are skipped, counted and logged with a warning: a few bad
    files in a big folder should not stop a run, but nothing is silently replaced.
    """
    keep: list[int] = []
    skipped: list[Path] = []
    bar = track(paths, len(paths), f"checking {what}", "img",
                enabled=len(paths) > _PROGRESS_FROM)
    for i, path in enumerate(bar):
        if not path.is_file() or (check and not image_is_readable(path)):
            skipped.append(path)
        else:
            keep.append(i)
    if skipped:
        shown = ", ".join(str(p) for p in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        log.warning("%s: skipped %d missing or unreadable image(s) of %d: %s%s",
                    what, len(skipped), len(paths), shown, more)
    return keep, skipped


def holdout(n: int, split: str, val_fraction: float) -> list[int]:
    """Indices of `split` when a dataset ships no split of its own.

    Every k-th item (k = round(1 / val_fraction)) goes to val, the rest to train: stable
    across runs, and spread over the whole (sorted, so class-grouped) list.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    every = max(2, round(1.0 / val_fraction))
    in_val = [i % every == every - 1 for i in range(n)]
    return [i for i in range(n) if in_val[i] == (split == "val")]


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """A PIL image (RGB or L) as a contiguous uint8 tensor [C, H, W]."""
    arr = np.array(img, dtype=np.uint8)  # a writable copy: torch shares its memory
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def load_image(path: Path, size: int) -> torch.Tensor:
    """Decode `path` to RGB, honour EXIF orientation, resize + centre-crop to `size`.

    Raises DatasetError naming the file when it cannot be decoded.
    """
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img = to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"cannot read image {path}: {e}; expected a readable image file") from e
    return pil_to_tensor(resize_center_crop(img, size))


@dataclass(frozen=True)
class Item:
    """One entry of a file-backed dataset."""

    path: Path
    caption: str
    class_id: int = -1


class FileDataset(Dataset):
    """A list of (image file, caption, class id), decoded and resized on access.

    Subclasses build `items` and call `_set_items`; unreadable files found by the header
    scan are left out and listed in `skipped`.
    """

    channels = 3

    def __init__(self, image_size: int, split: str) -> None:
        if image_size < 1:
            raise DatasetError(f"image_size must be a positive integer, got {image_size!r}")
        self.image_size = image_size
        self.split = check_split(split)
        self.items: list[Item] = []
        self.skipped: list[Path] = []
        self.num_classes = 0
        self.class_names: list[str] | None = None

    def _set_items(self, items: list[Item], what: str, check_images: bool = True) -> list[int]:
        """Keep the readable items; returns their indices in `items`."""
        keep, self.skipped = scan_readable([it.path for it in items], what, check=check_images)
        self.items = [items[i] for i in keep]
        if not self.items:
            raise DatasetError(f"{what}: no readable images found ({len(self.skipped)} skipped)")
        return keep

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int]:
        item = self.items[index]
        return load_image(item.path, self.image_size), item.caption, item.class_id

    def captions(self) -> list[str]:
        """Every caption of the split (for building a tokenizer), without decoding images."""
        return [it.caption for it in self.items]
