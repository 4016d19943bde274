"""The image dataset of one domain, and the errors the data layer raises.

An :class:`ImageDataset` is built by the reader of its domain's on-disk format (:mod:`amt.data.readers`);
every image comes out as a float tensor [3, H, W] in [0, 1] (normalisation belongs to the model).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

Transform = Callable[[Image.Image], torch.Tensor]
"""PIL image → float tensor [3, H, W] in [0, 1] (:func:`amt.data.transforms.build_transform`)."""


class DataError(ValueError):
    """Bad input data; the message names the file or folder and what was expected."""


class MissingClassesError(DataError):
    """Classes named in a split are not in the data; ``missing`` and ``present`` list them in split order."""

    def __init__(self, message: str, missing: list[str], present: list[str]) -> None:
        super().__init__(message)
        self.missing, self.present = missing, present


class MissingSplitError(DataError):
    """The domain has no such class split: no splits file, no such key in it, or no classes in it."""


def is_readable(path: Path) -> bool:
    """True if ``path`` decodes as an image (the whole file is read)."""
    try:
        with Image.open(path) as im:
            im.convert("RGB").load()
        return True
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def read_rgb(path: str | Path, fix: str = "Remove or replace the file") -> Image.Image:
    """Decode the image file ``path`` as RGB; an unreadable file raises :class:`DataError` naming it and ``fix``."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}. {fix}") from exc


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
        name: the domain's name, for logs and errors.
    """

    # Classes per split ("train"/"val"/"test" → n) as the dataset itself defines them, and as its publisher
    # gives them; None where the dataset does not know (set by readers that read a split specification).
    classes_per_split: dict[str, int] | None = None
    published_classes_per_split: dict[str, int] | None = None

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        class_names: Sequence[str],
        transform: Transform,
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
        skipped = 0
        if skip_unreadable:
            readable = [s for s in samples if is_readable(s[0])]
            skipped = len(samples) - len(readable)
            if skipped:
                log.warning("%s: skipped %d unreadable image(s) of %d", name or "dataset", skipped, len(samples))
            samples = readable
        self.skipped = skipped
        self.samples = samples
        self.targets = [y for _, y in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> Image.Image:
        """Decode image ``index`` as RGB; an unreadable file raises :class:`DataError` naming it."""
        if index in self._cache:
            return Image.fromarray(self._cache[index])
        image = read_rgb(self.samples[index][0], "Remove or replace the file, or set data.skip_unreadable=true "
                         "to skip unreadable images (they are counted in the log).")
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

    def check_image(self, index: int) -> str | None:
        """Why image ``index`` cannot be loaded (``"missing file <path>"``, ``"unreadable image <path>"``),
        or None when it can; the whole file is decoded (``amt data check``)."""
        path = self.samples[index][0]
        if not path.is_file():
            return f"missing file {path}"
        if not is_readable(path):
            return f"unreadable image {path}"
        return None
