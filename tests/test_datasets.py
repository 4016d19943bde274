import json

import pytest
import torch

from amt.config import DataConfig, DomainConfig
from amt.data.datasets import DataError, ImageDataset, build_transform, load_domain

from conftest import write_image_folder


def test_folder_dataset_labels_and_pixel_range(image_folder):
    ds = load_domain(DomainConfig("d", str(image_folder)), DataConfig(image_size=8, resize_ratio=1.0))
    assert len(ds) == 8 * 12 and len(ds.class_names) == 8
    img, label = ds[13]
    assert img.shape == (3, 8, 8) and img.dtype == torch.float32
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert label == 1
    assert [len(c) for c in ds.indices_by_class()] == [12] * 8


def test_train_transform_is_random_and_in_range(image_folder):
    t = build_transform(DataConfig(image_size=8), train=True)
    ds = ImageDataset.from_folder(image_folder, t)
    a, b = ds[0][0], ds[0][0]
    assert a.shape == (3, 8, 8) and not torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 1


def test_splits_restrict_classes(image_folder, tmp_path):
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": ["class_00", "class_01"], "test": ["class_05"]}))
    ds = load_domain(DomainConfig("d", str(image_folder), splits=str(splits), split="train"), DataConfig())
    assert ds.class_names == ["class_00", "class_01"] and len(ds) == 24
    with pytest.raises(DataError, match="no split 'val'"):
        load_domain(DomainConfig("d", str(image_folder), splits=str(splits), split="val"), DataConfig())


def test_csv_dataset(image_folder, tmp_path):
    csv = tmp_path / "labels.csv"
    rows = ["path,label"] + [f"{p.relative_to(tmp_path)},{p.parent.name}" for p in sorted(image_folder.rglob("*.png"))]
    csv.write_text("\n".join(rows))
    ds = load_domain(DomainConfig("c", str(csv), format="csv"), DataConfig(image_size=8))
    assert len(ds) == 96 and ds.class_names[0] == "class_00"
    assert ds[0][0].shape == (3, 8, 8)


def test_csv_without_columns_is_clear(tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text("file,cls\na.png,1\n")
    with pytest.raises(DataError, match="'path' and 'label'"):
        ImageDataset.from_csv(csv, build_transform(DataConfig(), False))


def test_missing_and_empty_folders_are_clear(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_domain(DomainConfig("d", str(tmp_path / "nope")), DataConfig())
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="found no images"):
        load_domain(DomainConfig("d", str(tmp_path / "empty")), DataConfig())


def test_unreadable_image_names_file_or_is_skipped_and_counted(tmp_path):
    root = write_image_folder(tmp_path / "d", 3, 4)
    bad = root / "class_01" / "zzz_broken.png"
    bad.write_bytes(b"not a png")
    ds = load_domain(DomainConfig("d", str(root)), DataConfig(image_size=8))
    idx = [i for i, (p, _) in enumerate(ds.samples) if p == bad][0]
    with pytest.raises(DataError, match="zzz_broken.png"):
        ds[idx]
    ds = load_domain(DomainConfig("d", str(root)), DataConfig(image_size=8, skip_unreadable=True))
    assert len(ds) == 12 and ds.skipped == 1
    assert all(p != bad for p, _ in ds.samples)


def test_decoded_cache_gives_same_images(image_folder):
    cfg = DataConfig(image_size=8, resize_ratio=1.0)
    plain = load_domain(DomainConfig("d", str(image_folder)), cfg)
    cached = load_domain(DomainConfig("d", str(image_folder)), DataConfig(image_size=8, resize_ratio=1.0,
                                                                         cache_decoded=True))
    for i in (0, 5, 0):
        assert torch.equal(plain[i][0], cached[i][0])
    assert len(cached._cache) == 2


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
