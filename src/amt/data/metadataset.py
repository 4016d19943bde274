"""Meta-Dataset in its converted TFRecord layout, read without TensorFlow.

The official conversion (``meta_dataset/dataset_conversion``) writes, per dataset::

    <root>/<dataset>/dataset_spec.json      classes per split, class names, images per class
    <root>/<dataset>/<class_id>.tfrecords   one file per class; ids 0..N-1 ordered train, valid, test
    <root>/<dataset>/<class_id>.index       optional: "<byte offset> <record size>" per line (tfrecord2idx)

Each record is a ``tf.train.Example`` with ``image`` (encoded JPEG/PNG bytes) and ``label`` (int64, the
global class id). :func:`load_metadataset_domain` returns an :class:`~amt.data.base.ImageDataset`
whose items are read one record at a time (seek to a byte offset found by one scan at construction), so
episode samplers and evaluation work on it unchanged.

Supported ``dataset_spec.json`` shapes, as the official converter writes them (the ``__class__`` field;
see :meth:`MetaDatasetSpec.from_dict`):

* flat (``DatasetSpecification``: aircraft, cu_birds, dtd, quickdraw, fungi, vgg_flower, traffic_sign,
  mscoco): ``classes_per_split`` with keys ``TRAIN``/``VALID``/``TEST`` (or the older ``Split.TRAIN``
  spelling) and ``images_per_class`` keyed by class id;
* bi-level (``BiLevelDatasetSpecification``, omniglot): ``superclasses_per_split`` +
  ``classes_per_superclass`` instead of ``classes_per_split``; a split's classes are those of its
  superclasses, superclasses numbered train, valid, test;
* hierarchical (``HierarchicalDatasetSpecification``, ilsvrc_2012 and ilsvrc_2012_v2): a split's classes
  are the leaves of its WordNet subgraph ``split_subgraphs[split]`` (nodes without ``children_ids``);
  class ids run over the train leaves, then valid, then test, each in sorted WordNet-id order, which is
  what the official ``ImageNetConverter`` assigns (``class_names`` maps id → WordNet id and is checked
  against the leaves). ``images_per_class[split]`` is keyed by WordNet id and covers every node of the
  split's subgraph (an internal node counts the images below it); a class's count is its leaf's entry.

:data:`PUBLISHED_CLASSES_PER_SPLIT` holds the class counts of the published specs, so a copy can be
compared with them (``amt data check``).

Not supported: ``file_pattern`` with more than one ``{}`` (episode-sharded dumps), ``SequenceExample``
records, features other than ``image``/``label``.

A class file whose record count differs from ``images_per_class`` is read as it is, with one warning per
split that counts such files and names up to three with both counts (a partial copy is usable, but you
should know); an empty, missing or truncated class file is a :class:`DataError`. Every record read is
CRC-checked.
"""

from __future__ import annotations

import io
import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
from PIL import Image
from tfrecord import example_pb2

from amt.data.base import DataError, ImageDataset, MissingSplitError, Transform

log = logging.getLogger(__name__)

SPLITS = ("TRAIN", "VALID", "TEST")
_SPLIT_ALIASES = {
    "train": "TRAIN", "training": "TRAIN",
    "val": "VALID", "valid": "VALID", "validation": "VALID",
    "test": "TEST", "testing": "TEST",
}
_HEADER = 12  # uint64 length + uint32 masked crc of the length
_FOOTER = 4  # uint32 masked crc of the data


def _split_key(key: str) -> str:
    """``"TRAIN"``, ``"Split.TRAIN"``, ``"train"`` → ``"TRAIN"``; anything else → ``DataError``."""
    k = str(key).split(".")[-1]
    k = _SPLIT_ALIASES.get(k.lower(), k.upper())
    if k not in SPLITS:
        raise DataError(f"unknown split {key!r}; use one of train/val/test (or TRAIN/VALID/TEST)")
    return k


def _by_split(d: dict, what: str, path: Path) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise DataError(f"{path}: {what!r} must be an object keyed by split, found {type(d).__name__}")
    out = {_split_key(k): v for k, v in d.items()}
    return {s: out.get(s, 0) for s in SPLITS} if what.endswith("per_split") else out


