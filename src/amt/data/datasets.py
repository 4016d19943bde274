"""Image datasets of one domain: folder-per-class trees, CSV-labelled files, class splits.

Every image comes out as a float tensor [3, H, W] in [0, 1]; normalisation belongs to the model.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from amt.config import DataConfig, DomainConfig

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input data; the message names the file or folder and what was expected."""


class ImageDataset(torch.utils.data.Dataset):
    """Images of one domain with integer labels ``0..C-1``.

    Args:
        samples: (image path, label) pairs, labels in ``0..len(class_names)-1``.
        class_names: name of each label.
        transform: PIL image → float tensor [3, H, W] in [0, 1].
        skip_unreadable: check every file once now and drop (and count) the unreadable ones
            instead of failing when one is loaded.
        cache_decoded: keep decoded images in memory (uint8) after their first load; worth it for
            small images read many times (the embedded benchmark), not for large datasets.
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        class_names: Sequence[str],
        transform: Callable[[Image.Image], torch.Tensor],
        skip_unreadable: bool = False,
        cache_decoded: bool = False,
        name: str = "",
    ) -> None:
        self.name = name
        self.class_names = list(class_names)
        self.transform = transform
        self.cache_decoded = cache_decoded
        self._cache: dict[int, np.ndarray] = {}
        samples = [(Path(p), int(y)) for p, y in samples]
        if skip_unreadable:
            readable = [s for s in samples if _is_readable(s[0])]
            skipped = len(samples) - len(readable)
            if skipped:
                log.warning("%s: skipped %d unreadable image(s) of %d", name or "dataset", skipped, len(samples))
            samples = readable
        self.skipped = 0 if not skip_unreadable else skipped
        self.samples = samples
        self.targets = [y for _, y in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> Image.Image:
        """Decode image ``index`` as RGB; an unreadable file raises :class:`DataError` naming it."""
        if index in self._cache:
            return Image.fromarray(self._cache[index])
        path = self.samples[index][0]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(
                f"cannot read image {path}: {exc}. Remove or replace the file, or set "
                f"data.skip_unreadable=true to skip unreadable images (they are counted in the log)."
            ) from exc
        if self.cache_decoded:
            self._cache[index] = np.asarray(image)
        return image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.load_image(index)), self.samples[index][1]

    def indices_by_class(self) -> list[list[int]]:
        """Sample indices of each class, ordered by label."""
        out: list[list[int]] = [[] for _ in self.class_names]
        for i, y in enumerate(self.targets):
            out[y].append(i)
        return out

    @classmethod
    def from_folder(
        cls,
        root: str | Path,
        transform: Callable,
        classes: Sequence[str] | None = None,
        extensions: Sequence[str] = (".png", ".jpg", ".jpeg"),
        **kwargs,
    ) -> "ImageDataset":
        """One sub-folder per class under ``root``; ``classes`` restricts (and orders) the classes."""
        root = Path(root)
        if not root.is_dir():
            raise DataError(
                f"image folder {root} does not exist; expected a folder with one sub-folder of images per class"
            )
        available = sorted(p.name for p in root.iterdir() if p.is_dir())
        if classes is None:
            classes = available
        else:
            missing = [c for c in classes if c not in set(available)]
            if missing:
                raise DataError(
                    f"{root}: {len(missing)} class folder(s) named in the split are missing, e.g. {missing[:5]}"
                )
        exts = {e.lower() for e in extensions}
        samples = []
        for label, c in enumerate(classes):
            files = sorted(p for p in (root / c).iterdir() if p.is_file() and p.suffix.lower() in exts)
            samples += [(p, label) for p in files]
        if not classes or not samples:
            raise DataError(
                f"{root}: found no images ({', '.join(sorted(exts))}) in class sub-folders; expected "
                f"{root}/<class name>/<image file>"
            )
        return cls(samples, classes, transform, name=kwargs.pop("name", root.name), **kwargs)

    @classmethod
    def from_csv(
        cls,
        csv_path: str | Path,
        transform: Callable,
        classes: Sequence[str] | None = None,
        **kwargs,
    ) -> "ImageDataset":
        """A CSV with a header and columns ``path,label``; relative paths are relative to the CSV."""
        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise DataError(f"CSV file {csv_path} does not exist; expected a file with columns path,label")
        with csv_path.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
                raise DataError(
                    f"{csv_path}: header must contain columns 'path' and 'label', found {reader.fieldnames}"
                )
            rows = [(r["path"], r["label"]) for r in reader]
        if not rows:
            raise DataError(f"{csv_path}: no rows; expected one (image path, label) row per image")
        names = sorted({y for _, y in rows}) if classes is None else list(classes)
        index = {c: i for i, c in enumerate(names)}
        samples = []
        for p, y in rows:
            if y in index:
                path = Path(p)
                samples.append((path if path.is_absolute() else csv_path.parent / path, index[y]))
        if not samples:
            raise DataError(f"{csv_path}: none of its labels is among the requested classes {names[:5]}...")
        return cls(samples, names, transform, name=kwargs.pop("name", csv_path.stem), **kwargs)


def _is_readable(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.convert("RGB").load()
        return True
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


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


def build_transform(cfg: DataConfig, train: bool) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image → float tensor [3, size, size] in [0, 1].

    Train: RandomResizedCrop, optional horizontal flip, colour jitter (as PMF). Test: resize the
    shorter side to ``size * resize_ratio`` then centre-crop ``size``.
    """
    size = cfg.image_size
    if train:
        ops = [v2.RandomResizedCrop(size, scale=cfg.crop_scale, antialias=True)]
        if cfg.hflip:
            ops.append(v2.RandomHorizontalFlip())
        if cfg.color_jitter > 0:
            j = cfg.color_jitter
            ops.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    else:
        ops = [v2.Resize(round(size * cfg.resize_ratio), antialias=True), v2.CenterCrop(size)]
    return v2.Compose([v2.PILToTensor(), *ops, v2.ToDtype(torch.float32, scale=True)])


