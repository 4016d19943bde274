"""Shared fixtures: tiny real image folders written to disk, tiny real timm ViTs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_image_folder(root: Path, n_classes: int, per_class: int | list[int], size: int = 16, seed: int = 0) -> Path:
    """Folder-per-class PNG dataset; class c's images are noisy copies of a class-specific colour."""
    rng = np.random.default_rng(seed)
    counts = per_class if isinstance(per_class, list) else [per_class] * n_classes
    for c in range(n_classes):
        d = root / f"class_{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, size=3)
        for i in range(counts[c]):
            px = np.clip(base + rng.normal(0, 20, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(d / f"{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "domain", n_classes=8, per_class=12)
