"""scikit-learn's bundled 1,797 real 8x8 handwritten digits: grey, offline, labelled.

Pixel values 0..16 are scaled to 0..255. The split is fixed: the first 1,500 images are
train, the last 297 val.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from training.datasets.base import DatasetError, check_split, pil_to_tensor, resize_center_crop

VAL_SIZE = 297


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
        check_split(split)
        if image_size < 1:
            raise DatasetError(f"image_size must be a positive integer, got {image_size!r}")
        images, labels = load_digit_images()
        cut = len(images) - VAL_SIZE
        part = slice(0, cut) if split == "train" else slice(cut, None)
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
