"""Image datasets of one domain, one reader per on-disk format, and class splits.

Formats (``DomainConfig.format``): ``folder`` (one sub-folder per class), ``csv`` (``path,label``),
``isic`` and ``chestx`` (the BSCD-FSL label tables as distributed), ``filelist`` (the FWT JSON file
lists of the fine-grained benchmarks) and ``metadataset`` (converted TFRecords, :mod:`amt.data.metadataset`).
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

ISIC_TABLE = "ISIC2018_Task3_Training_GroundTruth.csv"
ISIC_IMAGES = "ISIC2018_Task3_Training_Input"
CHESTX_TABLE = "Data_Entry_2017.csv"
CHESTX_CLASSES = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumothorax")
"""The BSCD-FSL ChestX classes, in label order (its loader drops "No Finding" and every other finding)."""


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
        classes = _requested_classes(sorted(p.name for p in root.iterdir() if p.is_dir()), classes, root)
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
        """A CSV with a header and columns ``path,label``; relative paths are relative to the CSV.

        Class names are the label values, sorted; ``classes`` restricts (and orders) them.
        """
        csv_path = Path(csv_path)
        _, rows = _read_table(csv_path, ("path", "label"), "a CSV file with header path,label, one row per image")
        names = sorted({r["label"] for _, r in rows})
        index = {c: i for i, c in enumerate(names)}
        samples = [(_resolve(r["path"], csv_path.parent), index[r["label"]]) for _, r in rows]
        samples, names = _restrict(samples, names, classes, csv_path)
        return cls(samples, names, transform, name=kwargs.pop("name", csv_path.stem), **kwargs)

    @classmethod
    def from_isic(
        cls,
        root: str | Path,
        transform: Callable,
        classes: Sequence[str] | None = None,
        **kwargs,
    ) -> "ImageDataset":
        """ISIC 2018 Task 3 (BSCD-FSL) as distributed, under ``root``.

        ``ISIC2018_Task3_Training_GroundTruth.csv`` (in ``root`` or in the zip's folder of the same
        name) has header ``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC`` and one one-hot row per image (``1.0``
        in the image's diagnosis column, ``0.0`` elsewhere); images are
        ``ISIC2018_Task3_Training_Input/<image>.jpg``. Class names are the diagnosis columns in header
        order. A row that is not exactly one-hot raises :class:`DataError` naming the file and line.
        """
        root = Path(root)
        layout = (f"{root}/{ISIC_TABLE} (header image,MEL,NV,BCC,AKIEC,BKL,DF,VASC, one-hot rows) and "
                  f"{root}/{ISIC_IMAGES}/<image>.jpg")
        candidates = (root / ISIC_TABLE, root / ISIC_TABLE.removesuffix(".csv") / ISIC_TABLE)
        table = next((p for p in candidates if p.is_file()), candidates[0])
        header, rows = _read_table(table, ("image",), layout)
        names = [c for c in header if c != "image"]
        samples = [(root / ISIC_IMAGES / f"{r['image']}.jpg", _one_hot(r, names, f"{table} line {line}"))
                   for line, r in rows]
        samples, names = _restrict(samples, names, classes, table)
        return cls(samples, names, transform, name=kwargs.pop("name", root.name), **kwargs)

    @classmethod
    def from_chestx(
        cls,
        root: str | Path,
        transform: Callable,
        classes: Sequence[str] | None = None,
        **kwargs,
    ) -> "ImageDataset":
        """NIH ChestX-ray14 as BSCD-FSL uses it, under ``root``.

        ``Data_Entry_2017.csv`` names each image (``Image Index``) and its findings (``Finding Labels``,
        ``|``-joined); images are ``images/<Image Index>``. Only images with exactly one finding among
        :data:`CHESTX_CLASSES` are kept (no multi-label, "No Finding" or other findings), labelled in
        that class order. The greyscale images are converted to RGB when loaded.
        """
        root = Path(root)
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
        samples, names = _restrict(samples, CHESTX_CLASSES, classes, table)
        return cls(samples, names, transform, name=kwargs.pop("name", root.name), **kwargs)

    @classmethod
    def from_filelist(
        cls,
        json_path: str | Path,
        transform: Callable,
        classes: Sequence[str] | None = None,
        **kwargs,
    ) -> "ImageDataset":
        """An FWT (Tseng et al., 2020) file list such as ``filelists/cub/novel.json``.

        The JSON holds ``image_names`` (paths; relative ones resolve against the JSON's folder),
        ``image_labels`` (one int per image) and optionally ``label_names`` (indexed by label). The
        labels that occur, in sorted order, become ``0..C-1`` (novel classes are often a noncontiguous
        subset such as 100..199); their names are ``label_names[label]``, or ``str(label)`` without it.
        """
        json_path = Path(json_path)
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
        samples = [(_resolve(p, json_path.parent), index[y]) for p, y in zip(paths, labels)]
        samples, names = _restrict(samples, names, classes, json_path)
        return cls(samples, names, transform, name=kwargs.pop("name", json_path.parent.name), **kwargs)


class MissingClassesError(DataError):
    """Classes named in a split are not in the data; ``missing`` and ``present`` list them in split order."""

    def __init__(self, message: str, missing: list[str], present: list[str]) -> None:
        super().__init__(message)
        self.missing, self.present = missing, present


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


_READERS: dict[str, Callable[..., ImageDataset]] = {
    "folder": ImageDataset.from_folder,
    "csv": ImageDataset.from_csv,
    "isic": ImageDataset.from_isic,
    "chestx": ImageDataset.from_chestx,
    "filelist": ImageDataset.from_filelist,
}
FORMATS = (*_READERS, "metadataset")
"""Every value ``DomainConfig.format`` accepts."""


def _open_domain(
    domain: DomainConfig,
    cfg: DataConfig,
    transform: Callable,
    split: str | None,
    classes: Sequence[str] | None = None,
    **kwargs,
) -> ImageDataset:
    """``domain`` read by the reader of its format: the one dispatch behind :func:`load_domain` and
    :func:`check_domain`. ``classes`` (if given) replaces the class list of ``split``; ``kwargs`` go
    to the :class:`ImageDataset` constructor."""
    if domain.format == "metadataset":  # converted Meta-Dataset TFRecords; the class splits are in its spec
        from amt.data.metadataset import load_metadataset_domain

        return load_metadataset_domain(domain.path, split or "test", transform, name=domain.name,
                                       cache_decoded=kwargs.get("cache_decoded", False))
    reader = _READERS.get(domain.format)
    if reader is None:
        raise DataError(f"domain {domain.name!r}: unknown format {domain.format!r}; use one of {', '.join(FORMATS)}")
    if classes is None and split is not None:
        if domain.splits is None:
            raise DataError(f"domain {domain.name!r} asks for split {split!r} but gives no splits file; "
                            f"set `splits` to a class-split JSON or `split` to null")
        splits = load_splits(domain.splits)
        if split not in splits:
            raise DataError(f"{domain.splits} has no split {split!r}; it has {sorted(splits)}")
        classes = splits[split]
    if domain.format == "folder":
        kwargs["extensions"] = cfg.extensions
    return reader(domain.path, transform, classes, name=domain.name, **kwargs)


def load_domain(
    domain: DomainConfig, cfg: DataConfig, train: bool = False, split: str | None = None
) -> ImageDataset:
    """The dataset of ``domain`` restricted to one class split (``split`` overrides ``domain.split``)."""
    split = split if split is not None else domain.split
    return _open_domain(domain, cfg, build_transform(cfg, train), split,
                        skip_unreadable=cfg.skip_unreadable, cache_decoded=cfg.cache_decoded)


def _identity(image: Image.Image) -> Image.Image:
    return image


def check_domain(domain: DomainConfig, cfg: DataConfig, n_way: int = 5, n_shot: int = 5, n_query: int = 15) -> dict:
    """Validate a user's copy of one domain without stopping at the first problem (``amt data check``).

    Returns ``{"domain", "classes", "images", "per_class": {name: n}, "problems": [str, ...]}``: split
    classes absent from the data, missing files, unreadable images (each named), classes too small for
    ``n_shot + n_query`` images, fewer than ``n_way`` usable classes. Structural errors (no folder, bad
    table or file list, bad split file) raise :class:`DataError` as at load time. ``metadataset`` records
    are counted as the reader finds them (it has already checked that every class file is there).
    """
    problems: list[str] = []
    try:
        dataset = _open_domain(domain, cfg, _identity, domain.split)
    except MissingClassesError as exc:
        if not exc.present:
            raise
        problems += [f"class {c!r} named in split {domain.split!r} is not in {domain.path}" for c in exc.missing]
        dataset = _open_domain(domain, cfg, _identity, domain.split, classes=exc.present)
    readable = [True] * len(dataset)
    if domain.format != "metadataset":  # its samples are (class file, label): nothing to open per image
        for i, (path, _) in enumerate(dataset.samples):
            if not path.is_file():
                problems.append(f"missing file {path}")
                readable[i] = False
            elif not _is_readable(path):
                problems.append(f"unreadable image {path}")
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
    return {"domain": domain.name, "classes": len(per_class), "images": int(sum(per_class.values())),
            "per_class": per_class, "problems": problems}
