"""Classifying a user's own images: the Python API and `amt predict`, on real image files, the shipped backbone and
the shipped pool."""

import csv

import pytest
import torch
from PIL import Image

from amt.attacks import robust_under_pgd
from amt.classify import FewShotClassifier, load_image
from amt.cli import main
from amt.data.base import DataError

from conftest import write_image_folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Support (5 classes × 2 images) and query folders of a dataset the project has never seen."""
    root = tmp_path_factory.mktemp("own")
    data = write_image_folder(root / "all", 5, 4, size=24, seed=3)
    support, query = root / "support", root / "query"
    for d in sorted(data.iterdir()):
        (support / d.name).mkdir(parents=True)
        query.mkdir(exist_ok=True)
        for i, f in enumerate(sorted(d.iterdir())):
            f.rename((support / d.name / f.name) if i < 2 else (query / f"{d.name}_{f.name}"))
    return support, query


@pytest.fixture(scope="module")
def amt_clf():
    return FewShotClassifier.from_config("configs/embedded.yaml", pool="embedded:glyph_pool")


def test_support_images_are_classified_as_their_class_with_probabilities(amt_clf, folders):
    support, _ = folders
    classes = {d.name: sorted(d.iterdir())[:1] for d in sorted(support.iterdir())}  # one shot
    amt_clf.fit(classes)
    images = [v[0] for v in classes.values()]
    out = amt_clf.predict(images + [Image.open(images[2]), torch.rand(3, 50, 40)])  # paths, PIL, a tensor
    assert out.labels[:5] == list(classes) and out.labels[5] == list(classes)[2]  # a 1-shot support is its prototype
    assert out.probs.shape == (7, 5) and torch.allclose(out.probs.sum(1), torch.ones(7))
    assert out.min_eps is None


def test_robustness_readout_is_the_smallest_flipping_radius(amt_clf, folders):
    support, query = folders
    amt_clf.fit({d.name: sorted(d.iterdir()) for d in sorted(support.iterdir())})
    queries = sorted(query.iterdir())[:2]
    out = amt_clf.predict(queries, robustness=True, max_eps=32 / 255, bisection_steps=4)
    assert out.min_eps.shape == (2,) and bool((out.min_eps > 0).all())
    x = amt_clf._images(queries)
    with amt_clf.method.adapt(amt_clf.support, amt_clf.support_labels, 5, torch.Generator().manual_seed(0)) as (fn, _):
        pred = fn(x).argmax(-1)
        for i, eps in enumerate(out.min_eps.tolist()):
            if eps == float("inf"):
                continue
            attack = amt_clf.cfg.attack.__class__(eps=eps, step_size=eps / 10, steps=amt_clf.cfg.attack.steps,
                                                  restarts=amt_clf.cfg.attack.restarts)
            kept = robust_under_pgd(attack, fn, x[i : i + 1], pred[i : i + 1], torch.Generator().manual_seed(i))
            assert not bool(kept[0])  # at the reported radius the attack flips the prediction


def test_attack_stays_in_the_ball_and_its_prediction_is_what_predict_says(amt_clf, folders):
    support, query = folders
    amt_clf.fit({d.name: sorted(d.iterdir()) for d in sorted(support.iterdir())})
    queries = sorted(query.iterdir())[:4]
    x = amt_clf._images(queries)
    eps = 16 / 255
    adv, clean, attacked = amt_clf.attack(queries, eps)
    assert adv.shape == x.shape and float((adv - x).abs().max()) <= eps + 1e-6
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    assert clean.labels == amt_clf.predict(queries).labels
    assert attacked.labels == amt_clf.predict(list(adv)).labels  # the adversarial images, classified afresh
    assert attacked.labels != clean.labels  # 16/255 flips some of these noise images (min_eps ≈ 1/255)
    with pytest.raises(ValueError, match="pixel units"):
        amt_clf.attack(queries, 8)


def test_bad_images_and_support_sets_are_named(amt_clf, tmp_path):
    bad = tmp_path / "note.png"
    bad.write_text("not an image")
    with pytest.raises(DataError, match="note.png"):
        load_image(bad, amt_clf.transform, 32)
    with pytest.raises(DataError, match="at least 2 classes"):
        amt_clf.fit({"a": [torch.rand(3, 8, 8)]})
    with pytest.raises(DataError, match=r"\['b'\] have no support images"):
        amt_clf.fit({"a": [torch.rand(3, 8, 8)], "b": []})
    with pytest.raises(DataError, match="pixels in"):
        load_image(torch.full((3, 8, 8), 2.0), amt_clf.transform, 32)


def test_amt_predict_writes_one_row_per_query_and_refuses_bad_input(folders, tmp_path):
    support, query = folders
    out = tmp_path / "pred.csv"
    assert main(["predict", "--support", str(support), "--query", str(query), "--pool", "embedded:glyph_pool",
                 "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(list(query.iterdir())) == 10
    assert set(rows[0]) == {"path", "label", *(f"p_class_0{c}" for c in range(5))}
    assert all(abs(sum(float(r[f"p_class_0{c}"]) for c in range(5)) - 1) < 1e-4 for r in rows)
    empty = tmp_path / "empty_support"
    (empty / "only").mkdir(parents=True)
    (empty / "none").mkdir()
    Image.new("RGB", (8, 8)).save(empty / "only" / "a.png")
    assert main(["predict", "--support", str(empty), "--query", str(query), "--out", str(tmp_path / "x.csv")]) == 2
    assert main(["predict", "--support", str(support), "--query", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "x.csv")]) == 2
    (tmp_path / "q").mkdir()
    assert main(["predict", "--support", str(support), "--query", str(tmp_path / "q"),
                 "--out", str(tmp_path / "x.csv")]) == 2  # no query images
    assert not (tmp_path / "x.csv").exists()


def test_amt_predict_names_each_bad_input(folders, tmp_path, caplog):
    support, query = folders
    out = str(tmp_path / "x.csv")

    def error(args: list[str]) -> str:
        caplog.clear()
        assert main(["predict", *args, "--out", out]) == 2
        return " ".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")

    one = tmp_path / "one_class"
    (one / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(one / "cat" / "a.png")
    assert "at least 2 classes" in error(["--support", str(one), "--query", str(query)])
    (one / "dog").mkdir()
    assert "['dog'] have no support images" in error(["--support", str(one), "--query", str(query)])
    (one / "dog" / "broken.png").write_bytes(b"not an image")
    assert "broken.png" in error(["--support", str(one), "--query", str(query)])
    (tmp_path / "q").mkdir()
    assert "no query images" in error(["--support", str(support), "--query", str(tmp_path / "q")])
    message = error(["--support", str(support), "--query", str(query), "--pool", "embedded:glyph_pool",
                     "--set", "backbone.checkpoint=null", "--set", "backbone.random_init=true"])  # another backbone
    assert "glyph_pool was trained from backbone" in message
    assert not (tmp_path / "x.csv").exists()
