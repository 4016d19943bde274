"""One reader per on-disk format, the class-split JSON files, and the registry :data:`READERS`.

Formats (``DomainConfig.format``): ``folder`` (one sub-folder per class), ``csv`` (``path,label``),
``isic`` and ``chestx`` (the BSCD-FSL label tables as distributed), ``filelist`` (the FWT JSON file
lists of the fine-grained benchmarks) and ``metadataset`` (converted TFRecords, :mod:`amt.data.metadataset`).

Every reader has the signature of :class:`Reader`. The file-based formats take their classes from the
domain's class-split JSON (``DomainConfig.splits``, :func:`load_splits`); ``metadataset`` takes them from
its own ``dataset_spec.json``. A split the domain does not have raises :class:`MissingSplitError`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from amt.config import DataConfig, DomainConfig
from amt.data.base import (
    DataError,
    ImageDataset,
    MissingClassesError,
    MissingSplitError,
    Transform,
)

ISIC_TABLE = "ISIC2018_Task3_Training_GroundTruth.csv"
ISIC_IMAGES = "ISIC2018_Task3_Training_Input"
CHESTX_TABLE = "Data_Entry_2017.csv"
CHESTX_CLASSES = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumothorax")
"""The BSCD-FSL ChestX classes, in label order (its loader drops "No Finding" and every other finding)."""


class Reader(Protocol):
    """Reads one domain of one format into an :class:`ImageDataset`.

    Args:
        domain: where the data is (``path``), its ``name`` and class-split file (``splits``).
        data: ``extensions`` (folders), ``skip_unreadable`` and ``cache_decoded``.
        transform: PIL image → float tensor [3, H, W] in [0, 1].
        split: the class split to read (``"train"``, ``"val"``, ``"test"``; None: every class).
        classes: class names to read, in this order, instead of those of ``split``.
    """

    def __call__(
        self,
        domain: DomainConfig,
        data: DataConfig,
        transform: Transform,
        split: str | None = None,
        classes: Sequence[str] | None = None,
    ) -> ImageDataset: ...


def load_splits(path: str | Path) -> dict[str, list[str]]:
    """Read a class-split JSON file: ``{"train": [...], "val": [...], "test": [...]}``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"class-split file {path} does not exist")
    try:
        splits = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"class-split file {path} is not valid JSON: {exc}") from exc
    if not isinstance(splits, dict) or not all(isinstance(v, list) for v in splits.values()):
        raise DataError(f"class-split file {path} must map split names to lists of class names")
    return splits


def _split_classes(domain: DomainConfig, split: str | None, classes: Sequence[str] | None) -> Sequence[str] | None:
    """The class names a file-based reader keeps: ``classes`` if given, else those ``split`` lists in the
    domain's splits file, else None (every class). A split the file lacks, or lists no classes for,
    raises :class:`MissingSplitError`."""
    if classes is not None or split is None:
        return classes
    if domain.splits is None:
        raise MissingSplitError(f"domain {domain.name!r} asks for split {split!r} but gives no splits file; "
                                f"set `splits` to a class-split JSON or `split` to null")
    splits = load_splits(domain.splits)
    if split not in splits:
        raise MissingSplitError(f"{domain.splits} has no split {split!r}; it has {sorted(splits)}")
    if not splits[split]:
        raise MissingSplitError(f"{domain.splits}: split {split!r} lists no classes; list its class names or "
                                f"choose another split")
    return splits[split]


