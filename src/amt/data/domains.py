"""Opening a configured domain: its dataset, its validation classes, and a check of a user's copy.

Each function dispatches on ``DomainConfig.format`` through :data:`amt.data.readers.READERS` only; what
differs between formats (where the class splits come from, whether images are files) belongs to the
reader and the dataset it returns.
"""

from __future__ import annotations

import dataclasses

from PIL import Image

from amt.config import DataConfig, DomainConfig
from amt.data.base import (
    DataError,
    ImageDataset,
    MissingClassesError,
    MissingSplitError,
    Transform,
)
from amt.data.readers import FORMATS, READERS, Reader, load_splits


def _reader(domain: DomainConfig) -> Reader:
    reader = READERS.get(domain.format)
    if reader is None:
        raise DataError(f"domain {domain.name!r}: unknown format {domain.format!r}; use one of {', '.join(FORMATS)}")
    return reader


def load_domain(domain: DomainConfig, data: DataConfig, transform: Transform, split: str | None = None) -> ImageDataset:
    """The dataset of ``domain`` restricted to one class split (``split`` overrides ``domain.split``).

    Args:
        domain: the domain entry (path, format, class splits).
        data: image loading settings (``extensions``, ``skip_unreadable``, ``cache_decoded``).
        transform: PIL image → float tensor [3, H, W] in [0, 1]
            (:func:`amt.data.transforms.build_transform`).
        split: ``"train"``, ``"val"`` or ``"test"``; None: ``domain.split``.
    """
    split = split if split is not None else domain.split
    return _reader(domain)(domain, data, transform, split)


def validation_set(domain: DomainConfig, data: DataConfig, transform: Transform, n_way: int) -> ImageDataset | None:
    """The validation classes of ``domain``, or None when it has fewer than ``n_way`` of them.

    The validation classes are the ``"val"`` split of the domain's class-split file (``metadataset``: the
    ``VALID`` split of its ``dataset_spec.json``). A domain without that split (no splits file, no ``val``
    key, no classes in it) has none; a broken splits file or data raises :class:`DataError` as at load time.
    """
    try:
        val = load_domain(domain, data, transform, split="val")
    except MissingSplitError:
        return None
    return val if len(val.class_names) >= n_way else None


def _identity(image: Image.Image) -> Image.Image:
    return image


def check_domain(domain: DomainConfig, data: DataConfig, n_way: int = 5, n_shot: int = 5, n_query: int = 15) -> dict:
    """Validate a user's copy of one domain without stopping at the first problem (``amt data check``).

    Returns ``{"domain", "classes", "images", "per_class": {name: n}, "classes_per_split",
    "published_classes_per_split", "problems": [str, ...]}``: split classes absent from the data, missing
    files, unreadable images (each named), classes too small for ``n_shot + n_query`` images, fewer than
    ``n_way`` usable classes, class splits that differ from the published ones. Structural errors (no
    folder, bad table or file list, bad split file) raise :class:`DataError` as at load time. Each image
    is checked by its dataset (:meth:`ImageDataset.check_image`); ``metadataset`` records are counted as
    the reader finds them (it has already checked that every class file is there).

    ``classes_per_split`` is the number of classes of each split (``{"train": n, "val": n, "test": n}``)
    as the domain defines them: the dataset's own (``metadataset``: its ``dataset_spec.json``), else the
    lengths of the splits file's lists, else None (no splits: every class is used).
    ``published_classes_per_split`` is what the dataset's publisher gives (Meta-Dataset's published specs),
    or None; a copy whose splits differ from it is a problem.
    """
    data = dataclasses.replace(data, skip_unreadable=False, cache_decoded=False)  # report, don't skip
    reader = _reader(domain)
    problems: list[str] = []
    try:
        dataset = reader(domain, data, _identity, domain.split)
    except MissingClassesError as exc:
        if not exc.present:
            raise
        problems += [f"class {c!r} named in split {domain.split!r} is not in {domain.path}" for c in exc.missing]
        dataset = reader(domain, data, _identity, domain.split, exc.present)
    readable = [True] * len(dataset)
    for i in range(len(dataset)):
        problem = dataset.check_image(i)
        if problem is not None:
            problems.append(problem)
            readable[i] = False
    per_class = {name: 0 for name in dataset.class_names}
    for ok, (_, y) in zip(readable, dataset.samples):
        per_class[dataset.class_names[y]] += ok
    need = n_shot + n_query
    small = {c: n for c, n in per_class.items() if n < need}
    problems += [f"class {c!r} has {n} readable image(s), fewer than {need} = {n_shot} shots + {n_query} queries"
                 for c, n in small.items()]
    usable = len(per_class) - len(small)
    if usable < n_way:
        problems.append(f"only {usable} class(es) have {need}+ images; a {n_way}-way {n_shot}-shot task with "
                        f"{n_query} queries needs {n_way}")
    splits = dataset.classes_per_split
    if splits is None and domain.splits is not None:
        splits = {name: len(classes) for name, classes in load_splits(domain.splits).items()}
    published = dataset.published_classes_per_split
    if splits is not None and published is not None and splits != published:
        problems.append(f"classes per split {splits} differ from the published splits {published}; results "
                        f"on this copy are not comparable with published ones")
    return {"domain": domain.name, "classes": len(per_class), "images": int(sum(per_class.values())),
            "per_class": per_class, "classes_per_split": splits, "published_classes_per_split": published,
            "problems": problems}
