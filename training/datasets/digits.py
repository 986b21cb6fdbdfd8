"""scikit-learn's bundled 1,797 real 8x8 handwritten digits: grey, offline, labelled.

Pixel values 0..16 are scaled to 0..255. The splits are fixed: the last 297 images are
`test`, which neither training nor checkpoint selection sees; `val` is every 10th of the
first 1,500 (150 images) and `train` the other 1,350.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from training.datasets.base import DatasetError, holdout, pil_to_tensor, resize_center_crop

TEST_SIZE = 297
VAL_FRACTION = 0.1  # of the first 1,500: every 10th is val
SPLITS = ("train", "val", "test")


def split_indices(n: int, split: str) -> list[int]:
    """Indices of `split` among `n` digits: test is the last TEST_SIZE, val and train
    share the rest (every 10th is val)."""
    if split not in SPLITS:
        raise DatasetError(f"split must be one of {SPLITS}, got {split!r}")
    cut = n - TEST_SIZE
    if split == "test":
        return list(range(cut, n))
    return holdout(cut, split, VAL_FRACTION)


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 [N, 8, 8] (0..255) and their labels [N]."""
    try:
        from sklearn.datasets import load_digits  # heavy import; only this dataset needs it
    except ImportError as e:
        raise DatasetError("the digits dataset needs scikit-learn: pip install "
                           "'promptpix[train]'") from e
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


class DigitsDataset(Dataset):
    """Handwritten digits, 1 channel, captions "a handwritten digit {n}", class id n."""

    channels = 1
    num_classes = 10
    class_names: ClassVar[list[str]] = [str(n) for n in range(10)]

    def __init__(self, image_size: int = 8, split: str = "train") -> None:
        if image_size < 1:
            raise DatasetError(f"image_size must be a positive integer, got {image_size!r}")
        images, labels = load_digit_images()
        part = split_indices(len(images), split)
        self.images, self.labels = images[part], labels[part]
        self.image_size = image_size
        self.split = split

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int]:
        label = int(self.labels[index])
        img = self.images[index]
        if self.image_size == img.shape[0]:
            image = torch.from_numpy(img[None].copy())  # (1, 8, 8)
        else:
            grey = Image.fromarray(img)  # 2-D uint8 -> mode "L"
            image = pil_to_tensor(resize_center_crop(grey, self.image_size))
        return image, f"a handwritten digit {label}", label

    def captions(self) -> list[str]:
        """Every caption of the split."""
        return [f"a handwritten digit {int(n)}" for n in self.labels]
