"""Dedicated readers: ISIC 2018 and ChestX-ray14 (BSCD-FSL) tables, FWT JSON file lists; `amt data check`.

The fixtures follow the published layouts (docs/data.md names the sources): the ISIC 2018 Task 3 ground
truth (``image`` + the seven diagnosis columns, one-hot ``1.0``/``0.0``), NIH's ``Data_Entry_2017.csv``
(its header splits ``OriginalImage[Width,Height]`` and ``OriginalImagePixelSpacing[x,y]`` at their commas and
ends with one), and FWT's ``write_*_filelist.py`` output (every class in ``label_names``, novel classes
``i % 4 == 3``, absolute image paths). Names and ids are made up."""

import inspect
import json
import subprocess
import sys
import typing

import numpy as np
import pytest
import torch
from PIL import Image

from amt.config import AugmentConfig, DataConfig, DomainConfig
from amt.data.base import DataError
from amt.data.domains import check_domain, load_domain
from amt.data.readers import CHESTX_CLASSES, FORMATS, READERS
from amt.data.transforms import build_transform

ISIC_COLUMNS = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
CFG = DataConfig()
T16 = build_transform(16, CFG, AugmentConfig(), train=False)


def _image(path, grey=False, size=20):
    path.parent.mkdir(parents=True, exist_ok=True)
    px = np.random.default_rng(len(path.name)).integers(0, 256, size=(size, size) if grey else (size, size, 3))
    Image.fromarray(px.astype(np.uint8)).save(path)
    return path


def _assert_images(ds):
    for i in range(len(ds)):
        img, label = ds[i]
        assert img.shape == (3, 16, 16) and img.dtype == torch.float32
        assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
        assert label == ds.samples[i][1]


def _labels(ds):
    return {p.name: ds.class_names[y] for p, y in ds.samples}


def _splits(tmp_path, classes):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"test": classes}))
    return str(path)


@pytest.fixture
def isic(tmp_path):
    root = tmp_path / "ISIC"
    rows = {"ISIC_0001": "MEL", "ISIC_0002": "MEL", "ISIC_0003": "NV", "ISIC_0004": "NV", "ISIC_0005": "VASC",
            "ISIC_0006": "VASC", "ISIC_0007": "VASC"}
    lines = ["image," + ",".join(ISIC_COLUMNS)]
    for image, label in rows.items():
        lines.append(image + "," + ",".join("1.0" if c == label else "0.0" for c in ISIC_COLUMNS))
        _image(root / "ISIC2018_Task3_Training_Input" / f"{image}.jpg")
    (root / "ISIC2018_Task3_Training_GroundTruth.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def chestx(tmp_path):
    root = tmp_path / "ChestX"
    rows = [("00000001_000.png", "Atelectasis"), ("00000002_000.png", "Atelectasis"),
            ("00000003_000.png", "Effusion"), ("00000004_000.png", "Effusion"), ("00000005_000.png", "Effusion"),
            ("00000006_000.png", "Pneumothorax"), ("00000007_000.png", "Pneumothorax"),
            ("00000008_000.png", "No Finding"), ("00000009_000.png", "Effusion|Mass"),
            ("00000010_000.png", "Pneumonia"), ("00000011_000.png", "Hernia")]
    lines = ["Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
             "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"]
    for i, (image, labels) in enumerate(rows):
        lines.append(f"{image},{labels},0,{i + 1},58,M,PA,2500,2048,0.168,0.168,")
        _image(root / "images" / image, grey=True)
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def filelist(tmp_path):
    """A novel.json as FWT's write_cub_filelist.py writes it: label_names lists all 16 class folders (sorted),
    the novel classes are i % 4 == 3 (here 3, 7, 11), image paths are absolute (one made relative here)."""
    root = tmp_path / "filelists" / "cub"
    names = [f"{i + 1:03d}.Bird_{i + 1}" for i in range(16)]
    images, labels = [], []
    for label, count in ((11, 2), (3, 3), (7, 2)):
        for k in range(count):
            rel = f"source/CUB_200_2011/images/{names[label]}/{names[label]}_{k}.jpg"
            _image(root / rel)
            images.append(rel if k == 1 else str(root / rel))
            labels.append(label)
    path = root / "novel.json"
    path.write_text(json.dumps({"label_names": names, "image_names": images, "image_labels": labels}))
    return path


def test_isic_labels_from_one_hot_columns(isic, tmp_path):
    ds = load_domain(DomainConfig("isic", str(isic), format="isic"), CFG, T16)
    assert ds.class_names == ISIC_COLUMNS and ds.name == "isic"
    assert _labels(ds) == {"ISIC_0001.jpg": "MEL", "ISIC_0002.jpg": "MEL", "ISIC_0003.jpg": "NV",
                           "ISIC_0004.jpg": "NV", "ISIC_0005.jpg": "VASC", "ISIC_0006.jpg": "VASC",
                           "ISIC_0007.jpg": "VASC"}
    _assert_images(ds)
    ds = load_domain(DomainConfig("isic", str(isic), "isic", _splits(tmp_path, ["VASC", "MEL"]), "test"), CFG, T16)
    assert ds.class_names == ["VASC", "MEL"] and [len(c) for c in ds.indices_by_class()] == [3, 2]


def test_isic_table_in_its_own_folder_as_unzipped(isic):
    table = isic / "ISIC2018_Task3_Training_GroundTruth.csv"
    (isic / "ISIC2018_Task3_Training_GroundTruth").mkdir()
    table.rename(isic / "ISIC2018_Task3_Training_GroundTruth" / table.name)
    assert len(load_domain(DomainConfig("isic", str(isic), format="isic"), CFG, T16)) == 7


def test_isic_row_not_one_hot_names_file_and_line(isic):
    table = isic / "ISIC2018_Task3_Training_GroundTruth.csv"
    lines = table.read_text().splitlines()
    lines[3] = "ISIC_0003,1.0,1.0,0.0,0.0,0.0,0.0,0.0"
    table.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"GroundTruth\.csv line 4: .*not one-hot"):
        load_domain(DomainConfig("isic", str(isic), format="isic"), CFG, T16)
    lines[3] = "ISIC_0003,0.0,0.0,0.0,0.0,0.0,0.0,0.0"
    table.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="line 4"):
        load_domain(DomainConfig("isic", str(isic), format="isic"), CFG, T16)
    table.unlink()
    with pytest.raises(DataError, match="does not exist; expected .*ISIC2018_Task3_Training_Input"):
        load_domain(DomainConfig("isic", str(isic), format="isic"), CFG, T16)


