import json

import pytest
import torch

from amt.config import AugmentConfig, DataConfig, DomainConfig
from amt.data.base import DataError
from amt.data.domains import load_domain, validation_set
from amt.data.readers import read_csv, read_folder
from amt.data.transforms import build_transform

from conftest import write_image_folder

TEST8 = build_transform(8, DataConfig(resize_ratio=1.0), AugmentConfig(), train=False)


def test_folder_dataset_labels_and_pixel_range(image_folder):
    ds = load_domain(DomainConfig("d", str(image_folder)), DataConfig(), TEST8)
    assert len(ds) == 8 * 12 and len(ds.class_names) == 8
    img, label = ds[13]
    assert img.shape == (3, 8, 8) and img.dtype == torch.float32
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert label == 1
    assert [len(c) for c in ds.indices_by_class()] == [12] * 8


def test_train_transform_is_random_and_in_range(image_folder):
    t = build_transform(8, DataConfig(), AugmentConfig(), train=True)
    ds = read_folder(DomainConfig("d", str(image_folder)), DataConfig(), t)
    a, b = ds[0][0], ds[0][0]
    assert a.shape == (3, 8, 8) and not torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 1


def test_splits_restrict_classes(image_folder, tmp_path):
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": ["class_00", "class_01"], "test": ["class_05"]}))
    ds = load_domain(DomainConfig("d", str(image_folder), splits=str(splits), split="train"), DataConfig(), TEST8)
    assert ds.class_names == ["class_00", "class_01"] and len(ds) == 24
    with pytest.raises(DataError, match="no split 'val'"):
        load_domain(DomainConfig("d", str(image_folder), splits=str(splits), split="val"), DataConfig(), TEST8)


def test_csv_dataset(image_folder, tmp_path):
    csv = tmp_path / "labels.csv"
    rows = ["path,label"] + [f"{p.relative_to(tmp_path)},{p.parent.name}" for p in sorted(image_folder.rglob("*.png"))]
    csv.write_text("\n".join(rows))
    ds = load_domain(DomainConfig("c", str(csv), format="csv"), DataConfig(), TEST8)
    assert len(ds) == 96 and ds.class_names[0] == "class_00"
    assert ds[0][0].shape == (3, 8, 8)


def test_csv_without_columns_is_clear(tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text("file,cls\na.png,1\n")
    with pytest.raises(DataError, match="'path' and 'label'"):
        read_csv(DomainConfig("bad", str(csv), format="csv"), DataConfig(), TEST8)


def test_missing_and_empty_folders_are_clear(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_domain(DomainConfig("d", str(tmp_path / "nope")), DataConfig(), TEST8)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="found no images"):
        load_domain(DomainConfig("d", str(tmp_path / "empty")), DataConfig(), TEST8)


def test_unreadable_image_names_file_or_is_skipped_and_counted(tmp_path):
    root = write_image_folder(tmp_path / "d", 3, 4)
    bad = root / "class_01" / "zzz_broken.png"
    bad.write_bytes(b"not a png")
    ds = load_domain(DomainConfig("d", str(root)), DataConfig(), TEST8)
    idx = next(i for i, (p, _) in enumerate(ds.samples) if p == bad)
    with pytest.raises(DataError, match="zzz_broken.png"):
        ds[idx]
    ds = load_domain(DomainConfig("d", str(root)), DataConfig(skip_unreadable=True), TEST8)
    assert len(ds) == 12 and ds.skipped == 1
    assert all(p != bad for p, _ in ds.samples)


def test_decoded_cache_gives_same_images(image_folder):
    plain = load_domain(DomainConfig("d", str(image_folder)), DataConfig(), TEST8)
    cached = load_domain(DomainConfig("d", str(image_folder)), DataConfig(cache_decoded=True), TEST8)
    for i in (0, 5, 0):
        assert torch.equal(plain[i][0], cached[i][0])
    assert len(cached._cache) == 2


def _ops(transform) -> list[str]:
    return [type(op).__name__ for op in transform.transforms]


def test_transform_ops_follow_the_augment_config():
    data = DataConfig(resize_ratio=1.5, crop_scale=(0.5, 1.0))
    train = build_transform(8, data, AugmentConfig(), train=True)
    assert _ops(train) == ["PILToTensor", "RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter", "ToDtype"]
    assert list(train.transforms[1].size) == [8, 8] and tuple(train.transforms[1].scale) == (0.5, 1.0)
    assert tuple(train.transforms[3].brightness) == pytest.approx((0.6, 1.4))
    plain = build_transform(8, data, AugmentConfig(hflip=False, color_jitter=0.0), train=True)
    assert _ops(plain) == ["PILToTensor", "RandomResizedCrop", "ToDtype"]
    test = build_transform(8, data, AugmentConfig(), train=False)
    assert _ops(test) == ["PILToTensor", "Resize", "CenterCrop", "ToDtype"]
    assert list(test.transforms[1].size) == [12] and list(test.transforms[2].size) == [8, 8]


def test_validation_set_is_the_val_split_when_it_has_enough_classes(image_folder, tmp_path):
    def domain(splits: dict | None) -> DomainConfig:
        if splits is None:
            return DomainConfig("d", str(image_folder), split="test")
        path = tmp_path / "splits.json"
        path.write_text(json.dumps(splits))
        return DomainConfig("d", str(image_folder), splits=str(path), split="test")

    test = ["class_05", "class_06", "class_07"]
    val = validation_set(domain({"val": ["class_02", "class_03"], "test": test}), DataConfig(), TEST8, n_way=2)
    assert val.class_names == ["class_02", "class_03"] and val[0][0].shape == (3, 8, 8)
    assert validation_set(domain({"val": ["class_02", "class_03"], "test": test}), DataConfig(), TEST8, 3) is None
    assert validation_set(domain({"val": [], "test": test}), DataConfig(), TEST8, n_way=1) is None
    assert validation_set(domain({"test": test}), DataConfig(), TEST8, n_way=1) is None
    assert validation_set(domain(None), DataConfig(), TEST8, n_way=1) is None
    with pytest.raises(DataError, match=r"not in the data, e\.g\. \['gone'\]"):
        validation_set(domain({"val": ["gone"], "test": test}), DataConfig(), TEST8, n_way=1)


def test_data_check_reports_every_problem_and_exits_nonzero(tmp_path, capsys):
    from amt.cli import main

    root = write_image_folder(tmp_path / "d", 6, [20, 20, 20, 20, 20, 7])
    (root / "class_00" / "broken.png").write_bytes(b"not an image")
    assert main(["data", "check", str(root), "--n-shot", "5", "--n-query", "10"]) == 1
    out = capsys.readouterr().out
    assert "6 classes" in out and "unreadable image" in out and "broken.png" in out
    assert "class 'class_05' has 7 readable image(s), fewer than 15" in out
    (root / "class_00" / "broken.png").unlink()
    assert main(["data", "check", str(root), "--n-shot", "1", "--n-query", "5"]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("path,label\n" + "".join(f"d/class_01/{i:03d}.png,a\n" for i in range(20))
                        + "missing.png,a\n")
    assert main(["data", "check", str(csv_path), "--format", "csv", "--n-way", "1", "--n-shot", "1",
                 "--n-query", "5"]) == 1
    assert "missing file" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "nope")]) == 2