def read_folder(
    domain: DomainConfig,
    data: DataConfig,
    transform: Transform,
    split: str | None = None,
    classes: Sequence[str] | None = None,
) -> ImageDataset:
    """One sub-folder per class under ``domain.path`` (images: ``data.extensions``); the split's classes
    (or ``classes``) restrict and order the classes."""
    classes = _split_classes(domain, split, classes)
    root = Path(domain.path)
    if not root.is_dir():
        raise DataError(
            f"image folder {root} does not exist; expected a folder with one sub-folder of images per class"
        )
    classes = _requested_classes(sorted(p.name for p in root.iterdir() if p.is_dir()), classes, root)
    exts = {e.lower() for e in data.extensions}
    samples = []
    for label, c in enumerate(classes):
        files = sorted(p for p in (root / c).iterdir() if p.is_file() and p.suffix.lower() in exts)
        samples += [(p, label) for p in files]
    if not classes or not samples:
        raise DataError(
            f"{root}: found no images ({', '.join(sorted(exts))}) in class sub-folders; expected "
            f"{root}/<class name>/<image file>"
        )
    return _dataset(samples, classes, transform, domain, data)


Listing = tuple[list[tuple[Path, int]], list[str], Path]
"""What a table-based format lists: (image path, label) pairs, the class names by label, and the file read."""


def _listed(list_samples: Callable[[Path], Listing]) -> Reader:
    """The :class:`Reader` of a format whose images are listed in a table or file (``list_samples(path)``):
    the split's classes (or ``classes``) restrict and order the listed classes."""

    def read(domain: DomainConfig, data: DataConfig, transform: Transform, split: str | None = None,
             classes: Sequence[str] | None = None) -> ImageDataset:
        classes = _split_classes(domain, split, classes)
        samples, names, source = list_samples(Path(domain.path))
        samples, names = _restrict(samples, names, classes, source)
        return _dataset(samples, names, transform, domain, data)

    read.__doc__ = list_samples.__doc__
    return read


def _list_csv(csv_path: Path) -> Listing:
    """A CSV (``domain.path``) with a header and columns ``path,label``; relative paths are relative to the CSV.

    Class names are the label values, sorted; the split's classes (or ``classes``) restrict and order them.
    """
    _, rows = _read_table(csv_path, ("path", "label"), "a CSV file with header path,label, one row per image")
    names = sorted({r["label"] for _, r in rows})
    index = {c: i for i, c in enumerate(names)}
    return [(_resolve(r["path"], csv_path.parent), index[r["label"]]) for _, r in rows], names, csv_path


def _list_isic(root: Path) -> Listing:
    """ISIC 2018 Task 3 (BSCD-FSL) as distributed, under ``root`` = ``domain.path``.

    ``ISIC2018_Task3_Training_GroundTruth.csv`` (in ``root`` or in the zip's folder of the same
    name) has header ``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC`` and one one-hot row per image (``1.0``
    in the image's diagnosis column, ``0.0`` elsewhere); images are
    ``ISIC2018_Task3_Training_Input/<image>.jpg``. Class names are the diagnosis columns in header
    order. A row that is not exactly one-hot raises :class:`DataError` naming the file and line.
    """
    layout = (f"{root}/{ISIC_TABLE} (header image,MEL,NV,BCC,AKIEC,BKL,DF,VASC, one-hot rows) and "
              f"{root}/{ISIC_IMAGES}/<image>.jpg")
    candidates = (root / ISIC_TABLE, root / ISIC_TABLE.removesuffix(".csv") / ISIC_TABLE)
    table = next((p for p in candidates if p.is_file()), candidates[0])
    header, rows = _read_table(table, ("image",), layout)
    names = [c for c in header if c != "image"]
    samples = [(root / ISIC_IMAGES / f"{r['image']}.jpg", _one_hot(r, names, f"{table} line {line}"))
               for line, r in rows]
    return samples, names, table


def _list_chestx(root: Path) -> Listing:
    """NIH ChestX-ray14 as BSCD-FSL uses it, under ``root`` = ``domain.path``.

    ``Data_Entry_2017.csv`` names each image (``Image Index``) and its findings (``Finding Labels``,
    ``|``-joined); images are ``images/<Image Index>``. Only images with exactly one finding among
    :data:`CHESTX_CLASSES` are kept (no multi-label, "No Finding" or other findings), labelled in
    that class order. The greyscale images are converted to RGB when loaded.
    """
    layout = (f"{root}/{CHESTX_TABLE} (columns 'Image Index', 'Finding Labels') and "
              f"{root}/images/<Image Index>")
    table = root / CHESTX_TABLE
    _, rows = _read_table(table, ("Image Index", "Finding Labels"), layout)
    index = {c: i for i, c in enumerate(CHESTX_CLASSES)}
    samples = []
    for _, r in rows:
        findings = [f.strip() for f in r["Finding Labels"].split("|")]
        if len(findings) == 1 and findings[0] in index:
            samples.append((root / "images" / r["Image Index"], index[findings[0]]))
    return samples, list(CHESTX_CLASSES), table