PUBLISHED_CLASSES_PER_SPLIT: dict[str, dict[str, int]] = {
    name: dict(zip(SPLITS, counts)) for name, counts in {
        "ilsvrc_2012": (712, 158, 130),
        "ilsvrc_2012_v2": (1000, 0, 0),
        "omniglot": (883, 81, 659),
        "aircraft": (70, 15, 15),
        "cu_birds": (140, 30, 30),
        "dtd": (33, 7, 7),
        "quickdraw": (241, 52, 52),
        "fungi": (994, 200, 200),
        "vgg_flower": (71, 15, 16),
        "traffic_sign": (0, 0, 43),
        "mscoco": (0, 40, 40),
    }.items()
}
"""Classes of ``TRAIN``/``VALID``/``TEST`` in the specs the Meta-Dataset project publishes
(``meta_dataset/dataset_conversion/dataset_specs/<name>_dataset_spec.json``; the same numbers are in its
README), keyed by the spec's ``name``."""


@dataclass(frozen=True)
class MetaDatasetSpec:
    """The parts of a ``dataset_spec.json`` this reader needs.

    Attributes:
        name: dataset name from the spec (e.g. ``"cu_birds"``).
        root: folder holding the spec and the class files.
        classes_per_split: number of classes of ``TRAIN``, ``VALID``, ``TEST``.
        class_names: name of each global class id ``0..N-1`` (``str(id)`` where the spec has none; the
            WordNet id for ilsvrc_2012).
        images_per_class: record count of each class id according to the spec (may be partial).
        file_pattern: class file name with one ``{}`` for the class id.
        kind: ``"flat"``, ``"bilevel"`` or ``"hierarchical"`` (module docstring).
    """

    name: str
    root: Path
    classes_per_split: dict[str, int]
    class_names: dict[int, str]
    images_per_class: dict[int, int]
    file_pattern: str = "{}.tfrecords"
    kind: str = "flat"

    @classmethod
    def load(cls, root: str | Path) -> MetaDatasetSpec:
        """Read ``<root>/dataset_spec.json``; a missing or malformed spec raises :class:`DataError`."""
        root = Path(root)
        path = root / "dataset_spec.json"
        if not path.is_file():
            raise DataError(
                f"Meta-Dataset spec {path} does not exist; expected a converted dataset folder "
                f"<root>/<dataset>/dataset_spec.json with <class_id>.tfrecords files beside it"
            )
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"Meta-Dataset spec {path} is not valid JSON: {exc}") from exc
        return cls.from_dict(raw, root, path)

    @classmethod
    def from_dict(cls, raw: dict, root: Path, path: Path | None = None) -> MetaDatasetSpec:
        """Parse a flat, bi-level or hierarchical spec dict (see the module docstring)."""
        path = path or root / "dataset_spec.json"
        if not isinstance(raw, dict):
            raise DataError(f"{path}: expected a JSON object, found {type(raw).__name__}")
        ipc = raw.get("images_per_class")
        if not isinstance(ipc, dict):
            raise DataError(f"{path}: missing 'images_per_class' (an object class id → image count)")
        names_raw = raw.get("class_names") or {}
        names = None
        try:
            if "split_subgraphs" in raw or raw.get("__class__") == "HierarchicalDatasetSpecification":
                kind = "hierarchical"  # ilsvrc_2012
                counts, names, images = _hierarchical(raw, ipc, names_raw, path)
            elif any(isinstance(v, dict) for v in ipc.values()):
                raise DataError(
                    f"{path}: 'images_per_class' maps to objects (per-split WordNet counts of a hierarchical "
                    f"spec) but there is no 'split_subgraphs' to tell which nodes are classes; use the "
                    f"dataset_spec.json the official converter wrote"
                )
            else:
                images = {int(c): int(n) for c, n in ipc.items()}
                if "classes_per_split" in raw:
                    kind = "flat"
                    per_split = _by_split(raw["classes_per_split"], "classes_per_split", path)
                    counts = {s: int(n) for s, n in per_split.items()}
                elif "superclasses_per_split" in raw:  # bi-level (omniglot)
                    kind = "bilevel"
                    counts = _bilevel_counts(raw, path)
                else:
                    raise DataError(
                        f"{path}: has neither 'classes_per_split' nor 'superclasses_per_split'; "
                        f"cannot tell which classes belong to which split"
                    )
        except DataError:
            raise
        except (TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"{path}: malformed class counts: {exc}") from exc
        total = sum(counts.values())
        if sorted(images) != list(range(total)):
            raise DataError(
                f"{path}: classes_per_split {counts} sums to {total} classes but images_per_class has "
                f"{len(images)} class ids ({min(images, default=None)}..{max(images, default=None)}); "
                f"expected ids 0..{total - 1}"
            )
        if names is None:
            names = {c: str(names_raw.get(str(c), names_raw.get(c, c))) for c in range(total)}
        pattern = str(raw.get("file_pattern", "{}.tfrecords"))
        if pattern.count("{}") != 1:
            raise DataError(
                f"{path}: file_pattern {pattern!r} is not supported; expected one '{{}}' for the class id "
                f"(e.g. '{{}}.tfrecords')"
            )
        return cls(str(raw.get("name", root.name)), root, counts, names, images, pattern, kind)

    @property
    def published_classes_per_split(self) -> dict[str, int] | None:
        """Classes per split of the published spec of the same ``name`` (None for another dataset)."""
        return PUBLISHED_CLASSES_PER_SPLIT.get(self.name)

    def class_ids(self, split: str) -> list[int]:
        """Global class ids of ``split`` (train, then valid, then test in id order)."""
        s = _split_key(split)
        start = sum(self.classes_per_split[k] for k in SPLITS[: SPLITS.index(s)])
        return list(range(start, start + self.classes_per_split[s]))

    def class_file(self, class_id: int) -> Path:
        return self.root / self.file_pattern.format(class_id)


