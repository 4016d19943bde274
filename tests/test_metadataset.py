"""Meta-Dataset TFRecord reader on a tiny converted dataset written with the `tfrecord` package."""

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tfrecord import TFRecordWriter
from tfrecord.tools.tfrecord2idx import create_index
from torchvision.transforms import v2

from amt.config import AugmentConfig, DataConfig, DomainConfig
from amt.data.base import DataError
from amt.data.domains import check_domain, load_domain, validation_set
from amt.data.episodes import FixedSampler, load_episode
from amt.data.metadataset import MetaDatasetSpec, load_metadataset_domain
from amt.data.transforms import build_transform

from conftest import gen

TO_TENSOR = v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)])
TEST8 = build_transform(8, DataConfig(resize_ratio=1.0), AugmentConfig(), train=False)
SPLIT = {"TRAIN": 2, "VALID": 1, "TEST": 5}  # 8 classes: ids 0-1 train, 2 valid, 3-7 test
PER_CLASS = 6


def colour(c: int, i: int) -> tuple[int, int, int]:
    return (30 * c + 5, 7 * i + 3, 255 - 20 * c)


def png_bytes(rgb: tuple[int, int, int], size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="PNG")
    return buf.getvalue()


def write_dataset(root: Path, split_key=lambda s: s, per_class=PER_CLASS, index=False) -> Path:
    """A converted dataset: dataset_spec.json and one <class_id>.tfrecords per class."""
    root.mkdir(parents=True)
    n = sum(SPLIT.values())
    for c in range(n):
        w = TFRecordWriter(str(root / f"{c}.tfrecords"))
        for i in range(per_class):
            w.write({"image": (png_bytes(colour(c, i)), "byte"), "label": (c, "int")})
        w.close()
        if index:
            create_index(str(root / f"{c}.tfrecords"), str(root / f"{c}.index"))
    spec = {
        "name": "tiny", "classes_per_split": {split_key(k): v for k, v in SPLIT.items()},
        "images_per_class": {str(c): per_class for c in range(n)},
        "class_names": {str(c): f"n{c:03d}" for c in range(n)},
        "path": str(root), "file_pattern": "{}.tfrecords",
    }
    (root / "dataset_spec.json").write_text(json.dumps(spec))
    return root


@pytest.fixture
def tiny(tmp_path):
    return write_dataset(tmp_path / "tiny")


@pytest.mark.parametrize("key", [lambda s: s, lambda s: f"Split.{s}"], ids=["TRAIN", "Split.TRAIN"])
def test_split_classes_names_and_counts(tmp_path, key):
    root = write_dataset(tmp_path / "d", split_key=key)
    for split, ids in [("train", [0, 1]), ("val", [2]), ("test", [3, 4, 5, 6, 7])]:
        ds = load_metadataset_domain(root, split, TO_TENSOR)
        assert ds.class_names == [f"n{c:03d}" for c in ids] and ds.class_ids == ids
        assert [len(c) for c in ds.indices_by_class()] == [PER_CLASS] * len(ids)
        assert len(ds) == PER_CLASS * len(ids) and ds.name == "tiny"


@pytest.mark.parametrize("index", [False, True], ids=["scan", "index_file"])
def test_images_round_trip(tmp_path, index):
    ds = load_metadataset_domain(write_dataset(tmp_path / "d", index=index), "test", TO_TENSOR)
    for label, idx in enumerate(ds.indices_by_class()):
        for i, j in enumerate(idx):
            img, y = ds[j]
            assert y == label and img.shape == (3, 8, 8)
            expected = np.broadcast_to(np.array(colour(ds.class_ids[label], i), dtype=np.uint8), (8, 8, 3))
            assert np.array_equal(np.asarray(ds.load_image(j)), expected)  # exact pixels
            assert torch.equal((img * 255).round().to(torch.uint8), torch.from_numpy(expected.copy()).permute(2, 0, 1))


def test_max_images_and_cache(tiny):
    ds = load_metadataset_domain(tiny, "train", TO_TENSOR, max_images_per_class=2, cache_decoded=True)
    assert [len(c) for c in ds.indices_by_class()] == [2, 2]
    a = np.asarray(ds.load_image(3))
    assert 3 in ds._cache and np.array_equal(np.asarray(ds.load_image(3)), a)


def test_five_way_episode(tiny):
    ds = load_metadataset_domain(tiny, "test", TO_TENSOR)
    sampler = FixedSampler(ds.indices_by_class(), n_way=5, n_shot=2, n_query=3, generator=gen(0))
    ep = load_episode(ds, sampler.sample())
    assert ep.support_images.shape == (10, 3, 8, 8) and ep.query_images.shape == (15, 3, 8, 8)
    assert sorted(ep.class_ids.tolist()) == [0, 1, 2, 3, 4]
    # every support image of a way has that class's colour (red channel encodes the class id)
    for img, y in zip(ep.support_images, ep.support_labels):
        c = ds.class_ids[int(ep.class_ids[y])]
        assert round(float(img[0, 0, 0]) * 255) == colour(c, 0)[0]


def test_missing_spec_and_class_file(tmp_path, tiny):
    with pytest.raises(DataError, match="dataset_spec.json does not exist"):
        load_metadataset_domain(tmp_path / "nope", "test", TO_TENSOR)
    (tiny / "5.tfrecords").unlink()
    with pytest.raises(DataError, match=r"1 class file\(s\) of split 'test' are missing"):
        load_metadataset_domain(tiny, "test", TO_TENSOR)
    assert len(load_metadataset_domain(tiny, "train", TO_TENSOR)) == 2 * PER_CLASS  # other splits still load