def _list_filelist(json_path: Path) -> Listing:
    """An FWT (Tseng et al., 2020) file list such as ``filelists/cub/novel.json`` (``domain.path``).

    The JSON holds ``image_names`` (paths; relative ones resolve against the JSON's folder),
    ``image_labels`` (one int per image) and optionally ``label_names`` (indexed by label). The
    labels that occur, in sorted order, become ``0..C-1`` (novel classes are often a noncontiguous
    subset such as 100..199); their names are ``label_names[label]``, or ``str(label)`` without it.
    """
    layout = ('a JSON file {"label_names": [names], "image_names": [paths], "image_labels": [ints]} '
              "(an FWT file list such as novel.json)")
    if not json_path.is_file():
        raise DataError(f"file list {json_path} does not exist; expected {layout}")
    try:
        meta = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"file list {json_path} is not valid JSON ({exc}); expected {layout}") from exc
    meta = meta if isinstance(meta, dict) else {}
    paths, labels, label_names = meta.get("image_names"), meta.get("image_labels"), meta.get("label_names")
    if not isinstance(paths, list) or not isinstance(labels, list) or not all(isinstance(p, str) for p in paths):
        raise DataError(f"{json_path}: needs a list of path strings 'image_names' and a list 'image_labels'; "
                        f"expected {layout}")
    if label_names is not None and not isinstance(label_names, list):
        raise DataError(f"{json_path}: 'label_names' must be a list of class names; expected {layout}")
    if len(paths) != len(labels):
        raise DataError(f"{json_path}: {len(paths)} image_names but {len(labels)} image_labels; "
                        f"expected one label per image")
    n_names = len(label_names) if label_names is not None else None
    bad = [y for y in labels if type(y) is not int or (n_names is not None and not 0 <= y < n_names)]
    if bad:
        allowed = "integers" if n_names is None else f"integers in 0..{n_names - 1} (indices into label_names)"
        raise DataError(f"{json_path}: image_labels must be {allowed}; found {bad[:5]}")
    used = sorted(set(labels))
    names = [str(label_names[y]) if label_names is not None else str(y) for y in used]
    if len(set(names)) != len(names):
        raise DataError(f"{json_path}: two labels share a name in label_names; class names must be unique")
    index = {y: i for i, y in enumerate(used)}
    return [(_resolve(p, json_path.parent), index[y]) for p, y in zip(paths, labels)], names, json_path


def read_metadataset(
    domain: DomainConfig,
    data: DataConfig,
    transform: Transform,
    split: str | None = None,
    classes: Sequence[str] | None = None,
) -> ImageDataset:
    """Meta-Dataset's converted TFRecords under ``domain.path`` (:mod:`amt.data.metadataset`).

    The classes are those of ``split`` (default ``"test"``) in the folder's ``dataset_spec.json``;
    ``domain.splits`` is not used, and ``classes`` cannot be given. A split without classes raises
    :class:`MissingSplitError`. Records are CRC-checked when read, so ``data.skip_unreadable`` does not apply.
    """
    # Imported here: it loads tfrecord and crc32c, needed only when this format is used.
    from amt.data.metadataset import load_metadataset_domain

    if classes is not None:
        raise DataError(f"domain {domain.name!r}: a Meta-Dataset domain takes its classes from "
                        f"{domain.path}/dataset_spec.json; a class list cannot be given")
    return load_metadataset_domain(domain.path, split or "test", transform, name=domain.name,
                                   cache_decoded=data.cache_decoded)


