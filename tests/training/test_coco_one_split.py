"""COCO with one split on disk (what most people fetch): training runs on it and holds out a
fixed share for validation, saying so; --val_fraction sets the share of every holdout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.training.train_helpers import TINY, run_script
from training.datasets import build_dataset


def write_coco_split(root: Path, split: str, n: int, captions: bool = True) -> None:
    """`{split}2017/` with n JPEGs and (optionally) annotations/captions_{split}2017.json,
    in the layout and JSON schema of the COCO 2017 archives."""
    images, annotations = [], []
    for i in range(1, n + 1):
        name = f"{i:012d}.jpg"
        path = root / f"{split}2017" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20 + i % 3, 16), (7 * i % 256, 40, 200)).save(path)
        images.append({"id": i, "file_name": name, "width": 20 + i % 3, "height": 16,
                       "license": 1, "coco_url": "", "date_captured": ""})
        annotations += [{"id": 100 * i + k, "image_id": i, "caption": f"photo {i} take {k}"}
                        for k in range(2)]
    if captions:
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"captions_{split}2017.json").write_text(json.dumps(
            {"info": {}, "licenses": [], "images": images, "annotations": annotations}))


def _ids(ds) -> set[str]:
    return {it.path.name for it in ds.items}


@pytest.mark.parametrize("split", ["train", "val"])
def test_one_split_is_divided_into_train_and_val(tmp_path: Path, split: str, caplog) -> None:
    write_coco_split(tmp_path, split, 40)
    with caplog.at_level("INFO", logger="training.datasets.coco"):
        train = build_dataset("coco", tmp_path, 8, "train")
        val = build_dataset("coco", tmp_path, 8, "val")
    assert (len(train), len(val)) == (38, 2)  # a fixed 1-in-20 holdout
    assert not _ids(train) & _ids(val) and len(_ids(train) | _ids(val)) == 40
    assert _ids(val) == {"000000000020.jpg", "000000000040.jpg"}  # every 20th, by image id
    assert f"only {split}2017/" in caplog.text and "1-in-20 holdout" in caplog.text
    assert val[0][1] in {"photo 20 take 0", "photo 20 take 1"}  # captions follow the images
    # --val_fraction changes the share; the same call gives the same split.
    val4 = build_dataset("coco", tmp_path, 8, "val", val_fraction=0.25)
    assert len(val4) == 10 and _ids(val4) == _ids(build_dataset("coco", tmp_path, 8, "val",
                                                                val_fraction=0.25))


def test_both_splits_are_used_as_shipped(tmp_path: Path) -> None:
    write_coco_split(tmp_path, "train", 6)
    write_coco_split(tmp_path, "val", 3)
    assert len(build_dataset("coco", tmp_path, 8, "train")) == 6
    assert len(build_dataset("coco", tmp_path, 8, "val")) == 3


def test_no_image_folder_names_both(tmp_path: Path) -> None:
    from training.datasets import DatasetError

    (tmp_path / "annotations").mkdir()
    with pytest.raises(DatasetError, match="neither train2017/ nor val2017/"):
        build_dataset("coco", tmp_path, 8, "train")


def test_train_llm_prompt_on_val2017_alone(tmp_path: Path) -> None:
    """The guide's COCO command (scaled down) with only val2017 fetched: it trains, holds out
    1 in 4 (--val_fraction 0.25) and says so."""
    data = tmp_path / "coco"
    write_coco_split(data, "val", 24)
    flags = list(TINY)
    flags[flags.index("shapes")] = "coco"
    i = flags.index("--shapes_train_size")
    del flags[i:i + 2]
    proc = run_script(["train_llm_prompt.py", *flags, "--data_root", str(data),
                       "--max_steps", "2", "--val_fraction", "0.25", "--checkpoint_dir",
                       str(tmp_path / "ck")])
    assert "only val2017/" in proc.stderr and "1-in-4 holdout" in proc.stderr
    from model import load_checkpoint

    meta = load_checkpoint(tmp_path / "ck" / "best_model.pth")[1]
    assert meta["val_bpd"] > 0 and meta["train_args"]["val_fraction"] == 0.25


def test_val_fraction_flag_range() -> None:
    from training.config import parse_train_args

    assert parse_train_args([]).val_fraction == 0.05  # the readers' 1-in-20 stays the default
    for bad in ("0", "1", "-0.1"):
        with pytest.raises(SystemExit):
            parse_train_args(["--val_fraction", bad])


def test_training_rotates_through_each_images_captions(tmp_path: Path, one_thread: None) -> None:
    """COCO has ~5 captions an image; epoch e trains on the ones `set_epoch(e)` picks, so a
    run sees every caption, not each image's epoch-0 pick again and again."""
    import torch

    from training.config import parse_train_args
    from training.distributed import DistInfo
    from training.trainer import Trainer

    data = tmp_path / "coco"
    write_coco_split(data, "train", 8)
    write_coco_split(data, "val", 2)
    flags = list(TINY)
    flags[flags.index("shapes")] = "coco"
    i = flags.index("--shapes_train_size")
    del flags[i:i + 2]

    seen: set[str] = set()

    class Recording(Trainer):
        def train_step(self, images: torch.Tensor, captions: list[str],
                       labels: torch.Tensor) -> None:
            seen.update(captions)
            super().train_step(images, captions, labels)

    cfg = parse_train_args([*flags, "--data_root", str(data), "--batch_size", "4",
                            "--num_epochs", "6", "--cond_drop_prob", "0",
                            "--checkpoint_dir", str(tmp_path / "ck")])
    t = Recording(cfg, DistInfo())
    assert t.fit() == 0
    # 8 images x 2 captions; the picks are fixed by (epoch, index): 6 epochs see all 16
    # (before: the epoch-0 pick of each image, 8, every epoch).
    assert len(seen) == 16, sorted(seen)