def test_corrupt_and_truncated_records(tiny):
    path = tiny / "0.tfrecords"
    raw = bytearray(path.read_bytes())
    raw[40] ^= 0xFF  # inside the first record's data
    path.write_bytes(bytes(raw))
    ds = load_metadataset_domain(tiny, "train", TO_TENSOR)
    with pytest.raises(DataError, match="checksum mismatch"):
        ds[0]
    ds[PER_CLASS]  # class 1 is intact
    path.write_bytes(bytes(raw[:-10]))
    with pytest.raises(DataError, match="truncated"):
        load_metadataset_domain(tiny, "train", TO_TENSOR)


def test_count_mismatch_warns(tiny, caplog):
    spec = json.loads((tiny / "dataset_spec.json").read_text())
    spec["images_per_class"]["0"] = PER_CLASS + 4
    (tiny / "dataset_spec.json").write_text(json.dumps(spec))
    with caplog.at_level(logging.WARNING):
        ds = load_metadataset_domain(tiny, "train", TO_TENSOR)
    assert len(ds) == 2 * PER_CLASS and "says 10" in caplog.text


def test_spec_variants_and_errors(tmp_path):
    root = tmp_path
    # hierarchical (ilsvrc_2012): images_per_class nested per split
    nested = {"TRAIN": {"0": 3, "1": 4}, "VALID": {"2": 5}, "TEST": {"3": 1}}
    h = MetaDatasetSpec.from_dict({"images_per_class": nested}, root)
    assert h.classes_per_split == {"TRAIN": 2, "VALID": 1, "TEST": 1} and h.class_ids("test") == [3]
    # bi-level (omniglot): superclasses per split
    b = MetaDatasetSpec.from_dict({
        "superclasses_per_split": {"Split.TRAIN": 2, "Split.VALID": 0, "Split.TEST": 1},
        "classes_per_superclass": {"0": 2, "1": 3, "2": 2},
        "images_per_class": {str(c): 20 for c in range(7)},
    }, root)
    assert b.class_ids("train") == [0, 1, 2, 3, 4] and b.class_ids("val") == [] and b.class_ids("test") == [5, 6]
    with pytest.raises(DataError, match="sums to 3 classes"):
        MetaDatasetSpec.from_dict({"classes_per_split": {"TRAIN": 3}, "images_per_class": {"0": 1}}, root)
    with pytest.raises(DataError, match="unknown split"):
        MetaDatasetSpec.from_dict({"classes_per_split": {"TRAINING_SET": 1}, "images_per_class": {"0": 1}}, root)
    with pytest.raises(DataError, match="file_pattern"):
        MetaDatasetSpec.from_dict({"classes_per_split": {"TRAIN": 1}, "images_per_class": {"0": 1},
                                   "file_pattern": "{}_{}.tfrecords"}, root)


def test_undecodable_image_and_wrong_label(tmp_path):
    root = write_dataset(tmp_path / "d")
    w = TFRecordWriter(str(root / "0.tfrecords"))
    w.write({"image": (b"not an image", "byte"), "label": (0, "int")})
    w.write({"image": (png_bytes((1, 2, 3)), "byte"), "label": (5, "int")})
    w.close()
    ds = load_metadataset_domain(root, "train", TO_TENSOR)
    with pytest.raises(DataError, match="cannot decode the image bytes"):
        ds[0]
    with pytest.raises(DataError, match="record label 5 but the file is class 0"):
        ds[1]


def test_metadataset_format_through_load_domain_and_evaluation(tiny, tmp_path):
    from contextlib import contextmanager

    from amt.config import EvalConfig
    from amt.evaluate import evaluate
    from amt.head import cosine_logits, prototypes
    from amt.methods import Method, TaskRecord

    domain = DomainConfig("tiny", str(tiny), format="metadataset", split="test")
    ds = load_domain(domain, DataConfig(), TEST8)
    assert ds.class_names == [f"n{c:03d}" for c in range(3, 8)]
    assert load_domain(domain, DataConfig(), TEST8, split="train").class_names == ["n000", "n001"]

    class Colour(Method):  # a method that classifies by mean colour
        @contextmanager
        def adapt(self, s, y, n, g):
            protos = prototypes(s.mean(dim=(2, 3)), y, n)
            yield (lambda x: cosine_logits(x.mean(dim=(2, 3)), protos, 10.0)), TaskRecord()

    res = evaluate({"colour": Colour()}, [(domain, ds)], EvalConfig(n_tasks=3, shots=(1,), n_query=2, corruptions=()))
    assert res["results"][0]["n_tasks"] == 3 and res["results"][0]["mean"] > 50


def test_metadataset_domain_validation_set_and_check(tmp_path, tiny):
    domain = DomainConfig("tiny", str(tiny), format="metadataset", split="test")
    val = validation_set(domain, DataConfig(), TEST8, n_way=1)  # the spec's VALID split: class 2
    assert val.class_names == ["n002"] and val.class_ids == [2] and val[0][0].shape == (3, 8, 8)
    assert validation_set(domain, DataConfig(), TEST8, n_way=2) is None
    spec = json.loads((tiny / "dataset_spec.json").read_text())
    spec["classes_per_split"] = {"TRAIN": 2, "VALID": 0, "TEST": 6}  # e.g. traffic_sign: no validation classes
    (tiny / "dataset_spec.json").write_text(json.dumps(spec))
    assert validation_set(domain, DataConfig(), TEST8, n_way=1) is None
    report = check_domain(domain, DataConfig(), n_way=5, n_shot=1, n_query=5)
    assert report["classes"] == 6 and report["images"] == 6 * PER_CLASS and report["problems"] == []