def _bilevel_counts(raw: dict, path: Path) -> dict[str, int]:
    """Classes per split of a bi-level spec: superclasses are numbered train, valid, test, and a split's
    classes are those of its superclasses."""
    sup = {s: int(n) for s, n in _by_split(raw["superclasses_per_split"], "superclasses_per_split", path).items()}
    cps = raw.get("classes_per_superclass")
    if not isinstance(cps, dict):
        raise DataError(f"{path}: bi-level spec without 'classes_per_superclass'")
    cps = {int(k): int(v) for k, v in cps.items()}
    counts, start = {}, 0
    for s in SPLITS:
        missing = [k for k in range(start, start + sup[s]) if k not in cps]
        if missing:
            raise DataError(f"{path}: classes_per_superclass has no entry for superclass(es) {missing[:5]} "
                            f"of split {s} (superclasses_per_split {sup})")
        counts[s] = sum(cps[k] for k in range(start, start + sup[s]))
        start += sup[s]
    return counts


def _hierarchical(
    raw: dict, ipc: dict, names_raw: dict, path: Path
) -> tuple[dict[str, int], dict[int, str], dict[int, int]]:
    """(classes per split, WordNet id of each class id, images of each class id) of a hierarchical spec.

    A split's classes are the leaves of ``split_subgraphs[split]``, a list of nodes ``{"wn_id",
    "children_ids", "parents_ids", ...}``; ids run over the sorted train leaves, then valid, then test
    (``ImageNetConverter``). A ``class_names`` that does not give each split's id range exactly that
    split's leaves raises :class:`DataError`; within a split its order is kept (the records follow it).
    """
    if "split_subgraphs" not in raw:
        raise DataError(f"{path}: a HierarchicalDatasetSpecification needs 'split_subgraphs' (the WordNet "
                        f"subgraph of each split, whose leaves are the classes)")
    graphs = _by_split(raw["split_subgraphs"], "split_subgraphs", path)
    per_split = _by_split(ipc, "images_per_class", path)
    leaves: dict[str, list[str]] = {}
    for s in SPLITS:
        nodes = graphs.get(s, [])
        if not isinstance(nodes, list) or not all(isinstance(n, dict) and "wn_id" in n for n in nodes):
            raise DataError(f"{path}: split_subgraphs[{s!r}] must be a list of nodes "
                            f"{{'wn_id': ..., 'children_ids': [...], ...}}")
        leaves[s] = sorted(str(n["wn_id"]) for n in nodes if not n.get("children_ids"))
    order = [w for s in SPLITS for w in leaves[s]]
    if len(set(order)) != len(order):
        raise DataError(f"{path}: a WordNet id is a leaf of more than one split's subgraph")
    counts = {s: len(leaves[s]) for s in SPLITS}
    names = dict(enumerate(order))
    if names_raw:
        given = {int(k): str(v) for k, v in names_raw.items()}
        if sorted(given) != list(range(len(order))):
            raise DataError(f"{path}: class_names has {len(given)} class ids but the split subgraphs have "
                            f"{len(order)} leaves {counts}; expected ids 0..{len(order) - 1}")
        start = 0
        for s in SPLITS:
            if {given[c] for c in range(start, start + counts[s])} != set(leaves[s]):
                raise DataError(f"{path}: class_names of ids {start}..{start + counts[s] - 1} are not the "
                                f"{counts[s]} leaves of split_subgraphs[{s!r}]; class ids must run over the "
                                f"train leaves, then valid, then test")
            start += counts[s]
        names = given
    split_of = {w: s for s in SPLITS for w in leaves[s]}
    images = {}
    for c, w in names.items():
        split_counts = per_split.get(split_of[w], {})
        if not isinstance(split_counts, dict) or w not in split_counts:
            raise DataError(f"{path}: images_per_class[{split_of[w]!r}] has no count for leaf {w} (class {c})")
        images[c] = int(split_counts[w])
    return counts, names, images


