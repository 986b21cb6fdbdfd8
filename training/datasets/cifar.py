"""CIFAR-100 from the official python pickle layout under `data_root/cifar-100-python`.

The pickles are read by an unpickler that admits only what the official files contain
(dicts, lists, bytes, numpy arrays), so a hostile file cannot run code.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from training.datasets.base import DatasetError, check_split, pil_to_tensor, resize_center_crop

log = logging.getLogger(__name__)

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
FOLDER = "cifar-100-python"
_FILES = {"train": "train", "val": "test"}

# Everything a numpy array pickle (protocol 2 from Python 2, or newer) refers to.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("copyreg", "_reconstructor"),
}


class _DataUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a data file")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict[bytes, Any]:
    if not path.is_file():
        raise DatasetError(
            f"{path} not found; expected the CIFAR-100 python layout "
            f"(data_root/{FOLDER}/train, test, meta). Pass --download to fetch it "
            f"({URL}) where a network exists."
        )
    try:
        with path.open("rb") as f:
            data = _DataUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DatasetError(f"{path} is not a readable CIFAR-100 pickle: {e}") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(data).__name__}")
    return data


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_cifar100(data_root: str | Path) -> Path:
    """Fetch the official archive into `data_root`, verify its MD5 and extract it.

    Returns the extracted folder. Skips the download when the folder is already complete.
    """
    root = Path(data_root)
    target = root / FOLDER
    if all((target / f).is_file() for f in ("train", "test", "meta")):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        archive = Path(tmp) / "cifar-100-python.tar.gz"
        log.info("downloading %s to %s", URL, root)
        try:
            urllib.request.urlretrieve(URL, archive)  # a fixed https URL
        except OSError as e:
            raise DatasetError(f"cannot download {URL}: {e}") from e
        got = _md5(archive)
        if got != MD5:
            raise DatasetError(f"{URL}: MD5 {got} does not match the expected {MD5}")
        with tarfile.open(archive, "r:gz") as tar:
            # The "data" filter refuses absolute paths, `..` and links out of the folder.
            tar.extractall(root, filter="data")
    return target


class Cifar100Dataset(Dataset):
    """CIFAR-100 (train: 50,000, val = the official test set: 10,000), fine labels.

    Captions are "a photo of a {class}" with underscores as spaces ("maple tree").
    """

    channels = 3

    def __init__(self, data_root: str | Path, image_size: int = 32, split: str = "train",
                 download: bool = False) -> None:
        check_split(split)
        if image_size < 1:
            raise DatasetError(f"image_size must be a positive integer, got {image_size!r}")
        if download:
            download_cifar100(data_root)
        folder = Path(data_root) / FOLDER
        meta = _load_pickle(folder / "meta")
        data = _load_pickle(folder / _FILES[split])
        path = folder / _FILES[split]
        try:
            names = [n.decode() if isinstance(n, bytes) else str(n)
                     for n in meta[b"fine_label_names"]]
            pixels = np.asarray(data[b"data"], dtype=np.uint8)
            labels = [int(x) for x in data[b"fine_labels"]]
        except KeyError as e:
            raise DatasetError(f"{path} or its meta lacks key {e}; expected b'data', "
                               f"b'fine_labels' and meta b'fine_label_names'") from e
        if pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32 or len(labels) != len(pixels):
            raise DatasetError(f"{path}: expected b'data' uint8 N x 3072 and N fine labels, got "
                               f"{pixels.shape} and {len(labels)} labels")
        if labels and not 0 <= min(labels) <= max(labels) < len(names):
            raise DatasetError(f"{path}: fine labels outside 0..{len(names) - 1}")
        self.images = pixels.reshape(-1, 3, 32, 32)  # rows are R plane, G plane, B plane
        self.labels = labels
        self.class_names = [n.replace("_", " ") for n in names]
        self.num_classes = len(names)
        self.image_size = image_size
        self.split = split

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int]:
        label = self.labels[index]
        chw = self.images[index]
        if self.image_size == 32:
            image = torch.from_numpy(chw.copy())
        else:
            pil = Image.fromarray(chw.transpose(1, 2, 0))
            image = pil_to_tensor(resize_center_crop(pil, self.image_size))
        return image, f"a photo of a {self.class_names[label]}", label

    def captions(self) -> list[str]:
        """Every caption of the split, without touching the pixels."""
        return [f"a photo of a {self.class_names[y]}" for y in self.labels]
