"""Each file-backed dataset read from a small fixture written in its real on-disk format."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from training.datasets import DATASETS, DatasetError, build_dataset

RED, GREEN, BLUE = (200, 30, 30), (30, 200, 30), (30, 30, 200)


def write_image(path: Path, colour: tuple[int, ...] = RED, size: tuple[int, int] = (20, 20),
                mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def write_corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    return path


def near(pixel: torch.Tensor, colour: tuple[int, ...], tol: int = 4) -> bool:
    """A JPEG round trip moves colours by a few levels."""
    return bool((pixel.int() - torch.tensor(colour)).abs().max() <= tol)


def check_item(item: tuple, size: int, channels: int = 3) -> None:
    image, caption, class_id = item
    assert isinstance(image, torch.Tensor) and image.dtype == torch.uint8
    assert image.shape == (channels, size, size) and image.is_contiguous()
    assert isinstance(caption, str) and caption and isinstance(class_id, int)


# ---------------------------------------------------------------- build_dataset ------------

def test_registry_and_argument_errors(tmp_path: Path) -> None:
    assert DATASETS == ("shapes", "cifar100", "imagenet", "imagenet10k", "coco", "folder",
                        "digits")
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'"):
        build_dataset("mnist", tmp_path, 16)
    with pytest.raises(DatasetError, match="unknown dataset option"):
        build_dataset("shapes", None, 16, shapes_size=3)
    with pytest.raises(DatasetError, match="split"):
        build_dataset("shapes", None, 16, split="test")
    missing = tmp_path / "nowhere"
    for name in ("imagenet", "coco", "folder"):
        with pytest.raises(DatasetError, match=str(missing)):
            build_dataset(name, missing, 16)


def test_items_batch_with_the_default_collate() -> None:
    images, captions, labels = next(iter(DataLoader(build_dataset("shapes", None, 8),
                                                    batch_size=4)))
    assert images.shape == (4, 3, 8, 8) and images.dtype == torch.uint8
    assert len(captions) == 4 and labels.tolist() == [-1] * 4


# ---------------------------------------------------------------- cifar100 -----------------

def write_cifar(root: Path, n_train: int = 6, n_test: int = 3) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    names = [f"class_{i}".encode() for i in range(98)] + [b"maple_tree", b"apple"]

    def dump(name: str, obj: object) -> None:  # protocol 2, as the official files
        with (folder / name).open("wb") as f:
            pickle.dump(obj, f, protocol=2)

    dump("meta", {b"fine_label_names": names, b"coarse_label_names": [b"x"] * 20})
    for fname, n in (("train", n_train), ("test", n_test)):
        data = np.zeros((n, 3, 32, 32), dtype=np.uint8)
        data[:, 0], data[:, 1], data[:, 2] = 10, 20, 30  # R, G, B planes
        data[:, :, 0, 0] = 255  # top-left pixel white
        dump(fname, {b"data": data.reshape(n, 3072), b"fine_labels": [98, 99, 5] * (n // 3),
                     b"coarse_labels": [0] * n, b"filenames": [b"f.png"] * n})
    return root


def test_cifar100_official_pickle_layout(tmp_path: Path) -> None:
    root = write_cifar(tmp_path)
    train = build_dataset("cifar100", root, 32)
    val = build_dataset("cifar100", root, 32, "val")
    assert (len(train), len(val)) == (6, 3)
    assert (train.channels, train.num_classes) == (3, 100)
    assert train.class_names[98] == "maple tree"
    image, caption, label = train[0]
    check_item(train[0], 32)
    assert (caption, label) == ("a photo of a maple tree", 98)
    assert image[:, 0, 0].tolist() == [255, 255, 255] and image[:, 5, 5].tolist() == [10, 20, 30]
    assert train[1][1:] == ("a photo of a apple", 99)
    assert train.captions()[:2] == ["a photo of a maple tree", "a photo of a apple"]
    small = build_dataset("cifar100", root, 16)
    check_item(small[0], 16)
    assert small[0][0][:, 8, 8].tolist() == [10, 20, 30]


def test_cifar100_missing_and_hostile_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"cifar-100-python.*--download"):
        build_dataset("cifar100", tmp_path, 32)
    root = write_cifar(tmp_path / "evil")
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple:
            return (Path.touch, (marker,))

    (root / "cifar-100-python" / "train").write_bytes(pickle.dumps({b"data": Exploit()}))
    with pytest.raises(DatasetError, match="not allowed"):
        build_dataset("cifar100", root, 32)
    assert not marker.exists()


# ---------------------------------------------------------------- imagenet -----------------

def test_imagenet_class_folders_with_synset_mapping(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("val", 1)):
        for wnid, colour in (("n01440764", RED), ("n01443537", GREEN)):
            for k in range(n):
                write_image(tmp_path / split / wnid / f"img{k}.JPEG", colour, (40, 30))
    (tmp_path / "LOC_synset_mapping.txt").write_text(
        "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n")
    train = build_dataset("imagenet", tmp_path, 16)
    val = build_dataset("imagenet10k", tmp_path, 16, "val")
    assert (len(train), len(val)) == (6, 2)
    assert train.class_names == ["tench", "goldfish"] and train.num_classes == 2
    check_item(train[0], 16)
    assert train[0][1:] == ("a photo of a tench", 0)
    assert val[1][1:] == ("a photo of a goldfish", 1)
    assert near(train[3][0][:, 8, 8], GREEN)


def test_imagenet_words_txt_folder_names_and_flat_holdout(tmp_path: Path) -> None:
    for cls in ("n02084071", "hot_dog"):
        for k in range(20):
            write_image(tmp_path / cls / f"{k:02d}.png", BLUE)
    (tmp_path / "words.txt").write_text("n02084071\tdog, domestic dog\n")
    train = build_dataset("imagenet", tmp_path, 8)
    val = build_dataset("imagenet", tmp_path, 8, "val")
    assert train.class_names == ["hot dog", "dog"]  # folders sorted: hot_dog, n02084071
    assert (len(train), len(val)) == (38, 2)  # a fixed 1-in-20 holdout
    assert not {it.path for it in train.items} & {it.path for it in val.items}
    assert {val[0][1], val[1][1]} == {"a photo of a dog", "a photo of a hot dog"}


def test_imagenet_refuses_val_classes_unknown_to_train(tmp_path: Path) -> None:
    write_image(tmp_path / "train" / "cat" / "a.png")
    write_image(tmp_path / "val" / "zebra" / "a.png")
    with pytest.raises(DatasetError, match="zebra"):
        build_dataset("imagenet", tmp_path, 8, "val")


# ---------------------------------------------------------------- coco ---------------------

def write_coco(root: Path, split: str = "val") -> None:
    write_image(root / f"{split}2017" / "000000000001.jpg", RED, (64, 48))
    write_image(root / f"{split}2017" / "000000000002.png", GREEN, (48, 64))
    write_image(root / f"{split}2017" / "000000000003.png", BLUE)  # no caption
    annotations = {
        "info": {}, "licenses": [],
        "images": [{"id": 1, "file_name": "000000000001.jpg", "width": 64, "height": 48},
                   {"id": 2, "file_name": "000000000002.png", "width": 48, "height": 64},
                   {"id": 3, "file_name": "000000000003.png", "width": 20, "height": 20}],
        "annotations": [{"id": 10 + k, "image_id": 1, "caption": f"A red thing number {k}.\n"}
                        for k in range(5)] + [{"id": 20, "image_id": 2, "caption": "green"}],
    }
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"captions_{split}2017.json").write_text(json.dumps(annotations))


def test_coco_captions(tmp_path: Path) -> None:
    write_coco(tmp_path)
    # val2017 alone: train is all of it but the 1-in-20 holdout (none of 2 images).
    ds = build_dataset("coco", tmp_path, 16, "train")
    assert len(ds) == 2 and (ds.channels, ds.num_classes, ds.class_names) == (3, 0, None)
    check_item(ds[0], 16)
    reds = {f"A red thing number {k}." for k in range(5)}
    assert ds[0][1] in reds and ds[0][1] == ds[0][1]  # deterministic
    assert near(ds[0][0][:, 8, 8], RED) and ds[1][1:] == ("green", -1)
    seen = set()
    for epoch in range(20):
        ds.set_epoch(epoch)
        seen.add(ds[0][1])
    assert len(seen) >= 3 and seen <= reds
    assert sorted(ds.captions()) == sorted([*reds, "green"])


def test_coco_without_caption_file_uses_a_generic_caption(tmp_path: Path, caplog) -> None:
    write_coco(tmp_path, "train")
    (tmp_path / "annotations" / "captions_train2017.json").unlink()
    with caplog.at_level(logging.WARNING):
        ds = build_dataset("coco", tmp_path, 8)
    assert len(ds) == 3 and {ds[i][1] for i in range(3)} == {"a photo"}
    assert "captions_train2017.json" in caplog.text


@pytest.mark.parametrize("content,message", [
    ('{"images": [', "not valid JSON"),
    ('{"images": []}', "'images' and 'annotations'"),
    ('{"images": [{"id": "1"}], "annotations": []}', r"images\[0\]"),
])
def test_coco_malformed_json_is_refused(tmp_path: Path, content: str, message: str) -> None:
    write_coco(tmp_path)
    path = tmp_path / "annotations" / "captions_val2017.json"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message) as err:
        build_dataset("coco", tmp_path, 8, "val")
    assert str(path) in str(err.value) and "expected" in str(err.value)


# ---------------------------------------------------------------- folder -------------------

def write_folder(root: Path, rows: list[dict]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_folder_jsonl_with_a_corrupt_image_skipped_and_counted(tmp_path: Path, caplog) -> None:
    # Red | green | blue stripes, 30 x 10: the centre crop keeps the green.
    stripes = Image.new("RGB", (30, 10))
    for x0, colour in ((0, RED), (10, GREEN), (20, BLUE)):
        stripes.paste(colour, (x0, 0, x0 + 10, 10))
    (tmp_path / "imgs").mkdir()
    stripes.save(tmp_path / "imgs" / "stripes.png")
    write_image(tmp_path / "grey.jpg", 77, mode="L")
    write_image(tmp_path / "clear.png", (0, 0, 0, 0), mode="RGBA")
    write_corrupt(tmp_path / "broken.png")
    write_folder(tmp_path, [
        {"file_name": "imgs/stripes.png", "text": "three  stripes", "extra": 1},
        {"file_name": "grey.jpg", "text": "grey"},
        {"file_name": "broken.png", "text": "broken"},
        {"file_name": "missing.png", "text": "gone"},
        {"file_name": "clear.png", "text": "nothing"},
    ])
    with caplog.at_level(logging.WARNING):
        ds = build_dataset("folder", tmp_path, 10, val_fraction=0.01)  # ~all in train
    assert len(ds) == 3
    assert sorted(p.name for p in ds.skipped) == ["broken.png", "missing.png"]
    assert "skipped 2" in caplog.text
    image, caption, class_id = ds[0]
    check_item(ds[0], 10)
    assert (caption, class_id) == ("three stripes", -1)
    assert image[:, 5, 0].tolist() == list(GREEN) and image[:, 5, 9].tolist() == list(GREEN)
    assert ds[1][0][:, 0, 0].tolist() == [77, 77, 77]
    assert ds[2][0][:, 0, 0].tolist() == [255, 255, 255]  # transparency over white


def test_folder_train_and_val_subfolders(tmp_path: Path) -> None:
    for split, n in (("train", 4), ("validation", 2)):
        for k in range(n):
            write_image(tmp_path / split / f"{k}.png")
        write_folder(tmp_path / split, [{"file_name": f"{k}.png", "text": f"{split} {k}"}
                                        for k in range(n)])
    assert build_dataset("folder", tmp_path, 8).captions()[-1] == "train 3"
    assert build_dataset("folder", tmp_path, 8, "val").captions() == ["validation 0",
                                                                       "validation 1"]


@pytest.mark.parametrize("name", ["../secret.png", "imgs/../../secret.png", "/etc/passwd",
                                  "C:\\secret.png", "..\\secret.png"])
def test_folder_refuses_file_names_outside_the_folder(tmp_path: Path, name: str) -> None:
    write_image(tmp_path / "secret.png")
    write_folder(tmp_path / "data", [{"file_name": name, "text": "x"}])
    with pytest.raises(DatasetError, match="outside"):
        build_dataset("folder", tmp_path / "data", 8)


def test_folder_malformed_metadata(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"metadata\.jsonl not found"):
        build_dataset("folder", tmp_path, 8)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{oops\n')
    with pytest.raises(DatasetError, match=r"metadata\.jsonl:2: not valid JSON"):
        build_dataset("folder", tmp_path, 8)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "caption": "ok"}\n')
    with pytest.raises(DatasetError, match=r":1: .*expected .*\"text\""):
        build_dataset("folder", tmp_path, 8)


def test_unreadable_image_at_load_time_names_the_file(tmp_path: Path) -> None:
    write_corrupt(tmp_path / "bad.png")
    write_folder(tmp_path, [{"file_name": "bad.png", "text": "x"}] * 3)
    ds = build_dataset("folder", tmp_path, 8, check_images=False)
    with pytest.raises(DatasetError, match=r"bad\.png"):
        ds[0]


# ---------------------------------------------------------------- digits -------------------

def test_digits_are_the_bundled_real_digits() -> None:
    train, val = build_dataset("digits", None, 8), build_dataset("digits", None, 8, "val")
    assert (len(train), len(val)) == (1350, 150)
    assert (train.channels, train.num_classes, train.class_names[3]) == (1, 10, "3")
    image, caption, label = val[0]
    check_item(val[0], 8, channels=1)
    assert caption == f"a handwritten digit {label}" and 0 <= label <= 9
    pixels = torch.stack([train[i][0] for i in range(200)])
    assert pixels.max() == 255 and pixels.min() == 0
    check_item(build_dataset("digits", None, 16)[0], 16, channels=1)


def test_digits_test_split_is_the_last_297_and_unseen_by_train_and_val() -> None:
    from training.datasets.digits import load_digit_images, split_indices

    images, labels = load_digit_images()
    parts = {s: split_indices(len(images), s) for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in parts.items()} == {"train": 1350, "val": 150, "test": 297}
    assert parts["test"] == list(range(1500, 1797))
    assert sorted(parts["train"] + parts["val"]) == list(range(1500))  # disjoint, all of them
    assert not set(parts["test"]) & set(parts["train"] + parts["val"])
    test = build_dataset("digits", None, 8, "test")
    assert len(test) == 297 and (test.images == images[1500:]).all()
    assert [test[i][2] for i in range(297)] == labels[1500:].tolist()
    assert set(labels[parts["val"]]) == set(range(10))  # every class is validated
    with pytest.raises(DatasetError, match="split must be one of"):
        build_dataset("digits", None, 8, "holdout")