def load_domain(
    domain: DomainConfig, cfg: DataConfig, train: bool = False, split: str | None = None
) -> ImageDataset:
    """The dataset of ``domain`` restricted to one class split (``split`` overrides ``domain.split``)."""
    split = split if split is not None else domain.split
    if domain.format == "metadataset":  # converted Meta-Dataset TFRecords; the class splits are in its spec
        from amt.data.metadataset import load_metadataset_domain

        return load_metadataset_domain(domain.path, split or "test", build_transform(cfg, train), name=domain.name,
                                       cache_decoded=cfg.cache_decoded)
    classes = None
    if split is not None:
        if domain.splits is None:
            raise DataError(f"domain {domain.name!r} asks for split {split!r} but gives no splits file")
        splits = load_splits(domain.splits)
        if split not in splits:
            raise DataError(f"{domain.splits} has no split {split!r}; it has {sorted(splits)}")
        classes = splits[split]
    transform = build_transform(cfg, train)
    kwargs = dict(skip_unreadable=cfg.skip_unreadable, cache_decoded=cfg.cache_decoded, name=domain.name)
    if domain.format == "folder":
        return ImageDataset.from_folder(domain.path, transform, classes, cfg.extensions, **kwargs)
    if domain.format == "csv":
        return ImageDataset.from_csv(domain.path, transform, classes, **kwargs)
    raise DataError(f"domain {domain.name!r}: unknown format {domain.format!r}; use 'folder', 'csv' or 'metadataset'")


def check_domain(domain: DomainConfig, cfg: DataConfig, n_way: int = 5, n_shot: int = 5, n_query: int = 15) -> dict:
    """Validate a user's copy of one domain without stopping at the first problem (``amt data check``).

    Returns ``{"classes", "images", "per_class": {name: n}, "problems": [str, ...]}``: missing files,
    unreadable images (each named), classes too small for ``n_shot + n_query`` images, fewer than ``n_way``
    usable classes, and split entries without a class. Structural errors (no folder, bad CSV header,
    bad split file) raise :class:`DataError` as at load time.
    """
    problems: list[str] = []
    classes = None
    if domain.split is not None:
        if domain.splits is None:
            raise DataError(f"domain {domain.name!r} asks for split {domain.split!r} but gives no splits file")
        classes = load_splits(domain.splits).get(domain.split)
        if classes is None:
            raise DataError(f"{domain.splits} has no split {domain.split!r}")
    if domain.format == "folder":
        root = Path(domain.path)
        if classes is not None and root.is_dir():
            missing = [c for c in classes if not (root / c).is_dir()]
            problems += [f"class folder {root / c} named in split {domain.split!r} is missing" for c in missing]
            classes = [c for c in classes if c not in set(missing)]
        dataset = ImageDataset.from_folder(root, lambda im: im, classes, cfg.extensions, name=domain.name)
    elif domain.format == "csv":
        dataset = ImageDataset.from_csv(domain.path, lambda im: im, classes, name=domain.name)
    else:
        raise DataError(f"domain {domain.name!r}: unknown format {domain.format!r}; use 'folder' or 'csv'")
    readable = [False] * len(dataset)
    for i, (path, _) in enumerate(dataset.samples):
        if not path.is_file():
            problems.append(f"missing file {path}")
        elif not _is_readable(path):
            problems.append(f"unreadable image {path}")
        else:
            readable[i] = True
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
    return {"domain": domain.name, "classes": len(per_class), "images": int(sum(per_class.values())),
            "per_class": per_class, "problems": problems}