def scan_records(path: Path, limit: int | None = None) -> list[tuple[int, int]]:
    """(byte offset, data length) of each record in a TFRecord file, reading only the 12-byte headers.

    Uses ``<stem>.index`` (tfrecord2idx format: ``offset size`` per line) when it exists. A truncated
    file or a bad length checksum raises :class:`DataError` naming the file and the offset.
    """
    index = path.with_suffix(".index")
    if index.is_file():
        try:
            rows = [tuple(int(x) for x in line.split()) for line in index.read_text().splitlines() if line.strip()]
            out = [(off, size - _HEADER - _FOOTER) for off, size in rows]
        except ValueError as exc:
            raise DataError(f"index file {index} is malformed ({exc}); delete it to scan {path} instead") from exc
        return out[:limit] if limit is not None else out
    out = []
    size = path.stat().st_size
    with path.open("rb") as f:
        offset = 0
        while offset < size and (limit is None or len(out) < limit):
            header = f.read(_HEADER)
            if len(header) < _HEADER:
                raise DataError(f"{path}: truncated record header at byte {offset}; re-copy or re-convert the file")
            if header[8:] != _masked_crc(header[:8]):
                raise DataError(f"{path}: bad length checksum at byte {offset}; the file is corrupt")
            (length,) = struct.unpack("<Q", header[:8])
            end = offset + _HEADER + length + _FOOTER
            if end > size:
                raise DataError(f"{path}: record at byte {offset} runs past the end of the file (truncated)")
            out.append((offset, length))
            offset = end
            f.seek(offset)
    return out


def _masked_crc(data: bytes) -> bytes:
    crc = crc32c.crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


class TFRecordImageDataset(ImageDataset):
    """Images stored as ``tf.train.Example`` records, one TFRecord file per class.

    Args:
        records: ``(file, byte offset, data length, label)`` per image; ``label`` in ``0..C-1``.
        class_names: name of each label.
        class_ids: the global class id each label stands for (checked against each record's ``label``).
        transform, cache_decoded, name: as for :class:`ImageDataset`.
        spec: the dataset's spec; it sets :attr:`classes_per_split` and :attr:`published_classes_per_split`
            (``{"train": n, "val": n, "test": n}``, what ``amt data check`` reports; None without a spec).

    ``samples[i]`` is ``(class file, label)`` so code that reads labels from ``samples``/``targets`` works.
    """

    def __init__(
        self,
        records: list[tuple[Path, int, int, int]],
        class_names: list[str],
        class_ids: list[int],
        transform: Transform,
        cache_decoded: bool = False,
        name: str = "",
        spec: MetaDatasetSpec | None = None,
    ) -> None:
        super().__init__([(p, y) for p, _, _, y in records], class_names, transform,
                         cache_decoded=cache_decoded, name=name)
        self.records = records
        self.class_ids = list(class_ids)
        self.spec = spec
        self.classes_per_split = _public(spec.classes_per_split) if spec else None
        self.published_classes_per_split = _public(spec.published_classes_per_split) if spec else None

    def read_example(self, index: int) -> tuple[bytes, int]:
        """(encoded image bytes, record label) of image ``index``; a corrupt record raises ``DataError``."""
        path, offset, length, _ = self.records[index]
        with path.open("rb") as f:
            f.seek(offset + _HEADER)
            data = f.read(length)
            crc = f.read(_FOOTER)
        where = f"{path} (record {index} of {self.name or 'dataset'}, byte {offset})"
        if len(data) != length or crc != _masked_crc(data):
            raise DataError(f"{where}: data checksum mismatch; the file is corrupt, re-copy or re-convert it")
        try:
            feats = example_pb2.Example.FromString(data).features.feature
            image = feats["image"].bytes_list.value[0]
            label = feats["label"].int64_list.value[0] if "label" in feats else None
        except Exception as exc:  # protobuf raises its own DecodeError; a missing feature IndexError
            raise DataError(f"{where}: not a tf.train.Example with an 'image' bytes feature ({exc})") from exc
        return image, label

    def check_image(self, index: int) -> str | None:
        """None: the reader has already checked every class file and scanned its record headers (each
        record's data is CRC-checked when it is read), so there is no file per image to open."""
        return None

    def load_image(self, index: int) -> Image.Image:
        """Decode image ``index`` as RGB; a corrupt record or image raises :class:`DataError` naming it."""
        if index in self._cache:
            return Image.fromarray(self._cache[index])
        data, label = self.read_example(index)
        path, offset, _, y = self.records[index]
        if label is not None and label != self.class_ids[y]:
            raise DataError(
                f"{path} byte {offset}: record label {label} but the file is class {self.class_ids[y]}; "
                f"the class files are mixed up"
            )
        try:
            with Image.open(io.BytesIO(data)) as im:
                image = im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"{path} byte {offset}: cannot decode the image bytes: {exc}") from exc
        if self.cache_decoded:
            self._cache[index] = np.asarray(image)
        return image


