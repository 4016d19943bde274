"""No test image is ever used for tuning: a domain without validation classes holds out a fixed part of every class
for its validation tasks, for every on-disk format; the test tasks never see those images."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from contextlib import contextmanager

import pytest
import torch

from amt.config import AugmentConfig, DataConfig, DomainConfig, EvalConfig
from amt.data.domains import load_domain, validation_set
from amt.data.readers import CHESTX_CLASSES, CHESTX_TABLE, FORMATS, ISIC_IMAGES, ISIC_TABLE
from amt.data.transforms import build_transform
from amt.evaluate import evaluate, holdout_split
from amt.head import cosine_logits, prototypes
from amt.methods import Method, TaskRecord

from conftest import write_image_folder

DATA = DataConfig(resize_ratio=1.0)
TRANSFORM = build_transform(16, DATA, AugmentConfig(), train=False)


def _digest(images: torch.Tensor) -> set[str]:
    return {hashlib.sha1(x.numpy().tobytes()).hexdigest() for x in images}


class _Spy(Method):
    """A tunable method that records every image it sees while tuning and while being tested."""

    tunable = True

    def __init__(self):
        self.tuning, self.testing = set(), set()

    def tune(self, tasks, rng):
        for e in tasks:
            self.tuning |= _digest(e.support_images) | _digest(e.query_images)
        return {"chosen": {}}

    @contextmanager
    def adapt(self, support_images, support_labels, n_way, generator):
        self.testing |= _digest(support_images)
        protos = prototypes(support_images.mean(dim=(2, 3)), support_labels, n_way)

        def logits_fn(x):
            self.testing.update(_digest(x.detach()))
            return cosine_logits(x.mean(dim=(2, 3)), protos, 10.0)

        yield logits_fn, TaskRecord()


def _domain(fmt: str, tmp_path) -> DomainConfig:
    """One small domain (6+ classes of 10 distinct images) in on-disk format ``fmt``, without validation classes."""
    if fmt == "metadataset":
        from test_metadataset import write_dataset  # 5 test classes, 1 validation class (too few to tune on)

        return DomainConfig("d", str(write_dataset(tmp_path / "md", per_class=10)), "metadataset", split="test")
    root = write_image_folder(tmp_path / "folder", n_classes=7, per_class=10, size=16)
    files = [(p, p.parent.name) for p in sorted(root.glob("*/*.png"))]
    if fmt == "folder":
        return DomainConfig("d", str(root))
    if fmt == "csv":
        path = tmp_path / "d.csv"
        with path.open("w", newline="") as f:
            csv.writer(f).writerows([("path", "label"), *((str(p), c) for p, c in files)])
        return DomainConfig("d", str(path), "csv")
    if fmt == "filelist":
        classes = sorted({c for _, c in files})
        meta = {"label_names": classes, "image_names": [str(p) for p, _ in files],
                "image_labels": [classes.index(c) for _, c in files]}
        (tmp_path / "novel.json").write_text(json.dumps(meta))
        return DomainConfig("d", str(tmp_path / "novel.json"), "filelist")
    classes = sorted({c for _, c in files})
    out = tmp_path / fmt
    if fmt == "isic":
        (out / ISIC_IMAGES).mkdir(parents=True)
        names = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
        with (out / ISIC_TABLE).open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", *names])
            for i, (p, c) in enumerate(files):
                shutil.copy(p, out / ISIC_IMAGES / f"ISIC_{i:05d}.jpg")  # PNG bytes: PIL reads by content
                w.writerow([f"ISIC_{i:05d}", *("1.0" if k == classes.index(c) else "0.0" for k in range(7))])
        return DomainConfig("d", str(out), "isic")
    assert fmt == "chestx"
    (out / "images").mkdir(parents=True)
    with (out / CHESTX_TABLE).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image Index", "Finding Labels"])
        for i, (p, c) in enumerate(files):
            shutil.copy(p, out / "images" / f"{i:08d}_000.png")
            w.writerow([f"{i:08d}_000.png", CHESTX_CLASSES[classes.index(c)]])
    return DomainConfig("d", str(out), "chestx")


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_test_image_is_used_for_tuning_in_any_format(fmt, tmp_path):
    domain = _domain(fmt, tmp_path)
    dataset = load_domain(domain, DATA, TRANSFORM)
    assert validation_set(domain, DATA, TRANSFORM, 5) is None  # the domain has no usable validation classes
    spy = _Spy()
    cfg = EvalConfig(n_tasks=8, shots=(1, 2), n_query=2, corruptions=(), val_tasks=6, holdout_fraction=0.3)
    res = evaluate({"spy": spy}, [(domain, dataset)], cfg)
    assert spy.tuning and spy.testing and not spy.tuning & spy.testing
    assert "held-out images" in res["tuning"]["spy"]["d"]["1"]["validation_tasks"]


def test_the_holdout_is_a_fixed_part_of_every_class():
    classes = [list(range(c * 10, c * 10 + n)) for c, n in enumerate([10, 7, 1, 3])]
    val, test = holdout_split(classes, 0.25, seed=3)
    assert [len(v) for v in val] == [3, 2, 0, 1] and [len(t) for t in test] == [7, 5, 1, 2]
    for v, t, c in zip(val, test, classes):
        assert not set(v) & set(t) and sorted(v + t) == c
    assert holdout_split(classes, 0.25, seed=3) == (val, test)  # fixed by the seed
    assert holdout_split(classes, 0.25, seed=4) != (val, test)