read_csv = _listed(_list_csv)
read_isic = _listed(_list_isic)
read_chestx = _listed(_list_chestx)
read_filelist = _listed(_list_filelist)

READERS: dict[str, Reader] = {
    "folder": read_folder,
    "csv": read_csv,
    "isic": read_isic,
    "chestx": read_chestx,
    "filelist": read_filelist,
    "metadataset": read_metadataset,
}
"""The reader of each format."""
FORMATS = tuple(READERS)
"""Every value ``DomainConfig.format`` accepts."""


def _dataset(
    samples: Sequence[tuple[Path, int]], names: Sequence[str], transform: Transform, domain: DomainConfig,
    data: DataConfig,
) -> ImageDataset:
    return ImageDataset(samples, names, transform, skip_unreadable=data.skip_unreadable,
                        cache_decoded=data.cache_decoded, name=domain.name)


def _requested_classes(available: Sequence[str], classes: Sequence[str] | None, source: Path) -> list[str]:
    """``classes`` checked against ``available`` (every available class when ``None``), in split order."""
    if classes is None:
        return list(available)
    classes = list(classes)
    if len(set(classes)) != len(classes):
        raise DataError(f"{source}: the split lists a class more than once; list each class once")
    have = set(available)
    missing = [c for c in classes if c not in have]
    if missing:
        raise MissingClassesError(
            f"{source}: {len(missing)} class(es) named in the split are not in the data, e.g. {missing[:5]}; "
            f"its classes include {list(available)[:5]}. Fix the splits file or the data.",
            missing, [c for c in classes if c in have],
        )
    return classes


def _restrict(
    samples: Sequence[tuple[Path, int]], class_names: Sequence[str], classes: Sequence[str] | None, source: Path
) -> tuple[list[tuple[Path, int]], list[str]]:
    """Keep the samples of ``classes`` (all when ``None``), relabelled ``0..len(classes)-1`` in that order."""
    picked = _requested_classes(class_names, classes, source)
    old = {c: i for i, c in enumerate(class_names)}
    relabel = {old[c]: j for j, c in enumerate(picked)}
    kept = [(p, relabel[y]) for p, y in samples if y in relabel]
    if not kept:
        raise DataError(f"{source}: no images of the requested classes {picked[:5]}; check the data and the split")
    return kept, picked


def _resolve(path: str, base: Path) -> Path:
    """``path`` as it is when absolute, else relative to ``base``."""
    p = Path(path)
    return p if p.is_absolute() else base / p


def _read_table(path: Path, required: Sequence[str], layout: str) -> tuple[list[str], list[tuple[int, dict]]]:
    """Header and ``(line number, row)`` pairs of a CSV file that has at least the ``required`` columns."""
    if not path.is_file():
        raise DataError(f"{path} does not exist; expected {layout}")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        if header is None or not set(required) <= set(header):
            raise DataError(f"{path}: header must contain columns {' and '.join(map(repr, required))}, "
                            f"found {header}; expected {layout}")
        rows = []
        for row in reader:
            if any(row.get(c) is None for c in required):
                raise DataError(f"{path} line {reader.line_num}: too few values; expected {layout}")
            rows.append((reader.line_num, row))
    if not rows:
        raise DataError(f"{path}: no rows; expected {layout}")
    return list(header), rows


def _one_hot(row: dict, columns: Sequence[str], where: str) -> int:
    """Index of the column holding 1 in a one-hot ``row``; anything else raises :class:`DataError`."""
    try:
        values = [float(row[c]) for c in columns]
    except (TypeError, ValueError):
        values = None
    if values is None or sum(v == 1.0 for v in values) != 1 or sum(v == 0.0 for v in values) != len(values) - 1:
        raise DataError(f"{where}: label values {[row.get(c) for c in columns]} for columns {list(columns)} are "
                        f"not one-hot; expected exactly one 1 and 0 elsewhere")
    return values.index(1.0)