def test_chestx_keeps_single_findings_of_the_seven_classes(chestx, tmp_path):
    ds = load_domain(DomainConfig("chestx", str(chestx), format="chestx"), CFG, T16)
    assert ds.class_names == list(CHESTX_CLASSES)
    assert _labels(ds) == {"00000001_000.png": "Atelectasis", "00000002_000.png": "Atelectasis",
                           "00000003_000.png": "Effusion", "00000004_000.png": "Effusion",
                           "00000005_000.png": "Effusion", "00000006_000.png": "Pneumothorax",
                           "00000007_000.png": "Pneumothorax"}
    _assert_images(ds)  # greyscale PNGs come out as 3 channels
    ds = load_domain(DomainConfig("chestx", str(chestx), "chestx", _splits(tmp_path, ["Effusion", "Atelectasis"]),
                                  "test"), CFG, T16)
    assert ds.class_names == ["Effusion", "Atelectasis"] and [len(c) for c in ds.indices_by_class()] == [3, 2]


def test_chestx_bad_table_is_clear(chestx):
    (chestx / "Data_Entry_2017.csv").write_text("Image,Labels\na.png,Mass\n")
    with pytest.raises(DataError, match="'Image Index' and 'Finding Labels'"):
        load_domain(DomainConfig("chestx", str(chestx), format="chestx"), CFG, T16)


def test_filelist_remaps_noncontiguous_labels(filelist, tmp_path):
    ds = load_domain(DomainConfig("cub", str(filelist), format="filelist"), CFG, T16)
    assert ds.class_names == ["004.Bird_4", "008.Bird_8", "012.Bird_12"]
    assert sorted(set(ds.targets)) == [0, 1, 2] and [len(c) for c in ds.indices_by_class()] == [3, 2, 2]
    assert all(ds.class_names[y] == p.parent.name and p.is_file() for p, y in ds.samples)
    _assert_images(ds)
    ds = load_domain(DomainConfig("cub", str(filelist), "filelist", _splits(tmp_path, ["012.Bird_12"]), "test"),
                     CFG, T16)
    assert ds.class_names == ["012.Bird_12"] and len(ds) == 2
    with pytest.raises(DataError, match=r"not in the data, e\.g\. \['nope'\]"):
        load_domain(DomainConfig("cub", str(filelist), "filelist", _splits(tmp_path, ["nope"]), "test"), CFG, T16)


def test_filelist_without_label_names_uses_the_numbers(filelist):
    meta = json.loads(filelist.read_text())
    del meta["label_names"]
    filelist.write_text(json.dumps(meta))
    ds = load_domain(DomainConfig("cub", str(filelist), format="filelist"), CFG, T16)
    assert ds.class_names == ["3", "7", "11"]


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    (json.dumps({"label_names": ["a"], "image_names": ["x.jpg"]}), "'image_labels'"),
    (json.dumps({"label_names": ["a"], "image_names": ["x.jpg", "y.jpg"], "image_labels": [0]}),
     "2 image_names but 1 image_labels"),
    (json.dumps({"label_names": ["a", "b"], "image_names": ["x.jpg"], "image_labels": [2]}),
     r"integers in 0\.\.1 \(indices into label_names\); found \[2\]"),
])
def test_filelist_errors_name_file_and_expectation(tmp_path, content, message):
    path = tmp_path / "novel.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_domain(DomainConfig("d", str(path), format="filelist"), CFG, T16)
    assert str(path) in str(info.value)


