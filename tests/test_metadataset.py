"""Meta-Dataset TFRecord reader on tiny converted datasets written with the `tfrecord` package.

The specs below the "published shapes" line have the structure of the files the Meta-Dataset project publishes
(meta_dataset/dataset_conversion/dataset_specs/*.json) and writes with its converter: flat, bi-level (omniglot)
and hierarchical (ilsvrc_2012: WordNet-keyed counts of every node, split_subgraphs, class_names id -> WordNet id),
with made-up names and ids. The published files themselves are not in the repository (nor downloaded here).
"""

import io
import itertools
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
from amt.data.base import DataError, MissingSplitError
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
    # images_per_class nested per split without split_subgraphs: no such spec is published (nor written by the
    # converter), and without the subgraphs the classes cannot be told from the internal nodes
    nested = {"TRAIN": {"0": 3, "1": 4}, "VALID": {"2": 5}, "TEST": {"3": 1}}
    with pytest.raises(DataError, match="no 'split_subgraphs'"):
        MetaDatasetSpec.from_dict({"images_per_class": nested}, root)
    # bi-level (omniglot): superclasses per split (older Split.* keys)
    b = MetaDatasetSpec.from_dict({
        "superclasses_per_split": {"Split.TRAIN": 2, "Split.VALID": 0, "Split.TEST": 1},
        "classes_per_superclass": {"0": 2, "1": 3, "2": 2},
        "images_per_class": {str(c): 20 for c in range(7)},
    }, root)
    assert b.class_ids("train") == [0, 1, 2, 3, 4] and b.class_ids("val") == [] and b.class_ids("test") == [5, 6]
    with pytest.raises(DataError, match=r"no entry for superclass\(es\) \[2\]"):
        MetaDatasetSpec.from_dict({"superclasses_per_split": {"TRAIN": 3}, "classes_per_superclass": {"0": 1, "1": 1},
                                   "images_per_class": {"0": 1, "1": 1}}, root)
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


# ---- specs in the shapes the official converter writes (meta_dataset/dataset_conversion/dataset_specs/*.json) ----
# Made-up names and WordNet ids; the structure (keys, nesting, what is keyed by what) is that of the published files.
SPLIT_NAMES = ("TRAIN", "VALID", "TEST")


def flat_spec(name: str, counts: tuple[int, int, int], per_class: int = 3) -> dict:
    """A ``DatasetSpecification`` (aircraft, cu_birds, dtd, quickdraw, fungi, vgg_flower, traffic_sign, mscoco)."""
    n = sum(counts)
    return {"name": name, "classes_per_split": dict(zip(SPLIT_NAMES, counts)),
            "images_per_class": {str(c): per_class for c in range(n)},
            "class_names": {str(c): f"{c:03d}.{name}_class" for c in range(n)},
            "path": f"/path/to/records/{name}", "file_pattern": "{}.tfrecords", "__class__": "DatasetSpecification"}


def bilevel_spec(name: str, superclasses: dict[str, list[int]], per_class: int = 3) -> dict:
    """A ``BiLevelDatasetSpecification`` (omniglot): ``superclasses[split]`` lists the classes of each of its
    superclasses (alphabets), superclasses numbered train, valid, test."""
    sizes = [k for s in SPLIT_NAMES for k in superclasses.get(s, [])]
    names = [f"Alphabet{a:02d}-character{i + 1:02d}" for a, k in enumerate(sizes) for i in range(k)]
    return {"name": name, "superclasses_per_split": {s: len(superclasses.get(s, [])) for s in SPLIT_NAMES},
            "classes_per_superclass": {str(a): k for a, k in enumerate(sizes)},
            "images_per_class": {str(c): per_class for c in range(len(names))},
            "superclass_names": {str(a): f"Alphabet{a:02d}" for a in range(len(sizes))},
            "class_names": {str(c): n for c, n in enumerate(names)},
            "path": f"/path/to/records/{name}", "file_pattern": "{}.tfrecords",
            "__class__": "BiLevelDatasetSpecification"}