def load_metadataset_domain(
    root: str | Path,
    split: str,
    transform: Transform,
    name: str | None = None,
    max_images_per_class: int | None = None,
    cache_decoded: bool = False,
) -> TFRecordImageDataset:
    """The classes of one split of a converted Meta-Dataset dataset, as an ``ImageDataset``.

    Args:
        root: the dataset folder (``<records root>/<dataset>``, holding ``dataset_spec.json``).
        split: ``"train"``, ``"val"`` or ``"test"`` (also ``TRAIN``/``VALID``/``TEST``).
        transform: PIL image → float tensor [3, H, W] in [0, 1].
        name: dataset name for logs; default the spec's name.
        max_images_per_class: keep the first ``k`` records of each class (only those are scanned).
        cache_decoded: keep decoded images in memory after their first load.

    Labels are ``0..C-1`` in class-id order; ``class_names`` come from the spec and ``class_ids`` holds
    the global id of each label.
    """
    spec = MetaDatasetSpec.load(root)
    ids = spec.class_ids(split)
    if not ids:
        raise MissingSplitError(
            f"{spec.root}: split {split!r} has no classes (classes_per_split={spec.classes_per_split})"
        )
    missing = [str(spec.class_file(c)) for c in ids if not spec.class_file(c).is_file()]
    if missing:
        raise DataError(
            f"{spec.root}: {len(missing)} class file(s) of split {split!r} are missing, e.g. {missing[:3]}; "
            f"re-run the conversion or copy the complete dataset folder"
        )
    if max_images_per_class is not None and max_images_per_class < 1:
        raise DataError(f"max_images_per_class={max_images_per_class}; use None or a positive count")
    records, differ = [], []
    for label, c in enumerate(ids):
        path = spec.class_file(c)
        found = scan_records(path, limit=max_images_per_class)
        if not found:
            raise DataError(f"{path}: class file has no records")
        expected = spec.images_per_class.get(c)
        if max_images_per_class is None and expected is not None and expected != len(found):
            differ.append(f"{path}: {len(found)} record(s) but dataset_spec.json says {expected}")
        records += [(path, off, length, label) for off, length in found]
    if differ:  # one warning per split, not per class file (a partial ImageNet copy has hundreds)
        log.warning("%d of %d class file(s) of split %r have another record count than dataset_spec.json, "
                    "e.g. %s; using the records found", len(differ), len(ids), split, "; ".join(differ[:3]))
    return TFRecordImageDataset(
        records, [spec.class_names[c] for c in ids], ids, transform,
        cache_decoded=cache_decoded, name=name if name is not None else spec.name, spec=spec,
    )


def _public(counts: dict[str, int] | None) -> dict[str, int] | None:
    """``{"TRAIN": a, "VALID": b, "TEST": c}`` → ``{"train": a, "val": b, "test": c}`` (the config's names)."""
    return None if counts is None else {"train": counts["TRAIN"], "val": counts["VALID"], "test": counts["TEST"]}