def test_check_domain_reports_missing_image(isic, chestx, filelist):
    (isic / "ISIC2018_Task3_Training_Input" / "ISIC_0004.jpg").unlink()
    (chestx / "images" / "00000006_000.png").unlink()
    (filelist.parent / "source/CUB_200_2011/images/008.Bird_8/008.Bird_8_1.jpg").unlink()
    for fmt, path, gone in (("isic", isic, "ISIC_0004.jpg"), ("chestx", chestx, "00000006_000.png"),
                            ("filelist", filelist, "008.Bird_8_1.jpg")):
        report = check_domain(DomainConfig(fmt, str(path), format=fmt), CFG, n_way=2, n_shot=1, n_query=1)
        assert [p for p in report["problems"] if p.startswith("missing file")] == [
            f"missing file {p}" for p, _ in load_domain(DomainConfig(fmt, str(path), format=fmt), CFG, T16).samples
            if p.name == gone]
        assert report["images"] == 6 and report["classes"] == (3 if fmt == "filelist" else 7)


def test_check_domain_reports_split_classes_absent(filelist, tmp_path):
    domain = DomainConfig("cub", str(filelist), "filelist", _splits(tmp_path, ["004.Bird_4", "gone"]), "test")
    report = check_domain(domain, CFG, n_way=1, n_shot=1, n_query=1)
    assert report["classes"] == 1 and any("'gone'" in p for p in report["problems"])


def test_data_check_cli_filelist(filelist, capsys):
    from amt.cli import main

    assert main(["data", "check", str(filelist), "--format", "filelist", "--n-way", "3", "--n-shot", "1",
                 "--n-query", "1"]) == 0
    out = capsys.readouterr().out
    assert "3 classes, 7 readable images" in out and out.strip().endswith("OK")
    (filelist.parent / "source/CUB_200_2011/images/004.Bird_4/004.Bird_4_2.jpg").write_bytes(b"not an image")
    assert main(["data", "check", str(filelist), "--format", "filelist", "--n-way", "3", "--n-shot", "2",
                 "--n-query", "1"]) == 1
    out = capsys.readouterr().out
    assert "unreadable image" in out and "004.Bird_4_2.jpg" in out and "fewer than 3" in out


def test_every_format_is_a_cli_choice(tmp_path):
    from amt.cli import main

    for fmt in FORMATS:  # a missing path is a data error (exit 2), not an argparse rejection (SystemExit)
        assert main(["data", "check", str(tmp_path / "nope"), "--format", fmt]) == 2


def test_registry_matches_config_and_readers_share_one_signature():
    assert FORMATS == typing.get_args(typing.get_type_hints(DomainConfig)["format"])
    signatures = {fmt: inspect.signature(reader) for fmt, reader in READERS.items()}
    assert len({str(s) for s in signatures.values()}) == 1, signatures


def test_readers_do_not_import_the_metadataset_reader_until_used():
    code = ("import sys, amt.data.domains, amt.data.readers; "
            "assert not {'tfrecord', 'crc32c', 'amt.data.metadataset'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bscdfsl_folder_layouts(tmp_path):
    """EuroSAT (``EuroSAT/2750/<class>/*.jpg``) and CropDisease (``dataset/train/<class>/*.jpg``; BSCD-FSL reads
    only ``train``) are torchvision ImageFolder trees in BSCD-FSL's loaders: classes are the sorted folder names."""
    eurosat = tmp_path / "EuroSAT" / "2750"
    for c in ("River", "AnnualCrop", "SeaLake", "Forest"):
        _image(eurosat / c / f"{c}_1.jpg")
    crop = tmp_path / "CropDiseases" / "dataset"
    for split, classes in (("train", ("Tomato___healthy", "Apple___Apple_scab")), ("test", ("Apple___Black_rot",))):
        for c in classes:
            _image(crop / split / c / f"{c}_1.JPG")
    ds = load_domain(DomainConfig("eurosat", str(eurosat), format="folder"), CFG, T16)
    assert ds.class_names == ["AnnualCrop", "Forest", "River", "SeaLake"]
    ds = load_domain(DomainConfig("cropdisease", str(crop / "train"), format="folder"), CFG, T16)
    assert ds.class_names == ["Apple___Apple_scab", "Tomato___healthy"] and len(ds) == 2  # .JPG counts too


def test_data_check_cli_prints_classes_per_split(isic, tmp_path, capsys):
    from amt.cli import main

    args = ["data", "check", str(isic), "--format", "isic", "--n-way", "2", "--n-shot", "1", "--n-query", "1"]
    assert main(args) == 1  # the fixture has images of 3 of the 7 classes only
    assert "classes per split: no class splits given; all 7 classes are used" in capsys.readouterr().out
    splits = tmp_path / "isic_splits.json"
    splits.write_text(json.dumps({"val": ["NV"], "test": ["MEL", "VASC"]}))
    assert main(args + ["--splits", str(splits), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "ISIC: 2 classes, 5 readable images" in out and "classes per split: val 1 / test 2 (checked: test)" in out