def hierarchical_spec(name: str, shape: dict[str, tuple[int, int]], seed: int = 0, per_leaf: int = 3) -> dict:
    """A ``HierarchicalDatasetSpecification`` (ilsvrc_2012): ``shape[split] = (leaves, internal nodes)``.

    Each split has its own DAG (a root, internal nodes, leaves; one leaf with two parents), exported as the
    converter does: nodes sorted by WordNet id with ``wn_id``/``words``/``children_ids``/``parents_ids``;
    ``images_per_class[split]`` keyed by WordNet id for every node (internal: the images of the distinct
    leaves below); ``class_names`` maps id → WordNet id over the sorted train leaves, then valid, then test.
    WordNet ids are random, so per-split sorting differs from node order and from a global sort.
    """
    rng = np.random.default_rng(seed)
    ids = iter(f"n{x:08d}" for x in rng.choice(10**8, size=sum(sum(v) for v in shape.values()), replace=False))
    graphs, counts, class_names = {}, {}, []
    for s in SPLIT_NAMES:
        n_leaves, n_internal = shape.get(s, (0, 0))
        internal = [next(ids) for _ in range(n_internal)]
        leaves = [next(ids) for _ in range(n_leaves)]
        children = {w: [] for w in internal + leaves}
        for i in range(1, n_internal):  # internal nodes as a binary heap under internal[0]
            children[internal[(i - 1) // 2]].append(internal[i])
        hosts = [w for i, w in enumerate(internal) if 2 * i + 1 >= n_internal]  # no internal child: needs a leaf
        for leaf, owner in zip(leaves, itertools.chain(hosts, itertools.cycle(internal))):
            children[owner].append(leaf)
        if n_leaves > 1 and n_internal > 1:  # a DAG, as WordNet is: one leaf under a second parent
            children[internal[0]].append(leaves[-1])
        parents = {w: [p for p, cs in children.items() if w in cs] for w in children}
        below = {w: {w} for w in leaves}
        for w in reversed(internal):  # children come later in heap order
            below[w] = set().union(*(below[c] for c in children[w]))
        graphs[s] = [{"wn_id": w, "words": f"synset {w}", "children_ids": sorted(children[w]),
                      "parents_ids": sorted(parents[w])} for w in sorted(children)]
        counts[s] = {w: per_leaf * len(below[w]) for w in sorted(children)}
        class_names += sorted(leaves)
    return {"name": name, "split_subgraphs": graphs, "images_per_class": counts,
            "class_names": {str(c): w for c, w in enumerate(class_names)},
            "path": f"/path/to/records/{name}", "file_pattern": "{}.tfrecords",
            "__class__": "HierarchicalDatasetSpecification"}


def write_converted(root: Path, spec: dict, per_class: int = 3, class_ids=None) -> Path:
    """``spec`` as ``root/dataset_spec.json`` and ``root/<id>.tfrecords`` per class (``class_ids``, default every
    class), each with ``per_class`` records ``{"image": PNG bytes, "label": id}`` as the converter writes them."""
    root.mkdir(parents=True)
    (root / "dataset_spec.json").write_text(json.dumps(spec))
    for c in range(len(spec["class_names"])) if class_ids is None else class_ids:
        w = TFRecordWriter(str(root / spec["file_pattern"].format(c)))
        for i in range(per_class):
            w.write({"image": (png_bytes(colour(c % 8, i)), "byte"), "label": (c, "int")})
        w.close()
    return root


def test_hierarchical_spec_classes_are_the_leaves_numbered_train_valid_test(tmp_path):
    raw = hierarchical_spec("ilsvrc_2012", {"TRAIN": (6, 3), "VALID": (5, 2), "TEST": (5, 3)})
    spec = MetaDatasetSpec.from_dict(raw, tmp_path)
    assert spec.kind == "hierarchical"
    assert spec.classes_per_split == {"TRAIN": 6, "VALID": 5, "TEST": 5}  # leaves, not the 9 / 7 / 8 entries
    assert {s: len(raw["images_per_class"][s]) for s in SPLIT_NAMES} == {"TRAIN": 9, "VALID": 7, "TEST": 8}
    leaves = {s: sorted(n["wn_id"] for n in raw["split_subgraphs"][s] if not n["children_ids"]) for s in SPLIT_NAMES}
    order = leaves["TRAIN"] + leaves["VALID"] + leaves["TEST"]
    assert order != sorted(order)  # per-split order, not a global sort: the fixture can tell them apart
    assert [spec.class_names[c] for c in range(16)] == order
    assert [spec.class_names[c] for c in spec.class_ids("test")] == leaves["TEST"]
    assert spec.images_per_class == dict.fromkeys(range(16), 3)  # the leaves' entries, not the internal nodes'
    # without class_names the ids follow the same rule; a reordering inside a split is kept (records follow it)
    assert MetaDatasetSpec.from_dict({k: v for k, v in raw.items() if k != "class_names"}, tmp_path).class_names \
        == spec.class_names
    swapped = dict(raw, class_names=dict(raw["class_names"], **{"0": order[1], "1": order[0]}))
    assert MetaDatasetSpec.from_dict(swapped, tmp_path).class_names[0] == order[1]


def test_hierarchical_spec_errors(tmp_path):
    raw = hierarchical_spec("ilsvrc_2012", {"TRAIN": (6, 3), "VALID": (5, 2), "TEST": (5, 3)})
    crossed = dict(raw, class_names=dict(raw["class_names"], **{"5": raw["class_names"]["6"],
                                                                "6": raw["class_names"]["5"]}))
    with pytest.raises(DataError, match=r"class_names of ids 0\.\.5 are not the 6 leaves of split_subgraphs\['TRAIN"):
        MetaDatasetSpec.from_dict(crossed, tmp_path)
    with pytest.raises(DataError, match="class_names has 15 class ids but the split subgraphs have 16 leaves"):
        MetaDatasetSpec.from_dict(dict(raw, class_names={str(c): w for c, w in list(raw["class_names"].items())[:15]}),
                                  tmp_path)
    leaf = raw["class_names"]["0"]
    train = {k: v for k, v in raw["images_per_class"]["TRAIN"].items() if k != leaf}
    counts = dict(raw["images_per_class"], TRAIN=train)
    with pytest.raises(DataError, match=f"images_per_class\\['TRAIN'\\] has no count for leaf {leaf} \\(class 0\\)"):
        MetaDatasetSpec.from_dict(dict(raw, images_per_class=counts), tmp_path)
    with pytest.raises(DataError, match="needs 'split_subgraphs'"):
        MetaDatasetSpec.from_dict({k: v for k, v in raw.items() if k != "split_subgraphs"}, tmp_path)


def test_hierarchical_copy_loads_with_the_converters_labels(tmp_path):
    raw = hierarchical_spec("ilsvrc_2012", {"TRAIN": (6, 3), "VALID": (5, 2), "TEST": (5, 3)})
    root = write_converted(tmp_path / "ilsvrc_2012", raw, per_class=4)
    for split, ids in (("train", range(0, 6)), ("val", range(6, 11)), ("test", range(11, 16))):
        ds = load_metadataset_domain(root, split, TO_TENSOR)
        assert ds.class_ids == list(ids) and ds.class_names == [raw["class_names"][str(c)] for c in ids]
        assert [ds[i][1] for i in range(len(ds))] == [y for y in range(len(ids)) for _ in range(4)]  # labels checked
    ds = load_metadataset_domain(root, "test", TO_TENSOR)
    ep = load_episode(ds, FixedSampler(ds.indices_by_class(), n_way=5, n_shot=1, n_query=3, generator=gen(0)).sample())
    assert ep.support_images.shape == (5, 3, 8, 8) and ep.query_images.shape == (15, 3, 8, 8)


def test_ilsvrc_2012_v2_has_only_train_classes(tmp_path):
    raw = hierarchical_spec("ilsvrc_2012_v2", {"TRAIN": (7, 3)})  # v2: every class in TRAIN, VALID/TEST empty
    raw["split_subgraphs"].update(VALID=[], TEST=[])
    raw["images_per_class"].update(VALID={}, TEST={})
    root = write_converted(tmp_path / "v2", raw)
    assert MetaDatasetSpec.load(root).classes_per_split == {"TRAIN": 7, "VALID": 0, "TEST": 0}
    assert len(load_metadataset_domain(root, "train", TO_TENSOR).class_names) == 7
    with pytest.raises(MissingSplitError, match="split 'test' has no classes"):
        load_metadataset_domain(root, "test", TO_TENSOR)


def test_bilevel_spec_in_the_published_shape(tmp_path):
    raw = bilevel_spec("omniglot", {"TRAIN": [3, 2], "VALID": [2], "TEST": [4, 1, 2]})
    root = write_converted(tmp_path / "omniglot", raw)
    spec = MetaDatasetSpec.load(root)
    assert spec.kind == "bilevel" and spec.classes_per_split == {"TRAIN": 5, "VALID": 2, "TEST": 7}
    ds = load_metadataset_domain(root, "test", TO_TENSOR)
    assert ds.class_ids == list(range(7, 14)) and ds.class_names[0] == "Alphabet03-character01"


# Classes per split of the ten sources in the Meta-Dataset project's published dataset_spec.json files; for
# ilsvrc_2012 also its internal nodes (images_per_class has 1011 / 200 / 180 entries).
PUBLISHED = {
    "ilsvrc_2012": ("hierarchical", (712, 158, 130)), "omniglot": ("bilevel", (883, 81, 659)),
    "aircraft": ("flat", (70, 15, 15)), "cu_birds": ("flat", (140, 30, 30)), "dtd": ("flat", (33, 7, 7)),
    "quickdraw": ("flat", (241, 52, 52)), "fungi": ("flat", (994, 200, 200)), "vgg_flower": ("flat", (71, 15, 16)),
    "traffic_sign": ("flat", (0, 0, 43)), "mscoco": ("flat", (0, 40, 40)),
}
ILSVRC_INTERNAL = (299, 42, 50)
OMNIGLOT_ALPHABETS = (25, 5, 20)


def published_shape_spec(name: str) -> dict:
    """A spec of ``name``'s published shape and class counts (made-up names, ids and image counts)."""
    kind, counts = PUBLISHED[name]
    if kind == "hierarchical":
        return hierarchical_spec(name, dict(zip(SPLIT_NAMES, zip(counts, ILSVRC_INTERNAL))), per_leaf=2)
    if kind == "bilevel":  # the split's classes spread over its alphabets
        return bilevel_spec(name, {s: [n // k + (i < n % k) for i in range(k)]
                                   for s, n, k in zip(SPLIT_NAMES, counts, OMNIGLOT_ALPHABETS)}, per_class=2)
    return flat_spec(name, counts, per_class=2)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_class_counts_and_a_test_episode(tmp_path, name):
    kind, counts = PUBLISHED[name]
    raw = published_shape_spec(name)
    n_train, n_valid, n_test = counts
    test_ids = range(n_train + n_valid, n_train + n_valid + n_test)  # the converter numbers train, valid, test
    root = write_converted(tmp_path / name, raw, per_class=2, class_ids=test_ids)
    spec = MetaDatasetSpec.load(root)
    assert spec.kind == kind and spec.classes_per_split == dict(zip(SPLIT_NAMES, counts))
    assert spec.published_classes_per_split == spec.classes_per_split
    if kind == "hierarchical":
        assert [len(raw["images_per_class"][s]) for s in SPLIT_NAMES] == [1011, 200, 180]
    ds = load_metadataset_domain(root, "test", TO_TENSOR)
    assert ds.class_ids == list(test_ids)
    assert ds.classes_per_split == dict(zip(("train", "val", "test"), counts)) == ds.published_classes_per_split
    ep = load_episode(ds, FixedSampler(ds.indices_by_class(), n_way=5, n_shot=1, n_query=1, generator=gen(0)).sample())
    assert ep.support_images.shape == (5, 3, 8, 8) and ep.query_images.shape == (5, 3, 8, 8)


def test_data_check_prints_the_classes_per_split(tmp_path, tiny, capsys):
    from amt.cli import main

    root = write_converted(tmp_path / "ilsvrc_2012",
                           hierarchical_spec("ilsvrc_2012", {"TRAIN": (6, 3), "VALID": (5, 2), "TEST": (5, 3)}))
    assert main(["data", "check", str(root), "--format", "metadataset", "--n-shot", "1", "--n-query", "1"]) == 1
    out = capsys.readouterr().out
    assert "ilsvrc_2012: 5 classes, 15 readable images" in out
    assert "classes per split: train 6 / val 5 / test 5; published: train 712 / val 158 / test 130" in out
    assert "differ from the published splits" in out
    assert main(["data", "check", str(tiny), "--format", "metadataset", "--split", "train", "--n-way", "2",
                 "--n-shot", "1", "--n-query", "1"]) == 0  # a dataset without published splits
    out = capsys.readouterr().out
    assert "classes per split: train 2 / val 1 / test 5 (checked: train)\n" in out and out.strip().endswith("OK")
